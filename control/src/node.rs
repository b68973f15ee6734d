//! One siptg process's roles, gathered for `/status` and `/metrics`.

use crate::link::Role;
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::worker::Worker;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// The roles running in this process.
pub struct Node {
    pub started: Instant,
    pub config_source: String,
    pub manager: Option<Arc<Manager>>,
    pub worker: Option<Arc<Worker>>,
    pub storage: Option<Arc<Storage>>,
    pub metrics: Arc<Metrics>,
}

impl Node {
    /// Roles present.
    pub fn roles(&self) -> Vec<Role> {
        let mut r = Vec::new();
        if self.manager.is_some() {
            r.push(Role::Manager);
        }
        if self.worker.is_some() {
            r.push(Role::Worker);
        }
        if self.storage.is_some() {
            r.push(Role::Storage);
        }
        r
    }

    /// Everything `siptg status` shows, as JSON.
    pub async fn status(&self) -> Value {
        let manager = match &self.manager {
            Some(m) => {
                let mut v = json!({ "peers": m.peer_status() });
                // A Manager on its own host shows what its peers report about themselves.
                if self.worker.is_none() && self.storage.is_none() {
                    v["remote"] = json!(m.remote_status().await);
                }
                v
            }
            None => Value::Null,
        };
        let worker = match &self.worker {
            Some(w) => w.status().await,
            None => Value::Null,
        };
        let storage = match &self.storage {
            Some(s) => s.status().await,
            None => Value::Null,
        };
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "config": self.config_source,
            "uptime_s": self.started.elapsed().as_secs(),
            "roles": self.roles(),
            "manager": manager,
            "worker": worker,
            "storage": storage,
        })
    }

    /// Prometheus text: counters plus gauges read now.
    pub async fn metrics_text(&self) -> String {
        let mut g: Vec<(String, Vec<(String, String)>, f64)> = Vec::new();
        let l = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
        };
        for role in self.roles() {
            g.push(("siptg_role_up".into(), l(&[("role", role.to_string())]), 1.0));
        }
        g.push((
            "siptg_uptime_seconds".into(),
            vec![],
            self.started.elapsed().as_secs_f64(),
        ));
        if let Some(m) = &self.manager {
            for p in m.peer_status() {
                let role = p.role.map(|r| r.to_string()).unwrap_or_default();
                let up = if p.state == "up" { 1.0 } else { 0.0 };
                g.push(("siptg_link_up".into(), l(&[("peer", p.name.clone()), ("role", role)]), up));
            }
        }
        if let Some(w) = &self.worker {
            g.push((
                "siptg_manager_link_up".into(),
                l(&[("node", w.name().to_string())]),
                if w.links().manager().is_some() { 1.0 } else { 0.0 },
            ));
            let sup = w.dataplane().status();
            g.push((
                "siptg_dataplane_connected".into(),
                vec![],
                if sup.connected { 1.0 } else { 0.0 },
            ));
            g.push(("siptg_dataplane_tracked_sessions".into(), vec![], sup.tracked_sessions as f64));
            if let Some(status) = match w.dataplane().client() {
                Some(c) => c.status().await.ok(),
                None => None,
            } {
                for (name, f) in [
                    ("siptg_dataplane_shard_running", 0),
                    ("siptg_dataplane_sessions", 1),
                    ("siptg_dataplane_legs", 2),
                    ("siptg_dataplane_ports_free", 3),
                    ("siptg_dataplane_packets_relayed", 4),
                ] {
                    for s in &status.shards {
                        let v = match f {
                            0 => f64::from(u8::from(s.running)),
                            1 => s.sessions as f64,
                            2 => s.legs as f64,
                            3 => s.ports_free as f64,
                            _ => s.packets_relayed as f64,
                        };
                        g.push((name.into(), l(&[("core", s.core.to_string())]), v));
                    }
                }
            }
        }
        if let Some(s) = &self.storage {
            if let Ok(n) = s.store().count_sessions().await {
                g.push(("siptg_storage_telegram_sessions".into(), vec![], n as f64));
            }
        }
        self.metrics.render(&g)
    }
}
