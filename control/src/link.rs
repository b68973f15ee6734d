//! Links between Manager and Workers/Storages: a versioned handshake, heartbeats, and requests in
//! both directions, as length-prefixed JSON frames over any byte stream.
//!
//! Between hosts the stream is mutual TLS (see [`crate::tls`]); inside `siptg up` it is an
//! in-process duplex pipe. The protocol is the same either way, so `up` exercises the same code.
//!
//! The Manager is the client (it dials, as in SIP.TG); it sends a heartbeat every interval and
//! the server acknowledges. Either side declares the link dead after `timeout` of silence.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

/// Link protocol version; the major number must match. 2: `IncomingCall` carries the hunting
/// rungs, Workers report `CallEnded` (a version-1 peer is refused at the handshake rather than
/// failing calls). 3: `CallAnswered`/`TalkBudget` (plan limits) and `GatewayMessage` (a
/// Telegram user's text for the PBX): an older Worker could not decode them and would drop
/// the link at the first one, so it is refused at the handshake instead. 4: `Connections`
/// (the control API's SIP connections a Worker runs).
pub const LINK_VERSION: u16 = 4;
const LINK_MAGIC: &str = "siptg-link";
const MAX_FRAME: usize = 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The three kinds of node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
    Storage,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
            Role::Storage => "storage",
        })
    }
}

/// Frames on a link.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Hello {
        magic: String,
        version: u16,
        role: Role,
        name: String,
        heartbeat_ms: u64,
    },
    Welcome {
        version: u16,
        role: Role,
        name: String,
    },
    Refused {
        reason: String,
    },
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        body: Response,
    },
}

/// Questions one node asks another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Worker → Manager: how to answer a SIP request (the Manager owns routing).
    Route(Box<RouteQuery>),
    /// Manager → Worker/Storage: the node's status, for `siptg status`.
    Status,
    /// Manager or Worker → Storage: a Telegram request for one account (allow-listed there).
    Telegram(Box<TelegramRequest>),
    /// Storage → Manager, Manager → Workers: an update from one of a Storage's accounts
    /// (already filtered by the Storage's update allow-list); `update` is the TL `Update`,
    /// base64.
    TelegramUpdate { account: String, update: String },
    /// Manager → Worker: place a Telegram user's call to a PBX.
    GatewayIncoming(Box<IncomingCall>),
    /// Worker → Manager: a gateway call is over (its talk time and whether it failed count
    /// against the gateway's plan limits, which the Manager keeps).
    CallEnded(Box<CallReport>),
    /// Worker → Manager: gateway call `call` was answered (talking calls share the month's
    /// rest of talk time).
    CallAnswered { gateway: String, call: u64 },
    /// Manager → Worker: gateway call `call` may talk `remaining_ms` more (its share of the
    /// month's rest); the Worker ends it then.
    TalkBudget { call: u64, remaining_ms: u64 },
    /// Manager → Worker: a Telegram user's text for the gateway's PBX (a SIP `MESSAGE`).
    GatewayMessage(Box<GatewayMessage>),
    /// Manager → Worker: the control API's SIP connections this Worker runs (outbound
    /// registrations, keep-alives); the whole list each time, sent on link-up and on change.
    Connections {
        connections: Vec<crate::config::ConnectionConfig>,
    },
}

/// Which way a gateway call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallDirection {
    /// A PBX called a Telegram user.
    ToTelegram,
    /// A Telegram user called the PBX.
    FromTelegram,
}

/// How one gateway call went, as the Worker that ran it saw it: facts only; the Manager
/// decides what counts against which limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallReport {
    pub gateway: String,
    /// The call's id on its Worker (as in `CallAnswered`).
    pub call: u64,
    pub direction: CallDirection,
    /// Both sides were connected (the PBX got or sent a 2xx and Telegram media ran).
    pub answered: bool,
    /// Talk time in milliseconds, from the answer to the end (0 when never answered).
    pub talk_ms: u64,
    /// The PBX gave up before an answer (CANCEL): its own ring timeout, not a failure.
    pub cancelled_by_pbx: bool,
    /// The final SIP status of an unanswered call (towards the PBX, or from it), 200 otherwise.
    pub code: u16,
    pub reason: String,
}

/// A Telegram request through the Session Storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelegramRequest {
    pub account: String,
    pub op: TelegramOp,
    /// From a Worker to the Manager: which Storage (the Manager forwards); ignored by Storages.
    #[serde(default)]
    pub storage: Option<String>,
}

/// An INVITE that goes to Telegram: the gateway, its account and who to call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayRoute {
    pub gateway: String,
    pub storage: String,
    pub account: String,
    /// The Telegram user, after the connection's dial rules.
    pub query: crate::telegram::resolve::PeerQuery,
    /// The calling connection's codecs, in its order.
    pub codecs: Vec<String>,
    /// The connection's DTMF methods, in order.
    pub dtmf: Vec<String>,
    /// The gateway's concurrent calls.
    pub lines: u32,
    /// Longest call in seconds (0 = unlimited).
    pub max_call_secs: u64,
    /// Talk time left of the gateway's monthly duration in milliseconds (`None` =
    /// unlimited): the Worker ends the call when it runs out after the answer.
    #[serde(default)]
    pub talk_budget_ms: Option<u64>,
    /// The gateway's text messages are on: a `MESSAGE` in the call's dialog goes to the
    /// Telegram user.
    #[serde(default = "yes")]
    pub messages: bool,
    /// The gateway's keypad bot (an account of the same Storage): the answered call's chat
    /// gets its inline keypad (`gateway::keypad`).
    #[serde(default)]
    pub keypad_bot: Option<String>,
}

fn yes() -> bool {
    true
}

/// A Telegram user's call the Manager routes to a PBX through a Worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingCall {
    pub gateway: String,
    pub storage: String,
    pub account: String,
    /// The `phoneCallRequested` (TL, base64).
    pub call: String,
    /// Priority hunting: the rungs in order (lowest `priority` first), each the reachable
    /// PBXs of one priority. Every target of a rung is rung in parallel; the next rung is
    /// tried when all of them fail.
    pub rungs: Vec<Vec<HuntTarget>>,
    /// Caller ID (From user) and display name.
    pub from_user: String,
    pub from_name: Option<String>,
    /// Extra headers (`X-TG-ID`, `X-TG-Username`, `X-TG-Phone`, `X-TG-Name`).
    pub headers: Vec<(String, String)>,
    pub dtmf: Vec<String>,
    /// Talk time left of the gateway's monthly duration in milliseconds (`None` = unlimited).
    #[serde(default)]
    pub talk_budget_ms: Option<u64>,
    /// The gateway's text messages are on (a `MESSAGE` in the call's dialog).
    #[serde(default = "yes")]
    pub messages: bool,
    /// The gateway's keypad bot, as in [`GatewayRoute::keypad_bot`].
    #[serde(default)]
    pub keypad_bot: Option<String>,
}

/// A Telegram user's text message to a gateway's account, routed by the Manager to a Worker
/// that sends it to the PBX as a SIP `MESSAGE` (the targets in hunting order, tried one after
/// the other until one answers 2xx) and tells the user in the chat when none took it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayMessage {
    /// The gateway (for logs and counters).
    pub gateway: String,
    /// The Session Storage and account the chat notice of a failure goes through.
    pub storage: String,
    pub account: String,
    /// The sender's Telegram user id (a keypad text during a call with them is DTMF).
    pub user_id: i64,
    /// The sender with their access hash, for the chat notice of a failure (`None` when the
    /// Storage could not resolve them: the failure is only logged).
    pub peer: Option<crate::telegram::resolve::Peer>,
    /// The text, as the user wrote it (the `MESSAGE` body).
    pub text: String,
    /// The PBXs to try, lowest `priority` first.
    pub targets: Vec<HuntTarget>,
    /// Caller ID (From user) and display name, as for calls.
    pub from_user: String,
    pub from_name: Option<String>,
    /// `X-TG-ID`, `X-TG-Username`, `X-TG-Phone`, `X-TG-Name`.
    pub headers: Vec<(String, String)>,
}

/// One PBX a Telegram user's call may ring (a fork of the hunt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HuntTarget {
    /// Request-URI of the INVITE.
    pub request_uri: String,
    /// Where the INVITE goes.
    pub address: SocketAddr,
    /// The connection it goes out on.
    pub connection: String,
    /// The connection's codecs, in its order.
    pub codecs: Vec<String>,
}

/// What to do with the account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TelegramOp {
    /// A serialized TL function (base64); refused unless on the Storage's allow-list.
    Invoke { body: String },
    /// Who is this peer (with the Storage's persistent cache).
    Resolve {
        query: crate::telegram::resolve::PeerQuery,
    },
    /// The Storage's accounts and their states (`account` is ignored).
    Accounts,
}

/// The Storage's answer to a [`TelegramRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum TelegramAnswer {
    /// The TL result (base64).
    Invoked { body: String },
    Peer {
        peer: crate::telegram::resolve::Peer,
        cached: bool,
    },
    Accounts {
        accounts: Vec<crate::telegram::accounts::AccountRecord>,
    },
}

/// What the Manager needs to route a SIP request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteQuery {
    pub method: String,
    pub request_uri: String,
    pub from_user: Option<String>,
    pub to_user: Option<String>,
    pub source: SocketAddr,
    /// REGISTER: the `Authorization` header, for the Manager's registrar (passwords never leave
    /// the Manager).
    #[serde(default)]
    pub authorization: Option<String>,
    /// REGISTER: the `Contact` header value (`*` unregisters everything).
    #[serde(default)]
    pub contact: Option<String>,
    /// REGISTER: the `Expires` header.
    #[serde(default)]
    pub expires: Option<u32>,
    /// INVITE: headers an IP trunk may be told apart by (`X-*`, `P-*` and other extension
    /// headers; the standard ones are left out), at most 32.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// Answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    /// A final SIP response to send, with SIP.TG's reason phrase.
    Route {
        code: u16,
        reason: String,
        /// Headers the response carries (challenges, Contact with expiry, Date).
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// INVITE: place the call's other leg toward this registered PBX (the Worker's B2BUA).
    Forward {
        /// The connection the call goes out on.
        connection: String,
        /// The PBX's registered Contact URI (the B-leg's Request-URI).
        contact: String,
        /// Where the PBX registered from: requests go there (NAT-safe, like RFC 5626 flows).
        address: SocketAddr,
        /// The calling connection's codecs, in its order of preference.
        #[serde(default)]
        codecs: Vec<String>,
    },
    Status {
        status: serde_json::Value,
    },
    /// A Telegram request's outcome, with Telegram's error names kept.
    Telegram {
        result: Result<TelegramAnswer, crate::telegram::TgError>,
    },
    /// Acknowledges a notification (`TelegramUpdate`).
    Done,
    /// INVITE: call this Telegram user through the gateway (the Worker's gateway call).
    Gateway(Box<GatewayRoute>),
    Error {
        message: String,
    },
}

/// Why a link could not be set up or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("refused by peer: {0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("link closed")]
    Closed,
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), LinkError> {
    let body = serde_json::to_vec(f).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, LinkError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Handshake(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| LinkError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Who is at the other end of an established link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub role: Role,
    pub name: String,
    pub version: u16,
}

/// Client side of the handshake (the Manager): says who it is, checks who answered.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    role: Role,
    name: &str,
    heartbeat: Duration,
    expect_role: Role,
    expect_name: &str,
) -> Result<PeerInfo, LinkError> {
    let hello = Frame::Hello {
        magic: LINK_MAGIC.into(),
        version: LINK_VERSION,
        role,
        name: name.into(),
        heartbeat_ms: heartbeat.as_millis() as u64,
    };
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        write_frame(stream, &hello).await?;
        read_frame(stream).await
    })
    .await
    .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))??;
    match answer {
        Frame::Welcome {
            version,
            role,
            name,
        } => {
            if role != expect_role || name != expect_name {
                return Err(LinkError::Handshake(format!(
                    "expected {expect_role} {expect_name:?}, reached {role} {name:?}"
                )));
            }
            Ok(PeerInfo {
                role,
                name,
                version,
            })
        }
        Frame::Refused { reason } => Err(LinkError::Refused(reason)),
        other => Err(LinkError::Handshake(format!(
            "unexpected first frame {other:?}"
        ))),
    }
}

/// Server side of the handshake (Worker, Storage). `cert_name` is the CN of the peer's verified
/// certificate (TLS links): the peer must call itself by that name.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    role: Role,
    name: &str,
    accept_role: Role,
    cert_name: Option<&str>,
) -> Result<(PeerInfo, Duration), LinkError> {
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(stream))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))??;
    let Frame::Hello {
        magic,
        version,
        role: peer_role,
        name: peer_name,
        heartbeat_ms,
    } = first
    else {
        return Err(LinkError::Handshake("first frame is not a hello".into()));
    };
    let refusal = if magic != LINK_MAGIC {
        Some("not a siptg link".to_string())
    } else if version != LINK_VERSION {
        Some(format!(
            "link version {version} unsupported; this node speaks {LINK_VERSION}"
        ))
    } else if peer_role != accept_role {
        Some(format!(
            "a {role} accepts links from a {accept_role}, not a {peer_role}"
        ))
    } else if cert_name.is_some_and(|cn| cn != peer_name) {
        Some(format!(
            "peer calls itself {peer_name:?} but its certificate is for {:?}",
            cert_name.unwrap_or_default()
        ))
    } else if heartbeat_ms == 0 {
        Some("heartbeat interval 0".to_string())
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = write_frame(
            stream,
            &Frame::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(LinkError::Handshake(reason));
    }
    write_frame(
        stream,
        &Frame::Welcome {
            version: LINK_VERSION,
            role,
            name: name.into(),
        },
    )
    .await?;
    Ok((
        PeerInfo {
            role: peer_role,
            name: peer_name,
            version,
        },
        Duration::from_millis(heartbeat_ms),
    ))
}

/// Answers requests arriving on a link.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// A handler for the passive side of a link (Worker, Storage): answers `Status` with what
/// `status` returns and refuses every other request, naming `role`.
pub fn status_handler<F, Fut>(role: Role, status: F) -> Handler
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = serde_json::Value> + Send + 'static,
{
    let status = Arc::new(status);
    Arc::new(move |req| {
        let status = status.clone();
        Box::pin(async move {
            match req {
                Request::Status => Response::Status {
                    status: status().await,
                },
                other => Response::Error {
                    message: format!("a {role} does not answer {other:?}"),
                },
            }
        })
    })
}

/// A handler that answers every request with an error (for sides that expect none).
pub fn no_requests() -> Handler {
    Arc::new(|req| {
        Box::pin(async move {
            Response::Error {
                message: format!("request {req:?} not handled by this node"),
            }
        })
    })
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// A live link; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    peer: PeerInfo,
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    up: Arc<AtomicBool>,
    closed: watch::Receiver<bool>,
    rtt_us: Arc<AtomicU64>,
    since: Instant,
}

impl LinkHandle {
    /// Who is at the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// False once the link has died.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Last heartbeat round trip (client side only), if measured.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// When the link came up.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Resolves when the link dies.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Sends a request and waits up to `timeout` for its answer.
    pub async fn request(&self, body: Request, timeout: Duration) -> Result<Response, LinkError> {
        if !self.is_up() {
            return Err(LinkError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let sent = self.tx.send(Frame::Request { id, body }).await;
        let result = match sent {
            Err(_) => Err(LinkError::Closed),
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(LinkError::Closed),
                Err(_) => Err(LinkError::Timeout(timeout)),
            },
        };
        lock(&self.pending).remove(&id);
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs an established link: heartbeats (when `heartbeat` is `Some`, i.e. the client side),
/// silence detection after `timeout`, and request dispatch to `handler`.
pub fn spawn<S>(
    stream: S,
    peer: PeerInfo,
    heartbeat: Option<Duration>,
    timeout: Duration,
    handler: Handler,
) -> LinkHandle
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(256);
    let (closed_tx, closed_rx) = watch::channel(false);
    let handle = LinkHandle {
        peer: peer.clone(),
        tx: tx.clone(),
        pending: Arc::new(Mutex::new(HashMap::new())),
        next_id: Arc::new(AtomicU64::new(1)),
        up: Arc::new(AtomicBool::new(true)),
        closed: closed_rx,
        rtt_us: Arc::new(AtomicU64::new(0)),
        since: Instant::now(),
    };
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_frame(&mut wr, &f).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let h = handle.clone();
    tokio::spawn(async move {
        let sent_at = Arc::new(Mutex::new(HashMap::<u64, Instant>::new()));
        let beat = heartbeat.map(|interval| {
            let tx = tx.clone();
            let sent_at = sent_at.clone();
            tokio::spawn(async move {
                let mut seq = 0u64;
                let mut tick = tokio::time::interval(interval);
                loop {
                    tick.tick().await;
                    seq += 1;
                    {
                        let mut s = lock(&sent_at);
                        s.retain(|&k, _| k + 16 > seq);
                        s.insert(seq, Instant::now());
                    }
                    if tx.send(Frame::Heartbeat { seq }).await.is_err() {
                        break;
                    }
                }
            })
        });
        let reason = loop {
            let frame = match tokio::time::timeout(timeout, read_frame(&mut rd)).await {
                Err(_) => break format!("no heartbeat for {timeout:?}"),
                Ok(Err(e)) => break e.to_string(),
                Ok(Ok(f)) => f,
            };
            match frame {
                Frame::Heartbeat { seq } => {
                    let _ = tx.send(Frame::HeartbeatAck { seq }).await;
                }
                Frame::HeartbeatAck { seq } => {
                    if let Some(t) = lock(&sent_at).remove(&seq) {
                        h.rtt_us
                            .store(t.elapsed().as_micros().max(1) as u64, Ordering::Relaxed);
                    }
                }
                Frame::Request { id, body } => {
                    let handler = handler.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let body = handler(body).await;
                        let _ = tx.send(Frame::Response { id, body }).await;
                    });
                }
                Frame::Response { id, body } => {
                    if let Some(waiter) = lock(&h.pending).remove(&id) {
                        let _ = waiter.send(body);
                    }
                }
                other => break format!("unexpected frame after handshake: {other:?}"),
            }
        };
        tracing::warn!(peer = %h.peer.name, role = %h.peer.role, %reason, "link down");
        h.up.store(false, Ordering::Relaxed);
        if let Some(b) = beat {
            b.abort();
        }
        writer.abort();
        lock(&h.pending).clear();
        let _ = closed_tx.send(true);
    });
    tracing::info!(peer = %peer.name, role = %peer.role, "link up");
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_status() -> Handler {
        Arc::new(|req| {
            Box::pin(async move {
                match req {
                    Request::Status => Response::Status {
                        status: serde_json::json!({"ok": true}),
                    },
                    other => Response::Error {
                        message: format!("{other:?}"),
                    },
                }
            })
        })
    }

    async fn pair(hb: Duration, timeout: Duration) -> (LinkHandle, LinkHandle) {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let (peer, hb) = server_handshake(&mut b, Role::Worker, "w1", Role::Manager, None)
                .await
                .unwrap();
            spawn(b, peer, None, hb * 3, echo_status())
        });
        let peer = client_handshake(&mut a, Role::Manager, "m1", hb, Role::Worker, "w1")
            .await
            .unwrap();
        let client = spawn(a, peer, Some(hb), timeout, echo_status());
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn requests_flow_both_ways_and_heartbeats_measure_rtt() {
        let (m, w) = pair(Duration::from_millis(20), Duration::from_millis(500)).await;
        assert_eq!(w.peer().name, "m1");
        let r = m
            .request(Request::Status, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            r,
            Response::Status {
                status: serde_json::json!({"ok": true})
            }
        );
        let r = w
            .request(Request::Status, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(matches!(r, Response::Status { .. }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(m.rtt().is_some());
        assert!(m.is_up() && w.is_up());
    }

    #[tokio::test]
    async fn wrong_role_is_refused_with_a_reason() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            server_handshake(&mut b, Role::Worker, "w1", Role::Manager, None).await
        });
        let err = client_handshake(
            &mut a,
            Role::Storage,
            "s1",
            Duration::from_secs(1),
            Role::Worker,
            "w1",
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, LinkError::Refused(ref r) if r.contains("not a storage")),
            "{err}"
        );
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn name_must_match_certificate() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            server_handshake(&mut b, Role::Worker, "w1", Role::Manager, Some("manager-2")).await
        });
        let err = client_handshake(
            &mut a,
            Role::Manager,
            "m1",
            Duration::from_secs(1),
            Role::Worker,
            "w1",
        )
        .await
        .unwrap_err();
        assert!(matches!(err, LinkError::Refused(_)));
        drop(server);
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            role: Role::Worker,
            name: "w".into(),
            version: 1,
        }
    }

    #[tokio::test]
    async fn vanished_peer_is_declared_down() {
        let (a, b) = tokio::io::duplex(4096);
        let link = spawn(a, peer(), None, Duration::from_secs(5), no_requests());
        drop(b);
        tokio::time::timeout(Duration::from_secs(2), link.closed())
            .await
            .unwrap();
        assert!(!link.is_up());
        assert!(matches!(
            link.request(Request::Status, Duration::from_secs(1)).await,
            Err(LinkError::Closed)
        ));
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (a, _silent) = tokio::io::duplex(4096);
        let link = spawn(a, peer(), None, Duration::from_millis(100), no_requests());
        tokio::time::timeout(Duration::from_secs(2), link.closed())
            .await
            .unwrap();
        assert!(!link.is_up());
    }
}
