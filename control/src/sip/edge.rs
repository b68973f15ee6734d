//! UDP SIP listeners of a Worker. Each request is parsed, handed to a [`Responder`] (the Worker,
//! which consults its Manager), and answered from the socket it arrived on, to the source
//! address and — with `rport` (RFC 3581) — the source port, else the Via's sent-by port.

use super::message::{parse_request, response, response_target, Request};
use crate::metrics::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::UdpSocket;

/// Largest SIP datagram accepted (RFC 3261 allows up to 65,535; real ones are far smaller).
const MAX_DATAGRAM: usize = 65_535;
/// Requests being answered at once per listener; beyond it requests get an immediate 503, so a
/// flood cannot pile up tasks waiting on the Manager.
const MAX_IN_FLIGHT: usize = 4096;

/// Methods counted by name in metrics; anything else is `other` (the label comes off the wire).
const KNOWN_METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "UPDATE",
    "PRACK",
    "MESSAGE",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "PUBLISH",
];

fn method_label(method: &str) -> &str {
    KNOWN_METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("other")
}

/// A To-tag that is the same for every retransmission of a request (RFC 3261 §8.2.6.2 wants
/// one tag per dialog-forming response; deriving it avoids keeping transaction state here).
fn stable_tag(req: &Request) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for name in ["Call-ID", "From", "CSeq"] {
        req.header(name).unwrap_or("").hash(&mut h);
    }
    format!("{:08x}", h.finish() as u32)
}

/// A final answer to a request: status code and reason phrase; `None` sends nothing (ACK).
pub type Answer = Option<Reply>;

/// A final response: status, SIP.TG's reason phrase, and headers it must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// A response without extra headers.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Reply {
            code,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }
}

/// Decides how to answer a request.
pub trait Responder: Send + Sync + 'static {
    /// Answers one request from `source`.
    fn answer(
        &self,
        req: Request,
        source: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>>;
}

/// Binds a UDP listener; fails with the address in the message.
pub async fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for SIP on udp:{addr}: {e}"),
        )
    })
}

/// Serves one UDP socket forever.
pub async fn serve_udp(
    sock: Arc<UdpSocket>,
    responder: Arc<dyn Responder>,
    server: String,
    metrics: Arc<Metrics>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let (n, source) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "SIP receive error");
                continue;
            }
        };
        let data = &buf[..n];
        // Keepalive CRLFs (RFC 5626) and stray bytes.
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let req = match parse_request(data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%source, error = %e, "unparseable SIP datagram dropped");
                metrics.inc("siptg_sip_malformed_total", &[]);
                continue;
            }
        };
        metrics.inc(
            "siptg_sip_requests_total",
            &[("method", method_label(&req.method))],
        );
        let target = response_target(&req, source);
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            if req.method != "ACK" {
                let busy = response(
                    &req,
                    503,
                    "Service Unavailable",
                    source,
                    &stable_tag(&req),
                    &server,
                    &[("Retry-After", "5")],
                );
                let _ = sock.send_to(busy.as_bytes(), target).await;
                metrics.inc("siptg_sip_overload_total", &[]);
            }
            continue;
        };
        let sock = sock.clone();
        let responder = responder.clone();
        let server = server.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tag = stable_tag(&req);
            if req.method == "INVITE" {
                // Stops INVITE retransmissions while the Manager is consulted.
                let trying = response(&req, 100, "Trying", source, &tag, &server, &[]);
                let _ = sock.send_to(trying.as_bytes(), target).await;
            }
            let method = req.method.clone();
            let call_id = req.header("Call-ID").unwrap_or("").to_string();
            let Some(Reply {
                code,
                reason,
                headers,
            }) = responder.answer(req.clone(), source).await
            else {
                return;
            };
            let mut extra: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            if method == "OPTIONS" && code == 200 {
                extra.push((
                    "Allow",
                    "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE, PRACK, MESSAGE",
                ));
            }
            let text = response(&req, code, &reason, source, &tag, &server, &extra);
            tracing::info!(%source, %method, %call_id, code, %reason, "SIP response");
            metrics.inc("siptg_sip_responses_total", &[("code", &code.to_string())]);
            if let Err(e) = sock.send_to(text.as_bytes(), target).await {
                tracing::warn!(%target, error = %e, "cannot send SIP response");
            }
        });
    }
}
