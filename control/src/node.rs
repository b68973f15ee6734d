//! One siptg process's roles, gathered for `/status` and `/metrics`.

use crate::link::Role;
use crate::manager::Manager;
use crate::metrics::{Gauge, Metrics};
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
                // What the gateways with plan limits have used (talk time this month, failed
                // calls within the hour).
                let usage: serde_json::Map<String, Value> = m
                    .routing()
                    .gateways()
                    .iter()
                    .filter(|g| !g.monthly_duration.is_zero() || g.failed_calls_per_hour > 0)
                    .map(|g| {
                        let u = m.routing().usage(&g.name);
                        let v = json!({
                            "month": u.month,
                            "talk_ms": u.talk_ms,
                            "monthly_ms": g.monthly_duration.as_millis() as u64,
                            "failed_last_hour": u.failed.len(),
                            "failed_calls_per_hour": g.failed_calls_per_hour,
                        });
                        (g.name.clone(), v)
                    })
                    .collect();
                let mut v = json!({ "peers": m.peer_status(), "usage": usage });
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
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut g: Vec<Gauge> = Vec::new();
        for role in self.roles() {
            g.push(Gauge::new(
                "siptg_role_up",
                &[("role", role.to_string())],
                1.0,
            ));
        }
        g.push(Gauge::new(
            "siptg_uptime_seconds",
            &[],
            self.started.elapsed().as_secs_f64(),
        ));
        if let Some(m) = &self.manager {
            for p in m.peer_status() {
                let role = p.role.map(|r| r.to_string()).unwrap_or_default();
                g.push(Gauge::new(
                    "siptg_link_up",
                    &[("peer", p.name.clone()), ("role", role)],
                    flag(p.state == "up"),
                ));
            }
        }
        if let Some(w) = &self.worker {
            g.push(Gauge::new(
                "siptg_manager_link_up",
                &[("node", w.name().to_string())],
                flag(w.links().manager().is_some()),
            ));
            for (connection, up) in w.peers_up() {
                g.push(Gauge::new(
                    "siptg_sip_peer_up",
                    &[("connection", connection)],
                    flag(up),
                ));
            }
            let sup = w.dataplane().status();
            g.push(Gauge::new(
                "siptg_dataplane_connected",
                &[],
                flag(sup.connected),
            ));
            g.push(Gauge::new(
                "siptg_dataplane_tracked_sessions",
                &[],
                sup.tracked_sessions as f64,
            ));
            let status = match w.dataplane().client() {
                Some(c) => c.status().await.ok(),
                None => None,
            };
            let shards = status.map(|s| s.shards).unwrap_or_default();
            type Field = fn(&siptg_proto::ShardStatus) -> f64;
            let fields: [(&str, Field); 8] = [
                ("siptg_dataplane_shard_running", |s| {
                    f64::from(u8::from(s.running))
                }),
                ("siptg_dataplane_sessions", |s| s.sessions as f64),
                ("siptg_dataplane_legs", |s| s.legs as f64),
                ("siptg_dataplane_ports_free", |s| s.ports_free as f64),
                ("siptg_dataplane_dropped_malformed", |s| {
                    s.dropped_malformed as f64
                }),
                ("siptg_dataplane_dropped_foreign", |s| {
                    s.dropped_foreign as f64
                }),
                ("siptg_dataplane_dropped_srtp", |s| s.dropped_srtp as f64),
                ("siptg_dataplane_packets_relayed", |s| {
                    s.packets_relayed as f64
                }),
            ];
            for (name, field) in fields {
                for s in &shards {
                    g.push(Gauge::new(name, &[("core", s.core.to_string())], field(s)));
                }
            }
        }
        if let Some(s) = &self.storage {
            if let Ok(n) = s.store().count_sessions().await {
                g.push(Gauge::new("siptg_storage_telegram_sessions", &[], n as f64));
            }
        }
        self.metrics.render(&g)
    }
}
