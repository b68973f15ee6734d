//! The Session Storage role: keeps Telegram accounts' MTProto sessions (sealed) in the
//! database, keeps each account connected, answers its Manager's allow-listed Telegram requests
//! over the link and forwards the accounts' allowed updates to it. Auth keys never leave it.

use crate::config::{Config, StorageConfig, TelegramBackend, TelegramConfig, STORAGE_KEY_ENV};
use crate::link::{Handler, Request, Response, Role, TelegramAnswer, TelegramOp};
use crate::linkserver::LinkServer;
use crate::store::Store;
use crate::telegram::account::AccountOptions;
use crate::telegram::accounts::{Accounts, Cloud};
use crate::telegram::resolve;
use crate::telegram::sealed::StorageKey;
use crate::telegram::TgError;
use base64::Engine;
use grammers_tl_types::Serializable;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A running Session Storage.
pub struct Storage {
    cfg: StorageConfig,
    telegram: TelegramConfig,
    links: Arc<LinkServer>,
    store: Store,
    accounts: Arc<Accounts>,
}

/// How an account reaches Telegram under this configuration.
pub fn cloud_of(t: &TelegramConfig) -> Cloud {
    match t.backend {
        TelegramBackend::Sim => Cloud::Sim(t.sim_address),
        TelegramBackend::Mtproto => Cloud::Telegram,
    }
}

/// The accounts of a configuration (used by the role and by `siptg storage login`).
pub fn open_accounts(
    config: &Config,
    storage: &StorageConfig,
    base: &Path,
    store: Store,
) -> Result<Arc<Accounts>, TgError> {
    let key_file = crate::config::resolve(base, &storage.key_file);
    let key = StorageKey::load(STORAGE_KEY_ENV, &key_file, true)
        .map_err(|e| TgError::store(e.to_string()))?;
    let opts = AccountOptions {
        api_id: config
            .telegram
            .api_id
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(0),
        api_hash: config.telegram.api_hash.clone().unwrap_or_default(),
        rpc_timeout: storage.rpc_timeout,
        peer_flood_hold: storage.peer_flood_hold,
    };
    Ok(Accounts::new(
        store,
        key,
        cloud_of(&config.telegram),
        opts,
        storage.hygiene.clone(),
    ))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Storage {
    /// A Storage over an open database; reconnects every logged-in account in the background
    /// and forwards their updates to the Manager.
    pub fn start(
        cfg: StorageConfig,
        telegram: TelegramConfig,
        links: Arc<LinkServer>,
        store: Store,
        accounts: Arc<Accounts>,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            cfg,
            telegram,
            links,
            store,
            accounts,
        });
        let accounts = me.accounts.clone();
        tokio::spawn(async move {
            match accounts.start_all().await {
                Ok(list) => {
                    for r in list {
                        tracing::info!(account = %r.name, state = ?r.state, "Telegram account");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot load Telegram accounts"),
            }
        });
        let weak = Arc::downgrade(&me);
        let mut rx = me.accounts.subscribe();
        tokio::spawn(async move {
            loop {
                let u = match rx.recv().await {
                    Ok(u) => u,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            lost = n,
                            "Telegram updates dropped: the Manager is too slow"
                        );
                        continue;
                    }
                    Err(_) => break,
                };
                let Some(me) = weak.upgrade() else { break };
                let Some(manager) = me.links.manager() else {
                    tracing::debug!(account = %u.account, "no Manager linked; update not forwarded");
                    continue;
                };
                let req = Request::TelegramUpdate {
                    account: u.account,
                    update: b64().encode(u.update.to_bytes()),
                };
                tokio::spawn(async move {
                    if let Err(e) = manager.request(req, Duration::from_secs(5)).await {
                        tracing::warn!(error = %e, "Telegram update not delivered to the Manager");
                    }
                });
            }
        });
        me
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

    /// The accounts.
    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    /// Answers the Manager's (and Workers') requests.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let me = self.clone();
        Arc::new(move |req| {
            let me = me.clone();
            Box::pin(async move {
                match req {
                    Request::Status => Response::Status {
                        status: me.status().await,
                    },
                    Request::Telegram(r) => Response::Telegram {
                        result: me.telegram(&r.account, r.op).await,
                    },
                    other => Response::Error {
                        message: format!("a {} does not answer {other:?}", Role::Storage),
                    },
                }
            })
        })
    }

    /// One Telegram request for `account`.
    pub async fn telegram(&self, account: &str, op: TelegramOp) -> Result<TelegramAnswer, TgError> {
        match op {
            TelegramOp::Accounts => Ok(TelegramAnswer::Accounts {
                accounts: self.accounts.list().await?,
            }),
            TelegramOp::Invoke { body } => {
                let a = self.accounts.get(account)?;
                let body = b64()
                    .decode(body.as_bytes())
                    .map_err(|e| TgError::Invalid {
                        what: "request body".into(),
                        why: e.to_string(),
                    })?;
                let answer = a.invoke_allowed(body).await?;
                Ok(TelegramAnswer::Invoked {
                    body: b64().encode(answer),
                })
            }
            TelegramOp::Resolve { query } => {
                let a = self.accounts.get(account)?;
                let (peer, source) = resolve::resolve(&a, &self.store, &query).await?;
                Ok(TelegramAnswer::Peer {
                    peer,
                    cached: source == resolve::Source::Cache,
                })
            }
        }
    }

    /// The Storage's part of `siptg status`.
    pub async fn status(&self) -> serde_json::Value {
        let accounts = match self.accounts.list().await {
            Ok(list) => list
                .iter()
                .map(|r| {
                    let waits = self
                        .accounts
                        .get(&r.name)
                        .map(|a| a.flood_waits())
                        .unwrap_or_default();
                    json!({
                        "name": r.name,
                        "state": r.state,
                        "user_id": r.me.as_ref().map(|m| m.user_id),
                        "username": r.me.as_ref().and_then(|m| m.username.clone()),
                        "phone": r.phone,
                        "connected": self.accounts.get(&r.name).is_ok(),
                        "flood_waits": waits,
                    })
                })
                .collect::<Vec<_>>(),
            Err(e) => vec![json!({"error": e.to_string()})],
        };
        json!({
            "name": self.cfg.name,
            "database": self.store.backend(),
            "telegram_backend": match self.telegram.backend {
                TelegramBackend::Sim => format!("sim ({})", self.telegram.sim_address),
                TelegramBackend::Mtproto => "mtproto".to_string(),
            },
            "accounts": accounts,
            "manager_links": self.links.status(),
        })
    }
}
