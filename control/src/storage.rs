//! The Session Storage role: keeps Telegram accounts' MTProto sessions in the database and
//! answers its Manager over a link.

use crate::config::{StorageConfig, TelegramBackend, TelegramConfig};
use crate::link::{self, Handler, Role};
use crate::linkserver::LinkServer;
use crate::store::Store;
use serde_json::json;
use std::sync::Arc;

/// A running Session Storage.
pub struct Storage {
    cfg: StorageConfig,
    telegram: TelegramConfig,
    links: Arc<LinkServer>,
    store: Store,
}

impl Storage {
    /// A Storage over an open database.
    pub fn new(
        cfg: StorageConfig,
        telegram: TelegramConfig,
        links: Arc<LinkServer>,
        store: Store,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            telegram,
            links,
            store,
        })
    }

    /// The Storage's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Where Manager links arrive.
    pub fn links(&self) -> &Arc<LinkServer> {
        &self.links
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Answers the Manager's requests.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let me = self.clone();
        link::status_handler(Role::Storage, move || {
            let me = me.clone();
            async move { me.status().await }
        })
    }

    /// The Storage's part of `siptg status`.
    pub async fn status(&self) -> serde_json::Value {
        let sessions = match self.store.count_sessions().await {
            Ok(n) => json!(n),
            Err(e) => json!({"error": e.to_string()}),
        };
        json!({
            "name": self.cfg.name,
            "database": self.store.backend(),
            "telegram_sessions": sessions,
            "telegram_backend": match self.telegram.backend {
                TelegramBackend::Sim => "sim",
                TelegramBackend::Mtproto => "mtproto",
            },
            "manager_links": self.links.status(),
        })
    }
}
