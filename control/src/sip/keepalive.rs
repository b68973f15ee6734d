//! OPTIONS keep-alive toward a PBX (`ip` trunks and `register_to_pbx` connections), sans-IO.
//!
//! An `ip` trunk has no registration that would tell us the PBX is gone, and a registration
//! refreshes only every few minutes; an OPTIONS every `keepalive` interval does. Any response,
//! whatever its code (a PBX that answers `404`, `405` or `501` to OPTIONS is still there), means
//! the peer is up; no response within the transaction timeout (64×T1, at most the interval)
//! means it is down. Over UDP the OPTIONS is retransmitted like a non-INVITE request (T1
//! doubling, capped at T2). The runtime feeds datagrams and timers and reads [`PeerState`]
//! changes from [`KeepAlive::take_change`] to log them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::msg::{parse_datagram, Method, SipMessage};

/// What the keep-alive knows about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// No OPTIONS has completed yet.
    Unknown,
    /// The last OPTIONS got a response.
    Up,
    /// The last OPTIONS got none.
    Down,
}

impl PeerState {
    /// The word shown in `siptg status` and the logs.
    pub fn label(self) -> &'static str {
        match self {
            PeerState::Unknown => "unknown",
            PeerState::Up => "up",
            PeerState::Down => "down",
        }
    }
}

/// Why a datagram was not taken as the answer to our OPTIONS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeepAliveError {
    /// It does not parse as SIP.
    #[error("not a SIP message: {0}")]
    Parse(String),
    /// It is a request, or a response to something else (stale, foreign).
    #[error("not a response to our current OPTIONS")]
    Unrelated,
}

#[derive(Debug, Clone)]
struct Pending {
    branch: String,
    cseq: u32,
    sent: Instant,
    bytes: Vec<u8>,
    next_retransmit: Instant,
    retransmit_interval: Duration,
    give_up: Instant,
}

/// OPTIONS pings to one peer.
#[derive(Debug)]
pub struct KeepAlive {
    target: SocketAddr,
    local: SocketAddr,
    interval: Duration,
    t1: Duration,
    t2: Duration,
    user_agent: String,
    call_id: String,
    from_tag: String,
    cseq: u32,
    state: PeerState,
    changed: Option<PeerState>,
    last_rtt: Option<Duration>,
    pending: Option<Pending>,
    next_probe: Instant,
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
}

fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl KeepAlive {
    /// Pings `target` from `local` every `interval` (the first one at `now`), with the
    /// RFC 3261 default timers (T1 500 ms, T2 4 s).
    pub fn new(target: SocketAddr, local: SocketAddr, interval: Duration, now: Instant) -> Self {
        KeepAlive {
            target,
            local,
            interval: interval.max(Duration::from_secs(1)),
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            user_agent: "siptg".into(),
            call_id: format!("{}@siptg", token()),
            from_tag: token(),
            cseq: 0,
            state: PeerState::Unknown,
            changed: None,
            last_rtt: None,
            pending: None,
            next_probe: now,
            queue: VecDeque::new(),
        }
    }

    /// Sets the User-Agent header.
    pub fn with_user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// The peer's state as last seen.
    pub fn state(&self) -> PeerState {
        self.state
    }

    /// How long the last answered OPTIONS took.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// The new state, once per change (for the logs).
    pub fn take_change(&mut self) -> Option<PeerState> {
        self.changed.take()
    }

    /// The next datagram to send, and where.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.queue.pop_front()
    }

    /// When [`KeepAlive::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(match &self.pending {
            Some(p) => p.next_retransmit.min(p.give_up),
            None => self.next_probe,
        })
    }

    fn set_state(&mut self, state: PeerState) {
        if self.state != state {
            self.state = state;
            self.changed = Some(state);
        }
    }

    /// Sends, retransmits or gives up, as due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = &mut self.pending {
            if now >= p.give_up {
                self.pending = None;
                self.set_state(PeerState::Down);
            } else if now >= p.next_retransmit {
                self.queue.push_back((self.target, p.bytes.clone()));
                p.retransmit_interval = (p.retransmit_interval * 2).min(self.t2);
                p.next_retransmit = now + p.retransmit_interval;
            }
            return;
        }
        if now >= self.next_probe {
            self.send(now);
        }
    }

    fn send(&mut self, now: Instant) {
        self.cseq += 1;
        let branch = format!("z9hG4bK{}", token());
        let host = match self.target {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        let local = match self.local {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        let text = format!(
            "OPTIONS sip:{host} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:siptg@{local}>;tag={}\r\n\
             To: <sip:{host}>\r\n\
             Call-ID: {}\r\n\
             CSeq: {} OPTIONS\r\n\
             User-Agent: {}\r\n\
             Accept: application/sdp\r\n\
             Content-Length: 0\r\n\r\n",
            self.from_tag, self.call_id, self.cseq, self.user_agent
        );
        let bytes = text.into_bytes();
        self.queue.push_back((self.target, bytes.clone()));
        let timeout = (self.t1 * 64).min(self.interval);
        self.pending = Some(Pending {
            branch,
            cseq: self.cseq,
            sent: now,
            bytes,
            next_retransmit: now + self.t1,
            retransmit_interval: self.t1,
            give_up: now + timeout,
        });
        self.next_probe = now + self.interval;
    }

    /// A datagram from the peer. Any final response to the current OPTIONS (any code) means
    /// the peer is up; provisional ones are ignored.
    pub fn on_datagram(&mut self, now: Instant, data: &[u8]) -> Result<(), KeepAliveError> {
        let msg = parse_datagram(data).map_err(|e| KeepAliveError::Parse(e.to_string()))?;
        let SipMessage::Response(resp) = msg else {
            return Err(KeepAliveError::Unrelated);
        };
        let Some(p) = &self.pending else {
            return Err(KeepAliveError::Unrelated);
        };
        let ours = resp.call_id() == Some(self.call_id.as_str())
            && resp.cseq() == Some((p.cseq, Method::Options))
            && resp.top_via_branch().as_deref() == Some(p.branch.as_str());
        if !ours {
            return Err(KeepAliveError::Unrelated);
        }
        if resp.code < 200 {
            return Ok(());
        }
        self.last_rtt = Some(now.saturating_duration_since(p.sent));
        self.pending = None;
        self.set_state(PeerState::Up);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PBX: &str = "127.0.0.1:5070";
    const US: &str = "127.0.0.1:40000";

    fn reply(req: &[u8], code: u16, reason: &str) -> Vec<u8> {
        let Ok(SipMessage::Request(r)) = parse_datagram(req) else {
            panic!("our OPTIONS does not parse");
        };
        super::super::msg::SipResponse::to(&r, code, reason, Some("pbx"))
            .to_bytes()
            .to_vec()
    }

    fn ka(t0: Instant) -> KeepAlive {
        KeepAlive::new(
            PBX.parse().unwrap(),
            US.parse().unwrap(),
            Duration::from_secs(30),
            t0,
        )
    }

    #[test]
    fn any_answer_means_up_even_405() {
        let t0 = Instant::now();
        let mut k = ka(t0);
        assert_eq!(k.state(), PeerState::Unknown);
        k.handle_timeout(t0);
        let (to, req) = k.poll_transmit().expect("an OPTIONS");
        assert_eq!(to, PBX.parse().unwrap());
        let text = String::from_utf8(req.clone()).unwrap();
        assert!(
            text.starts_with("OPTIONS sip:127.0.0.1:5070 SIP/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("CSeq: 1 OPTIONS"));
        // A provisional does not count; a 405 does.
        k.on_datagram(t0, &reply(&req, 100, "Trying")).unwrap();
        assert_eq!(k.state(), PeerState::Unknown);
        k.on_datagram(
            t0 + Duration::from_millis(20),
            &reply(&req, 405, "Method Not Allowed"),
        )
        .unwrap();
        assert_eq!(k.state(), PeerState::Up);
        assert_eq!(k.take_change(), Some(PeerState::Up));
        assert_eq!(k.take_change(), None);
        assert_eq!(k.last_rtt(), Some(Duration::from_millis(20)));
        // The next one 30 s after the first.
        assert_eq!(k.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        // A late duplicate of the old answer is not taken for the next OPTIONS.
        k.handle_timeout(t0 + Duration::from_secs(30));
        let (_, second) = k.poll_transmit().expect("second OPTIONS");
        assert!(String::from_utf8_lossy(&second).contains("CSeq: 2 OPTIONS"));
        assert_eq!(
            k.on_datagram(t0, &reply(&req, 200, "OK")),
            Err(KeepAliveError::Unrelated)
        );
    }

    #[test]
    fn silence_means_down_after_retransmissions_and_recovery_means_up() {
        let t0 = Instant::now();
        let mut k = ka(t0);
        k.handle_timeout(t0);
        let (_, req) = k.poll_transmit().unwrap();
        let mut sends = 1;
        let mut now = t0;
        while k.state() != PeerState::Down {
            now = k.poll_timeout().unwrap();
            assert!(now <= t0 + Duration::from_secs(30));
            k.handle_timeout(now);
            while let Some((_, b)) = k.poll_transmit() {
                assert_eq!(b, req, "retransmissions are identical");
                sends += 1;
            }
        }
        // 0, 0.5, 1.5, 3.5, 7.5, 11.5, … until 30 s (the interval caps Timer F's 32 s).
        assert_eq!(now, t0 + Duration::from_secs(30));
        assert!(sends >= 8, "{sends}");
        assert_eq!(k.take_change(), Some(PeerState::Down));
        // The next OPTIONS goes at once (its probe time has come) and an answer brings it up.
        k.handle_timeout(now);
        let (_, next) = k.poll_transmit().expect("a new OPTIONS");
        assert_ne!(next, req);
        k.on_datagram(now, &reply(&next, 501, "Not Implemented"))
            .unwrap();
        assert_eq!(k.take_change(), Some(PeerState::Up));
    }

    #[test]
    fn garbage_and_foreign_responses_are_ignored() {
        let t0 = Instant::now();
        let mut k = ka(t0);
        k.handle_timeout(t0);
        let (_, req) = k.poll_transmit().unwrap();
        assert!(matches!(
            k.on_datagram(t0, b"\x00\x01garbage"),
            Err(KeepAliveError::Parse(_))
        ));
        let foreign = String::from_utf8(reply(&req, 200, "OK"))
            .unwrap()
            .replace("@siptg", "@elsewhere");
        assert_eq!(
            k.on_datagram(t0, foreign.as_bytes()),
            Err(KeepAliveError::Unrelated)
        );
        assert_eq!(k.state(), PeerState::Unknown);
    }
}
