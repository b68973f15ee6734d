//! A TURN client (RFC 8656 over UDP, STUN framing and long-term credentials per RFC 8489),
//! sans-IO: it is fed the server's datagrams and the time, and hands back datagrams for the
//! server. Telegram's `phoneConnectionWebrtc` entries name TURN servers with a username and
//! password; a call with `p2p_allowed = false` must reach the peer through such a relay only.
//!
//! One [`TurnClient`] is one allocation on one server, used from one local UDP socket (the
//! 5-tuple is the allocation's identity on the server). The owner:
//! - sends whatever [`TurnClient::poll_transmit`] returns to [`TurnClient::server`];
//! - passes datagrams from the server (see [`TurnClient::is_from_server`]) to
//!   [`TurnClient::receive`], which returns relayed peer data as `(peer, payload)`;
//! - wraps outgoing peer data with [`TurnClient::send_to`];
//! - calls [`TurnClient::handle_timeout`] at [`TurnClient::poll_timeout`] and drains
//!   [`TurnClient::poll_event`].
//!
//! The client answers the 401 challenge, follows 438 nonce changes, retransmits requests on the
//! RFC 8489 schedule, refreshes the allocation, its permissions and channel bindings before they
//! expire, and moves each peer from Send indications to ChannelData once its channel is bound.
//! Usernames and passwords are used as given (no OpaqueString/SASLprep): Telegram's are ASCII.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// Why a TURN exchange failed or a datagram was refused; each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    /// Bytes that are neither valid STUN nor ChannelData; dropped.
    #[error("malformed datagram from the TURN server: {0}")]
    Malformed(&'static str),
    /// A STUN message whose FINGERPRINT does not match its contents; dropped.
    #[error("FINGERPRINT of a message from the TURN server does not match its contents")]
    Fingerprint,
    /// A response to an authenticated request whose MESSAGE-INTEGRITY is wrong or missing:
    /// forged or corrupted. It is dropped as if never received (the request keeps retrying).
    #[error("{method} response {problem}; dropped as forged or corrupted")]
    Integrity {
        method: &'static str,
        problem: &'static str,
    },
    /// The server refused our credentials (401 after we sent them): wrong username or password.
    #[error(
        "TURN server refused the credentials of user {username:?} in realm {realm:?}: \
         {code} {reason} (wrong username or password?)"
    )]
    Unauthorized {
        username: String,
        realm: String,
        code: u16,
        reason: String,
    },
    /// An error response other than an authentication challenge, with its code and reason.
    #[error("TURN {method} refused: {code} {reason}")]
    Rejected {
        method: &'static str,
        code: u16,
        reason: String,
    },
    /// No response after every retransmission (7 sends over 39.5 s).
    #[error("TURN {method} to {server} got no response after 7 transmissions over 39.5 s")]
    Timeout {
        method: &'static str,
        server: SocketAddr,
    },
    /// ChannelData on a channel number we never bound.
    #[error("ChannelData on channel {0:#06x}, which is bound to no peer")]
    UnknownChannel(u16),
    /// All 16384 channel numbers are taken; the peer is reached through Send indications.
    #[error("all 16384 TURN channel numbers are in use")]
    ChannelsExhausted,
    /// The allocation's lifetime ran out before a Refresh succeeded.
    #[error("the TURN allocation expired before a Refresh succeeded")]
    Expired,
    /// The server (RFC 8489 nonce cookie) offers password algorithms, none of them MD5.
    #[error("TURN server offers password algorithms {0:?}, and this client speaks only MD5 (1)")]
    PasswordAlgorithm(Vec<u16>),
}

/// What the owner of a [`TurnClient`] must act on; drained with [`TurnClient::poll_event`].
/// Failed permissions and channel bindings are only logged: the client falls back to Send
/// indications, and a peer without a permission shows up as an ICE pair that never succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    /// The allocation exists: `relayed` is the relay candidate's address
    /// ([`TurnClient::mapped`] gives the server-reflexive one).
    Allocated { relayed: SocketAddr },
    /// The allocation failed or was lost; the client does nothing more.
    Failed(TurnError),
}

/// RFC 8489 §6: the magic cookie in every STUN header.
const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER_LEN: usize = 20;
/// RFC 8489 §14.7: FINGERPRINT is the CRC-32 of the message XORed with this.
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// RFC 8489 §9.2.4: a NONCE starting with this announces the security features (and may come
/// with PASSWORD-ALGORITHMS).
const NONCE_COOKIE: &[u8] = b"obMatJos2";

// Methods (RFC 8656 §17).
const ALLOCATE: u16 = 0x003;
const REFRESH: u16 = 0x004;
const SEND: u16 = 0x006;
const DATA: u16 = 0x007;
const CREATE_PERMISSION: u16 = 0x008;
const CHANNEL_BIND: u16 = 0x009;

// Attributes (RFC 8489 §18.3, RFC 8656 §18).
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_DATA: u16 = 0x0013;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
const ATTR_PASSWORD_ALGORITHM: u16 = 0x001D;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_PASSWORD_ALGORITHMS: u16 = 0x8002;
const ATTR_FINGERPRINT: u16 = 0x8028;

/// REQUESTED-TRANSPORT value: UDP (IANA protocol 17).
const TRANSPORT_UDP: u8 = 17;
/// PASSWORD-ALGORITHM number of MD5 (RFC 8489 §18.5).
const PASSWORD_ALGORITHM_MD5: u16 = 0x0001;

/// RFC 8489 §6.2.1: initial RTO, number of sends (Rc) and the wait after the last (Rm × RTO).
const RTO: Duration = Duration::from_millis(500);
const MAX_SENDS: u32 = 7;
const LAST_WAIT: u32 = 16;
/// Lifetime assumed when a success response omits LIFETIME (RFC 8656 §7.2 default).
const DEFAULT_LIFETIME: u32 = 600;
/// A LIFETIME beyond a day is taken as a day (no server grants that much; keeps `Instant`
/// arithmetic far from overflow).
const MAX_LIFETIME: u32 = 86_400;
/// Permissions last 300 s, channel bindings 600 s (RFC 8656 §9, §12); refreshed a minute early.
const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
const CHANNEL_REFRESH: Duration = Duration::from_secs(540);
/// At most this many 438 (Stale Nonce) retries in a row for one request.
const MAX_STALE_RETRIES: u8 = 3;
/// RFC 8656 §12: channel numbers a client may bind.
const FIRST_CHANNEL: u16 = 0x4000;
const LAST_CHANNEL: u16 = 0x7FFF;
/// Peer data larger than this is refused by [`TurnClient::send_to`]: it would not fit a UDP
/// datagram with the TURN framing around it.
const MAX_DATA: usize = 65_000;

/// One allocation on one TURN server, driven sans-IO.
pub struct TurnClient {
    server: SocketAddr,
    username: String,
    password: String,
    auth: Option<Auth>,
    phase: Phase,
    transactions: Vec<Transaction>,
    permissions: HashMap<IpAddr, Upkeep>,
    channels: HashMap<SocketAddr, Channel>,
    channel_peers: HashMap<u16, SocketAddr>,
    next_channel: u16,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<TurnEvent>,
}

/// The long-term credential state learnt from the server's challenge.
struct Auth {
    realm: String,
    nonce: Vec<u8>,
    key: [u8; 16],
    /// PASSWORD-ALGORITHMS exactly as the server sent it, echoed back (RFC 8489 §9.2.4).
    algorithms: Option<Vec<u8>>,
}

enum Phase {
    Allocating,
    Allocated(Allocation),
    Closing,
    /// Closed or failed: nothing more is sent.
    Done,
}

struct Allocation {
    relayed: SocketAddr,
    mapped: Option<SocketAddr>,
    expires: Instant,
    refresh_at: Instant,
    refreshing: bool,
}

/// When a permission or channel binding next needs a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upkeep {
    /// Send (Create|Refresh) at this time, once allocated.
    Due(Instant),
    InFlight,
    /// Given up; [`TurnClient::add_permission`] tries a failed permission again.
    Failed,
}

struct Channel {
    number: u16,
    upkeep: Upkeep,
    bound: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Allocate,
    /// `Some(0)` deletes the allocation ([`TurnClient::close`]); `None` asks for the default.
    Refresh(Option<u32>),
    CreatePermission(IpAddr),
    ChannelBind {
        number: u16,
        peer: SocketAddr,
    },
}

impl Request {
    fn method(self) -> u16 {
        match self {
            Request::Allocate => ALLOCATE,
            Request::Refresh(_) => REFRESH,
            Request::CreatePermission(_) => CREATE_PERMISSION,
            Request::ChannelBind { .. } => CHANNEL_BIND,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Request::Allocate => "Allocate",
            Request::Refresh(_) => "Refresh",
            Request::CreatePermission(_) => "CreatePermission",
            Request::ChannelBind { .. } => "ChannelBind",
        }
    }
}

struct Transaction {
    id: [u8; 12],
    request: Request,
    bytes: Vec<u8>,
    /// The key its MESSAGE-INTEGRITY was made with; responses must verify with it.
    key: Option<[u8; 16]>,
    sends: u32,
    deadline: Instant,
    stale_retries: u8,
}

impl TurnClient {
    /// A client for `server` with Telegram's TURN `username` and `password`; the first
    /// Allocate is queued for [`TurnClient::poll_transmit`].
    pub fn new(server: SocketAddr, username: &str, password: &str, now: Instant) -> Self {
        let mut client = TurnClient {
            server: canonical(server),
            username: username.to_string(),
            password: password.to_string(),
            auth: None,
            phase: Phase::Allocating,
            transactions: Vec::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            channel_peers: HashMap::new(),
            next_channel: FIRST_CHANNEL,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        };
        client.start(now, Request::Allocate, 0);
        client
    }

    /// Where every datagram from [`TurnClient::poll_transmit`] and [`TurnClient::send_to`] goes.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The relayed transport address (the relay candidate), once allocated and until closed.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match &self.phase {
            Phase::Allocated(a) => Some(a.relayed),
            _ => None,
        }
    }

    /// Our address as the server saw it (XOR-MAPPED-ADDRESS), once allocated and until closed.
    pub fn mapped(&self) -> Option<SocketAddr> {
        match &self.phase {
            Phase::Allocated(a) => a.mapped,
            _ => None,
        }
    }

    /// True once [`TurnClient::close`] finished or the client failed: nothing more will be sent,
    /// and the owner may drop the client and its socket.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether a datagram received from `from` belongs to this client (it came from the server),
    /// so that one socket can carry TURN and other traffic.
    pub fn is_from_server(&self, from: SocketAddr) -> bool {
        canonical(from) == self.server
    }

    /// Handles a datagram from the server. Responses advance the client (their outcome shows up
    /// in [`TurnClient::poll_event`]) and give `Ok(None)`, as do stale retransmitted responses;
    /// relayed data (ChannelData or a Data indication) is returned as `(peer, payload)`.
    /// Malformed, forged or unexpected datagrams give an error and change nothing.
    pub fn receive(
        &mut self,
        now: Instant,
        bytes: &[u8],
    ) -> Result<Option<(SocketAddr, Vec<u8>)>, TurnError> {
        let first = *bytes
            .first()
            .ok_or(TurnError::Malformed("empty datagram"))?;
        match first >> 6 {
            0b01 => self.receive_channel_data(bytes).map(Some),
            0b00 => {
                let message = Message::parse(bytes)?;
                match message.class {
                    Class::Indication if message.method == DATA => {
                        let peer = message
                            .attr(ATTR_XOR_PEER_ADDRESS)
                            .ok_or(TurnError::Malformed(
                                "Data indication without XOR-PEER-ADDRESS",
                            ))
                            .and_then(|v| decode_xor_address(v, &message.id))?;
                        let data = message
                            .attr(ATTR_DATA)
                            .ok_or(TurnError::Malformed("Data indication without DATA"))?;
                        Ok(Some((peer, data.to_vec())))
                    }
                    Class::Success | Class::Error => {
                        self.on_response(now, &message)?;
                        Ok(None)
                    }
                    Class::Request | Class::Indication => Err(TurnError::Malformed(
                        "a STUN request or an indication other than Data",
                    )),
                }
            }
            _ => Err(TurnError::Malformed("neither STUN nor ChannelData")),
        }
    }

    /// Wraps `data` for `peer` in a datagram for the server: ChannelData once the peer's channel
    /// is bound, a Send indication until then. For a new peer it also requests the permission
    /// and binds a channel (those requests come out of [`TurnClient::poll_transmit`]). `None`
    /// while there is no allocation, or for data larger than a UDP datagram can relay.
    pub fn send_to(&mut self, now: Instant, peer: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        if !matches!(self.phase, Phase::Allocated(_)) || data.len() > MAX_DATA {
            return None;
        }
        let peer = canonical(peer);
        self.permissions
            .entry(peer.ip())
            .or_insert(Upkeep::Due(now));
        if !self.channels.contains_key(&peer) {
            self.new_channel(now, peer);
        }
        self.issue_due(now);
        if let Some(channel) = self.channels.get(&peer).filter(|c| c.bound) {
            let mut out = Vec::with_capacity(4 + data.len());
            out.extend_from_slice(&channel.number.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
            return Some(out);
        }
        let id = rand::random::<[u8; 12]>();
        let mut m = Builder::new(SEND, Class::Indication, &id);
        m.xor_address(ATTR_XOR_PEER_ADDRESS, peer);
        m.attr(ATTR_DATA, data);
        Some(m.finish())
    }

    /// Asks the server to accept traffic from and to `peer` (an IP: permissions ignore ports),
    /// e.g. for each remote ICE candidate, so that the peer's first packets are not dropped. Kept
    /// refreshed until [`TurnClient::close`]; a failed permission is tried again.
    pub fn add_permission(&mut self, now: Instant, peer: IpAddr) {
        if matches!(self.phase, Phase::Closing | Phase::Done) {
            return;
        }
        let peer = peer.to_canonical();
        match self.permissions.get(&peer) {
            Some(Upkeep::Due(_) | Upkeep::InFlight) => {}
            Some(Upkeep::Failed) | None => {
                self.permissions.insert(peer, Upkeep::Due(now));
                self.issue_due(now);
            }
        }
    }

    /// The next request (or retransmission) to send to [`TurnClient::server`].
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next change of the allocation (allocated, or failed).
    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// When [`TurnClient::handle_timeout`] must run next (a retransmission or a refresh);
    /// `None` once closed or failed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let transactions = self.transactions.iter().map(|t| t.deadline);
        let Phase::Allocated(a) = &self.phase else {
            return transactions.min();
        };
        let due = |u: &Upkeep| match u {
            Upkeep::Due(t) => Some(*t),
            _ => None,
        };
        let refresh = (!a.refreshing).then_some(a.refresh_at);
        transactions
            .chain(std::iter::once(a.expires))
            .chain(refresh)
            .chain(self.permissions.values().filter_map(due))
            .chain(self.channels.values().filter_map(|c| due(&c.upkeep)))
            .min()
    }

    /// Retransmits unanswered requests (RFC 8489: RTO 500 ms doubling, 7 sends, then 8 s),
    /// fails those that ran out, and refreshes the allocation, permissions and channels that
    /// are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut timed_out = Vec::new();
        for t in &mut self.transactions {
            if t.deadline > now {
                continue;
            }
            if t.sends < MAX_SENDS {
                t.sends += 1;
                t.deadline = next_deadline(now, t.sends);
                self.transmit.push_back(t.bytes.clone());
            } else {
                timed_out.push(t.id);
            }
        }
        for id in timed_out {
            if let Some(i) = self.transactions.iter().position(|t| t.id == id) {
                let t = self.transactions.remove(i);
                let error = TurnError::Timeout {
                    method: t.request.name(),
                    server: self.server,
                };
                self.request_failed(t.request, error);
            }
        }
        if let Phase::Allocated(a) = &self.phase {
            if now >= a.expires {
                self.fail(TurnError::Expired);
                return;
            }
        }
        self.issue_due(now);
    }

    /// Releases the allocation (Refresh with LIFETIME 0); [`TurnClient::is_closed`] turns true
    /// when the server answers or the request runs out of retransmissions. An Allocate still
    /// unanswered is abandoned at once.
    pub fn close(&mut self, now: Instant) {
        match self.phase {
            Phase::Allocated(_) => {
                self.clear();
                self.phase = Phase::Closing;
                self.start(now, Request::Refresh(Some(0)), 0);
            }
            Phase::Allocating => self.finish_close(),
            Phase::Closing | Phase::Done => {}
        }
    }

    fn receive_channel_data(&self, bytes: &[u8]) -> Result<(SocketAddr, Vec<u8>), TurnError> {
        let [n0, n1, l0, l1, rest @ ..] = bytes else {
            return Err(TurnError::Malformed("ChannelData shorter than its header"));
        };
        let number = u16::from_be_bytes([*n0, *n1]);
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        // Over UDP the payload may be followed by padding, never cut short (RFC 8656 §12.5).
        let payload = rest
            .get(..len)
            .ok_or(TurnError::Malformed("ChannelData longer than its datagram"))?;
        let peer = self
            .channel_peers
            .get(&number)
            .ok_or(TurnError::UnknownChannel(number))?;
        Ok((*peer, payload.to_vec()))
    }

    /// Reserves the next channel number for `peer`; its ChannelBind goes out with the next
    /// `issue_due`.
    fn new_channel(&mut self, now: Instant, peer: SocketAddr) {
        if self.next_channel > LAST_CHANNEL {
            self.channels.insert(
                peer,
                Channel {
                    number: 0,
                    upkeep: Upkeep::Failed,
                    bound: false,
                },
            );
            tracing::debug!(server = %self.server, %peer, "{}", TurnError::ChannelsExhausted);
            return;
        }
        let number = self.next_channel;
        self.next_channel += 1;
        self.channel_peers.insert(number, peer);
        self.channels.insert(
            peer,
            Channel {
                number,
                upkeep: Upkeep::Due(now),
                bound: false,
            },
        );
    }

    /// Sends the permission, channel and allocation refreshes that are due.
    fn issue_due(&mut self, now: Instant) {
        let Phase::Allocated(a) = &mut self.phase else {
            return;
        };
        let refresh = !a.refreshing && now >= a.refresh_at;
        if refresh {
            a.refreshing = true;
        }
        let mut requests = Vec::new();
        for (ip, upkeep) in &mut self.permissions {
            if matches!(upkeep, Upkeep::Due(t) if *t <= now) {
                *upkeep = Upkeep::InFlight;
                requests.push(Request::CreatePermission(*ip));
            }
        }
        for (peer, channel) in &mut self.channels {
            if matches!(channel.upkeep, Upkeep::Due(t) if t <= now) {
                channel.upkeep = Upkeep::InFlight;
                requests.push(Request::ChannelBind {
                    number: channel.number,
                    peer: *peer,
                });
            }
        }
        if refresh {
            requests.push(Request::Refresh(None));
        }
        for request in requests {
            self.start(now, request, 0);
        }
    }

    /// Sends `request` as a new transaction, authenticated once the server's challenge is known.
    fn start(&mut self, now: Instant, request: Request, stale_retries: u8) {
        let id = rand::random::<[u8; 12]>();
        let mut m = Builder::new(request.method(), Class::Request, &id);
        match request {
            Request::Allocate => m.attr(ATTR_REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0]),
            Request::Refresh(Some(lifetime)) => m.attr(ATTR_LIFETIME, &lifetime.to_be_bytes()),
            Request::Refresh(None) => {}
            Request::CreatePermission(ip) => {
                m.xor_address(ATTR_XOR_PEER_ADDRESS, SocketAddr::new(ip, 0))
            }
            Request::ChannelBind { number, peer } => {
                let [hi, lo] = number.to_be_bytes();
                m.attr(ATTR_CHANNEL_NUMBER, &[hi, lo, 0, 0]);
                m.xor_address(ATTR_XOR_PEER_ADDRESS, peer);
            }
        }
        let key = self.auth.as_ref().map(|auth| {
            m.attr(ATTR_USERNAME, self.username.as_bytes());
            m.attr(ATTR_REALM, auth.realm.as_bytes());
            m.attr(ATTR_NONCE, &auth.nonce);
            if let Some(algorithms) = &auth.algorithms {
                m.attr(ATTR_PASSWORD_ALGORITHMS, algorithms);
                let [hi, lo] = PASSWORD_ALGORITHM_MD5.to_be_bytes();
                m.attr(ATTR_PASSWORD_ALGORITHM, &[hi, lo, 0, 0]);
            }
            m.integrity(&auth.key);
            auth.key
        });
        m.fingerprint();
        let bytes = m.finish();
        self.transmit.push_back(bytes.clone());
        self.transactions.push(Transaction {
            id,
            request,
            bytes,
            key,
            sends: 1,
            deadline: next_deadline(now, 1),
            stale_retries,
        });
    }

    fn on_response(&mut self, now: Instant, message: &Message) -> Result<(), TurnError> {
        let Some(i) = self.transactions.iter().position(|t| t.id == message.id) else {
            // A retransmission's answer after the first one was handled, or not ours.
            return Ok(());
        };
        let t = &self.transactions[i];
        let method = t.request.name();
        if message.method != t.request.method() {
            return Err(TurnError::Malformed(
                "response method differs from its request's",
            ));
        }
        let success = message.class == Class::Success;
        // RFC 8489 §9.2.5: a response to an authenticated request is authenticated with the same
        // key. Error responses the server could not sign (the 401/438 challenges, 400) carry
        // none and are taken as they are.
        match (t.key, message.integrity.is_some()) {
            (Some(key), true) if !message.verify_integrity(&key) => {
                return Err(TurnError::Integrity {
                    method,
                    problem: "fails MESSAGE-INTEGRITY",
                });
            }
            (Some(_), false) if success => {
                return Err(TurnError::Integrity {
                    method,
                    problem: "lacks MESSAGE-INTEGRITY",
                });
            }
            _ => {}
        }
        let error = if success {
            None
        } else {
            Some(message.error_code()?)
        };
        let t = self.transactions.remove(i);
        match error {
            None => self.request_succeeded(now, t.request, message),
            Some((code, reason)) => self.on_error(now, t, message, code, reason),
        }
        Ok(())
    }

    fn on_error(
        &mut self,
        now: Instant,
        t: Transaction,
        message: &Message,
        code: u16,
        reason: String,
    ) {
        let challenge = match code {
            401 if t.key.is_none() => self.take_challenge(message, true),
            438 if t.stale_retries < MAX_STALE_RETRIES => self.take_challenge(message, false),
            401 => Err(TurnError::Unauthorized {
                username: self.username.clone(),
                realm: self
                    .auth
                    .as_ref()
                    .map(|a| a.realm.clone())
                    .unwrap_or_default(),
                code,
                reason,
            }),
            _ => Err(TurnError::Rejected {
                method: t.request.name(),
                code,
                reason,
            }),
        };
        match challenge {
            Ok(()) => {
                let stale = if code == 438 { t.stale_retries + 1 } else { 0 };
                self.start(now, t.request, stale);
            }
            Err(error) => self.request_failed(t.request, error),
        }
    }

    /// Takes REALM and NONCE from a 401 (`first`) or 438 response into our credentials.
    fn take_challenge(&mut self, message: &Message, first: bool) -> Result<(), TurnError> {
        let nonce = message
            .attr(ATTR_NONCE)
            .ok_or(TurnError::Malformed("401/438 response without NONCE"))?
            .to_vec();
        let realm = match (message.attr(ATTR_REALM), &self.auth) {
            (Some(realm), _) => String::from_utf8_lossy(realm).into_owned(),
            (None, Some(auth)) if !first => auth.realm.clone(),
            (None, _) => return Err(TurnError::Malformed("401/438 response without REALM")),
        };
        let algorithms = match message.attr(ATTR_PASSWORD_ALGORITHMS) {
            Some(value) if nonce.starts_with(NONCE_COOKIE) => {
                let offered = password_algorithms(value)?;
                if !offered.contains(&PASSWORD_ALGORITHM_MD5) {
                    return Err(TurnError::PasswordAlgorithm(offered));
                }
                Some(value.to_vec())
            }
            _ => self.auth.as_ref().and_then(|a| a.algorithms.clone()),
        };
        let key = long_term_key(&self.username, &realm, &self.password);
        self.auth = Some(Auth {
            realm,
            nonce,
            key,
            algorithms,
        });
        Ok(())
    }

    fn request_succeeded(&mut self, now: Instant, request: Request, message: &Message) {
        match request {
            Request::Allocate => {
                let relayed = message
                    .attr(ATTR_XOR_RELAYED_ADDRESS)
                    .ok_or(TurnError::Malformed(
                        "Allocate success without XOR-RELAYED-ADDRESS",
                    ))
                    .and_then(|v| decode_xor_address(v, &message.id));
                let relayed = match relayed {
                    Ok(relayed) => relayed,
                    Err(error) => return self.fail(error),
                };
                let mapped = message
                    .attr(ATTR_XOR_MAPPED_ADDRESS)
                    .and_then(|v| decode_xor_address(v, &message.id).ok());
                let (expires, refresh_at) = lifetime_times(now, message);
                self.phase = Phase::Allocated(Allocation {
                    relayed,
                    mapped,
                    expires,
                    refresh_at,
                    refreshing: false,
                });
                self.events.push_back(TurnEvent::Allocated { relayed });
                self.issue_due(now);
            }
            Request::Refresh(Some(0)) => self.finish_close(),
            Request::Refresh(_) => {
                let (expires, refresh_at) = lifetime_times(now, message);
                if let Phase::Allocated(a) = &mut self.phase {
                    a.expires = expires;
                    a.refresh_at = refresh_at;
                    a.refreshing = false;
                }
            }
            Request::CreatePermission(ip) => {
                if let Some(upkeep) = self.permissions.get_mut(&ip) {
                    *upkeep = Upkeep::Due(now + PERMISSION_REFRESH);
                }
            }
            Request::ChannelBind { peer, .. } => {
                if let Some(channel) = self.channels.get_mut(&peer) {
                    channel.bound = true;
                    channel.upkeep = Upkeep::Due(now + CHANNEL_REFRESH);
                }
            }
        }
    }

    fn request_failed(&mut self, request: Request, error: TurnError) {
        match request {
            Request::Allocate => self.fail(error),
            Request::Refresh(Some(0)) => self.finish_close(),
            Request::Refresh(_) => self.fail(error),
            Request::CreatePermission(peer) => {
                if let Some(upkeep) = self.permissions.get_mut(&peer) {
                    *upkeep = Upkeep::Failed;
                }
                tracing::warn!(server = %self.server, %peer, "TURN permission: {error}");
            }
            Request::ChannelBind { peer, .. } => {
                if let Some(channel) = self.channels.get_mut(&peer) {
                    channel.upkeep = Upkeep::Failed;
                    channel.bound = false;
                }
                tracing::debug!(server = %self.server, %peer, "TURN channel: {error}");
            }
        }
    }

    fn fail(&mut self, error: TurnError) {
        self.clear();
        self.phase = Phase::Done;
        self.events.push_back(TurnEvent::Failed(error));
    }

    fn finish_close(&mut self) {
        self.clear();
        self.phase = Phase::Done;
    }

    fn clear(&mut self) {
        self.transactions.clear();
        self.permissions.clear();
        self.channels.clear();
        self.channel_peers.clear();
    }
}

/// When a transaction sent `sends` times at `now` needs its next step.
fn next_deadline(now: Instant, sends: u32) -> Instant {
    if sends < MAX_SENDS {
        now + RTO * (1 << (sends - 1))
    } else {
        now + RTO * LAST_WAIT
    }
}

/// Expiry and refresh time of an allocation from a success response's LIFETIME: refreshed a
/// minute before it ends, or halfway through when it is shorter than two minutes.
fn lifetime_times(now: Instant, message: &Message) -> (Instant, Instant) {
    let seconds = message
        .attr(ATTR_LIFETIME)
        .and_then(|v| <[u8; 4]>::try_from(v).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(DEFAULT_LIFETIME)
        .min(MAX_LIFETIME);
    let lifetime = Duration::from_secs(u64::from(seconds));
    let margin = (lifetime / 2).min(Duration::from_secs(60));
    (now + lifetime, now + lifetime - margin)
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) compared as the IPv4 they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// RFC 8489 §9.2.2: the long-term credential key, MD5(username ":" realm ":" password).
fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(username.as_bytes());
    md5.update(b":");
    md5.update(realm.as_bytes());
    md5.update(b":");
    md5.update(password.as_bytes());
    md5.finalize().into()
}

/// HMAC-SHA1 over the concatenation of `parts`. Keys up to the block size are zero-padded and
/// longer ones hashed first, as HMAC itself does, so that any key works without a fallible init.
fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha1> as KeyInit>::new(&block.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

/// The algorithm numbers in a PASSWORD-ALGORITHMS value.
fn password_algorithms(mut value: &[u8]) -> Result<Vec<u16>, TurnError> {
    let mut algorithms = Vec::new();
    while let [a0, a1, l0, l1, rest @ ..] = value {
        let len = usize::from(u16::from_be_bytes([*l0, *l1])).div_ceil(4) * 4;
        algorithms.push(u16::from_be_bytes([*a0, *a1]));
        value = rest
            .get(len..)
            .ok_or(TurnError::Malformed("PASSWORD-ALGORITHMS overruns itself"))?;
    }
    if !value.is_empty() {
        return Err(TurnError::Malformed("PASSWORD-ALGORITHMS overruns itself"));
    }
    Ok(algorithms)
}

/// XOR-MAPPED-ADDRESS, XOR-RELAYED-ADDRESS and XOR-PEER-ADDRESS share this encoding
/// (RFC 8489 §14.2): the port XORed with the cookie's top half, the IP with cookie ‖ id.
fn xor_mask(id: &[u8; 12]) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(id);
    mask
}

fn encode_xor_address(addr: SocketAddr, id: &[u8; 12]) -> Vec<u8> {
    let mask = xor_mask(id);
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = Vec::with_capacity(20);
    let (family, octets): (u8, Vec<u8>) = match addr.ip() {
        IpAddr::V4(ip) => (1, ip.octets().to_vec()),
        IpAddr::V6(ip) => (2, ip.octets().to_vec()),
    };
    value.extend_from_slice(&[0, family]);
    value.extend_from_slice(&port.to_be_bytes());
    value.extend(octets.iter().zip(mask).map(|(b, m)| b ^ m));
    value
}

fn decode_xor_address(value: &[u8], id: &[u8; 12]) -> Result<SocketAddr, TurnError> {
    let mask = xor_mask(id);
    let [_, family, p0, p1, ip @ ..] = value else {
        return Err(TurnError::Malformed("XOR address shorter than its header"));
    };
    let port = u16::from_be_bytes([*p0, *p1]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut octets = [0u8; 16];
    for (o, (b, m)) in octets.iter_mut().zip(ip.iter().zip(mask)) {
        *o = b ^ m;
    }
    let ip = match (family, ip.len()) {
        (1, 4) => IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
        (2, 16) => IpAddr::V6(Ipv6Addr::from(octets)),
        _ => {
            return Err(TurnError::Malformed(
                "XOR address of unknown family or length",
            ))
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// The class bits of a STUN message type (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// Interleaves method and class bits into a message type (RFC 8489 §5, figure 3).
fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

fn split_message_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    let class = match ((t >> 4) & 0b01) | ((t >> 7) & 0b10) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Writes one STUN message; the header's length is kept current after every attribute.
struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    fn new(method: u16, class: Class, id: &[u8; 12]) -> Self {
        let mut buf = Vec::with_capacity(160);
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(id);
        Builder { buf }
    }

    fn id(&self) -> [u8; 12] {
        let mut id = [0u8; 12];
        id.copy_from_slice(&self.buf[8..HEADER_LEN]);
        id
    }

    /// Sets the header's length to the attributes so far plus `extra` bytes.
    fn set_length(&mut self, extra: usize) {
        let len = (self.buf.len() - HEADER_LEN + extra) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute, zero-padded to 4 bytes. Callers bound `value` (peer data by
    /// `MAX_DATA`; realm and nonce came in 16-bit lengths).
    fn attr(&mut self, kind: u16, value: &[u8]) {
        self.buf.extend_from_slice(&kind.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len().div_ceil(4) * 4, 0);
        self.set_length(0);
    }

    fn xor_address(&mut self, kind: u16, addr: SocketAddr) {
        let value = encode_xor_address(addr, &self.id());
        self.attr(kind, &value);
    }

    /// MESSAGE-INTEGRITY: HMAC-SHA1 over the message so far, its length counting this attribute.
    fn integrity(&mut self, key: &[u8]) {
        self.set_length(24);
        let mac = hmac_sha1(key, &[&self.buf]);
        self.attr(ATTR_MESSAGE_INTEGRITY, &mac);
    }

    /// FINGERPRINT: CRC-32 of the message so far XOR 0x5354554e, its length counting it.
    fn fingerprint(&mut self) {
        self.set_length(8);
        let crc = crc32(&[&self.buf]) ^ FINGERPRINT_XOR;
        self.attr(ATTR_FINGERPRINT, &crc.to_be_bytes());
    }

    fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// A parsed STUN message borrowing its datagram; FINGERPRINT, when present, already checked.
struct Message<'a> {
    method: u16,
    class: Class,
    id: [u8; 12],
    bytes: &'a [u8],
    /// Attributes before MESSAGE-INTEGRITY (later ones are ignored, RFC 8489 §14.5).
    attrs: Vec<(u16, &'a [u8])>,
    /// Offset of the MESSAGE-INTEGRITY attribute's header, and its value.
    integrity: Option<(usize, &'a [u8])>,
}

impl<'a> Message<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, TurnError> {
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(TurnError::Malformed("shorter than a STUN header"));
        };
        let kind = u16::from_be_bytes([header[0], header[1]]);
        if kind & 0xC000 != 0 {
            return Err(TurnError::Malformed("not a STUN message"));
        }
        if header[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(TurnError::Malformed(
                "STUN message without the magic cookie",
            ));
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if len % 4 != 0 || HEADER_LEN + len != bytes.len() {
            return Err(TurnError::Malformed(
                "STUN length does not match the datagram",
            ));
        }
        let (method, class) = split_message_type(kind);
        let mut id = [0u8; 12];
        id.copy_from_slice(&header[8..HEADER_LEN]);
        let mut message = Message {
            method,
            class,
            id,
            bytes,
            attrs: Vec::new(),
            integrity: None,
        };
        let mut offset = HEADER_LEN;
        while offset < bytes.len() {
            let Some([t0, t1, l0, l1]) = bytes.get(offset..offset + 4) else {
                return Err(TurnError::Malformed("truncated STUN attribute header"));
            };
            let kind = u16::from_be_bytes([*t0, *t1]);
            let len = usize::from(u16::from_be_bytes([*l0, *l1]));
            let start = offset + 4;
            let next = start + len.div_ceil(4) * 4;
            if next > bytes.len() {
                return Err(TurnError::Malformed("STUN attribute overruns the message"));
            }
            let value = &bytes[start..start + len];
            match kind {
                ATTR_FINGERPRINT => {
                    if next != bytes.len() {
                        return Err(TurnError::Malformed("attribute after FINGERPRINT"));
                    }
                    let expected = crc32(&[&bytes[..offset]]) ^ FINGERPRINT_XOR;
                    if value != expected.to_be_bytes() {
                        return Err(TurnError::Fingerprint);
                    }
                }
                ATTR_MESSAGE_INTEGRITY if message.integrity.is_none() => {
                    if len != 20 {
                        return Err(TurnError::Malformed("MESSAGE-INTEGRITY not 20 bytes"));
                    }
                    message.integrity = Some((offset, value));
                }
                _ if message.integrity.is_none() => message.attrs.push((kind, value)),
                _ => {}
            }
            offset = next;
        }
        Ok(message)
    }

    /// The first attribute of this type (before MESSAGE-INTEGRITY).
    fn attr(&self, kind: u16) -> Option<&'a [u8]> {
        self.attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
    }

    /// RFC 8489 §14.5: HMAC-SHA1 over the message up to MESSAGE-INTEGRITY, with the header's
    /// length as if that attribute were the last; compared in constant time.
    fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some((offset, value)) = self.integrity else {
            return false;
        };
        let len = ((offset - HEADER_LEN + 24) as u16).to_be_bytes();
        let mac = hmac_sha1(key, &[&self.bytes[..2], &len, &self.bytes[4..offset]]);
        mac.ct_eq(value).into()
    }

    /// ERROR-CODE as (code, reason); a missing or malformed one is an error.
    fn error_code(&self) -> Result<(u16, String), TurnError> {
        let Some([_, _, class, number, reason @ ..]) = self.attr(ATTR_ERROR_CODE) else {
            return Err(TurnError::Malformed(
                "error response without a valid ERROR-CODE",
            ));
        };
        let (class, number) = (u16::from(class & 0x07), u16::from(*number));
        if !(3..=6).contains(&class) || number >= 100 {
            return Err(TurnError::Malformed("ERROR-CODE out of range"));
        }
        // coturn counts a C string's NUL into the reason phrase.
        let reason = String::from_utf8_lossy(reason);
        Ok((
            class * 100 + number,
            reason.trim_end_matches('\0').to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const REALM: &str = "test.local";

    fn server() -> SocketAddr {
        "192.0.2.10:3478".parse().unwrap()
    }

    fn relayed_addr() -> SocketAddr {
        "192.0.2.10:49160".parse().unwrap()
    }

    fn mapped_addr() -> SocketAddr {
        "203.0.113.5:40001".parse().unwrap()
    }

    fn key() -> [u8; 16] {
        long_term_key("tguser", REALM, "tgpass")
    }

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// The server's answer to `request`: `attrs`, signed with `key` when given, FINGERPRINT.
    fn response(
        request: &[u8],
        class: Class,
        attrs: &[(u16, Vec<u8>)],
        key: Option<&[u8; 16]>,
    ) -> Vec<u8> {
        let request = Message::parse(request).unwrap();
        let mut m = Builder::new(request.method, class, &request.id);
        for (kind, value) in attrs {
            m.attr(*kind, value);
        }
        if let Some(key) = key {
            m.integrity(key);
        }
        m.fingerprint();
        m.finish()
    }

    fn error_code(code: u16, reason: &str) -> (u16, Vec<u8>) {
        let mut value = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        value.extend_from_slice(reason.as_bytes());
        (ATTR_ERROR_CODE, value)
    }

    fn challenge(nonce: &str) -> Vec<(u16, Vec<u8>)> {
        vec![
            error_code(401, "Unauthorized"),
            (ATTR_NONCE, nonce.as_bytes().to_vec()),
            (ATTR_REALM, REALM.as_bytes().to_vec()),
        ]
    }

    fn xor_attr(kind: u16, addr: SocketAddr, request: &[u8]) -> (u16, Vec<u8>) {
        let id = Message::parse(request).unwrap().id;
        (kind, encode_xor_address(addr, &id))
    }

    fn lifetime(seconds: u32) -> (u16, Vec<u8>) {
        (ATTR_LIFETIME, seconds.to_be_bytes().to_vec())
    }

    fn allocate_success(request: &[u8], seconds: u32) -> Vec<u8> {
        let attrs = [
            xor_attr(ATTR_XOR_RELAYED_ADDRESS, relayed_addr(), request),
            xor_attr(ATTR_XOR_MAPPED_ADDRESS, mapped_addr(), request),
            lifetime(seconds),
        ];
        response(request, Class::Success, &attrs, Some(&key()))
    }

    fn drain(client: &mut TurnClient) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| client.poll_transmit()).collect()
    }

    /// A client taken through the 401 challenge to an allocation of `seconds`.
    fn allocated(now: Instant, seconds: u32) -> TurnClient {
        let mut client = TurnClient::new(server(), "tguser", "tgpass", now);
        let first = client.poll_transmit().unwrap();
        let challenge = response(&first, Class::Error, &challenge("nonce-1"), None);
        assert_eq!(client.receive(now, &challenge), Ok(None));
        let second = client.poll_transmit().unwrap();
        assert_eq!(
            client.receive(now, &allocate_success(&second, seconds)),
            Ok(None)
        );
        assert_eq!(
            client.poll_event(),
            Some(TurnEvent::Allocated {
                relayed: relayed_addr()
            })
        );
        client
    }

    /// Answers every queued request with a signed success (no attributes).
    fn answer_all(client: &mut TurnClient, now: Instant) -> Vec<(u16, Option<IpAddr>)> {
        let mut seen = Vec::new();
        for request in drain(client) {
            let m = Message::parse(&request).unwrap();
            let peer = m
                .attr(ATTR_XOR_PEER_ADDRESS)
                .map(|v| decode_xor_address(v, &m.id).unwrap().ip());
            seen.push((m.method, peer));
            let attrs = if m.method == REFRESH {
                vec![lifetime(600)]
            } else {
                vec![]
            };
            let answer = response(&request, Class::Success, &attrs, Some(&key()));
            assert_eq!(client.receive(now, &answer), Ok(None));
        }
        seen.sort();
        seen
    }

    /// RFC 5769 §2.4: a request with long-term authentication (user "マトリックス", password
    /// "TheMatrIX" after SASLprep, realm "example.org").
    const RFC5769_LONG_TERM: &str = "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388\
        e383aae38383e382afe382b900000015001c662f2f3439396b39353464364f4c33346f4c39465354767936\
        3473410014000b6578616d706c652e6f72670000080014f67024656dd64a3e02b8e0712e85c9a28ca89666";
    /// RFC 5769 §2.1: a request with short-term integrity and FINGERPRINT.
    const RFC5769_REQUEST: &str = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e\
        207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a6836\
        7659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";
    /// RFC 5769 §2.2 and §2.3: responses with an IPv4 and an IPv6 XOR-MAPPED-ADDRESS.
    const RFC5769_IPV4: &str = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563\
        746f7220002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004\
        c07d4c96";
    const RFC5769_IPV6: &str = "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563\
        746f7220002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c\
        8292c275bfe3ed4180280004c8fb0b4c";
    const RFC5769_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

    #[test]
    fn message_types_interleave_method_and_class_bits() {
        assert_eq!(message_type(ALLOCATE, Class::Request), 0x0003);
        assert_eq!(message_type(ALLOCATE, Class::Success), 0x0103);
        assert_eq!(message_type(ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(DATA, Class::Indication), 0x0017);
        assert_eq!(message_type(CHANNEL_BIND, Class::Success), 0x0109);
        for method in [
            ALLOCATE,
            REFRESH,
            SEND,
            DATA,
            CREATE_PERMISSION,
            CHANNEL_BIND,
            0xFFF,
        ] {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(
                    split_message_type(message_type(method, class)),
                    (method, class)
                );
            }
        }
    }

    #[test]
    fn rfc5769_long_term_request_is_rebuilt_byte_for_byte_and_verifies_with_the_md5_key() {
        let vector = hex(RFC5769_LONG_TERM);
        let message = Message::parse(&vector).unwrap();
        let username = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
        assert_eq!(message.attr(ATTR_USERNAME), Some(username.as_bytes()));
        assert_eq!(message.attr(ATTR_REALM), Some(&b"example.org"[..]));
        let key = long_term_key(username, "example.org", "TheMatrIX");
        assert!(message.verify_integrity(&key));
        assert!(!message.verify_integrity(&long_term_key(username, "example.org", "TheMatrix")));

        let mut id = [0u8; 12];
        id.copy_from_slice(&vector[8..20]);
        let mut m = Builder::new(0x001, Class::Request, &id);
        m.attr(ATTR_USERNAME, username.as_bytes());
        m.attr(ATTR_NONCE, b"f//499k954d6OL34oL9FSTvy64sA");
        m.attr(ATTR_REALM, b"example.org");
        m.integrity(&key);
        assert_eq!(m.finish(), vector);
    }

    #[test]
    fn rfc5769_sample_request_has_a_valid_fingerprint_and_short_term_integrity() {
        let vector = hex(RFC5769_REQUEST);
        let message = Message::parse(&vector).unwrap();
        assert_eq!(message.attr(ATTR_USERNAME), Some(&b"evtj:h6vY"[..]));
        assert!(message.verify_integrity(RFC5769_PASSWORD));
        let mut corrupted = vector.clone();
        corrupted[30] ^= 0x01;
        assert_eq!(
            Message::parse(&corrupted).err(),
            Some(TurnError::Fingerprint)
        );
    }

    #[test]
    fn rfc5769_responses_decode_ipv4_and_ipv6_xor_mapped_addresses() {
        for (vector, expected) in [
            (RFC5769_IPV4, "192.0.2.1:32853"),
            (RFC5769_IPV6, "[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
        ] {
            let bytes = hex(vector);
            let message = Message::parse(&bytes).unwrap();
            assert_eq!(message.class, Class::Success);
            assert!(message.verify_integrity(RFC5769_PASSWORD));
            let mapped =
                decode_xor_address(message.attr(ATTR_XOR_MAPPED_ADDRESS).unwrap(), &message.id);
            assert_eq!(mapped, Ok(expected.parse().unwrap()));
            assert_eq!(
                encode_xor_address(expected.parse().unwrap(), &message.id),
                message.attr(ATTR_XOR_MAPPED_ADDRESS).unwrap()
            );
        }
    }

    #[test]
    fn allocate_answers_the_401_challenge_with_long_term_credentials() {
        let now = Instant::now();
        let mut client = TurnClient::new(server(), "tguser", "tgpass", now);
        assert_eq!(client.relayed(), None);
        let first = client.poll_transmit().unwrap();
        let m = Message::parse(&first).unwrap();
        assert_eq!((m.method, m.class), (ALLOCATE, Class::Request));
        assert_eq!(m.attr(ATTR_REQUESTED_TRANSPORT), Some(&[17, 0, 0, 0][..]));
        assert!(m.integrity.is_none() && m.attr(ATTR_USERNAME).is_none());
        assert_eq!(client.poll_transmit(), None);

        let challenge = response(&first, Class::Error, &challenge("nonce-1"), None);
        assert_eq!(client.receive(now, &challenge), Ok(None));
        let second = client.poll_transmit().unwrap();
        let m2 = Message::parse(&second).unwrap();
        assert_ne!(m2.id, m.id, "a new transaction");
        assert_eq!(m2.attr(ATTR_REQUESTED_TRANSPORT), Some(&[17, 0, 0, 0][..]));
        assert_eq!(m2.attr(ATTR_USERNAME), Some(&b"tguser"[..]));
        assert_eq!(m2.attr(ATTR_REALM), Some(REALM.as_bytes()));
        assert_eq!(m2.attr(ATTR_NONCE), Some(&b"nonce-1"[..]));
        assert!(m2.verify_integrity(&key()));

        // The first transaction is over: a retransmitted challenge changes nothing.
        assert_eq!(client.receive(now, &challenge), Ok(None));
        assert_eq!(client.poll_transmit(), None);
        // A permission asked for now waits for the allocation.
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        client.add_permission(now, peer);
        assert_eq!(client.poll_transmit(), None);

        client
            .receive(now, &allocate_success(&second, 600))
            .unwrap();
        assert_eq!(
            client.poll_event(),
            Some(TurnEvent::Allocated {
                relayed: relayed_addr()
            })
        );
        assert_eq!(client.relayed(), Some(relayed_addr()));
        assert_eq!(client.mapped(), Some(mapped_addr()));
        let request = client.poll_transmit().unwrap();
        let m = Message::parse(&request).unwrap();
        let to = decode_xor_address(m.attr(ATTR_XOR_PEER_ADDRESS).unwrap(), &m.id);
        assert_eq!(
            (m.method, to),
            (CREATE_PERMISSION, Ok(SocketAddr::new(peer, 0)))
        );
        let answer = response(&request, Class::Success, &[], Some(&key()));
        client.receive(now, &answer).unwrap();
        // Next: the permission's refresh (240 s), then the allocation's a minute before its
        // 600 s lifetime ends.
        assert_eq!(client.poll_timeout(), Some(now + PERMISSION_REFRESH));
    }

    #[test]
    fn a_401_after_credentials_is_a_wrong_password_error() {
        let now = Instant::now();
        let mut client = TurnClient::new(server(), "tguser", "wrong", now);
        let first = client.poll_transmit().unwrap();
        client
            .receive(now, &response(&first, Class::Error, &challenge("n1"), None))
            .unwrap();
        let second = client.poll_transmit().unwrap();
        client
            .receive(
                now,
                &response(&second, Class::Error, &challenge("n2"), None),
            )
            .unwrap();
        let Some(TurnEvent::Failed(error)) = client.poll_event() else {
            panic!("expected a failure");
        };
        assert_eq!(
            error,
            TurnError::Unauthorized {
                username: "tguser".into(),
                realm: REALM.into(),
                code: 401,
                reason: "Unauthorized".into(),
            }
        );
        assert!(error.to_string().contains("wrong username or password"));
        assert!(client.is_closed());
        assert_eq!(client.poll_timeout(), None);
        assert_eq!(client.poll_transmit(), None);
    }

    #[test]
    fn error_responses_name_the_code_and_reason() {
        let now = Instant::now();
        let mut client = TurnClient::new(server(), "tguser", "tgpass", now);
        let first = client.poll_transmit().unwrap();
        client
            .receive(now, &response(&first, Class::Error, &challenge("n1"), None))
            .unwrap();
        let second = client.poll_transmit().unwrap();
        let quota = [error_code(486, "Allocation Quota Reached")];
        client
            .receive(now, &response(&second, Class::Error, &quota, Some(&key())))
            .unwrap();
        let Some(TurnEvent::Failed(error)) = client.poll_event() else {
            panic!("expected a failure");
        };
        assert_eq!(
            error.to_string(),
            "TURN Allocate refused: 486 Allocation Quota Reached"
        );
    }

    #[test]
    fn stale_nonce_is_retried_with_the_new_nonce() {
        let now = Instant::now();
        let mut client = allocated(now, 600);
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        client.add_permission(now, peer);
        let request = client.poll_transmit().unwrap();
        let stale = [
            error_code(438, "Stale Nonce"),
            (ATTR_NONCE, b"nonce-2".to_vec()),
            (ATTR_REALM, REALM.as_bytes().to_vec()),
        ];
        client
            .receive(now, &response(&request, Class::Error, &stale, None))
            .unwrap();
        let retry = client.poll_transmit().unwrap();
        let m = Message::parse(&retry).unwrap();
        assert_eq!(m.method, CREATE_PERMISSION);
        assert_eq!(m.attr(ATTR_NONCE), Some(&b"nonce-2"[..]));
        assert!(m.verify_integrity(&key()));
        client
            .receive(now, &response(&retry, Class::Success, &[], Some(&key())))
            .unwrap();
        assert_eq!(client.poll_event(), None);
        assert_eq!(
            client.permissions.get(&peer),
            Some(&Upkeep::Due(now + PERMISSION_REFRESH))
        );
    }

    #[test]
    fn responses_with_bad_or_missing_integrity_are_dropped_and_the_request_retried() {
        let now = Instant::now();
        let mut client = TurnClient::new(server(), "tguser", "tgpass", now);
        let first = client.poll_transmit().unwrap();
        client
            .receive(now, &response(&first, Class::Error, &challenge("n1"), None))
            .unwrap();
        let second = client.poll_transmit().unwrap();
        let attrs = [xor_attr(ATTR_XOR_RELAYED_ADDRESS, relayed_addr(), &second)];
        let forged = response(&second, Class::Success, &attrs, Some(&[7; 16]));
        let unsigned = response(&second, Class::Success, &attrs, None);
        let forged_error = response(
            &second,
            Class::Error,
            &[error_code(403, "Forbidden")],
            Some(&[7; 16]),
        );
        for bad in [forged, unsigned, forged_error] {
            assert!(matches!(
                client.receive(now, &bad),
                Err(TurnError::Integrity {
                    method: "Allocate",
                    ..
                })
            ));
        }
        assert_eq!(client.poll_event(), None);
        assert_eq!(client.relayed(), None);
        // Still retransmitting, and the genuine answer is taken.
        assert_eq!(client.poll_timeout(), Some(now + RTO));
        client
            .receive(now, &allocate_success(&second, 600))
            .unwrap();
        assert_eq!(client.relayed(), Some(relayed_addr()));
    }

    #[test]
    fn requests_retransmit_at_rfc_8489_intervals_then_time_out() {
        let t0 = Instant::now();
        let mut client = TurnClient::new(server(), "tguser", "tgpass", t0);
        let first = client.poll_transmit().unwrap();
        let mut sends = vec![0];
        let mut now = t0;
        for _ in 0..20 {
            let Some(at) = client.poll_timeout() else {
                break;
            };
            assert!(at > now);
            now = at;
            client.handle_timeout(now);
            for datagram in drain(&mut client) {
                assert_eq!(datagram, first, "a retransmission is the same request");
                sends.push((now - t0).as_millis());
            }
        }
        assert_eq!(sends, [0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(now - t0, Duration::from_millis(39_500));
        assert_eq!(
            client.poll_event(),
            Some(TurnEvent::Failed(TurnError::Timeout {
                method: "Allocate",
                server: server()
            }))
        );
        assert!(client.is_closed());
    }

    #[test]
    fn send_to_uses_send_indications_until_the_channel_is_bound_then_channel_data() {
        let now = Instant::now();
        let mut fresh = TurnClient::new(server(), "tguser", "tgpass", now);
        assert_eq!(
            fresh.send_to(now, "198.51.100.7:5000".parse().unwrap(), b"x"),
            None
        );

        let mut client = allocated(now, 600);
        for peer in ["198.51.100.7:40000", "[2001:db8::7]:40000"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let indication = client.send_to(now, peer, b"hello").unwrap();
            let m = Message::parse(&indication).unwrap();
            assert_eq!((m.method, m.class), (SEND, Class::Indication));
            let to = decode_xor_address(m.attr(ATTR_XOR_PEER_ADDRESS).unwrap(), &m.id);
            assert_eq!(to, Ok(peer));
            assert_eq!(m.attr(ATTR_DATA), Some(&b"hello"[..]));
            // The permission and the channel binding went out with the first packet only.
            let requests = drain(&mut client);
            let methods: Vec<u16> = requests
                .iter()
                .map(|r| Message::parse(r).unwrap().method)
                .collect();
            assert_eq!(methods.len(), 2);
            assert!(methods.contains(&CREATE_PERMISSION) && methods.contains(&CHANNEL_BIND));
            assert!(client.send_to(now, peer, b"again").is_some());
            assert_eq!(client.poll_transmit(), None);
            for request in requests {
                let answer = response(&request, Class::Success, &[], Some(&key()));
                client.receive(now, &answer).unwrap();
            }
        }
        let first = client.send_to(now, "198.51.100.7:40000".parse().unwrap(), b"hello");
        assert_eq!(first, Some(b"\x40\x00\x00\x05hello".to_vec()));
        let second = client.send_to(now, "[2001:db8::7]:40000".parse().unwrap(), b"hi");
        assert_eq!(second, Some(b"\x40\x01\x00\x02hi".to_vec()));
        assert_eq!(client.poll_transmit(), None);
        assert_eq!(
            client.send_to(now, "198.51.100.7:40000".parse().unwrap(), &[0; 70_000]),
            None
        );
    }

    #[test]
    fn relayed_data_arrives_from_channel_data_and_data_indications() {
        let now = Instant::now();
        let mut client = allocated(now, 600);
        let peer: SocketAddr = "198.51.100.7:40000".parse().unwrap();

        let mut m = Builder::new(DATA, Class::Indication, &[9; 12]);
        m.xor_address(ATTR_XOR_PEER_ADDRESS, peer);
        m.attr(ATTR_DATA, b"stun-or-dtls");
        assert_eq!(
            client.receive(now, &m.finish()),
            Ok(Some((peer, b"stun-or-dtls".to_vec())))
        );

        client.send_to(now, peer, b"x").unwrap();
        // Padded to 4 bytes, as a server may do even over UDP.
        let channel_data = b"\x40\x00\x00\x03abc\x00";
        assert_eq!(
            client.receive(now, channel_data),
            Ok(Some((peer, b"abc".to_vec())))
        );
        assert_eq!(
            client.receive(now, b"\x40\x05\x00\x01a"),
            Err(TurnError::UnknownChannel(0x4005))
        );
    }

    #[test]
    fn allocation_permissions_and_channels_are_refreshed_before_they_expire() {
        let t0 = Instant::now();
        let mut client = allocated(t0, 600);
        let peer: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        client.send_to(t0, peer, b"x").unwrap();
        answer_all(&mut client, t0);

        assert_eq!(client.poll_timeout(), Some(t0 + PERMISSION_REFRESH));
        client.handle_timeout(t0 + PERMISSION_REFRESH);
        assert_eq!(
            answer_all(&mut client, t0 + PERMISSION_REFRESH),
            [(CREATE_PERMISSION, Some(peer.ip()))]
        );
        let t540 = t0 + Duration::from_secs(540);
        assert_eq!(client.poll_timeout(), Some(t0 + Duration::from_secs(480)));
        client.handle_timeout(t540);
        let refreshed = answer_all(&mut client, t540);
        assert_eq!(
            refreshed,
            [
                (REFRESH, None),
                (CREATE_PERMISSION, Some(peer.ip())),
                (CHANNEL_BIND, Some(peer.ip())),
            ]
        );
        assert_eq!(client.poll_event(), None);
        assert_eq!(client.relayed(), Some(relayed_addr()));
        // The channel kept its number, and the new lifetime counts from the refresh.
        assert_eq!(
            client.send_to(t540, peer, b"y"),
            Some(b"\x40\x00\x00\x01y".to_vec())
        );
        assert_eq!(client.poll_timeout(), Some(t540 + Duration::from_secs(240)));
    }

    #[test]
    fn an_unrefreshed_allocation_expires() {
        let t0 = Instant::now();
        let mut client = allocated(t0, 20);
        assert_eq!(client.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        let mut now = t0;
        for _ in 0..20 {
            let Some(at) = client.poll_timeout() else {
                break;
            };
            now = at;
            client.handle_timeout(now);
            drain(&mut client);
        }
        assert_eq!(now, t0 + Duration::from_secs(20));
        assert_eq!(
            client.poll_event(),
            Some(TurnEvent::Failed(TurnError::Expired))
        );
    }

    #[test]
    fn a_refused_permission_is_not_retried_until_asked_again() {
        let now = Instant::now();
        let mut client = allocated(now, 600);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        client.add_permission(now, peer);
        let request = client.poll_transmit().unwrap();
        let forbidden = [error_code(403, "Forbidden IP")];
        client
            .receive(
                now,
                &response(&request, Class::Error, &forbidden, Some(&key())),
            )
            .unwrap();
        assert_eq!(client.permissions.get(&peer), Some(&Upkeep::Failed));
        assert_eq!(client.poll_event(), None, "the allocation itself is fine");
        client.send_to(now, SocketAddr::new(peer, 1), b"x").unwrap();
        let methods: Vec<u16> = drain(&mut client)
            .iter()
            .map(|r| Message::parse(r).unwrap().method)
            .collect();
        assert_eq!(methods, [CHANNEL_BIND]);
        client.add_permission(now, peer);
        let retry = client.poll_transmit().unwrap();
        assert_eq!(Message::parse(&retry).unwrap().method, CREATE_PERMISSION);
    }

    #[test]
    fn close_sends_refresh_with_lifetime_zero() {
        let now = Instant::now();
        let mut client = allocated(now, 600);
        client.close(now);
        assert_eq!(client.relayed(), None);
        let refresh = client.poll_transmit().unwrap();
        let m = Message::parse(&refresh).unwrap();
        assert_eq!(m.method, REFRESH);
        assert_eq!(m.attr(ATTR_LIFETIME), Some(&[0, 0, 0, 0][..]));
        assert!(m.verify_integrity(&key()));
        assert!(!client.is_closed());
        client
            .receive(
                now,
                &response(&refresh, Class::Success, &[lifetime(0)], Some(&key())),
            )
            .unwrap();
        assert!(client.is_closed());
        assert_eq!(client.poll_timeout(), None);
        assert_eq!(client.poll_event(), None);

        // Closing before the allocation exists just abandons it.
        let mut early = TurnClient::new(server(), "tguser", "tgpass", now);
        early.close(now);
        assert!(early.is_closed());
        assert_eq!(early.poll_timeout(), None);
    }

    #[test]
    fn password_algorithms_offered_with_the_nonce_cookie_are_echoed() {
        let now = Instant::now();
        let nonce = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";
        // SHA-256 (2) and MD5 (1), no parameters.
        let offer = vec![0, 2, 0, 0, 0, 1, 0, 0];
        let mut client = TurnClient::new(server(), "tguser", "tgpass", now);
        let first = client.poll_transmit().unwrap();
        let mut attrs = challenge(nonce);
        attrs.push((ATTR_PASSWORD_ALGORITHMS, offer.clone()));
        client
            .receive(now, &response(&first, Class::Error, &attrs, None))
            .unwrap();
        let second = Message::parse(&client.poll_transmit().unwrap())
            .map(|m| {
                (
                    m.attr(ATTR_PASSWORD_ALGORITHMS).map(<[u8]>::to_vec),
                    m.attr(ATTR_PASSWORD_ALGORITHM).map(<[u8]>::to_vec),
                )
            })
            .unwrap();
        assert_eq!(second, (Some(offer), Some(vec![0, 1, 0, 0])));

        let mut sha256_only = TurnClient::new(server(), "tguser", "tgpass", now);
        let first = sha256_only.poll_transmit().unwrap();
        let mut attrs = challenge(nonce);
        attrs.push((ATTR_PASSWORD_ALGORITHMS, vec![0, 2, 0, 0]));
        sha256_only
            .receive(now, &response(&first, Class::Error, &attrs, None))
            .unwrap();
        assert_eq!(
            sha256_only.poll_event(),
            Some(TurnEvent::Failed(TurnError::PasswordAlgorithm(vec![2])))
        );
    }

    #[test]
    fn garbage_is_an_error_and_never_a_panic() {
        let now = Instant::now();
        let mut client = allocated(now, 600);
        client.send_to(now, "198.51.100.7:40000".parse().unwrap(), b"x");
        let pending = drain(&mut client);
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x00],
            vec![0x40, 0x00, 0x00],
            b"\x40\x00\x00\x10short".to_vec(),
            vec![0x80; 40],
            // A header claiming more than the datagram holds.
            hex("0101fffc2112a442000000000000000000000000"),
            // An attribute running past the end, and a truncated attribute header.
            hex("010100082112a442000000000000000000000000 0020 0010 00010000"),
            hex("010100042112a442000000000000000000000000 0020 00"),
            // No magic cookie.
            hex("0101000000000000000000000000000000000000"),
            // Error response without ERROR-CODE, out-of-range ERROR-CODE.
            response(&pending[0], Class::Error, &[], None),
            response(
                &pending[0],
                Class::Error,
                &[(ATTR_ERROR_CODE, vec![0, 0, 9, 99])],
                None,
            ),
        ];
        for vector in [
            RFC5769_LONG_TERM,
            RFC5769_REQUEST,
            RFC5769_IPV4,
            RFC5769_IPV6,
        ] {
            let bytes = hex(vector);
            cases.extend((0..bytes.len()).map(|n| bytes[..n].to_vec()));
        }
        let mut rng = StdRng::seed_from_u64(8656);
        for _ in 0..5000 {
            let len: usize = rng.gen_range(0..120);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if len >= 8 && rng.gen_bool(0.5) {
                bytes[0] &= 0x01;
                bytes[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let body = (len.saturating_sub(20) & !3) as u16;
                bytes[2..4].copy_from_slice(&body.to_be_bytes());
            }
            cases.push(bytes);
        }
        for case in &cases[..11] {
            assert!(client.receive(now, case).is_err(), "{case:02x?}");
        }
        for case in &cases {
            let _ = client.receive(now, case);
        }
        assert_eq!(client.relayed(), Some(relayed_addr()));
    }

    #[test]
    fn no_single_bit_flip_of_the_signed_part_of_a_response_is_accepted() {
        let now = Instant::now();
        let pending = || {
            let mut client = TurnClient::new(server(), "tguser", "tgpass", now);
            let first = client.poll_transmit().unwrap();
            client
                .receive(now, &response(&first, Class::Error, &challenge("n1"), None))
                .unwrap();
            let second = client.poll_transmit().unwrap();
            let genuine = allocate_success(&second, 600);
            (client, genuine)
        };
        let (_, genuine) = pending();
        // Header, three attributes and MESSAGE-INTEGRITY; FINGERPRINT follows.
        let signed = genuine.len() - 8;
        for bit in 0..genuine.len() * 8 {
            let (mut client, mut flipped) = pending();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let _ = client.receive(now, &flipped);
            if bit / 8 < signed {
                assert_eq!(client.relayed(), None, "bit {bit} flipped was accepted");
            } else {
                // A damaged FINGERPRINT header turns it into an unknown attribute after
                // MESSAGE-INTEGRITY, which RFC 8489 ignores: the signed part is intact.
                assert!(client.relayed().is_none_or(|a| a == relayed_addr()));
            }
        }
        let (mut client, genuine) = pending();
        client.receive(now, &genuine).unwrap();
        assert_eq!(client.relayed(), Some(relayed_addr()));
    }
}
