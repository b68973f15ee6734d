//! The Worker role: the SIP edge facing the PBX and the owner of the dataplane connection.
//!
//! Routing decisions belong to the Manager. A Worker without a live Manager link still answers
//! every SIP request, with `503 No response from Manager`, until the link is back (as SIP.TG's
//! Worker does), so a PBX fails over instead of timing out.

use crate::config::{SipConfig, WorkerConfig};
use crate::dataplane::Supervisor;
use crate::link::{
    self, Handler, Request as LinkRequest, Response as LinkResponse, Role, RouteQuery,
};
use crate::linkserver::LinkServer;
use crate::metrics::Metrics;
use crate::sip::ban::{BanConfig, BanList};
use crate::sip::edge::{self, Answer, Reply, Responder};
use crate::sip::message::{uri_user, Request};
use crate::sip::reasons;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// A running Worker.
pub struct Worker {
    cfg: WorkerConfig,
    links: Arc<LinkServer>,
    dataplane: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    sip_listen: std::sync::Mutex<Vec<String>>,
    /// Brute-force protection: addresses that failed to register too often are ignored.
    bans: std::sync::Mutex<BanList>,
}

impl Worker {
    /// A Worker whose Manager links arrive through `links` and whose media goes to `dataplane`.
    pub fn new(
        cfg: WorkerConfig,
        links: Arc<LinkServer>,
        dataplane: Arc<Supervisor>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            links,
            dataplane,
            metrics,
            sip_listen: std::sync::Mutex::new(Vec::new()),
            bans: std::sync::Mutex::new(BanList::new(BanConfig::default())),
        })
    }

    /// The Worker's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Where Manager links arrive.
    pub fn links(&self) -> &Arc<LinkServer> {
        &self.links
    }

    /// The dataplane supervisor.
    pub fn dataplane(&self) -> &Arc<Supervisor> {
        &self.dataplane
    }

    /// Answers the Manager's requests on a link.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let me = self.clone();
        link::status_handler(Role::Worker, move || {
            let me = me.clone();
            async move { me.status().await }
        })
    }

    /// Binds every SIP listener and serves them.
    pub async fn start_sip(self: &Arc<Self>, sip: &SipConfig) -> std::io::Result<()> {
        for l in &sip.listen {
            let sock = Arc::new(edge::bind_udp(l.addr).await?);
            let bound = sock.local_addr().unwrap_or(l.addr);
            tracing::info!(listen = %format!("udp:{bound}"), "SIP listening");
            self.sip_listen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("udp:{bound}"));
            tokio::spawn(edge::serve_udp(
                sock,
                self.clone() as Arc<dyn Responder>,
                sip.user_agent.clone(),
                self.metrics.clone(),
            ));
        }
        Ok(())
    }

    /// The Worker's part of `siptg status`.
    pub async fn status(&self) -> serde_json::Value {
        let dp = self.dataplane.status();
        let shards = match self.dataplane.client() {
            Some(c) => match c.status().await {
                Ok(s) => {
                    json!({"pid": s.pid, "driver": s.driver, "uptime_ms": s.uptime_ms, "shards": s.shards})
                }
                Err(e) => json!({"error": e.to_string()}),
            },
            None => json!(null),
        };
        json!({
            "name": self.cfg.name,
            "manager_links": self.links.status(),
            "sip_listen": *self.sip_listen.lock().unwrap_or_else(|p| p.into_inner()),
            "dataplane": { "supervisor": dp, "process": shards },
        })
    }

    fn bans(&self) -> std::sync::MutexGuard<'_, BanList> {
        self.bans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current bans, for the admin API.
    pub fn ban_list(&self) -> Vec<crate::sip::ban::BanInfo> {
        self.bans().list(std::time::Instant::now())
    }

    /// Lifts the ban of `ip`; false if it was not banned.
    pub fn lift_ban(&self, ip: std::net::IpAddr) -> bool {
        self.bans().lift(ip)
    }

    async fn route(&self, req: &Request, source: SocketAddr) -> Reply {
        let no_manager = Reply::new(503, reasons::NO_RESPONSE_FROM_MANAGER);
        let Some(manager) = self.links.manager() else {
            return no_manager;
        };
        if req.method == "OPTIONS" {
            return Reply::new(200, "OK");
        }
        let query = RouteQuery {
            method: req.method.clone(),
            request_uri: req.uri.clone(),
            from_user: req.header("From").and_then(uri_user),
            to_user: req.header("To").and_then(uri_user),
            source,
            authorization: req.header("Authorization").map(str::to_string),
            contact: req.header("Contact").map(str::to_string),
            expires: req.header("Expires").and_then(|e| e.trim().parse().ok()),
        };
        match manager
            .request(LinkRequest::Route(query), self.cfg.manager_timeout)
            .await
        {
            Ok(LinkResponse::Route {
                code,
                reason,
                headers,
            }) => Reply {
                code,
                reason,
                headers,
            },
            Ok(other) => {
                tracing::warn!(?other, "Manager answered a route query with something else");
                no_manager
            }
            Err(e) => {
                tracing::warn!(error = %e, "Manager did not answer a route query");
                no_manager
            }
        }
    }
}

impl Responder for Worker {
    fn answer(
        &self,
        req: Request,
        source: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
        Box::pin(async move {
            if req.method == "ACK" {
                return None;
            }
            let now = std::time::Instant::now();
            let banned = self.bans().is_banned(source.ip(), now);
            if let Some(left) = banned {
                // Like a firewall ban: no answer at all, so a scanner learns nothing.
                tracing::debug!(%source, left_s = left.as_secs(), "request from a banned address dropped");
                self.metrics.inc("siptg_sip_banned_drops_total", &[]);
                return None;
            }
            let reply = self.route(&req, source).await;
            if req.method == "REGISTER" {
                let failed = matches!(reply.code, 403 | 404);
                let mut bans = self.bans();
                if failed {
                    if let Some(ban) = bans.record_failure(source.ip(), now) {
                        tracing::warn!(%source, ban_s = ban.duration.as_secs(), "too many failed registrations; address banned");
                        self.metrics.inc("siptg_sip_bans_total", &[]);
                    }
                } else if reply.code == 200 {
                    bans.record_success(source.ip());
                }
            }
            Some(reply)
        })
    }
}
