//! RFC 3261 §17 transactions with the RFC 6026 fixes, sans-IO: messages and the time come in
//! as arguments, bytes to send and events for the transaction user (TU: dialogs, the B2BUA)
//! come out of queues. No sockets, no clock, no threads, so every timer of the RFC is tested
//! over simulated time.
//!
//! - Server transactions are keyed by (branch, sent-by, method) of the top Via (§17.2.3); an
//!   ACK matches its INVITE, a CANCEL gets its own transaction and is matched to the INVITE it
//!   cancels (§9.2). Requests from RFC 2543 peers (branch without the magic cookie) are keyed
//!   by Request-URI, Call-ID, From tag and CSeq number instead.
//! - Client transactions are keyed by (branch, CSeq method) (§17.1.3).
//! - Retransmissions are absorbed or answered here; only new requests, ACKs for 2xx, CANCELs
//!   of pending INVITEs, responses for client transactions, timeouts and transport errors
//!   reach the TU.
//! - The layer answers on its own: `100 Trying` for an INVITE the TU leaves unanswered for
//!   200 ms, `200 OK`/`481` to CANCEL, the ACK of a non-2xx final for client INVITEs, and
//!   `503` when the number of live transactions would exceed the cap.
//! - 2xx responses to INVITE leave retransmission to the TU (RFC 6026 Accepted state): the
//!   server TU retransmits its 2xx with [`TransactionLayer::respond`] or
//!   [`TransactionLayer::send_stateless`] until the ACK, which arrives as [`TxEvent::Ack`]; the
//!   client TU sends its own ACK with `send_stateless`.

#![deny(missing_docs)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::msg::{Method, SipMessage, SipRequest, SipResponse, Via};

/// The RFC 3261 branch prefix that says a branch is globally unique (§8.1.1.7).
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// How long a server INVITE transaction waits for the TU before sending `100 Trying` itself
/// (§17.2.1: "if the TU will not generate a provisional response within 200 ms").
pub const TRYING_DELAY: Duration = Duration::from_millis(200);

/// Live transactions allowed by [`TransactionLayer::new`]: beyond it requests are refused with
/// `503` so a flood cannot exhaust memory.
pub const DEFAULT_MAX_TRANSACTIONS: usize = 100_000;

/// Transport a message came on or goes out on; reliable ones turn off retransmissions and
/// zero the wait-for-retransmissions timers (§17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Datagrams: the transaction layer retransmits.
    Udp,
    /// A TCP connection.
    Tcp,
    /// A TLS connection.
    Tls,
}

impl Transport {
    /// Whether the transport delivers reliably (TCP, TLS).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The Via transport token.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
}

/// The RFC 3261 timer base values (§17, Table 4); every transaction timer derives from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// RTT estimate: first retransmission interval; 64×T1 is the transaction timeout.
    pub t1: Duration,
    /// Cap of the doubling retransmission interval for non-INVITE requests and INVITE
    /// responses.
    pub t2: Duration,
    /// How long a message may linger in the network: wait in Completed/Confirmed on UDP.
    pub t4: Duration,
}

impl Default for TimerConfig {
    /// The RFC defaults: T1 = 500 ms, T2 = 4 s, T4 = 5 s.
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    fn t64(&self) -> Duration {
        self.t1 * 64
    }
}

/// Identifies a server transaction (§17.2.3). ACKs are matched with method INVITE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerKey {
    /// The top Via branch (or, for RFC 2543 peers, a key made of the dialog identifiers).
    pub branch: String,
    /// The top Via sent-by, normalised ([`Via::sent_by`]).
    pub sent_by: String,
    /// The request method (INVITE for an ACK's transaction).
    pub method: Method,
}

/// Identifies a client transaction (§17.1.3): our branch and the CSeq method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The branch of the top Via we sent.
    pub branch: String,
    /// The request method.
    pub method: Method,
}

/// Either kind of transaction key, for events that concern both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TxKey {
    /// A server transaction.
    Server(ServerKey),
    /// A client transaction.
    Client(ClientKey),
}

/// What the transaction layer tells its TU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxEvent {
    /// A new request (not ACK): a server transaction exists; answer with
    /// [`TransactionLayer::respond`]. The top Via already carries `received`/`rport`.
    Request {
        /// The new server transaction.
        key: ServerKey,
        /// The request.
        req: SipRequest,
        /// Where it came from.
        source: SocketAddr,
        /// What it came on.
        transport: Transport,
    },
    /// An ACK that is not absorbed by a transaction: the ACK of a 2xx, for the dialog.
    Ack {
        /// The ACK.
        req: SipRequest,
        /// Where it came from.
        source: SocketAddr,
        /// What it came on.
        transport: Transport,
    },
    /// A CANCEL for an INVITE still pending: the layer already answered the CANCEL with 200;
    /// the TU should answer the INVITE with `487 Request Terminated`.
    Cancel {
        /// The INVITE's server transaction.
        invite: ServerKey,
        /// The CANCEL request.
        req: SipRequest,
        /// Where it came from.
        source: SocketAddr,
    },
    /// A response for a client transaction (provisional, final, and for INVITE every 2xx).
    Response {
        /// The client transaction.
        key: ClientKey,
        /// The response.
        resp: SipResponse,
        /// Where it came from.
        source: SocketAddr,
    },
    /// A transaction timed out (Timers B, F, H; and a server non-INVITE the TU never answered
    /// within 64×T1). For client transactions the TU acts as if it got a 408.
    Timeout {
        /// The transaction.
        key: TxKey,
    },
    /// The transport reported a failure towards the transaction's peer; the transaction is
    /// gone (§17.1.4, §17.2.4).
    TransportError {
        /// The transaction.
        key: TxKey,
    },
}

/// Why the TU's call into the layer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// No live transaction has that key (it timed out or terminated).
    #[error("no such transaction")]
    Unknown,
    /// The response does not fit the transaction's state (e.g. a second final response).
    #[error("response not allowed in this transaction state")]
    WrongState,
    /// A status code outside 100–699.
    #[error("status code {0} is not 100-699")]
    BadStatus(u16),
    /// The request has no Via for the layer to put its branch in.
    #[error("request has no Via header")]
    NoVia,
    /// A client transaction with this branch and method exists already.
    #[error("a transaction with this branch already exists")]
    Duplicate,
    /// ACK is not sent in a client transaction: use [`TransactionLayer::send_stateless`].
    #[error("ACK is sent with send_stateless, not in a transaction")]
    Ack,
    /// Only an INVITE that has not received a final response can be cancelled.
    #[error("only a pending INVITE can be cancelled")]
    NotCancellable,
    /// The cap on live transactions is reached.
    #[error("too many transactions")]
    Overloaded,
}

/// Counters of what the layer dropped or refused, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxStats {
    /// Responses that matched no client transaction (§17.1.3: discarded).
    pub stray_responses: u64,
    /// ACKs that matched nothing and carried no To tag, or hit a transaction still in
    /// Proceeding.
    pub stray_acks: u64,
    /// Requests without a usable top Via (or a response without branch and CSeq).
    pub unmatchable: u64,
    /// New requests answered 503 because of the transaction cap.
    pub refused: u64,
    /// Retransmitted requests and responses received and absorbed or answered.
    pub retransmissions_received: u64,
    /// Retransmissions we sent (timers and answers to retransmitted requests).
    pub retransmissions_sent: u64,
    /// Transactions that timed out.
    pub timeouts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    InviteServer,
    NonInviteServer,
    InviteClient,
    NonInviteClient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Calling,
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

/// Timer slots of a transaction; which RFC timer a slot is depends on kind and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    /// A, E, G.
    Retransmit = 0,
    /// B, F, H, and the abandoned server non-INVITE.
    Timeout = 1,
    /// D, I, J, K, L, M.
    Terminate = 2,
    /// The 200 ms wait before an automatic 100 Trying.
    Trying = 3,
}

const SLOTS: [Slot; 4] = [
    Slot::Retransmit,
    Slot::Timeout,
    Slot::Terminate,
    Slot::Trying,
];

#[derive(Debug)]
struct Tx {
    key: TxKey,
    kind: Kind,
    state: State,
    dest: SocketAddr,
    transport: Transport,
    /// Server: the last response sent. Client: the request.
    last: Option<Vec<u8>>,
    /// Server INVITE: the request (for the automatic 100). Client INVITE: the request (for
    /// ACK and CANCEL).
    request: Option<SipRequest>,
    /// Client INVITE: the ACK of the non-2xx final, resent for its retransmissions.
    ack: Option<Vec<u8>>,
    /// Server: the To tag of the responses sent, for the 200 to a CANCEL (§9.2).
    to_tag: Option<String>,
    /// Client INVITE: a CANCEL waiting for the first provisional response (§9.1).
    pending_cancel: Option<SipRequest>,
    interval: Duration,
    timers: [Option<Instant>; 4],
}

/// The transaction layer: feed it messages, TU actions and time; drain events, datagrams and
/// the next deadline.
#[derive(Debug)]
pub struct TransactionLayer {
    config: TimerConfig,
    max: usize,
    server_header: Option<String>,
    txs: HashMap<u64, Tx>,
    servers: HashMap<ServerKey, u64>,
    clients: HashMap<ClientKey, u64>,
    next_id: u64,
    heap: BinaryHeap<Reverse<(Instant, u64, Slot)>>,
    events: VecDeque<TxEvent>,
    transmits: VecDeque<(SocketAddr, Transport, Vec<u8>)>,
    stats: TxStats,
}

/// A random token for tags and branches.
fn random_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Where responses to a request go (§18.2.2, RFC 3581): back over the connection for reliable
/// transports; over UDP the source address with the source port when `rport` was asked for,
/// else the Via's sent-by port (5060 by default).
fn response_dest(via: &Via, source: SocketAddr, transport: Transport) -> SocketAddr {
    if transport.is_reliable() || via.param("rport").is_some() {
        return source;
    }
    SocketAddr::new(source.ip(), via.port.unwrap_or(5060))
}

impl TransactionLayer {
    /// A layer with the given timers and [`DEFAULT_MAX_TRANSACTIONS`].
    pub fn new(config: TimerConfig) -> Self {
        Self::with_limit(config, DEFAULT_MAX_TRANSACTIONS)
    }

    /// A layer that refuses new transactions beyond `max` live ones (503 to requests,
    /// [`TxError::Overloaded`] to the TU).
    pub fn with_limit(config: TimerConfig, max: usize) -> Self {
        Self {
            config,
            max,
            server_header: None,
            txs: HashMap::new(),
            servers: HashMap::new(),
            clients: HashMap::new(),
            next_id: 0,
            heap: BinaryHeap::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            stats: TxStats::default(),
        }
    }

    /// Adds a `Server` header to the responses the layer writes itself (100, 481, 503, the 200
    /// to CANCEL), so they look like the TU's.
    pub fn set_server_header(&mut self, value: Option<String>) {
        self.server_header = value;
    }

    /// The timer values in use.
    pub fn config(&self) -> TimerConfig {
        self.config
    }

    /// Drop and refusal counters.
    pub fn stats(&self) -> TxStats {
        self.stats
    }

    /// Number of live transactions (server and client).
    pub fn len(&self) -> usize {
        self.txs.len()
    }

    /// Whether no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<TxEvent> {
        self.events.pop_front()
    }

    /// The next message to send: destination, transport and bytes.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Transport, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if any timer runs.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id, slot))) = self.heap.peek().copied() {
            if self.live_timer(id, slot) == Some(at) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    fn live_timer(&self, id: u64, slot: Slot) -> Option<Instant> {
        self.txs.get(&id).and_then(|tx| tx.timers[slot as usize])
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, id, slot))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if self.live_timer(id, slot) != Some(at) {
                continue;
            }
            if let Some(tx) = self.txs.get_mut(&id) {
                tx.timers[slot as usize] = None;
            }
            self.fire(now, id, slot);
        }
    }

    fn set_timer(&mut self, id: u64, slot: Slot, at: Instant) {
        if let Some(tx) = self.txs.get_mut(&id) {
            tx.timers[slot as usize] = Some(at);
            self.heap.push(Reverse((at, id, slot)));
        }
    }

    fn clear_timer(&mut self, id: u64, slot: Slot) {
        if let Some(tx) = self.txs.get_mut(&id) {
            tx.timers[slot as usize] = None;
        }
    }

    /// Enters a wait-then-terminate state: terminated now when the wait is zero (reliable
    /// transports), else when the Terminate slot fires.
    fn terminate_after(&mut self, id: u64, now: Instant, wait: Duration) {
        for slot in SLOTS {
            self.clear_timer(id, slot);
        }
        if wait.is_zero() {
            self.remove(id);
        } else {
            self.set_timer(id, Slot::Terminate, now + wait);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Tx> {
        let tx = self.txs.remove(&id)?;
        match &tx.key {
            TxKey::Server(k) => self.servers.remove(k),
            TxKey::Client(k) => self.clients.remove(k),
        };
        Some(tx)
    }

    fn resend_last(&mut self, id: u64) {
        if let Some(tx) = self.txs.get(&id) {
            if let Some(bytes) = &tx.last {
                self.transmits
                    .push_back((tx.dest, tx.transport, bytes.clone()));
                self.stats.retransmissions_sent += 1;
            }
        }
    }

    fn fire(&mut self, now: Instant, id: u64, slot: Slot) {
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        let (kind, state) = (tx.kind, tx.state);
        match slot {
            Slot::Retransmit => {
                let next = match (kind, state) {
                    // Timer G: doubling, capped at T2.
                    (Kind::InviteServer, State::Completed) => (tx.interval * 2).min(self.config.t2),
                    // Timer A: doubling, no cap (Timer B ends it).
                    (Kind::InviteClient, State::Calling) => tx.interval * 2,
                    // Timer E: doubling to T2 while Trying, T2 once Proceeding.
                    (Kind::NonInviteClient, State::Trying) => (tx.interval * 2).min(self.config.t2),
                    (Kind::NonInviteClient, State::Proceeding) => self.config.t2,
                    _ => return,
                };
                tx.interval = next;
                self.resend_last(id);
                self.set_timer(id, Slot::Retransmit, now + next);
            }
            Slot::Timeout => {
                let timed_out = matches!(
                    (kind, state),
                    (Kind::InviteServer, State::Completed)
                        | (Kind::InviteClient, State::Calling)
                        | (Kind::NonInviteClient, State::Trying | State::Proceeding)
                        | (Kind::NonInviteServer, State::Trying | State::Proceeding)
                );
                if timed_out {
                    if let Some(tx) = self.remove(id) {
                        self.stats.timeouts += 1;
                        self.events.push_back(TxEvent::Timeout { key: tx.key });
                    }
                }
            }
            Slot::Terminate => {
                self.remove(id);
            }
            Slot::Trying => {
                if kind == Kind::InviteServer && state == State::Proceeding && tx.last.is_none() {
                    self.send_trying(id);
                }
            }
        }
    }

    /// Sends the layer's own 100 Trying for a server INVITE and remembers it as the last
    /// provisional response.
    fn send_trying(&mut self, id: u64) {
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        let Some(req) = &tx.request else {
            return;
        };
        let mut trying = SipResponse::to(req, 100, "Trying", None);
        if let Some(server) = &self.server_header {
            trying.headers.add("Server", server.as_str());
        }
        let bytes = trying.to_bytes();
        tx.last = Some(bytes.clone());
        tx.timers[Slot::Trying as usize] = None;
        self.transmits.push_back((tx.dest, tx.transport, bytes));
    }

    fn new_tx(
        &mut self,
        key: TxKey,
        kind: Kind,
        state: State,
        dest: SocketAddr,
        transport: Transport,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        match &key {
            TxKey::Server(k) => self.servers.insert(k.clone(), id),
            TxKey::Client(k) => self.clients.insert(k.clone(), id),
        };
        self.txs.insert(
            id,
            Tx {
                key,
                kind,
                state,
                dest,
                transport,
                last: None,
                request: None,
                ack: None,
                to_tag: None,
                pending_cancel: None,
                interval: self.config.t1,
                timers: [None; 4],
            },
        );
        id
    }

    /// A response the layer writes on its own to `req` (sent statelessly or stored by caller).
    fn own_response(
        &self,
        req: &SipRequest,
        code: u16,
        reason: &str,
        tag: Option<&str>,
    ) -> SipResponse {
        let tag = match tag {
            Some(t) => t.to_string(),
            None => random_token(),
        };
        let mut resp = SipResponse::to(req, code, reason, Some(&tag));
        if let Some(server) = &self.server_header {
            resp.headers.add("Server", server.as_str());
        }
        resp
    }

    /// Hands a received message to the layer: retransmissions are handled here, everything
    /// else becomes a [`TxEvent`].
    pub fn on_message(
        &mut self,
        now: Instant,
        msg: SipMessage,
        source: SocketAddr,
        transport: Transport,
    ) {
        match msg {
            SipMessage::Request(req) => self.on_request(now, req, source, transport),
            SipMessage::Response(resp) => self.on_response(now, resp, source),
        }
    }

    /// The branch part of a server key: the Via branch when it has the magic cookie, else the
    /// RFC 2543 fallback (§17.2.3) built from Request-URI, Call-ID, From tag and CSeq number.
    fn server_branch(req: &SipRequest, via: &Via) -> Option<String> {
        match via.branch() {
            Some(b) if b.starts_with(MAGIC_COOKIE) => Some(b.to_string()),
            _ => {
                let (num, _) = req.cseq()?;
                Some(format!(
                    "rfc2543|{}|{}|{}|{}",
                    req.uri,
                    req.call_id()?,
                    req.from_tag().unwrap_or(""),
                    num
                ))
            }
        }
    }

    fn on_request(
        &mut self,
        now: Instant,
        mut req: SipRequest,
        source: SocketAddr,
        transport: Transport,
    ) {
        let Some(via) = req.headers.top_via() else {
            self.stats.unmatchable += 1;
            return;
        };
        let Some(branch) = Self::server_branch(&req, &via) else {
            self.stats.unmatchable += 1;
            return;
        };
        let dest = response_dest(&via, source, transport);
        let sent_by = via.sent_by();
        req.stamp_received(source);

        if req.method == Method::Ack {
            let key = ServerKey {
                branch,
                sent_by,
                method: Method::Invite,
            };
            let found = self.servers.get(&key).copied();
            let state = found.and_then(|id| self.txs.get(&id)).map(|tx| tx.state);
            match (found, state) {
                (Some(id), Some(State::Completed)) => {
                    // Timer I: absorb ACK retransmissions for T4 on UDP.
                    let wait = if transport.is_reliable() {
                        Duration::ZERO
                    } else {
                        self.config.t4
                    };
                    if let Some(tx) = self.txs.get_mut(&id) {
                        tx.state = State::Confirmed;
                    }
                    self.terminate_after(id, now, wait);
                }
                (Some(_), Some(State::Confirmed)) => self.stats.retransmissions_received += 1,
                (Some(_), Some(State::Accepted)) => self.events.push_back(TxEvent::Ack {
                    req,
                    source,
                    transport,
                }),
                (Some(_), _) => self.stats.stray_acks += 1,
                (None, _) if req.to_tag().is_some() => self.events.push_back(TxEvent::Ack {
                    req,
                    source,
                    transport,
                }),
                (None, _) => self.stats.stray_acks += 1,
            }
            return;
        }

        let key = ServerKey {
            branch,
            sent_by,
            method: req.method.clone(),
        };
        if let Some(&id) = self.servers.get(&key) {
            self.stats.retransmissions_received += 1;
            let Some(tx) = self.txs.get(&id) else {
                return;
            };
            match (tx.kind, tx.state) {
                (Kind::InviteServer, State::Proceeding) if tx.last.is_none() => {
                    self.send_trying(id)
                }
                (Kind::InviteServer, State::Proceeding | State::Completed)
                | (Kind::NonInviteServer, State::Proceeding | State::Completed) => {
                    self.resend_last(id)
                }
                // Trying (non-INVITE, TU still thinking), Confirmed, Accepted: absorbed.
                _ => {}
            }
            return;
        }

        if self.txs.len() >= self.max {
            self.stats.refused += 1;
            let mut busy = self.own_response(&req, 503, "Service Unavailable", None);
            busy.headers.add("Retry-After", "5");
            self.transmits.push_back((dest, transport, busy.to_bytes()));
            return;
        }

        match req.method {
            Method::Invite => {
                let id = self.new_tx(
                    TxKey::Server(key.clone()),
                    Kind::InviteServer,
                    State::Proceeding,
                    dest,
                    transport,
                );
                if let Some(tx) = self.txs.get_mut(&id) {
                    tx.request = Some(req.clone());
                }
                self.set_timer(id, Slot::Trying, now + TRYING_DELAY);
                self.events.push_back(TxEvent::Request {
                    key,
                    req,
                    source,
                    transport,
                });
            }
            Method::Cancel => self.on_cancel(now, key, req, source, dest, transport),
            _ => {
                let id = self.new_tx(
                    TxKey::Server(key.clone()),
                    Kind::NonInviteServer,
                    State::Trying,
                    dest,
                    transport,
                );
                // Nobody waits longer than the client's Timer F: a TU that never answers does
                // not pin the transaction.
                self.set_timer(id, Slot::Timeout, now + self.config.t64());
                self.events.push_back(TxEvent::Request {
                    key,
                    req,
                    source,
                    transport,
                });
            }
        }
    }

    /// A new CANCEL (§9.2): answered here, 200 when it matches an INVITE transaction (481
    /// otherwise); the TU hears of it only while the INVITE is still pending.
    fn on_cancel(
        &mut self,
        now: Instant,
        key: ServerKey,
        req: SipRequest,
        source: SocketAddr,
        dest: SocketAddr,
        transport: Transport,
    ) {
        let invite_key = ServerKey {
            method: Method::Invite,
            ..key.clone()
        };
        let invite = self
            .servers
            .get(&invite_key)
            .and_then(|id| self.txs.get(id))
            .map(|tx| (tx.state, tx.to_tag.clone()));
        let resp = match &invite {
            Some((_, tag)) => self.own_response(&req, 200, "OK", tag.as_deref()),
            None => self.own_response(&req, 481, "Call/Transaction Does Not Exist", None),
        };
        let id = self.new_tx(
            TxKey::Server(key),
            Kind::NonInviteServer,
            State::Trying,
            dest,
            transport,
        );
        self.finish_server_non_invite(now, id, resp.to_bytes());
        if let Some((State::Proceeding, _)) = invite {
            self.events.push_back(TxEvent::Cancel {
                invite: invite_key,
                req,
                source,
            });
        }
    }

    fn finish_server_non_invite(&mut self, now: Instant, id: u64, bytes: Vec<u8>) {
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        tx.state = State::Completed;
        tx.last = Some(bytes.clone());
        let transport = tx.transport;
        self.transmits.push_back((tx.dest, transport, bytes));
        // Timer J: absorb request retransmissions for 64×T1 on UDP.
        let wait = if transport.is_reliable() {
            Duration::ZERO
        } else {
            self.config.t64()
        };
        self.terminate_after(id, now, wait);
    }

    /// Sends the TU's response in a server transaction. A 2xx to INVITE moves it to Accepted
    /// (RFC 6026), where further 2xx (the TU's retransmissions) are still accepted.
    pub fn respond(
        &mut self,
        now: Instant,
        key: &ServerKey,
        resp: SipResponse,
    ) -> Result<(), TxError> {
        if !(100..=699).contains(&resp.code) {
            return Err(TxError::BadStatus(resp.code));
        }
        let id = *self.servers.get(key).ok_or(TxError::Unknown)?;
        let tx = self.txs.get_mut(&id).ok_or(TxError::Unknown)?;
        let code = resp.code;
        if let Some(tag) = resp.to_tag() {
            tx.to_tag = Some(tag.to_string());
        }
        let (dest, transport) = (tx.dest, tx.transport);
        match (tx.kind, tx.state) {
            (Kind::InviteServer, State::Proceeding) => {
                let bytes = resp.to_bytes();
                tx.last = Some(bytes.clone());
                tx.timers[Slot::Trying as usize] = None;
                self.transmits.push_back((dest, transport, bytes));
                if code >= 300 {
                    tx.state = State::Completed;
                    tx.interval = self.config.t1;
                    if !transport.is_reliable() {
                        self.set_timer(id, Slot::Retransmit, now + self.config.t1);
                    }
                    self.set_timer(id, Slot::Timeout, now + self.config.t64());
                } else if code >= 200 {
                    tx.state = State::Accepted;
                    tx.request = None;
                    // Timer L: absorb INVITE retransmissions, pass 2xx retransmissions.
                    self.set_timer(id, Slot::Terminate, now + self.config.t64());
                }
                Ok(())
            }
            (Kind::InviteServer, State::Accepted) if (200..300).contains(&code) => {
                self.transmits.push_back((dest, transport, resp.to_bytes()));
                Ok(())
            }
            (Kind::NonInviteServer, State::Trying | State::Proceeding) => {
                if code < 200 {
                    tx.state = State::Proceeding;
                    let bytes = resp.to_bytes();
                    tx.last = Some(bytes.clone());
                    self.transmits.push_back((dest, transport, bytes));
                } else {
                    self.finish_server_non_invite(now, id, resp.to_bytes());
                }
                Ok(())
            }
            _ => Err(TxError::WrongState),
        }
    }

    /// Starts a client transaction: sends `req` to `dest` and retransmits it until a response
    /// or the timeout. The top Via must exist; a branch with the magic cookie is added when it
    /// has none. ACK is refused (it is not a transaction: use `send_stateless`).
    pub fn send_request(
        &mut self,
        now: Instant,
        mut req: SipRequest,
        dest: SocketAddr,
        transport: Transport,
    ) -> Result<ClientKey, TxError> {
        if req.method == Method::Ack {
            return Err(TxError::Ack);
        }
        let mut via = req.headers.top_via().ok_or(TxError::NoVia)?;
        let branch = match via.branch() {
            Some(b) => b.to_string(),
            None => {
                let b = format!("{MAGIC_COOKIE}{}", random_token());
                via.params
                    .retain(|(n, _)| !n.eq_ignore_ascii_case("branch"));
                via.params.push(("branch".to_string(), Some(b.clone())));
                req.headers.replace_top_via(via.to_string());
                b
            }
        };
        let key = ClientKey {
            branch,
            method: req.method.clone(),
        };
        if self.clients.contains_key(&key) {
            return Err(TxError::Duplicate);
        }
        if self.txs.len() >= self.max {
            return Err(TxError::Overloaded);
        }
        let invite = req.method == Method::Invite;
        let (kind, state) = if invite {
            (Kind::InviteClient, State::Calling)
        } else {
            (Kind::NonInviteClient, State::Trying)
        };
        let id = self.new_tx(TxKey::Client(key.clone()), kind, state, dest, transport);
        let bytes = req.to_bytes();
        self.transmits.push_back((dest, transport, bytes.clone()));
        if let Some(tx) = self.txs.get_mut(&id) {
            tx.last = Some(bytes);
            if invite {
                tx.request = Some(req);
            }
        }
        if !transport.is_reliable() {
            self.set_timer(id, Slot::Retransmit, now + self.config.t1);
        }
        // Timer B or F.
        self.set_timer(id, Slot::Timeout, now + self.config.t64());
        Ok(key)
    }

    /// Cancels a pending client INVITE (§9.1): the CANCEL goes out now if a provisional
    /// response arrived, else as soon as one does (it must not be sent before). Returns the
    /// CANCEL's key; a CANCEL still waiting when the INVITE ends is dropped.
    pub fn cancel(&mut self, now: Instant, invite: &ClientKey) -> Result<ClientKey, TxError> {
        let id = *self.clients.get(invite).ok_or(TxError::Unknown)?;
        let tx = self.txs.get_mut(&id).ok_or(TxError::Unknown)?;
        if tx.kind != Kind::InviteClient {
            return Err(TxError::NotCancellable);
        }
        let key = ClientKey {
            branch: invite.branch.clone(),
            method: Method::Cancel,
        };
        let Some(request) = &tx.request else {
            return Err(TxError::NotCancellable);
        };
        let cancel = request.cancel();
        match tx.state {
            State::Calling => {
                tx.pending_cancel = Some(cancel);
                Ok(key)
            }
            State::Proceeding => {
                let (dest, transport) = (tx.dest, tx.transport);
                self.send_request(now, cancel, dest, transport)
            }
            _ => Err(TxError::NotCancellable),
        }
    }

    /// Sends a message outside any transaction: the TU's ACK for a 2xx, its 2xx
    /// retransmissions after Timer L, stateless responses.
    pub fn send_stateless(
        &mut self,
        dest: SocketAddr,
        transport: Transport,
        msg: impl Into<SipMessage>,
    ) {
        self.transmits
            .push_back((dest, transport, msg.into().to_bytes()));
    }

    fn on_response(&mut self, now: Instant, resp: SipResponse, source: SocketAddr) {
        let (Some(branch), Some((_, method))) = (resp.top_via_branch(), resp.cseq()) else {
            self.stats.unmatchable += 1;
            return;
        };
        let key = ClientKey { branch, method };
        let Some(&id) = self.clients.get(&key) else {
            self.stats.stray_responses += 1;
            return;
        };
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        let code = resp.code;
        let transport = tx.transport;
        match (tx.kind, tx.state) {
            (Kind::InviteClient, State::Calling | State::Proceeding) => {
                tx.timers[Slot::Retransmit as usize] = None;
                tx.timers[Slot::Timeout as usize] = None;
                if code < 200 {
                    tx.state = State::Proceeding;
                    let pending = tx.pending_cancel.take();
                    let dest = tx.dest;
                    self.events
                        .push_back(TxEvent::Response { key, resp, source });
                    if let Some(cancel) = pending {
                        // The CANCEL could fail only on a duplicate or the cap; then the TU
                        // sees the INVITE complete normally.
                        let _ = self.send_request(now, cancel, dest, transport);
                    }
                } else if code < 300 {
                    tx.state = State::Accepted;
                    tx.pending_cancel = None;
                    tx.last = None;
                    self.events
                        .push_back(TxEvent::Response { key, resp, source });
                    // Timer M: keep matching 2xx retransmissions and forks for the TU.
                    self.set_timer(id, Slot::Terminate, now + self.config.t64());
                } else {
                    tx.state = State::Completed;
                    tx.pending_cancel = None;
                    let ack = tx.request.as_ref().map(|r| r.ack_for(&resp).to_bytes());
                    if let Some(ack) = &ack {
                        self.transmits.push_back((tx.dest, transport, ack.clone()));
                    }
                    tx.ack = ack;
                    tx.last = None;
                    self.events
                        .push_back(TxEvent::Response { key, resp, source });
                    // Timer D: answer final retransmissions with the ACK (at least 32 s).
                    let wait = if transport.is_reliable() {
                        Duration::ZERO
                    } else {
                        self.config.t64().max(Duration::from_secs(32))
                    };
                    self.terminate_after(id, now, wait);
                }
            }
            (Kind::InviteClient, State::Completed) => {
                self.stats.retransmissions_received += 1;
                if code >= 300 {
                    if let Some(ack) = &tx.ack {
                        self.transmits.push_back((tx.dest, transport, ack.clone()));
                        self.stats.retransmissions_sent += 1;
                    }
                }
            }
            (Kind::InviteClient, State::Accepted) => {
                if (200..300).contains(&code) {
                    self.events
                        .push_back(TxEvent::Response { key, resp, source });
                } else {
                    self.stats.retransmissions_received += 1;
                }
            }
            (Kind::NonInviteClient, State::Trying | State::Proceeding) => {
                if code < 200 {
                    tx.state = State::Proceeding;
                    self.events
                        .push_back(TxEvent::Response { key, resp, source });
                } else {
                    tx.state = State::Completed;
                    tx.last = None;
                    self.events
                        .push_back(TxEvent::Response { key, resp, source });
                    // Timer K: absorb response retransmissions for T4 on UDP.
                    let wait = if transport.is_reliable() {
                        Duration::ZERO
                    } else {
                        self.config.t4
                    };
                    self.terminate_after(id, now, wait);
                }
            }
            _ => self.stats.retransmissions_received += 1,
        }
    }

    /// The transport could not deliver to `dest` (ICMP error, connection refused or reset):
    /// every transaction talking to it fails with [`TxEvent::TransportError`].
    pub fn on_transport_error(&mut self, dest: SocketAddr, transport: Transport) {
        let failed: Vec<u64> = self
            .txs
            .iter()
            .filter(|(_, tx)| tx.dest == dest && tx.transport == transport)
            .map(|(&id, _)| id)
            .collect();
        for id in failed {
            if let Some(tx) = self.remove(id) {
                self.events
                    .push_back(TxEvent::TransportError { key: tx.key });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::msg::parse_datagram;
    use std::sync::OnceLock;

    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    fn t(ms: u64) -> Instant {
        epoch() + Duration::from_millis(ms)
    }

    fn since(at: Instant) -> u64 {
        (at - epoch()).as_millis() as u64
    }

    const A: &str = "192.0.2.1:5060";
    const B: &str = "192.0.2.2:5060";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn layer() -> TransactionLayer {
        TransactionLayer::new(TimerConfig::default())
    }

    /// A request as `A` sends it to `B`.
    fn request(method: &str, branch: &str) -> SipRequest {
        let text = format!(
            "{method} sip:bob@gw SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@a>;tag=fa\r\nTo: <sip:bob@gw>\r\nCall-ID: call1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        );
        match parse_datagram(text.as_bytes()) {
            Ok(SipMessage::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn transmits(l: &mut TransactionLayer) -> Vec<(SocketAddr, Transport, SipMessage)> {
        std::iter::from_fn(|| l.poll_transmit())
            .map(|(d, tr, bytes)| (d, tr, parse_datagram(&bytes).unwrap()))
            .collect()
    }

    fn events(l: &mut TransactionLayer) -> Vec<TxEvent> {
        std::iter::from_fn(|| l.poll_event()).collect()
    }

    fn code(m: &SipMessage) -> u16 {
        match m {
            SipMessage::Response(r) => r.code,
            SipMessage::Request(r) => panic!("request {}", r.method),
        }
    }

    /// Fires timers up to `until`; returns (ms, message) of everything sent on the way.
    fn run_until(l: &mut TransactionLayer, until: Instant) -> Vec<(u64, SipMessage)> {
        let mut sent = Vec::new();
        while let Some(at) = l.poll_timeout() {
            if at > until {
                break;
            }
            l.handle_timeout(at);
            for (_, _, m) in transmits(l) {
                sent.push((since(at), m));
            }
        }
        sent
    }

    fn times(sent: &[(u64, SipMessage)]) -> Vec<u64> {
        sent.iter().map(|(ms, _)| *ms).collect()
    }

    /// Receives a request at the server layer and returns its key.
    fn receive(
        l: &mut TransactionLayer,
        now: Instant,
        req: &SipRequest,
        transport: Transport,
    ) -> (ServerKey, SipRequest) {
        l.on_message(now, req.clone().into(), addr(A), transport);
        match events(l).as_slice() {
            [TxEvent::Request { key, req, .. }] => (key.clone(), req.clone()),
            other => panic!("{other:?}"),
        }
    }

    const BACKOFF: [u64; 10] = [
        500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ];

    #[test]
    fn server_non_invite_answers_retransmissions_until_timer_j() {
        let mut l = layer();
        let opt = request("OPTIONS", "z9hG4bKo1");
        let (key, req) = receive(&mut l, t(0), &opt, Transport::Udp);
        assert_eq!(key.method, Method::Options);
        assert_eq!(key.sent_by, "192.0.2.1:5060");
        assert!(req
            .header("Via")
            .unwrap()
            .ends_with(";rport=5060;received=192.0.2.1"));
        // Trying: a retransmission is absorbed.
        l.on_message(t(100), opt.clone().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty() && transmits(&mut l).is_empty());
        l.respond(t(200), &key, SipResponse::to(&req, 200, "OK", Some("x")))
            .unwrap();
        let sent = transmits(&mut l);
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].0, sent[0].1, code(&sent[0].2)),
            (addr(A), Transport::Udp, 200)
        );
        assert_eq!(
            l.respond(t(250), &key, SipResponse::to(&req, 500, "x", None)),
            Err(TxError::WrongState)
        );
        // Completed: a retransmission gets the same response again.
        l.on_message(t(300), opt.clone().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty());
        let again = transmits(&mut l);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].2, sent[0].2);
        // Timer J = 64*T1 after the final response.
        assert_eq!(l.poll_timeout(), Some(t(200 + 32_000)));
        l.handle_timeout(t(32_199));
        assert_eq!(l.len(), 1);
        l.handle_timeout(t(32_200));
        assert!(l.is_empty());
        assert_eq!(
            l.respond(t(32_300), &key, SipResponse::to(&req, 200, "OK", None)),
            Err(TxError::Unknown)
        );
        // Afterwards the same request is a new transaction.
        receive(&mut l, t(33_000), &opt, Transport::Udp);
        assert_eq!(l.stats().retransmissions_received, 2);
    }

    #[test]
    fn server_non_invite_provisional_then_final() {
        let mut l = layer();
        let msg = request("MESSAGE", "z9hG4bKm1");
        let (key, req) = receive(&mut l, t(0), &msg, Transport::Udp);
        l.respond(t(10), &key, SipResponse::to(&req, 100, "Trying", None))
            .unwrap();
        assert_eq!(code(&transmits(&mut l)[0].2), 100);
        l.on_message(t(20), msg.clone().into(), addr(A), Transport::Udp);
        assert_eq!(code(&transmits(&mut l)[0].2), 100);
        l.respond(
            t(30),
            &key,
            SipResponse::to(&req, 202, "Accepted", Some("y")),
        )
        .unwrap();
        assert_eq!(code(&transmits(&mut l)[0].2), 202);
        l.on_message(t(40), msg.into(), addr(A), Transport::Udp);
        assert_eq!(code(&transmits(&mut l)[0].2), 202);
    }

    #[test]
    fn server_non_invite_over_tcp_ends_at_the_final_response() {
        let mut l = layer();
        let opt = request("OPTIONS", "z9hG4bKo2");
        let (key, req) = receive(&mut l, t(0), &opt, Transport::Tcp);
        l.respond(t(1), &key, SipResponse::to(&req, 200, "OK", Some("x")))
            .unwrap();
        let sent = transmits(&mut l);
        assert_eq!((sent[0].0, sent[0].1), (addr(A), Transport::Tcp));
        // Timer J = 0.
        assert!(l.is_empty());
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn unanswered_server_non_invite_times_out() {
        let mut l = layer();
        let (key, _) = receive(&mut l, t(0), &request("INFO", "z9hG4bKi1"), Transport::Udp);
        assert_eq!(l.poll_timeout(), Some(t(32_000)));
        assert!(run_until(&mut l, t(40_000)).is_empty());
        assert_eq!(
            events(&mut l),
            [TxEvent::Timeout {
                key: TxKey::Server(key)
            }]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn server_invite_sends_100_trying_after_200_ms() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKa1");
        let (key, _) = receive(&mut l, t(0), &inv, Transport::Udp);
        assert_eq!(l.poll_timeout(), Some(t(200)));
        l.handle_timeout(t(199));
        assert!(transmits(&mut l).is_empty());
        l.handle_timeout(t(200));
        let sent = transmits(&mut l);
        assert_eq!(sent.len(), 1);
        let SipMessage::Response(trying) = &sent[0].2 else {
            panic!()
        };
        assert_eq!((trying.code, trying.to_tag()), (100, None));
        assert_eq!(trying.cseq(), Some((1, Method::Invite)));
        assert_eq!(
            trying.header("Via"),
            Some("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa1;rport=5060;received=192.0.2.1")
        );
        // A retransmission gets the 100 again; nothing else happens in Proceeding.
        l.on_message(t(600), inv.clone().into(), addr(A), Transport::Udp);
        assert_eq!(code(&transmits(&mut l)[0].2), 100);
        assert_eq!(l.poll_timeout(), None);
        assert!(events(&mut l).is_empty());
        let _ = key;
    }

    #[test]
    fn no_automatic_100_when_the_tu_is_quick_and_retransmissions_get_the_last_provisional() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKa2");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Udp);
        l.respond(
            t(100),
            &key,
            SipResponse::to(&req, 180, "Ringing", Some("b1")),
        )
        .unwrap();
        assert_eq!(code(&transmits(&mut l)[0].2), 180);
        assert!(run_until(&mut l, t(1000)).is_empty());
        l.on_message(t(1100), inv.clone().into(), addr(A), Transport::Udp);
        assert_eq!(code(&transmits(&mut l)[0].2), 180);

        // A retransmission before 200 ms and before the TU answers gets a 100 at once.
        let inv2 = request("INVITE", "z9hG4bKa3");
        receive(&mut l, t(2000), &inv2, Transport::Udp);
        l.on_message(t(2050), inv2.into(), addr(A), Transport::Udp);
        assert_eq!(code(&transmits(&mut l)[0].2), 100);
        assert!(run_until(&mut l, t(3000)).is_empty());
    }

    #[test]
    fn server_invite_non_2xx_timer_g_doubles_to_t2_until_timer_h() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKg1");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Udp);
        l.respond(
            t(0),
            &key,
            SipResponse::to(&req, 486, "Busy Here", Some("b1")),
        )
        .unwrap();
        assert_eq!(code(&transmits(&mut l)[0].2), 486);
        // A retransmitted INVITE gets the final response too.
        l.on_message(t(100), inv.clone().into(), addr(A), Transport::Udp);
        assert_eq!(code(&transmits(&mut l)[0].2), 486);
        let sent = run_until(&mut l, t(31_999));
        assert_eq!(times(&sent), BACKOFF);
        assert!(sent.iter().all(|(_, m)| code(m) == 486));
        assert!(events(&mut l).is_empty());
        // Timer H.
        assert_eq!(l.poll_timeout(), Some(t(32_000)));
        l.handle_timeout(t(32_000));
        assert_eq!(
            events(&mut l),
            [TxEvent::Timeout {
                key: TxKey::Server(key)
            }]
        );
        assert!(transmits(&mut l).is_empty() && l.is_empty());
        assert_eq!(l.stats().timeouts, 1);
    }

    #[test]
    fn ack_confirms_and_timer_i_absorbs_ack_retransmissions() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKc1");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Udp);
        let busy = SipResponse::to(&req, 486, "Busy Here", Some("b1"));
        l.respond(t(0), &key, busy.clone()).unwrap();
        transmits(&mut l);
        assert_eq!(times(&run_until(&mut l, t(600))), [500]);
        let ack = inv.ack_for(&busy);
        l.on_message(t(700), ack.clone().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty());
        // Confirmed: no more Timer G, and Timer I = T4.
        assert_eq!(l.poll_timeout(), Some(t(5_700)));
        l.on_message(t(1_000), ack.clone().into(), addr(A), Transport::Udp);
        l.on_message(t(1_100), inv.clone().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty() && transmits(&mut l).is_empty());
        assert!(run_until(&mut l, t(5_699)).is_empty());
        assert_eq!(l.len(), 1);
        l.handle_timeout(t(5_700));
        assert!(l.is_empty() && events(&mut l).is_empty());
    }

    #[test]
    fn reliable_server_invite_has_no_timer_g_and_no_timer_i() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKc2");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Tcp);
        let busy = SipResponse::to(&req, 603, "Decline", Some("b1"));
        l.respond(t(0), &key, busy.clone()).unwrap();
        transmits(&mut l);
        // Only Timer H runs.
        assert_eq!(l.poll_timeout(), Some(t(32_000)));
        l.on_message(t(10), inv.ack_for(&busy).into(), addr(A), Transport::Tcp);
        assert!(l.is_empty());
    }

    #[test]
    fn server_invite_2xx_is_accepted_until_timer_l() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKl1");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Udp);
        let ok = SipResponse::to(&req, 200, "OK", Some("b1"));
        l.respond(t(100), &key, ok.clone()).unwrap();
        assert_eq!(code(&transmits(&mut l)[0].2), 200);
        // Accepted: INVITE retransmissions are absorbed (the TU retransmits the 2xx).
        l.on_message(t(500), inv.clone().into(), addr(A), Transport::Udp);
        assert!(transmits(&mut l).is_empty() && events(&mut l).is_empty());
        l.respond(t(600), &key, ok.clone()).unwrap();
        assert_eq!(code(&transmits(&mut l)[0].2), 200);
        assert_eq!(
            l.respond(t(650), &key, SipResponse::to(&req, 486, "Busy", None)),
            Err(TxError::WrongState)
        );
        // The 2xx ACK is its own transaction: straight to the TU.
        let mut ack = inv.ack_for(&ok);
        ack.headers
            .replace_top_via("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKack1;rport");
        l.on_message(t(700), ack.clone().into(), addr(A), Transport::Udp);
        assert!(
            matches!(events(&mut l).as_slice(), [TxEvent::Ack { req, .. }] if req.method == Method::Ack)
        );
        // Timer L = 64*T1.
        assert_eq!(l.poll_timeout(), Some(t(32_100)));
        l.handle_timeout(t(32_100));
        assert!(l.is_empty());
        assert!(events(&mut l).is_empty());
    }

    #[test]
    fn stray_acks_and_responses_are_counted_and_dropped() {
        let mut l = layer();
        // No To tag and no transaction: stray.
        l.on_message(
            t(0),
            request("ACK", "z9hG4bKs1").into(),
            addr(A),
            Transport::Udp,
        );
        assert!(events(&mut l).is_empty());
        assert_eq!(l.stats().stray_acks, 1);
        // An ACK for a transaction still in Proceeding is stray too.
        let inv = request("INVITE", "z9hG4bKs2");
        receive(&mut l, t(0), &inv, Transport::Udp);
        l.on_message(
            t(1),
            request("ACK", "z9hG4bKs2").into(),
            addr(A),
            Transport::Udp,
        );
        assert_eq!(l.stats().stray_acks, 2);
        // With a To tag it may be a 2xx ACK: up to the dialog layer.
        let mut ack = request("ACK", "z9hG4bKs3");
        ack.set_header("To", "<sip:bob@gw>;tag=zz");
        l.on_message(t(2), ack.into(), addr(A), Transport::Udp);
        assert!(matches!(events(&mut l).as_slice(), [TxEvent::Ack { .. }]));
        // A response nobody asked for.
        let resp = SipResponse::to(&request("OPTIONS", "z9hG4bKnobody"), 200, "OK", Some("t"));
        l.on_message(t(3), resp.into(), addr(B), Transport::Udp);
        assert_eq!(l.stats().stray_responses, 1);
        assert!(events(&mut l).is_empty() && transmits(&mut l).is_empty());
    }

    /// A request as our client sends it (no branch: the layer adds one).
    fn outgoing(method: &str) -> SipRequest {
        let mut r = request(method, "x");
        r.headers
            .replace_top_via("SIP/2.0/UDP 192.0.2.1:5060;rport");
        r
    }

    fn answer(req: &SipRequest, code: u16, tag: &str) -> SipMessage {
        SipResponse::to(req, code, "Reason", Some(tag)).into()
    }

    #[test]
    fn send_request_adds_a_branch_and_refuses_ack_and_duplicates() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("OPTIONS"), addr(B), Transport::Udp)
            .unwrap();
        assert!(key.branch.starts_with(MAGIC_COOKIE) && key.branch.len() > 10);
        let sent = transmits(&mut l);
        assert_eq!(sent[0].2.top_via_branch(), Some(key.branch.clone()));
        assert_eq!(
            sent[0].2.header("Via"),
            Some(format!("SIP/2.0/UDP 192.0.2.1:5060;rport;branch={}", key.branch).as_str())
        );
        assert_eq!(
            l.send_request(t(0), request("ACK", "z9hG4bKx"), addr(B), Transport::Udp),
            Err(TxError::Ack)
        );
        let mut dup = outgoing("OPTIONS");
        dup.headers
            .replace_top_via(format!("SIP/2.0/UDP 192.0.2.1:5060;branch={}", key.branch));
        assert_eq!(
            l.send_request(t(0), dup, addr(B), Transport::Udp),
            Err(TxError::Duplicate)
        );
        let mut novia = outgoing("OPTIONS");
        novia.remove_header("Via");
        assert_eq!(
            l.send_request(t(0), novia, addr(B), Transport::Udp),
            Err(TxError::NoVia)
        );
    }

    #[test]
    fn client_non_invite_timer_e_doubles_to_t2_until_timer_f() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("OPTIONS"), addr(B), Transport::Udp)
            .unwrap();
        let first = transmits(&mut l);
        assert_eq!((first[0].0, first[0].1), (addr(B), Transport::Udp));
        let sent = run_until(&mut l, t(31_999));
        assert_eq!(times(&sent), BACKOFF);
        assert!(sent.iter().all(|(_, m)| *m == first[0].2));
        l.handle_timeout(t(32_000));
        assert_eq!(
            events(&mut l),
            [TxEvent::Timeout {
                key: TxKey::Client(key)
            }]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn client_non_invite_proceeding_retransmits_every_t2_then_timer_k() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("REGISTER"), addr(B), Transport::Udp)
            .unwrap();
        let SipMessage::Request(req) = transmits(&mut l).remove(0).2 else {
            panic!()
        };
        l.on_message(t(200), answer(&req, 100, "x"), addr(B), Transport::Udp);
        assert!(
            matches!(events(&mut l).as_slice(), [TxEvent::Response { key: k, resp, .. }] if *k == key && resp.code == 100)
        );
        assert_eq!(times(&run_until(&mut l, t(9_999))), [500, 4_500, 8_500]);
        l.on_message(t(10_000), answer(&req, 200, "r1"), addr(B), Transport::Udp);
        assert!(
            matches!(events(&mut l).as_slice(), [TxEvent::Response { resp, .. }] if resp.code == 200)
        );
        // Completed: retransmitted finals absorbed, Timer K = T4.
        l.on_message(t(11_000), answer(&req, 200, "r1"), addr(B), Transport::Udp);
        assert!(events(&mut l).is_empty() && transmits(&mut l).is_empty());
        assert_eq!(l.poll_timeout(), Some(t(15_000)));
        l.handle_timeout(t(15_000));
        assert!(l.is_empty());
        l.on_message(t(16_000), answer(&req, 200, "r1"), addr(B), Transport::Udp);
        assert_eq!(l.stats().stray_responses, 1);
    }

    #[test]
    fn reliable_client_non_invite_never_retransmits() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("OPTIONS"), addr(B), Transport::Tls)
            .unwrap();
        let SipMessage::Request(req) = transmits(&mut l).remove(0).2 else {
            panic!()
        };
        assert_eq!(l.poll_timeout(), Some(t(32_000)));
        l.on_message(t(100), answer(&req, 200, "r"), addr(B), Transport::Tls);
        assert_eq!(events(&mut l).len(), 1);
        assert!(l.is_empty());
        let key2 = l
            .send_request(t(0), outgoing("OPTIONS"), addr(B), Transport::Tcp)
            .unwrap();
        transmits(&mut l);
        assert!(run_until(&mut l, t(31_999)).is_empty());
        l.handle_timeout(t(32_000));
        assert_eq!(
            events(&mut l),
            [TxEvent::Timeout {
                key: TxKey::Client(key2)
            }]
        );
        let _ = key;
    }

    #[test]
    fn client_invite_timer_a_doubles_without_cap_until_timer_b() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Udp)
            .unwrap();
        transmits(&mut l);
        let sent = run_until(&mut l, t(31_999));
        assert_eq!(times(&sent), [500, 1_500, 3_500, 7_500, 15_500, 31_500]);
        l.handle_timeout(t(32_000));
        assert_eq!(
            events(&mut l),
            [TxEvent::Timeout {
                key: TxKey::Client(key)
            }]
        );
        assert!(l.is_empty());
        // Over TCP only Timer B runs.
        let key = l
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Tcp)
            .unwrap();
        transmits(&mut l);
        assert_eq!(l.poll_timeout(), Some(t(32_000)));
        assert!(run_until(&mut l, t(32_000)).is_empty());
        assert_eq!(
            events(&mut l),
            [TxEvent::Timeout {
                key: TxKey::Client(key)
            }]
        );
    }

    #[test]
    fn client_invite_acks_non_2xx_finals_until_timer_d() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Udp)
            .unwrap();
        let SipMessage::Request(inv) = transmits(&mut l).remove(0).2 else {
            panic!()
        };
        l.on_message(t(100), answer(&inv, 180, "b1"), addr(B), Transport::Udp);
        assert_eq!(events(&mut l).len(), 1);
        // Proceeding: no retransmissions, no Timer B.
        assert_eq!(l.poll_timeout(), None);
        l.on_message(t(6_000), answer(&inv, 486, "b1"), addr(B), Transport::Udp);
        assert!(
            matches!(events(&mut l).as_slice(), [TxEvent::Response { key: k, resp, .. }] if *k == key && resp.code == 486)
        );
        let sent = transmits(&mut l);
        assert_eq!(sent.len(), 1);
        let SipMessage::Request(ack) = &sent[0].2 else {
            panic!()
        };
        assert_eq!(sent[0].0, addr(B));
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, inv.uri);
        assert_eq!(ack.cseq(), Some((1, Method::Ack)));
        assert_eq!(ack.top_via_branch(), Some(key.branch.clone()));
        assert_eq!(ack.to_tag(), Some("b1"));
        assert_eq!(ack.from_tag(), Some("fa"));
        // A retransmitted final gets the ACK again and is not passed up.
        l.on_message(t(6_500), answer(&inv, 486, "b1"), addr(B), Transport::Udp);
        assert!(events(&mut l).is_empty());
        assert_eq!(transmits(&mut l)[0].2, sent[0].2);
        // Timer D = 32 s.
        assert_eq!(l.poll_timeout(), Some(t(38_000)));
        l.handle_timeout(t(38_000));
        assert!(l.is_empty());
    }

    #[test]
    fn client_invite_2xx_is_passed_up_until_timer_m() {
        let mut l = layer();
        let key = l
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Udp)
            .unwrap();
        let SipMessage::Request(inv) = transmits(&mut l).remove(0).2 else {
            panic!()
        };
        l.on_message(t(100), answer(&inv, 200, "b1"), addr(B), Transport::Udp);
        l.on_message(t(600), answer(&inv, 200, "b1"), addr(B), Transport::Udp);
        // A second fork answers too.
        l.on_message(t(700), answer(&inv, 200, "b2"), addr(B), Transport::Udp);
        let ev = events(&mut l);
        assert_eq!(ev.len(), 3);
        assert!(ev.iter().all(
            |e| matches!(e, TxEvent::Response { key: k, resp, .. } if *k == key && resp.code == 200)
        ));
        // The layer does not ACK a 2xx, nor retransmit the INVITE.
        assert!(transmits(&mut l).is_empty());
        assert_eq!(l.poll_timeout(), Some(t(32_100)));
        assert!(run_until(&mut l, t(32_100)).is_empty());
        assert!(l.is_empty());
        l.on_message(t(33_000), answer(&inv, 200, "b1"), addr(B), Transport::Udp);
        assert_eq!(l.stats().stray_responses, 1);
    }

    #[test]
    fn cancel_without_invite_gets_481_and_retransmissions_the_same() {
        let mut l = layer();
        let cancel = request("CANCEL", "z9hG4bKnone");
        l.on_message(t(0), cancel.clone().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty());
        let sent = transmits(&mut l);
        assert_eq!(code(&sent[0].2), 481);
        l.on_message(t(100), cancel.into(), addr(A), Transport::Udp);
        assert_eq!(transmits(&mut l)[0].2, sent[0].2);
    }

    #[test]
    fn cancel_after_final_gets_200_without_an_event() {
        let mut l = layer();
        let inv = request("INVITE", "z9hG4bKcf");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Udp);
        l.respond(t(0), &key, SipResponse::to(&req, 486, "Busy", Some("b7")))
            .unwrap();
        transmits(&mut l);
        l.on_message(t(10), inv.cancel().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty());
        let sent = transmits(&mut l);
        assert_eq!(code(&sent[0].2), 200);
        assert_eq!(sent[0].2.to_tag(), Some("b7"));
        assert_eq!(sent[0].2.cseq(), Some((1, Method::Cancel)));
    }

    /// Two layers, A (caller) and B (callee), on a zero-latency network with a loss rule.
    struct Net {
        a: TransactionLayer,
        b: TransactionLayer,
        /// (ms, from A?, message) of everything delivered or lost.
        wire: Vec<(u64, bool, SipMessage, bool)>,
    }

    impl Net {
        fn new() -> Self {
            Self {
                a: layer(),
                b: layer(),
                wire: Vec::new(),
            }
        }

        /// Delivers queued messages both ways until both queues are empty.
        fn pump(&mut self, now: Instant, lose: &mut dyn FnMut(bool, &SipMessage) -> bool) {
            loop {
                let mut moved = false;
                while let Some((dest, tr, bytes)) = self.a.poll_transmit() {
                    assert_eq!(dest, addr(B));
                    let m = parse_datagram(&bytes).unwrap();
                    let lost = lose(true, &m);
                    self.wire.push((since(now), true, m.clone(), lost));
                    if !lost {
                        self.b.on_message(now, m, addr(A), tr);
                    }
                    moved = true;
                }
                while let Some((dest, tr, bytes)) = self.b.poll_transmit() {
                    assert_eq!(dest, addr(A));
                    let m = parse_datagram(&bytes).unwrap();
                    let lost = lose(false, &m);
                    self.wire.push((since(now), false, m.clone(), lost));
                    if !lost {
                        self.a.on_message(now, m, addr(B), tr);
                    }
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
        }

        fn next_deadline(&mut self) -> Option<Instant> {
            match (self.a.poll_timeout(), self.b.poll_timeout()) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            }
        }
    }

    fn is_req(m: &SipMessage, method: Method) -> bool {
        matches!(m, SipMessage::Request(r) if r.method == method)
    }

    #[test]
    fn lost_invite_and_lost_final_response_still_complete_the_exchange() {
        let mut net = Net::new();
        let (mut invites_seen, mut finals_seen) = (0, 0);
        let mut lose = move |from_a: bool, m: &SipMessage| {
            if from_a && is_req(m, Method::Invite) {
                invites_seen += 1;
                return invites_seen == 1; // the first INVITE is lost
            }
            if !from_a && matches!(m, SipMessage::Response(r) if r.code == 486) {
                finals_seen += 1;
                return finals_seen == 1; // and so is the first 486
            }
            false
        };
        let inv_key = net
            .a
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Udp)
            .unwrap();
        let (mut a_events, mut b_requests) = (Vec::new(), 0);
        let mut now = t(0);
        loop {
            net.pump(now, &mut lose);
            while let Some(ev) = net.b.poll_event() {
                match ev {
                    TxEvent::Request { key, req, .. } => {
                        b_requests += 1;
                        // Network duplicate of the INVITE: absorbed.
                        net.b
                            .on_message(now, req.clone().into(), addr(A), Transport::Udp);
                        net.b
                            .respond(
                                now,
                                &key,
                                SipResponse::to(&req, 486, "Busy Here", Some("b1")),
                            )
                            .unwrap();
                    }
                    other => panic!("B got {other:?}"),
                }
            }
            net.pump(now, &mut lose);
            while let Some(ev) = net.a.poll_event() {
                a_events.push((since(now), ev));
            }
            let Some(next) = net.next_deadline() else {
                break;
            };
            now = next;
            net.a.handle_timeout(now);
            net.b.handle_timeout(now);
        }
        assert_eq!(b_requests, 1);
        let got: Vec<(u64, u16)> = a_events
            .iter()
            .map(|(ms, ev)| match ev {
                TxEvent::Response { key, resp, .. } => {
                    assert_eq!(key, &inv_key);
                    (*ms, resp.code)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        // The duplicated INVITE got the layer's 100 Trying at once; the 486 came once.
        assert_eq!(got, [(500, 100), (1_000, 486)]);
        // On the wire: INVITE lost at 0, Timer A resends it at 500, it is answered at once
        // (lost), Timer G resends the 486 at 1000 and the ACK follows; Timer A stopped.
        let summary: Vec<(u64, bool, String, bool)> = net
            .wire
            .iter()
            .map(|(ms, from_a, m, lost)| {
                let what = match m {
                    SipMessage::Request(r) => r.method.to_string(),
                    SipMessage::Response(r) => r.code.to_string(),
                };
                (*ms, *from_a, what, *lost)
            })
            .collect();
        let expect: Vec<(u64, bool, String, bool)> = [
            (0, true, "INVITE", true),
            (500, true, "INVITE", false),
            (500, false, "100", false),
            (500, false, "486", true),
            (1_000, false, "486", false),
            (1_000, true, "ACK", false),
        ]
        .iter()
        .map(|(ms, a, w, l)| (*ms, *a, w.to_string(), *l))
        .collect();
        assert_eq!(summary, expect);
        assert!(net.a.is_empty() && net.b.is_empty());
        assert_eq!(net.b.stats().timeouts + net.a.stats().timeouts, 0);
    }

    #[test]
    fn lost_2xx_is_recovered_by_the_tu_and_the_ack_reaches_the_dialog() {
        let mut net = Net::new();
        let mut oks = 0;
        let mut lose = move |from_a: bool, m: &SipMessage| {
            if !from_a && matches!(m, SipMessage::Response(r) if r.code == 200) {
                oks += 1;
                return oks == 1;
            }
            false
        };
        net.a
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Udp)
            .unwrap();
        let mut server: Option<(ServerKey, SipResponse)> = None;
        let (mut a_oks, mut b_acks, mut b_requests) = (0, 0, 0);
        let mut now = t(0);
        let mut resent = false;
        loop {
            net.pump(now, &mut lose);
            while let Some(ev) = net.b.poll_event() {
                match ev {
                    TxEvent::Request { key, req, .. } => {
                        b_requests += 1;
                        let ok = SipResponse::to(&req, 200, "OK", Some("b1"));
                        net.b.respond(now, &key, ok.clone()).unwrap();
                        server = Some((key, ok));
                    }
                    TxEvent::Ack { .. } => b_acks += 1,
                    other => panic!("B got {other:?}"),
                }
            }
            while let Some(ev) = net.a.poll_event() {
                if let TxEvent::Response { resp, .. } = ev {
                    assert_eq!(resp.code, 200);
                    a_oks += 1;
                    // The dialog ACKs the 2xx itself, in a new transaction.
                    let mut ack = SipRequest::new(Method::Ack, "sip:bob@gw");
                    ack.add_header("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKack;rport");
                    for h in ["From", "To", "Call-ID"] {
                        ack.add_header(h, resp.header(h).unwrap());
                    }
                    ack.add_header("CSeq", "1 ACK");
                    net.a.send_stateless(addr(B), Transport::Udp, ack);
                }
            }
            net.pump(now, &mut lose);
            // The callee's dialog retransmits its 2xx after T1 (RFC 6026 §7.1 leaves it to it).
            let tu_due = t(500);
            if !resent && now >= tu_due {
                if let Some((key, ok)) = &server {
                    net.b.respond(now, key, ok.clone()).unwrap();
                    resent = true;
                    continue;
                }
            }
            let Some(next) = net.next_deadline() else {
                break;
            };
            now = if resent { next } else { next.min(tu_due) };
            net.a.handle_timeout(now);
            net.b.handle_timeout(now);
        }
        assert_eq!((b_requests, a_oks, b_acks), (1, 1, 1));
        // The INVITE retransmitted by Timer A at 500 ms was absorbed in Accepted.
        assert!(net
            .wire
            .iter()
            .any(|(ms, a, m, _)| *ms == 500 && *a && is_req(m, Method::Invite)));
        assert!(net.a.is_empty() && net.b.is_empty());
    }

    #[test]
    fn cancel_waits_for_a_provisional_then_487_and_ack() {
        let mut net = Net::new();
        let inv_key = net
            .a
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Udp)
            .unwrap();
        let cancel_key = net.a.cancel(t(0), &inv_key).unwrap();
        assert_eq!(
            cancel_key,
            ClientKey {
                branch: inv_key.branch.clone(),
                method: Method::Cancel
            }
        );
        let mut none = |_: bool, _: &SipMessage| false;
        net.pump(t(0), &mut none);
        // Only the INVITE went out: no CANCEL before a provisional response.
        assert_eq!(net.wire.len(), 1);
        let Some(TxEvent::Request {
            key: b_key,
            req: b_req,
            ..
        }) = net.b.poll_event()
        else {
            panic!()
        };
        // The callee's TU is silent: the layer's 100 Trying at 200 ms releases the CANCEL.
        net.a.handle_timeout(t(200));
        net.b.handle_timeout(t(200));
        net.pump(t(200), &mut none);
        let wire: Vec<String> = net
            .wire
            .iter()
            .map(|(_, _, m, _)| match m {
                SipMessage::Request(r) => r.method.to_string(),
                SipMessage::Response(r) => r.code.to_string(),
            })
            .collect();
        assert_eq!(wire, ["INVITE", "100", "CANCEL", "200"]);
        let SipMessage::Request(cancel) = &net.wire[2].2 else {
            panic!()
        };
        assert_eq!(cancel.top_via_branch(), Some(inv_key.branch.clone()));
        assert_eq!(cancel.cseq(), Some((1, Method::Cancel)));
        match net.b.poll_event() {
            Some(TxEvent::Cancel { invite, req, .. }) => {
                assert_eq!(invite, b_key);
                assert_eq!(req.method, Method::Cancel);
            }
            other => panic!("{other:?}"),
        }
        net.b
            .respond(
                t(200),
                &b_key,
                SipResponse::to(&b_req, 487, "Request Terminated", Some("b1")),
            )
            .unwrap();
        net.pump(t(200), &mut none);
        let codes: Vec<(ClientKey, u16)> = std::iter::from_fn(|| net.a.poll_event())
            .map(|e| match e {
                TxEvent::Response { key, resp, .. } => (key, resp.code),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            [
                (inv_key.clone(), 100),
                (cancel_key.clone(), 200),
                (inv_key.clone(), 487)
            ]
        );
        assert!(is_req(&net.wire.last().unwrap().2, Method::Ack));
        // B is Confirmed (Timer I) and the CANCEL's server transaction waits in Timer J.
        assert!(net.b.poll_event().is_none());
        assert_eq!(net.b.len(), 2);
        assert_eq!(net.a.cancel(t(300), &inv_key), Err(TxError::NotCancellable));
    }

    #[test]
    fn the_cap_refuses_new_transactions_with_503() {
        let mut l = TransactionLayer::with_limit(TimerConfig::default(), 2);
        receive(&mut l, t(0), &request("INVITE", "z9hG4bK1"), Transport::Udp);
        receive(
            &mut l,
            t(0),
            &request("OPTIONS", "z9hG4bK2"),
            Transport::Udp,
        );
        l.on_message(
            t(0),
            request("INVITE", "z9hG4bK3").into(),
            addr(A),
            Transport::Udp,
        );
        assert!(events(&mut l).is_empty());
        let sent = transmits(&mut l);
        let SipMessage::Response(busy) = &sent[0].2 else {
            panic!()
        };
        assert_eq!(busy.code, 503);
        assert!(busy.to_tag().is_some());
        assert_eq!(busy.header("Retry-After"), Some("5"));
        assert_eq!(l.stats().refused, 1);
        // ACKs are never answered, even when full.
        l.on_message(
            t(0),
            request("ACK", "z9hG4bK4").into(),
            addr(A),
            Transport::Udp,
        );
        assert!(transmits(&mut l).is_empty());
        assert_eq!(
            l.send_request(t(0), outgoing("OPTIONS"), addr(B), Transport::Udp),
            Err(TxError::Overloaded)
        );
    }

    #[test]
    fn transport_errors_end_the_transactions_towards_that_peer() {
        let mut l = layer();
        let ck = l
            .send_request(t(0), outgoing("INVITE"), addr(B), Transport::Tcp)
            .unwrap();
        let other = l
            .send_request(t(0), outgoing("OPTIONS"), addr(A), Transport::Tcp)
            .unwrap();
        l.on_transport_error(addr(B), Transport::Tcp);
        assert_eq!(
            events(&mut l),
            [TxEvent::TransportError {
                key: TxKey::Client(ck)
            }]
        );
        assert_eq!(l.len(), 1);
        let _ = other;
    }

    #[test]
    fn responses_go_to_the_via_port_without_rport() {
        let mut l = layer();
        let mut inv = request("OPTIONS", "z9hG4bKp1");
        inv.headers
            .replace_top_via("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKp1");
        l.on_message(t(0), inv.into(), addr("192.0.2.1:40000"), Transport::Udp);
        let Some(TxEvent::Request { key, req, .. }) = l.poll_event() else {
            panic!()
        };
        assert!(req
            .header("Via")
            .unwrap()
            .ends_with(";branch=z9hG4bKp1;received=192.0.2.1"));
        l.respond(t(0), &key, SipResponse::to(&req, 200, "OK", Some("x")))
            .unwrap();
        assert_eq!(transmits(&mut l)[0].0, addr("192.0.2.1:5070"));
    }

    #[test]
    fn rfc2543_requests_without_magic_cookie_still_match() {
        let mut l = layer();
        let mut inv = request("INVITE", "old1");
        inv.headers.replace_top_via("SIP/2.0/UDP 192.0.2.1:5060");
        let (key, req) = receive(&mut l, t(0), &inv, Transport::Udp);
        assert!(key.branch.starts_with("rfc2543|"));
        // Retransmission matches.
        l.on_message(t(10), inv.clone().into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty());
        let busy = SipResponse::to(&req, 486, "Busy", Some("b1"));
        l.respond(t(20), &key, busy.clone()).unwrap();
        // The ACK (no branch, To tag from the response) confirms the same transaction.
        l.on_message(t(30), inv.ack_for(&busy).into(), addr(A), Transport::Udp);
        assert!(events(&mut l).is_empty());
        assert_eq!(l.poll_timeout(), Some(t(5_030)));
    }

    #[test]
    fn many_call_setups_are_cheap() {
        // INVITE/100/180/200/ACK/BYE/200 through two layers, 2000 times, in one go: the
        // per-call work of the layer and the message model must stay small.
        let mut net = Net::new();
        let mut none = |_: bool, _: &SipMessage| false;
        let start = Instant::now();
        for i in 0..2000u32 {
            let now = t(u64::from(i));
            let mut inv = outgoing("INVITE");
            inv.set_header("Call-ID", format!("c{i}"));
            let ik = net
                .a
                .send_request(now, inv, addr(B), Transport::Udp)
                .unwrap();
            net.pump(now, &mut none);
            let Some(TxEvent::Request { key, req, .. }) = net.b.poll_event() else {
                panic!()
            };
            net.b
                .respond(now, &key, SipResponse::to(&req, 180, "Ringing", Some("b")))
                .unwrap();
            net.b
                .respond(now, &key, SipResponse::to(&req, 200, "OK", Some("b")))
                .unwrap();
            net.pump(now, &mut none);
            let mut ok = None;
            while let Some(ev) = net.a.poll_event() {
                if let TxEvent::Response { key, resp, .. } = ev {
                    assert_eq!(key, ik);
                    ok = Some(resp);
                }
            }
            let ok = ok.unwrap();
            let mut ack = SipRequest::new(Method::Ack, "sip:bob@gw");
            ack.add_header(
                "Via",
                format!("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa{i}"),
            );
            let mut bye = SipRequest::new(Method::Bye, "sip:bob@gw");
            bye.add_header("Via", "SIP/2.0/UDP 192.0.2.1:5060");
            for h in ["From", "To", "Call-ID"] {
                ack.add_header(h, ok.header(h).unwrap());
                bye.add_header(h, ok.header(h).unwrap());
            }
            ack.add_header("CSeq", "1 ACK");
            bye.add_header("CSeq", "2 BYE");
            net.a.send_stateless(addr(B), Transport::Udp, ack);
            net.a
                .send_request(now, bye, addr(B), Transport::Udp)
                .unwrap();
            net.pump(now, &mut none);
            while let Some(ev) = net.b.poll_event() {
                if let TxEvent::Request { key, req, .. } = ev {
                    net.b
                        .respond(now, &key, SipResponse::to(&req, 200, "OK", None))
                        .unwrap();
                }
            }
            net.pump(now, &mut none);
            while net.a.poll_event().is_some() {}
        }
        let elapsed = start.elapsed();
        // Debug builds are ~10x slower than release; even so, 2000 calls take well under a
        // few seconds. The real number comes from `cargo bench --bench sip`.
        assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
        net.a.handle_timeout(t(200_000));
        net.b.handle_timeout(t(200_000));
        assert!(net.a.is_empty() && net.b.is_empty());
    }
}
