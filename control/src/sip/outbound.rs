//! Gateway → PBX: the registration client of a `register_to_pbx` connection, sans-IO.
//!
//! One [`OutboundRegistration`] keeps one binding alive at the PBX: it builds REGISTERs,
//! retransmits them itself (RFC 3261 §17.1.2: Timer E from T1 = 500 ms doubling to T2 = 4 s,
//! Timer F = 32 s), answers 401/407 with digest credentials, refreshes at 80 % of the granted
//! expiry, backs off (5 s doubling to 5 min, with jitter) after failures and timeouts, and
//! un-registers on [`OutboundRegistration::stop`]. The caller owns the socket and the clock:
//! it sends what [`poll_transmit`](OutboundRegistration::poll_transmit) yields, feeds datagrams
//! to [`on_response`](OutboundRegistration::on_response) and calls
//! [`handle_timeout`](OutboundRegistration::handle_timeout) at
//! [`poll_timeout`](OutboundRegistration::poll_timeout).
//!
//! It carries its own small response reader, so it does not depend on the general SIP message
//! module that is still being written.

use crate::config::{ConnectionConfig, ConnectionKind};
use crate::sip::digest;
use crate::sip::msg::{parse_datagram, SipMessage, SipResponse};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// RFC 3261 T1: first retransmission interval.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 T2: the retransmission interval stops doubling here.
pub const T2: Duration = Duration::from_secs(4);
/// RFC 3261 Timer F (64·T1): a transaction without a final response has failed.
pub const TIMER_F: Duration = Duration::from_secs(32);
/// First retry delay after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
/// Retry delays stop doubling here.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Challenged attempts within one registration cycle; more means the server loops.
const MAX_ROUNDS: u32 = 4;
/// The default SIP port for a `server`/`proxy` without one.
const DEFAULT_PORT: u16 = 5060;

/// Why a connection cannot be turned into a registration client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("connection {0:?} is not of type register_to_pbx")]
    WrongKind(String),
    #[error("connection {name:?}: {field} is missing")]
    Missing { name: String, field: &'static str },
    #[error("connection {name:?}: {field} {value:?} is not usable in a SIP URI")]
    BadField {
        name: String,
        field: &'static str,
        value: String,
    },
    #[error("connection {name:?}: {value:?} is not host[:port]")]
    BadAddress { name: String, value: String },
    /// The server (or proxy) is a host name: resolve `host`:`port` and use
    /// [`OutboundRegistration::with_target`].
    #[error("connection {name:?}: {host:?} needs a DNS lookup")]
    NeedsResolution {
        name: String,
        host: String,
        port: u16,
    },
}

/// Why a datagram was not taken as the answer to our REGISTER.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a SIP message ([`super::msg`]'s parser says why).
    #[error("malformed SIP: {0}")]
    Malformed(#[from] super::msg::ParseError),
    /// A request, where only responses are expected.
    #[error("a request, not a response")]
    NotAResponse,
    /// Well-formed, but not for the transaction in progress (late retransmission, stray).
    #[error("not for the REGISTER in progress")]
    Unmatched,
}

/// Where the registration stands, for logs and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The first REGISTER is under way.
    Registering,
    /// The PBX holds our binding until `until`.
    Registered { until: Instant },
    /// The PBX refused (403, a 401 to fresh credentials, 404, …); retried after a backoff.
    Failed { code: u16, reason: String },
    /// No final response within Timer F; retried after a backoff.
    Unreachable,
    /// Stopped (un-registered, or given up on shutdown).
    Stopped,
}

impl Status {
    /// A short name for JSON and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Status::Registering => "registering",
            Status::Registered { .. } => "registered",
            Status::Failed { .. } => "failed",
            Status::Unreachable => "unreachable",
            Status::Stopped => "stopped",
        }
    }
}

/// Reads a response with the SIP message model ([`super::msg`], which also insists on the
/// Via, From, To, Call-ID and CSeq our transaction is matched by).
fn parse_response(data: &[u8]) -> Result<SipResponse, ResponseError> {
    match parse_datagram(data)? {
        SipMessage::Response(resp) => Ok(resp),
        SipMessage::Request(_) => Err(ResponseError::NotAResponse),
    }
}

/// Splits a header value into its comma-separated elements (outside quotes and brackets).
fn elements(value: &str) -> Vec<&str> {
    let (mut quoted, mut depth, mut start) = (false, 0i32, 0);
    let mut out = Vec::new();
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => depth += 1,
            '>' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].trim());
    out
}

/// The value of `;name=value` among `;`-separated parameters.
fn param<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    params.split(';').skip(1).find_map(|p| {
        let (n, v) = p.split_once('=')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// `host[:port]` (optionally with a `sip:` prefix; IPv6 as `[addr]:port` or bare) → host, port.
pub(crate) fn split_host_port(value: &str) -> Option<(String, u16)> {
    let v = value.trim();
    let v = v
        .strip_prefix("sip:")
        .or_else(|| v.strip_prefix("SIP:"))
        .unwrap_or(v);
    if v.is_empty() || v.contains(['@', ';', ' ', '<', '>']) {
        return None;
    }
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Some((a.ip().to_string(), a.port()));
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some((ip.to_string(), DEFAULT_PORT));
    }
    if let Some(inner) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| (ip.to_string(), DEFAULT_PORT));
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((v.to_string(), DEFAULT_PORT)),
    }
}

/// A host as it appears in a SIP URI (IPv6 bracketed).
fn uri_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn random_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The credentials of the last challenge, kept to answer it again (refreshes reuse the nonce).
#[derive(Debug, Clone)]
struct Credentials {
    /// The challenge header values, joined.
    challenge: String,
    /// 407: answered with Proxy-Authorization.
    proxy: bool,
    nonce: String,
    /// Requests sent with this nonce so far.
    nc: u32,
    /// Not yet sent since the challenge arrived: a 401 to it means the password is wrong.
    fresh: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthUse {
    None,
    /// Credentials answering a challenge received in this cycle.
    Fresh,
    /// Credentials from an earlier challenge, sent pre-emptively.
    Reused,
}

#[derive(Debug)]
struct Transaction {
    cseq: u32,
    branch: String,
    bytes: Vec<u8>,
    next_retransmit: Instant,
    interval: Duration,
    deadline: Instant,
    unregister: bool,
    auth: AuthUse,
}

#[derive(Debug)]
enum Phase {
    /// The next REGISTER goes out at this time (first attempt, refresh or retry).
    Waiting(Instant),
    Pending(Transaction),
    Stopped,
}

/// The registration client of one `register_to_pbx` connection.
#[derive(Debug)]
pub struct OutboundRegistration {
    name: String,
    login: String,
    password: String,
    domain: String,
    /// Where REGISTERs go: the proxy if configured, else the server.
    target: SocketAddr,
    route: Option<String>,
    /// The socket REGISTERs leave from (Via sent-by).
    local: SocketAddr,
    /// Where the PBX should send requests for us (the Worker's SIP listener).
    contact: SocketAddr,
    expires: u32,
    user_agent: String,
    call_id: String,
    from_tag: String,
    cseq: u32,
    credentials: Option<Credentials>,
    /// Challenged or corrected attempts in the current cycle.
    rounds: u32,
    backoff: Duration,
    rng: u64,
    status: Status,
    phase: Phase,
    stopping: bool,
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    /// The Via transport token; `TLS` also means a reliable transport: no retransmissions.
    via_transport: &'static str,
}

impl OutboundRegistration {
    /// A client for `conn` sending from `local` (also the Contact until
    /// [`with_contact`](Self::with_contact)); the first REGISTER is due at `now`. The server
    /// and proxy must be IP addresses; for host names see [`OutboundError::NeedsResolution`].
    pub fn new(
        conn: &ConnectionConfig,
        local: SocketAddr,
        now: Instant,
    ) -> Result<Self, OutboundError> {
        let (host, port) = Self::target_spec(conn)?;
        let ip: IpAddr = host.parse().map_err(|_| OutboundError::NeedsResolution {
            name: conn.name.clone(),
            host: host.clone(),
            port,
        })?;
        Self::with_target(conn, SocketAddr::new(ip, port), local, now)
    }

    /// Where REGISTERs must be sent (`proxy` if set, else `server`), before any DNS lookup.
    pub fn target_spec(conn: &ConnectionConfig) -> Result<(String, u16), OutboundError> {
        if conn.kind != ConnectionKind::RegisterToPbx {
            return Err(OutboundError::WrongKind(conn.name.clone()));
        }
        let value = conn
            .proxy
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .or(conn.server.as_deref())
            .ok_or_else(|| OutboundError::Missing {
                name: conn.name.clone(),
                field: "server",
            })?;
        split_host_port(value).ok_or_else(|| OutboundError::BadAddress {
            name: conn.name.clone(),
            value: value.to_string(),
        })
    }

    /// A client for `conn` whose REGISTERs go to the already resolved `target`.
    pub fn with_target(
        conn: &ConnectionConfig,
        target: SocketAddr,
        local: SocketAddr,
        now: Instant,
    ) -> Result<Self, OutboundError> {
        let name = conn.name.clone();
        if conn.kind != ConnectionKind::RegisterToPbx {
            return Err(OutboundError::WrongKind(name));
        }
        let missing = |field| OutboundError::Missing {
            name: name.clone(),
            field,
        };
        let server = conn.server.as_deref().ok_or_else(|| missing("server"))?;
        let login = conn.login.clone().ok_or_else(|| missing("login"))?;
        let password = conn.password.clone().ok_or_else(|| missing("password"))?;
        let (server_host, _) =
            split_host_port(server).ok_or_else(|| OutboundError::BadAddress {
                name: name.clone(),
                value: server.to_string(),
            })?;
        let domain = match conn.domain.as_deref().map(str::trim) {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => uri_host(&server_host),
        };
        let uri_safe = |s: &str| {
            !s.is_empty()
                && !s
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || "<>@;\",".contains(c))
        };
        for (field, value) in [("login", &login), ("domain", &domain)] {
            if !uri_safe(value) {
                return Err(OutboundError::BadField {
                    name,
                    field,
                    value: value.clone(),
                });
            }
        }
        let route = match conn.proxy.as_deref().filter(|p| !p.trim().is_empty()) {
            Some(p) => {
                let (h, port) = split_host_port(p).ok_or_else(|| OutboundError::BadAddress {
                    name: name.clone(),
                    value: p.to_string(),
                })?;
                Some(format!("<sip:{}:{port};lr>", uri_host(&h)))
            }
            None => None,
        };
        Ok(Self {
            name,
            login,
            password,
            domain,
            target,
            route,
            local,
            contact: local,
            expires: conn.expires,
            user_agent: "siptg".into(),
            call_id: format!("{}@{}", random_token(), uri_host(&local.ip().to_string())),
            from_tag: random_token(),
            cseq: 0,
            credentials: None,
            rounds: 0,
            backoff: BACKOFF_MIN,
            rng: rand::random::<u64>() | 1,
            status: Status::Registering,
            phase: Phase::Waiting(now),
            stopping: false,
            queue: VecDeque::new(),
            via_transport: "UDP",
        })
    }

    /// Advertises `contact` (where the Worker listens for SIP) instead of the sending socket.
    pub fn with_contact(mut self, contact: SocketAddr) -> Self {
        self.contact = contact;
        self
    }

    /// REGISTERs go over a TLS connection from `local`: `SIP/2.0/TLS` in Via and no
    /// retransmissions (RFC 3261 §17.1.2.2: Timer E is for unreliable transports only).
    pub fn over_tls(mut self) -> Self {
        self.via_transport = "TLS";
        self
    }

    fn reliable(&self) -> bool {
        self.via_transport != "UDP"
    }

    /// Sets the User-Agent header.
    pub fn with_user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// The connection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where REGISTERs go.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The current status.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// True once stopped: nothing more will be sent.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.queue.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting(at) => Some(*at),
            Phase::Pending(tx) => Some(tx.next_retransmit.min(tx.deadline)),
            Phase::Stopped => None,
        }
    }

    /// Fires due timers: sends the next REGISTER, retransmits, or gives up on a transaction.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Waiting(at) if now >= *at => {
                self.rounds = 0;
                self.send_register(now, false);
            }
            Phase::Pending(tx) if now >= tx.deadline => {
                let unregister = tx.unregister;
                if unregister {
                    self.finish_stop();
                } else {
                    self.status = Status::Unreachable;
                    self.retry_later(now);
                }
            }
            Phase::Pending(tx) if now >= tx.next_retransmit && self.via_transport != "UDP" => {
                // Reliable transport: nothing to retransmit, only Timer F.
                tx.next_retransmit = tx.deadline;
            }
            Phase::Pending(tx) if now >= tx.next_retransmit => {
                self.queue.push_back((self.target, tx.bytes.clone()));
                tx.interval = (tx.interval * 2).min(T2);
                tx.next_retransmit = now + tx.interval;
            }
            _ => {}
        }
    }

    /// Starts un-registering (Expires: 0) if the PBX may hold our binding; else stops at once.
    pub fn stop(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let maybe_bound = matches!(self.status, Status::Registered { .. });
        if maybe_bound {
            self.rounds = 0;
            self.send_register(now, true);
        } else {
            self.finish_stop();
        }
    }

    fn finish_stop(&mut self) {
        self.phase = Phase::Stopped;
        self.status = Status::Stopped;
    }

    /// Takes a datagram that arrived on the registration socket. Errors are for logging only:
    /// the datagram is ignored and the state is unchanged.
    pub fn on_response(&mut self, now: Instant, data: &[u8]) -> Result<(), ResponseError> {
        let resp = parse_response(data)?;
        let Phase::Pending(tx) = &mut self.phase else {
            return Err(ResponseError::Unmatched);
        };
        if !Self::matches(&self.call_id, &resp, tx.cseq, &tx.branch) {
            return Err(ResponseError::Unmatched);
        }
        if resp.code < 200 {
            // Proceeding: the server has it; retransmit at T2 only (RFC 3261 §17.1.2.2).
            if self.via_transport == "UDP" {
                tx.interval = T2;
                tx.next_retransmit = now + T2;
            }
            return Ok(());
        }
        let (unregister, auth) = (tx.unregister, tx.auth);
        match resp.code {
            200..=299 if unregister => self.finish_stop(),
            200..=299 => self.on_success(now, &resp),
            401 | 407 => self.on_challenge(now, &resp, unregister, auth),
            423 if !unregister => {
                let min = resp
                    .header("Min-Expires")
                    .and_then(|v| v.trim().parse::<u32>().ok());
                match min {
                    Some(m) if m > self.expires && self.rounds < MAX_ROUNDS => {
                        self.expires = m;
                        self.rounds += 1;
                        self.send_register(now, false);
                    }
                    _ => self.fail(now, &resp),
                }
            }
            _ if unregister => self.finish_stop(),
            _ => self.fail(now, &resp),
        }
        Ok(())
    }

    fn matches(call_id: &str, resp: &SipResponse, cseq: u32, branch: &str) -> bool {
        let via_ok = resp.header("Via").is_some_and(|v| {
            let top = elements(v).first().copied().unwrap_or("");
            param(top, "branch") == Some(branch)
        });
        let cseq_ok = resp.header("CSeq").is_some_and(|v| {
            let mut p = v.split_whitespace();
            p.next().and_then(|n| n.parse::<u32>().ok()) == Some(cseq)
                && p.next().is_some_and(|m| m.eq_ignore_ascii_case("REGISTER"))
        });
        let call_ok = resp.header("Call-ID").map(str::trim) == Some(call_id);
        via_ok && cseq_ok && call_ok
    }

    fn on_success(&mut self, now: Instant, resp: &SipResponse) {
        let granted = self.granted_expiry(resp);
        if granted == 0 {
            self.status = Status::Failed {
                code: resp.code,
                reason: "no binding granted".into(),
            };
            self.retry_later(now);
            return;
        }
        let granted = Duration::from_secs(granted.into());
        self.status = Status::Registered {
            until: now + granted,
        };
        self.backoff = BACKOFF_MIN;
        if let Some(c) = &mut self.credentials {
            c.fresh = false;
        }
        let refresh = granted.mul_f64(0.8).max(Duration::from_secs(1));
        self.phase = Phase::Waiting(now + refresh);
    }

    /// The expiry the server granted our binding: our Contact's `expires`, else the Expires
    /// header, else what we asked for.
    fn granted_expiry(&self, resp: &SipResponse) -> u32 {
        let ours = self.contact_uri().to_ascii_lowercase();
        for value in resp.headers().get_all("Contact") {
            for element in elements(value) {
                let (uri, params) = match (element.find('<'), element.find('>')) {
                    (Some(a), Some(b)) if a < b => (&element[a + 1..b], &element[b + 1..]),
                    _ => element
                        .split_once(';')
                        .map_or((element, ""), |(u, _)| (u, &element[u.len()..])),
                };
                let uri = uri
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if uri == ours {
                    if let Some(e) =
                        param(&format!(";{}", params.trim_start_matches(';')), "expires")
                            .and_then(|e| e.parse().ok())
                    {
                        return e;
                    }
                }
            }
        }
        resp.header("Expires")
            .and_then(|e| e.trim().parse().ok())
            .unwrap_or(self.expires)
    }

    fn on_challenge(&mut self, now: Instant, resp: &SipResponse, unregister: bool, auth: AuthUse) {
        let proxy = resp.code == 407;
        let name = if proxy {
            "Proxy-Authenticate"
        } else {
            "WWW-Authenticate"
        };
        let challenge = resp.headers().get_all(name).collect::<Vec<_>>().join(", ");
        let parsed = digest::Challenge::parse_all(&challenge);
        let Some(best) = parsed.as_ref().ok().and_then(|c| c.first()) else {
            let why = match parsed {
                Err(e) => e.to_string(),
                Ok(_) => format!("no {name}"),
            };
            tracing::debug!(connection = %self.name, %why, "unusable challenge");
            return self.fail_with(
                now,
                unregister,
                resp.code,
                format!("{} ({why})", resp.reason),
            );
        };
        // A challenge to credentials that answered a challenge of this very cycle means the
        // password is wrong, unless the server says the nonce was merely stale.
        let retry = self.rounds < MAX_ROUNDS && (auth != AuthUse::Fresh || best.stale);
        if !retry {
            return self.fail_with(now, unregister, resp.code, resp.reason.clone());
        }
        let nc = match &self.credentials {
            Some(c) if c.nonce == best.nonce => c.nc,
            _ => 0,
        };
        self.credentials = Some(Credentials {
            nonce: best.nonce.clone(),
            challenge,
            proxy,
            nc,
            fresh: true,
        });
        self.rounds += 1;
        self.send_register(now, unregister);
    }

    fn fail(&mut self, now: Instant, resp: &SipResponse) {
        self.fail_with(now, false, resp.code, resp.reason.clone());
    }

    fn fail_with(&mut self, now: Instant, unregister: bool, code: u16, reason: String) {
        if unregister {
            return self.finish_stop();
        }
        if code == 403 {
            // The password was refused: the next attempt starts without stale credentials.
            self.credentials = None;
        }
        self.status = Status::Failed { code, reason };
        self.retry_later(now);
    }

    /// Schedules the next attempt after the current backoff (with up to 20 % jitter off it),
    /// and doubles the backoff.
    fn retry_later(&mut self, now: Instant) {
        if self.stopping {
            return self.finish_stop();
        }
        // xorshift64: jitter without a clock or global RNG in the sans-IO core.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        let delay = self.backoff.mul_f64(1.0 - 0.2 * fraction);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.phase = Phase::Waiting(now + delay);
    }

    fn request_uri(&self) -> String {
        format!("sip:{}", self.domain)
    }

    fn contact_uri(&self) -> String {
        format!("sip:{}@{}", self.login, self.contact)
    }

    fn send_register(&mut self, now: Instant, unregister: bool) {
        self.cseq = self.cseq.wrapping_add(1).max(1);
        let branch = format!("z9hG4bK{}", random_token());
        let ruri = self.request_uri();
        let mut auth = AuthUse::None;
        let mut auth_header = None;
        if let Some(c) = &mut self.credentials {
            let nc = c.nc + 1;
            match digest::respond(
                &c.challenge,
                "REGISTER",
                &ruri,
                &self.login,
                &self.password,
                digest::new_cnonce,
                nc,
            ) {
                Ok(v) => {
                    c.nc = nc;
                    auth = if c.fresh {
                        AuthUse::Fresh
                    } else {
                        AuthUse::Reused
                    };
                    c.fresh = false;
                    let name = if c.proxy {
                        "Proxy-Authorization"
                    } else {
                        "Authorization"
                    };
                    auth_header = Some((name, v));
                }
                Err(e) => {
                    tracing::debug!(connection = %self.name, error = %e, "cannot answer challenge");
                    self.credentials = None;
                }
            }
        }
        let mut m = format!(
            "REGISTER {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local};rport;branch={branch}\r\n\
             Max-Forwards: 70\r\n",
            transport = self.via_transport,
            local = self.local
        );
        if let Some(r) = &self.route {
            m.push_str(&format!("Route: {r}\r\n"));
        }
        let aor = format!("<sip:{}@{}>", self.login, self.domain);
        m.push_str(&format!(
            "From: {aor};tag={tag}\r\nTo: {aor}\r\nCall-ID: {cid}\r\nCSeq: {cseq} REGISTER\r\n",
            tag = self.from_tag,
            cid = self.call_id,
            cseq = self.cseq
        ));
        let expires = if unregister { 0 } else { self.expires };
        m.push_str(&format!(
            "Contact: <{}>{}\r\nExpires: {expires}\r\n",
            self.contact_uri(),
            if unregister { ";expires=0" } else { "" }
        ));
        if let Some((name, value)) = auth_header {
            m.push_str(&format!("{name}: {value}\r\n"));
        }
        m.push_str(&format!(
            "User-Agent: {}\r\nContent-Length: 0\r\n\r\n",
            self.user_agent
        ));
        let bytes = m.into_bytes();
        self.queue.push_back((self.target, bytes.clone()));
        let next_retransmit = if self.reliable() {
            now + TIMER_F
        } else {
            now + T1
        };
        self.phase = Phase::Pending(Transaction {
            cseq: self.cseq,
            branch,
            bytes,
            next_retransmit,
            interval: T1,
            deadline: now + TIMER_F,
            unregister,
            auth,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest::{Algorithm, DigestServer};
    use std::time::{SystemTime, UNIX_EPOCH};

    const LOCAL: &str = "127.0.0.1:40000";
    const PBX: &str = "127.0.0.1:5070";

    fn conn() -> ConnectionConfig {
        let text = r#"
            name = "pbx"
            type = "register_to_pbx"
            server = "127.0.0.1:5070"
            login = "siptg"
            password = "right-pass"
            expires = 600
        "#;
        toml::from_str(text).expect("test connection parses")
    }

    fn client(now: Instant) -> OutboundRegistration {
        OutboundRegistration::new(&conn(), LOCAL.parse().expect("addr"), now).expect("client")
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).expect("utf8")
    }

    fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
        msg.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The request just sent, as text.
    fn sent(c: &mut OutboundRegistration) -> String {
        let (to, bytes) = c.poll_transmit().expect("a datagram to send");
        assert_eq!(to, PBX.parse::<SocketAddr>().expect("addr"));
        text(&bytes)
    }

    /// A response to `req` with `code` and extra header lines.
    fn reply(req: &str, code: u16, reason: &str, extra: &[&str]) -> Vec<u8> {
        let mut m = format!("SIP/2.0 {code} {reason}\r\n");
        for h in ["Via", "From", "To", "Call-ID", "CSeq"] {
            m.push_str(&format!("{h}: {}\r\n", header(req, h).expect("header")));
        }
        for e in extra {
            m.push_str(e);
            m.push_str("\r\n");
        }
        m.push_str("Content-Length: 0\r\n\r\n");
        m.into_bytes()
    }

    fn wall() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    fn server() -> DigestServer {
        DigestServer::new("127.0.0.1", [9u8; 32], Duration::from_secs(300))
    }

    fn challenge(srv: &DigestServer, stale: bool) -> String {
        format!(
            "WWW-Authenticate: {}",
            srv.challenge(wall(), stale, &[Algorithm::Md5])[0]
        )
    }

    fn cseq(req: &str) -> u32 {
        header(req, "CSeq")
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("cseq")
    }

    fn nc(auth: &str) -> String {
        auth.split(", ")
            .find_map(|p| p.strip_prefix("nc="))
            .expect("nc")
            .to_string()
    }

    /// Registers through a 401 and returns the time of the 200.
    fn register(c: &mut OutboundRegistration, srv: &DigestServer, now: Instant) -> String {
        c.handle_timeout(now);
        let first = sent(c);
        c.on_response(
            now,
            &reply(&first, 401, "Unauthorized", &[&challenge(srv, false)]),
        )
        .expect("matches");
        let second = sent(c);
        c.on_response(
            now,
            &reply(
                &second,
                200,
                "OK",
                &[&format!("Contact: <sip:siptg@{LOCAL}>;expires=600")],
            ),
        )
        .expect("matches");
        second
    }

    #[test]
    fn first_register_has_the_expected_shape() {
        let now = Instant::now();
        let mut c = client(now);
        assert_eq!(c.poll_timeout(), Some(now));
        c.handle_timeout(now);
        let req = sent(&mut c);
        assert!(
            req.starts_with("REGISTER sip:127.0.0.1 SIP/2.0\r\n"),
            "{req}"
        );
        let via = header(&req, "Via").expect("via");
        assert!(via.starts_with(&format!("SIP/2.0/UDP {LOCAL};rport;branch=z9hG4bK")));
        assert!(header(&req, "From")
            .expect("from")
            .starts_with("<sip:siptg@127.0.0.1>;tag="));
        assert_eq!(header(&req, "To"), Some("<sip:siptg@127.0.0.1>"));
        assert_eq!(header(&req, "Contact"), Some("<sip:siptg@127.0.0.1:40000>"));
        assert_eq!(header(&req, "Expires"), Some("600"));
        assert_eq!(header(&req, "Authorization"), None);
        assert_eq!(c.status(), &Status::Registering);
    }

    #[test]
    fn challenge_is_answered_with_credentials_the_server_accepts() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        let second = register(&mut c, &srv, now);
        let auth = header(&second, "Authorization").expect("authorization");
        let user = srv
            .verify(
                "REGISTER",
                auth,
                |u| (u == "siptg").then(|| "right-pass".into()),
                wall(),
            )
            .expect("verifies");
        assert_eq!(user.username, "siptg");
        assert_eq!(user.uri, "sip:127.0.0.1");
        assert_eq!(nc(auth), "00000001");
        assert_eq!(
            c.status(),
            &Status::Registered {
                until: now + Duration::from_secs(600)
            }
        );
    }

    #[test]
    fn proxy_challenge_gets_proxy_authorization() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        c.handle_timeout(now);
        let first = sent(&mut c);
        let ch = srv.challenge(wall(), false, &[Algorithm::Md5])[0].clone();
        c.on_response(
            now,
            &reply(
                &first,
                407,
                "Proxy Authentication Required",
                &[&format!("Proxy-Authenticate: {ch}")],
            ),
        )
        .expect("matches");
        let second = sent(&mut c);
        assert!(header(&second, "Proxy-Authorization").is_some());
        assert!(header(&second, "Authorization").is_none());
        assert_eq!(cseq(&second), cseq(&first) + 1);
        assert_eq!(header(&second, "Call-ID"), header(&first, "Call-ID"));
    }

    #[test]
    fn refresh_at_80_percent_reuses_the_nonce_with_next_nc() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        let second = register(&mut c, &srv, now);
        let refresh_at = now + Duration::from_secs(480);
        assert_eq!(c.poll_timeout(), Some(refresh_at));
        c.handle_timeout(refresh_at - Duration::from_millis(1));
        assert!(c.poll_transmit().is_none());
        c.handle_timeout(refresh_at);
        let third = sent(&mut c);
        assert_eq!(header(&third, "Call-ID"), header(&second, "Call-ID"));
        assert_eq!(cseq(&third), cseq(&second) + 1);
        assert_eq!(
            nc(header(&third, "Authorization").expect("auth")),
            "00000002"
        );
        // Server grants less than asked, in the Expires header only.
        c.on_response(refresh_at, &reply(&third, 200, "OK", &["Expires: 100"]))
            .expect("matches");
        assert_eq!(c.poll_timeout(), Some(refresh_at + Duration::from_secs(80)));
    }

    #[test]
    fn new_nonce_on_refresh_is_answered_not_failed() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        register(&mut c, &srv, now);
        let t = now + Duration::from_secs(480);
        c.handle_timeout(t);
        let third = sent(&mut c);
        c.on_response(
            t,
            &reply(&third, 401, "Unauthorized", &[&challenge(&srv, false)]),
        )
        .expect("matches");
        let fourth = sent(&mut c);
        assert_eq!(
            nc(header(&fourth, "Authorization").expect("auth")),
            "00000001"
        );
        c.on_response(t, &reply(&fourth, 200, "OK", &["Expires: 600"]))
            .expect("matches");
        assert!(matches!(c.status(), Status::Registered { .. }));
    }

    #[test]
    fn wrong_password_401_loop_stops_and_backs_off() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        c.handle_timeout(now);
        let first = sent(&mut c);
        c.on_response(
            now,
            &reply(&first, 401, "Unauthorized", &[&challenge(&srv, false)]),
        )
        .expect("matches");
        let second = sent(&mut c);
        c.on_response(
            now,
            &reply(&second, 401, "Unauthorized", &[&challenge(&srv, false)]),
        )
        .expect("matches");
        assert!(c.poll_transmit().is_none(), "no third attempt at once");
        assert_eq!(
            c.status(),
            &Status::Failed {
                code: 401,
                reason: "Unauthorized".into()
            }
        );
        let next = c.poll_timeout().expect("retry scheduled");
        assert!(next >= now + BACKOFF_MIN.mul_f64(0.8) && next <= now + BACKOFF_MIN);
    }

    #[test]
    fn stale_rechallenge_is_retried() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        c.handle_timeout(now);
        let first = sent(&mut c);
        c.on_response(
            now,
            &reply(&first, 401, "Unauthorized", &[&challenge(&srv, false)]),
        )
        .expect("matches");
        let second = sent(&mut c);
        c.on_response(
            now,
            &reply(&second, 401, "Unauthorized", &[&challenge(&srv, true)]),
        )
        .expect("matches");
        assert!(c.poll_transmit().is_some(), "stale=true: answered again");
    }

    #[test]
    fn forbidden_fails_and_backoff_doubles_to_the_cap() {
        let mut now = Instant::now();
        let mut c = client(now);
        let mut last = Duration::ZERO;
        for round in 0..10 {
            c.handle_timeout(now);
            let req = sent(&mut c);
            c.on_response(now, &reply(&req, 403, "Wrong password", &[]))
                .expect("matches");
            assert_eq!(
                c.status(),
                &Status::Failed {
                    code: 403,
                    reason: "Wrong password".into()
                }
            );
            let at = c.poll_timeout().expect("retry");
            let delay = at - now;
            let nominal = (BACKOFF_MIN * 2u32.pow(round)).min(BACKOFF_MAX);
            assert!(
                delay <= nominal && delay >= nominal.mul_f64(0.8),
                "{delay:?} vs {nominal:?}"
            );
            assert!(delay >= last.mul_f64(0.8));
            last = delay;
            now = at;
        }
        assert!(last <= BACKOFF_MAX);
    }

    #[test]
    fn timeout_makes_it_unreachable_then_it_retries_and_recovers() {
        let start = Instant::now();
        let mut c = client(start);
        c.handle_timeout(start);
        let first = sent(&mut c);
        // Timer E: 0.5, 1, 2, 4, 4, 4 … until Timer F.
        let mut now = start;
        let mut gaps = Vec::new();
        loop {
            let t = c.poll_timeout().expect("timer");
            if t >= start + TIMER_F {
                now = t;
                break;
            }
            gaps.push((t - now).as_millis());
            now = t;
            c.handle_timeout(now);
            assert_eq!(sent(&mut c), first, "retransmission is identical");
        }
        assert_eq!(&gaps[..5], &[500, 1000, 2000, 4000, 4000]);
        c.handle_timeout(now);
        assert_eq!(c.status(), &Status::Unreachable);
        assert!(c.poll_transmit().is_none());
        let retry = c.poll_timeout().expect("retry scheduled");
        assert!(retry > now && retry <= now + BACKOFF_MIN);
        c.handle_timeout(retry);
        let again = sent(&mut c);
        assert_ne!(
            header(&again, "Via"),
            header(&first, "Via"),
            "new transaction"
        );
        c.on_response(retry, &reply(&again, 200, "OK", &["Expires: 60"]))
            .expect("matches");
        assert!(matches!(c.status(), Status::Registered { .. }));
    }

    #[test]
    fn provisional_slows_retransmissions_to_t2() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        let req = sent(&mut c);
        c.on_response(now, &reply(&req, 100, "Trying", &[]))
            .expect("matches");
        assert_eq!(c.poll_timeout(), Some(now + T2));
    }

    #[test]
    fn refresh_timeout_means_network_loss_and_re_registers() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        register(&mut c, &srv, now);
        let t = now + Duration::from_secs(480);
        c.handle_timeout(t);
        sent(&mut c);
        c.handle_timeout(t + TIMER_F);
        assert_eq!(c.status(), &Status::Unreachable);
        let retry = c.poll_timeout().expect("retry");
        c.handle_timeout(retry);
        assert!(c.poll_transmit().is_some());
    }

    #[test]
    fn malformed_and_unmatched_responses_change_nothing() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        let req = sent(&mut c);
        let before = c.poll_timeout();
        // Not SIP, or not a response: the message model's parser refuses them.
        let malformed: Vec<&[u8]> = vec![
            b"",
            b"\xff\xfe\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"SIP/2.0 2000 OK\r\n\r\n",
            b"SIP/2.0 OK\r\n\r\n",
            b"SIP/2.0 200 OK\r\nno colon\r\n\r\n",
            b"SIP/2.0 200 OK\r\n folded first\r\n\r\n",
        ];
        for data in malformed {
            assert!(
                matches!(c.on_response(now, data), Err(ResponseError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
        assert_eq!(
            c.on_response(now, b"SIP/2.0 200 OK\r\nCSeq: 1 REGISTER\r\n\r\n"),
            Err(ResponseError::Malformed(
                crate::sip::msg::ParseError::Missing("Via")
            ))
        );
        assert_eq!(
            c.on_response(
                now,
                b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n"
            ),
            Err(ResponseError::NotAResponse)
        );
        let other_branch =
            text(&reply(&req, 200, "OK", &[])).replace("branch=z9hG4bK", "branch=z9hG4bKx");
        assert_eq!(
            c.on_response(now, other_branch.as_bytes()),
            Err(ResponseError::Unmatched)
        );
        let other_cseq = text(&reply(&req, 200, "OK", &[])).replace(" REGISTER\r\n", " INVITE\r\n");
        assert_eq!(
            c.on_response(now, other_cseq.as_bytes()),
            Err(ResponseError::Unmatched)
        );
        // Random bytes never panic.
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let mut junk = Vec::new();
            for _ in 0..(x % 200) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                junk.push(b"SIP/2.0 401\r\n:;,<>\"Via: CSeq\t"[(x % 29) as usize]);
            }
            let _ = c.on_response(now, &junk);
        }
        assert_eq!(c.status(), &Status::Registering);
        assert_eq!(c.poll_timeout(), before);
        // Compact headers and bare LF are read.
        let compact = text(&reply(&req, 200, "OK", &["Expires: 120"]))
            .replace("Via:", "v:")
            .replace("Call-ID:", "i:")
            .replace("\r\n", "\n");
        c.on_response(now, compact.as_bytes())
            .expect("compact form accepted");
        assert!(matches!(c.status(), Status::Registered { .. }));
    }

    #[test]
    fn unusable_challenge_fails() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        let req = sent(&mut c);
        c.on_response(
            now,
            &reply(
                &req,
                401,
                "Unauthorized",
                &["WWW-Authenticate: Basic realm=\"x\""],
            ),
        )
        .expect("matches");
        assert!(matches!(c.status(), Status::Failed { code: 401, .. }));
        assert!(c.poll_transmit().is_none());
    }

    #[test]
    fn contact_expires_wins_over_expires_header() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        let req = sent(&mut c);
        let contacts = format!(
            "Contact: <sip:other@10.0.0.1:5060>;expires=30, <sip:siptg@{LOCAL};transport=udp>;expires=200"
        );
        c.on_response(now, &reply(&req, 200, "OK", &[&contacts, "Expires: 3600"]))
            .expect("matches");
        assert_eq!(
            c.status(),
            &Status::Registered {
                until: now + Duration::from_secs(200)
            }
        );
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(160)));
    }

    #[test]
    fn interval_too_brief_raises_expires() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        let req = sent(&mut c);
        c.on_response(
            now,
            &reply(&req, 423, "Interval Too Brief", &["Min-Expires: 1800"]),
        )
        .expect("matches");
        let again = sent(&mut c);
        assert_eq!(header(&again, "Expires"), Some("1800"));
    }

    #[test]
    fn stop_unregisters_with_expires_zero() {
        let now = Instant::now();
        let srv = server();
        let mut c = client(now);
        register(&mut c, &srv, now);
        c.stop(now);
        let req = sent(&mut c);
        assert_eq!(header(&req, "Expires"), Some("0"));
        assert_eq!(
            header(&req, "Contact"),
            Some("<sip:siptg@127.0.0.1:40000>;expires=0")
        );
        assert!(
            header(&req, "Authorization").is_some(),
            "pre-emptive credentials"
        );
        assert!(!c.is_stopped());
        c.on_response(now, &reply(&req, 200, "OK", &[]))
            .expect("matches");
        assert!(c.is_stopped());
        assert_eq!(c.status(), &Status::Stopped);
        assert_eq!(c.poll_timeout(), None);
    }

    /// Over TLS: `SIP/2.0/TLS` in Via, no retransmissions, Timer F still ends a silent
    /// transaction, and the poll deadline never lies in the past (no busy loop).
    #[test]
    fn over_tls_there_are_no_retransmissions() {
        let t0 = Instant::now();
        let mut c = client(t0).over_tls();
        c.handle_timeout(t0);
        let first = sent(&mut c);
        assert!(
            header(&first, "Via")
                .expect("via")
                .starts_with(&format!("SIP/2.0/TLS {LOCAL};rport;branch=z9hG4bK")),
            "{first}"
        );
        assert_eq!(c.poll_timeout(), Some(t0 + TIMER_F));
        c.on_response(t0, &reply(&first, 100, "Trying", &[]))
            .expect("matches");
        assert_eq!(c.poll_timeout(), Some(t0 + TIMER_F));
        c.handle_timeout(t0 + Duration::from_secs(5));
        assert!(c.poll_transmit().is_none());
        c.handle_timeout(t0 + TIMER_F);
        assert_eq!(c.status(), &Status::Unreachable);
    }

    #[test]
    fn stop_before_registering_sends_nothing() {
        let now = Instant::now();
        let mut c = client(now);
        c.stop(now);
        assert!(c.is_stopped());
        assert!(c.poll_transmit().is_none());
    }

    #[test]
    fn proxy_and_contact_and_config_errors() {
        let now = Instant::now();
        let mut cfg = conn();
        cfg.proxy = Some("127.0.0.2".into());
        cfg.domain = Some("pbx.example".into());
        let local: SocketAddr = LOCAL.parse().expect("addr");
        let mut c = OutboundRegistration::new(&cfg, local, now)
            .expect("client")
            .with_contact("127.0.0.1:5060".parse().expect("addr"));
        assert_eq!(c.target(), "127.0.0.2:5060".parse().expect("addr"));
        c.handle_timeout(now);
        let (_, bytes) = c.poll_transmit().expect("sent");
        let req = text(&bytes);
        assert!(req.starts_with("REGISTER sip:pbx.example SIP/2.0"));
        assert_eq!(header(&req, "Route"), Some("<sip:127.0.0.2:5060;lr>"));
        assert_eq!(header(&req, "Contact"), Some("<sip:siptg@127.0.0.1:5060>"));

        let mut named = conn();
        named.server = Some("pbx.example:5080".into());
        assert_eq!(
            OutboundRegistration::new(&named, local, now).err(),
            Some(OutboundError::NeedsResolution {
                name: "pbx".into(),
                host: "pbx.example".into(),
                port: 5080
            })
        );
        let mut bad = conn();
        bad.login = Some("a b".into());
        assert!(matches!(
            OutboundRegistration::new(&bad, local, now),
            Err(OutboundError::BadField { field: "login", .. })
        ));
        let mut v6 = conn();
        v6.server = Some("[::1]:5070".into());
        let mut c6 = OutboundRegistration::new(&v6, "[::1]:40000".parse().expect("addr"), now)
            .expect("v6 client");
        c6.handle_timeout(now);
        let (to, bytes) = c6.poll_transmit().expect("sent");
        assert_eq!(to, "[::1]:5070".parse().expect("addr"));
        assert!(text(&bytes).starts_with("REGISTER sip:[::1] SIP/2.0"));
    }
}
