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
use crate::sip::edge::{self, Answer, Responder};
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

    async fn route(&self, req: &Request, source: SocketAddr) -> (u16, String) {
        let no_manager = (503, reasons::NO_RESPONSE_FROM_MANAGER.to_string());
        let Some(manager) = self.links.manager() else {
            return no_manager;
        };
        if req.method == "OPTIONS" {
            return (200, "OK".into());
        }
        let query = RouteQuery {
            method: req.method.clone(),
            request_uri: req.uri.clone(),
            from_user: req.header("From").and_then(uri_user),
            to_user: req.header("To").and_then(uri_user),
            source,
        };
        match manager
            .request(LinkRequest::Route(query), self.cfg.manager_timeout)
            .await
        {
            Ok(LinkResponse::Route { code, reason }) => (code, reason),
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
            Some(self.route(&req, source).await)
        })
    }
}
