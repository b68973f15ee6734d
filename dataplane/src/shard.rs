//! The sans-IO relay core of one CPU core: sessions, legs, latching, counters, timers.
//!
//! Fed datagrams and time by a driver (see `driver`), it answers where each datagram goes and
//! queues events. It never touches a socket or reads the clock, so every rule here is tested
//! without I/O.
//!
//! Architecture invariant: one `Shard` is owned by one thread; nothing in it is shared or locked.

use crate::ports::PortPool;
use crate::rtp::{self, Packet};
use crate::srtp::{SrtpContext, MAX_OVERHEAD};
use crate::stats::{Arrival, ReceptionStats};
use crate::tgmedia::bridge::{BridgeOutput, TelegramBridge};
use siptg_proto::{
    CommandError, Event, LegId, LegInfo, LegSpec, LegStats, SessionId, SessionStats,
    SessionSummary, ShardStatus, TelegramEvent, TelegramOp,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest datagram relayed. Drivers receive into a buffer one byte larger, so a longer datagram
/// shows up as `MAX_DATAGRAM + 1` bytes and is dropped as malformed instead of cut short.
pub const MAX_DATAGRAM: usize = 2048;

/// Receive buffers must be this large: an oversized datagram (`MAX_DATAGRAM + 1`) plus room to
/// add an SRTP tag in place when the outgoing leg protects.
pub const PACKET_BUF: usize = MAX_DATAGRAM + 1 + MAX_OVERHEAD;

/// Which of a leg's sockets a datagram used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The RTP port (also carries RTCP with rtcp-mux).
    Rtp,
    /// The RTP port + 1, when rtcp-mux is off.
    Rtcp,
}

/// Where the driver must send a datagram it just handed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub session: SessionId,
    /// The leg whose socket sends it.
    pub leg: LegId,
    pub channel: Channel,
    pub dest: SocketAddr,
    /// Bytes to send from the start of the buffer (SRTP adds or strips a tag in place).
    pub len: usize,
    /// The destination is final for this socket (configured or latched, not a pre-latch hint):
    /// a driver may `connect()` the socket to it, which makes each send cheaper. It must undo
    /// that when [`Shard::update_leg`] changes the leg.
    pub settled: bool,
}

/// A datagram the shard itself originates (Telegram legs and the transcoded SIP stream of
/// their bridge), which the driver sends from the leg's socket after the current turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub session: SessionId,
    pub leg: LegId,
    pub channel: Channel,
    pub dest: SocketAddr,
    pub data: Vec<u8>,
}

/// Timing knobs of a shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardTimers {
    /// Silence after which a leg reports [`Event::RtpTimeout`].
    pub rtp_timeout: Duration,
    /// Period of [`Event::StreamStats`]; `None` disables them.
    pub stats_interval: Option<Duration>,
}

/// How a leg knows where its remote is. Only `Latched`/`Fixed` legs can be sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    /// No address and no latching: the leg only receives.
    Unknown,
    /// Configured address; packets from elsewhere are foreign.
    Fixed(SocketAddr),
    /// Waiting for the first packet; `hint` (from SDP) is used for sending until then.
    Latching { hint: Option<SocketAddr> },
    /// Learnt from the first packet; packets from elsewhere are foreign.
    Latched(SocketAddr),
}

impl Remote {
    fn from_spec(spec: &LegSpec) -> Self {
        match (spec.latch, spec.remote) {
            (true, hint) => Remote::Latching { hint },
            (false, Some(addr)) => Remote::Fixed(addr),
            (false, None) => Remote::Unknown,
        }
    }

    fn send_to(&self) -> Option<SocketAddr> {
        match *self {
            Remote::Fixed(a) | Remote::Latched(a) => Some(a),
            Remote::Latching { hint } => hint,
            Remote::Unknown => None,
        }
    }
}

/// Keeps what a leg sends one continuous RTP stream across source changes (`LegSpec::continuity`).
#[derive(Debug)]
struct Rewrite {
    out_ssrc: u32,
    in_ssrc: Option<u32>,
    seq_offset: u16,
    ts_offset: u32,
    last_seq: u16,
    last_ts: u32,
    last_at: Option<Instant>,
}

impl Rewrite {
    fn new(session: SessionId, leg: LegId) -> Self {
        // splitmix64: a well-spread SSRC without a random source in this sans-IO core.
        let mut z = session ^ ((leg as u64) << 48) ^ 0x9e37_79b9_7f4a_7c15;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rewrite {
            out_ssrc: (z ^ (z >> 31)) as u32,
            in_ssrc: None,
            seq_offset: 0,
            ts_offset: 0,
            last_seq: 0,
            last_ts: 0,
            last_at: None,
        }
    }

    /// Rewrites the header of an RTP packet about to be sent; a new source continues where the
    /// previous one stopped (next sequence number, timestamp advanced by the time elapsed).
    fn apply(&mut self, pkt: &mut [u8], h: &rtp::RtpHeader, clock_rate: u32, now: Instant) {
        if pkt.len() < 12 {
            return;
        }
        if self.in_ssrc != Some(h.ssrc) {
            if let Some(at) = self.last_at {
                let elapsed = now.saturating_duration_since(at).as_secs_f64() * clock_rate as f64;
                let next_ts = self.last_ts.wrapping_add((elapsed as u32).max(1));
                self.seq_offset = self.last_seq.wrapping_add(1).wrapping_sub(h.sequence);
                self.ts_offset = next_ts.wrapping_sub(h.timestamp);
            }
            self.in_ssrc = Some(h.ssrc);
        }
        let seq = h.sequence.wrapping_add(self.seq_offset);
        let ts = h.timestamp.wrapping_add(self.ts_offset);
        pkt[2..4].copy_from_slice(&seq.to_be_bytes());
        pkt[4..8].copy_from_slice(&ts.to_be_bytes());
        pkt[8..12].copy_from_slice(&self.out_ssrc.to_be_bytes());
        // Late packets do not move the continuation point backwards.
        if self.last_at.is_none() || seq.wrapping_sub(self.last_seq) < 0x8000 {
            self.last_seq = seq;
            self.last_ts = ts;
        }
        self.last_at = Some(now);
    }
}

/// The two SRTP contexts of a protected leg.
struct LegSrtp {
    /// Decrypts what the remote sends (its keys).
    inbound: SrtpContext,
    /// Encrypts what we send (our keys).
    outbound: SrtpContext,
}

impl std::fmt::Debug for LegSrtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LegSrtp")
    }
}

/// Builds a leg's SRTP contexts from its keys (errors name the bad key).
fn leg_srtp(spec: &LegSpec) -> Result<Option<Box<LegSrtp>>, CommandError> {
    let Some(k) = &spec.srtp else {
        return Ok(None);
    };
    let bad = |side: &str, e: crate::srtp::SrtpError| {
        CommandError::Invalid(format!("SRTP {side} key: {e}"))
    };
    Ok(Some(Box::new(LegSrtp {
        inbound: SrtpContext::new(k.suite, &k.remote_key, &k.remote_salt)
            .map_err(|e| bad("remote", e))?,
        outbound: SrtpContext::new(k.suite, &k.local_key, &k.local_salt)
            .map_err(|e| bad("local", e))?,
    })))
}

#[derive(Debug)]
struct Leg {
    spec: LegSpec,
    port: u16,
    local: SocketAddr,
    remote: Remote,
    /// Where RTCP comes from when it has its own port: learnt from the first RTCP packet (behind
    /// NAT it is not the RTP port + 1).
    rtcp_remote: Option<SocketAddr>,
    /// SDES-SRTP contexts when the leg is protected.
    srtp: Option<Box<LegSrtp>>,
    /// Header rewriting of what the leg sends, when it asks for continuity.
    rewrite: Option<Rewrite>,
    peer: Option<LegId>,
    rx: ReceptionStats,
    counters: LegStats,
    last_activity: Instant,
    seen_packet: bool,
    timeout_reported: bool,
    /// RTP timestamp of the last telephone-event reported, so its repeated end packets count once.
    last_dtmf_ts: Option<u32>,
    active_since_report: bool,
    /// Set on Telegram legs: their WebRTC stack and the transcoder to the bridged SIP leg.
    tg: Option<Box<TelegramBridge>>,
}

impl Leg {
    /// The E-model estimate of what this leg received; 0 until media arrived.
    fn mos(&self) -> f64 {
        if !self.seen_packet {
            return 0.0;
        }
        let jitter = self.rx.jitter_ms(self.spec.codec.clock_rate);
        crate::stats::mos(self.rx.loss_fraction(), jitter, &self.spec.codec.name)
    }

    fn stats(&self, leg: LegId, now: Instant) -> LegStats {
        LegStats {
            leg,
            local: Some(self.local),
            remote: self.remote.send_to(),
            peer: self.peer,
            lost: self.rx.lost(),
            jitter_ms: self.rx.jitter_ms(self.spec.codec.clock_rate),
            mos: self.mos(),
            idle_ms: self.seen_packet.then(|| {
                now.saturating_duration_since(self.last_activity)
                    .as_millis() as u64
            }),
            ..self.counters.clone()
        }
    }
}

#[derive(Debug)]
struct Session {
    tag: String,
    created: Instant,
    next_leg: LegId,
    legs: BTreeMap<LegId, Leg>,
}

/// One core's sessions and ports.
pub struct Shard {
    core: u16,
    epoch: Instant,
    pool: PortPool,
    timers: ShardTimers,
    sessions: HashMap<SessionId, Session>,
    events: Vec<Event>,
    last_stats: Instant,
    packets_relayed: u64,
    /// Core-wide drop totals (the legs' counters vanish with their sessions).
    drops: Drops,
    /// Datagrams originated here, waiting for the driver.
    transmits: Vec<Transmit>,
    /// How many Telegram legs live here (drivers tick faster while there are any).
    telegram_legs: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Drops {
    malformed: u64,
    foreign: u64,
    srtp: u64,
}

impl Shard {
    /// A shard for `core` owning the ports `ports` (inclusive); `now` starts its clock.
    pub fn new(core: u16, ports: (u16, u16), timers: ShardTimers, now: Instant) -> Self {
        Self {
            core,
            epoch: now,
            pool: PortPool::new(ports.0, ports.1),
            timers,
            sessions: HashMap::new(),
            events: Vec::new(),
            last_stats: now,
            packets_relayed: 0,
            drops: Drops::default(),
            transmits: Vec::new(),
            telegram_legs: 0,
        }
    }

    /// The core this shard runs on.
    pub fn core(&self) -> u16 {
        self.core
    }

    /// Opens an empty session with an id the caller chose (unique across shards).
    pub fn create_session(&mut self, id: SessionId, tag: String, now: Instant) {
        self.sessions.insert(
            id,
            Session {
                tag,
                created: now,
                next_leg: 1,
                legs: BTreeMap::new(),
            },
        );
    }

    /// Checks a leg request and reserves a port for it; the driver then binds the port and calls
    /// [`Shard::complete_add_leg`] or [`Shard::abort_add_leg`].
    pub fn begin_add_leg(
        &mut self,
        session: SessionId,
        spec: &LegSpec,
    ) -> Result<u16, CommandError> {
        if !self.sessions.contains_key(&session) {
            return Err(CommandError::UnknownSession(session));
        }
        validate_spec(spec)?;
        let (min, max) = self.pool.range();
        self.pool.take().ok_or(CommandError::PortsExhausted {
            core: self.core,
            min,
            max,
        })
    }

    /// Gives back a reserved port whose bind failed. It goes to the back of the queue, so a port
    /// another program holds is retried only after every other free port.
    pub fn abort_add_leg(&mut self, port: u16) {
        self.pool.give_back(port);
    }

    /// Records a leg whose sockets are bound at `local`.
    pub fn complete_add_leg(
        &mut self,
        session: SessionId,
        spec: LegSpec,
        port: u16,
        local: SocketAddr,
        now: Instant,
    ) -> Result<LegInfo, CommandError> {
        let srtp = match leg_srtp(&spec) {
            Ok(srtp) => srtp,
            Err(e) => {
                self.pool.give_back(port);
                return Err(e);
            }
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            self.pool.give_back(port);
            return Err(CommandError::UnknownSession(session));
        };
        let mut tg = match &spec.telegram {
            None => None,
            Some(t) => match TelegramBridge::new(t, local, now) {
                Ok(b) => Some(Box::new(b)),
                Err(e) => {
                    self.pool.give_back(port);
                    return Err(CommandError::Invalid(format!("telegram leg: {e}")));
                }
            },
        };
        let telegram = tg.as_mut().map(|b| b.local());
        let leg = s.next_leg;
        s.next_leg += 1;
        let rewrite = spec.continuity.then(|| Rewrite::new(session, leg));
        s.legs.insert(
            leg,
            Leg {
                remote: Remote::from_spec(&spec),
                rtcp_remote: None,
                srtp,
                rewrite,
                spec,
                port,
                local,
                peer: None,
                rx: ReceptionStats::default(),
                counters: LegStats::default(),
                last_activity: now,
                seen_packet: false,
                timeout_reported: false,
                last_dtmf_ts: None,
                active_since_report: false,
                tg,
            },
        );
        if telegram.is_some() {
            self.telegram_legs += 1;
        }
        Ok(LegInfo {
            session,
            leg,
            local,
            telegram,
        })
    }

    /// Applies a re-negotiated spec; a latching leg learns its remote again. A changed
    /// direction (hold, resume) restarts the session's RTP timeouts at `now`.
    pub fn update_leg(
        &mut self,
        session: SessionId,
        leg: LegId,
        spec: LegSpec,
        now: Instant,
    ) -> Result<LegInfo, CommandError> {
        validate_spec(&spec)?;
        let l = self.leg_mut(session, leg)?;
        if l.spec.rtcp_mux != spec.rtcp_mux || l.spec.local_ip != spec.local_ip {
            return Err(CommandError::Invalid(format!(
                "leg {leg}: rtcp_mux and local_ip cannot change on a live leg; add a new leg"
            )));
        }
        if l.spec.srtp != spec.srtp {
            // New keys (re-INVITE): new contexts; unchanged keys keep their rollover state.
            l.srtp = leg_srtp(&spec)?;
        }
        if !spec.continuity {
            l.rewrite = None;
        } else if l.rewrite.is_none() {
            l.rewrite = Some(Rewrite::new(session, leg));
        }
        let hold_changed = l.spec.direction != spec.direction;
        l.remote = Remote::from_spec(&spec);
        l.rtcp_remote = None;
        if l.spec.codec != spec.codec {
            l.rx = ReceptionStats::default();
        }
        if l.spec.telegram != spec.telegram {
            return Err(CommandError::Invalid(format!(
                "leg {leg}: a Telegram leg's setup cannot change; add a new leg"
            )));
        }
        l.spec = spec;
        let local = l.local;
        if let Some(s) = self.sessions.get_mut(&session) {
            tell_bridge_sip_codec(s, leg);
            if hold_changed {
                // Hold or resume: the RTP timeouts count from here, not from the last packet
                // before the hold.
                for l in s.legs.values_mut() {
                    l.last_activity = now;
                    l.timeout_reported = false;
                }
            }
        }
        Ok(LegInfo {
            session,
            leg,
            local,
            telegram: None,
        })
    }

    /// Bridges `a` and `b` both ways, unbridging whatever either was bridged to.
    pub fn bridge(&mut self, session: SessionId, a: LegId, b: LegId) -> Result<(), CommandError> {
        if a == b {
            return Err(CommandError::Invalid(format!(
                "cannot bridge leg {a} to itself"
            )));
        }
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(CommandError::UnknownSession(session))?;
        for leg in [a, b] {
            if !s.legs.contains_key(&leg) {
                return Err(CommandError::UnknownLeg { session, leg });
            }
        }
        for leg in [a, b] {
            if let Some(old) = s.legs.get(&leg).and_then(|l| l.peer) {
                if let Some(o) = s.legs.get_mut(&old) {
                    o.peer = None;
                }
            }
        }
        if let Some(l) = s.legs.get_mut(&a) {
            l.peer = Some(b);
        }
        if let Some(l) = s.legs.get_mut(&b) {
            l.peer = Some(a);
        }
        tell_bridge_sip_codec(s, a);
        tell_bridge_sip_codec(s, b);
        Ok(())
    }

    /// Removes a leg; returns its port so the driver closes the sockets (the port goes back to
    /// the pool here).
    pub fn delete_leg(&mut self, session: SessionId, leg: LegId) -> Result<u16, CommandError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(CommandError::UnknownSession(session))?;
        let l = s
            .legs
            .remove(&leg)
            .ok_or(CommandError::UnknownLeg { session, leg })?;
        if let Some(p) = l.peer.and_then(|p| s.legs.get_mut(&p)) {
            p.peer = None;
        }
        if l.tg.is_some() {
            self.telegram_legs -= 1;
        }
        self.pool.give_back(l.port);
        Ok(l.port)
    }

    /// Removes a session; returns the legs whose sockets the driver must close.
    pub fn delete_session(&mut self, session: SessionId) -> Result<Vec<LegId>, CommandError> {
        let s = self
            .sessions
            .remove(&session)
            .ok_or(CommandError::UnknownSession(session))?;
        let legs = s.legs.keys().copied().collect();
        for l in s.legs.into_values() {
            if l.tg.is_some() {
                self.telegram_legs -= 1;
            }
            self.pool.give_back(l.port);
        }
        Ok(legs)
    }

    /// Per-leg counters of a session.
    pub fn stats(&self, session: SessionId, now: Instant) -> Result<SessionStats, CommandError> {
        let s = self
            .sessions
            .get(&session)
            .ok_or(CommandError::UnknownSession(session))?;
        Ok(SessionStats {
            session,
            legs: s.legs.iter().map(|(&id, l)| l.stats(id, now)).collect(),
        })
    }

    /// Every session of this shard.
    pub fn summaries(&self, now: Instant) -> Vec<SessionSummary> {
        self.sessions
            .iter()
            .map(|(&id, s)| SessionSummary {
                session: id,
                tag: s.tag.clone(),
                core: self.core,
                legs: s
                    .legs
                    .iter()
                    .map(|(&leg, l)| LegInfo {
                        session: id,
                        leg,
                        local: l.local,
                        telegram: None,
                    })
                    .collect(),
                age_ms: now.saturating_duration_since(s.created).as_millis() as u64,
            })
            .collect()
    }

    /// Health numbers of this shard.
    pub fn status(&self) -> ShardStatus {
        let (port_min, port_max) = self.pool.range();
        ShardStatus {
            core: self.core,
            running: true,
            sessions: self.sessions.len() as u32,
            legs: self.sessions.values().map(|s| s.legs.len() as u32).sum(),
            port_min,
            port_max,
            ports_free: self.pool.free(),
            packets_relayed: self.packets_relayed,
            dropped_malformed: self.drops.malformed,
            dropped_foreign: self.drops.foreign,
            dropped_srtp: self.drops.srtp,
        }
    }

    /// Handles one datagram of `len` bytes received into `buf` on a leg's socket; returns where
    /// to relay `buf[..fwd.len]`, if anywhere. `buf` should be [`PACKET_BUF`] long so SRTP can
    /// add its tag in place (without the room, protecting fails and the packet is dropped).
    #[allow(clippy::too_many_arguments)]
    pub fn on_packet(
        &mut self,
        session: SessionId,
        leg: LegId,
        channel: Channel,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        now: Instant,
    ) -> Option<Forward> {
        let epoch = self.epoch;
        let s = self.sessions.get_mut(&session)?;
        let l = s.legs.get_mut(&leg)?;
        if let Some(tg) = l.tg.as_mut() {
            // A Telegram leg runs its own stack (STUN, DTLS, SRTP); nothing is relayed as is.
            let data = buf.get(..len).filter(|_| len <= MAX_DATAGRAM)?;
            let mut out = BridgeOutput::default();
            match tg.on_datagram(now, src, data, &mut out) {
                Ok(true) => {
                    l.counters.packets_in += 1;
                    l.counters.bytes_in += len as u64;
                    l.last_activity = now;
                    l.seen_packet = true;
                    l.timeout_reported = false;
                }
                Ok(false) => {
                    l.counters.dropped_foreign += 1;
                    self.drops.foreign += 1;
                }
                Err(e) => {
                    l.counters.dropped_malformed += 1;
                    self.drops.malformed += 1;
                    tracing::debug!(session, leg, "telegram leg: {e}");
                }
            }
            route_bridge(s, session, leg, out, &mut self.transmits, &mut self.events);
            return None;
        }
        let packet = match buf.get(..len) {
            Some(data) if len <= MAX_DATAGRAM => rtp::classify(data),
            _ => None,
        };
        // The RTCP-only port carries RTCP only; RTP there would bypass RTP latching.
        let packet = packet.filter(|p| channel == Channel::Rtp || *p == Packet::Rtcp);
        let Some(packet) = packet else {
            l.counters.dropped_malformed += 1;
            self.drops.malformed += 1;
            return None;
        };
        // Authenticate before anything learns from the packet (latching included).
        let len = match (&mut l.srtp, packet) {
            (None, _) => len,
            (Some(srtp), Packet::Rtp(_)) => match srtp.inbound.unprotect_rtp(buf, len) {
                Ok(n) => n,
                Err(_) => {
                    l.counters.dropped_srtp += 1;
                    self.drops.srtp += 1;
                    return None;
                }
            },
            (Some(srtp), Packet::Rtcp) => match srtp.inbound.unprotect_rtcp(buf, len) {
                Ok(n) => n,
                Err(_) => {
                    l.counters.dropped_srtp += 1;
                    self.drops.srtp += 1;
                    return None;
                }
            },
        };
        if !accept_source(l, channel, src) {
            l.counters.dropped_foreign += 1;
            self.drops.foreign += 1;
            return None;
        }
        l.counters.packets_in += 1;
        l.counters.bytes_in += len as u64;
        if let Packet::Rtp(h) = packet {
            // Only media keeps a leg alive: RTCP alone does not stop an RTP timeout.
            l.last_activity = now;
            l.seen_packet = true;
            l.timeout_reported = false;
            l.active_since_report = true;
            let is_event = Some(h.payload_type) == l.spec.codec.telephone_event;
            let arrival = Arrival {
                ssrc: h.ssrc,
                seq: h.sequence,
                timestamp: h.timestamp,
                at: now,
                clock_rate: l.spec.codec.clock_rate,
                timed: !is_event,
            };
            l.rx.on_packet(arrival, epoch);
            if is_event {
                detect_dtmf(session, leg, l, &h, &buf[..len], &mut self.events);
            }
        }
        let peer_id = l.peer?;
        let peer = s.legs.get_mut(&peer_id)?;
        if let Some(tg) = peer.tg.as_mut() {
            // SIP audio into a Telegram call: transcoded, not relayed.
            if let Packet::Rtp(h) = packet {
                let payload = buf.get(h.payload_offset..len).unwrap_or(&[]);
                let mut out = BridgeOutput::default();
                if let Err(e) = tg.from_sip(now, h.payload_type, h.timestamp, payload, &mut out) {
                    tracing::debug!(session, leg, "transcoding to Telegram: {e}");
                }
                route_bridge(
                    s,
                    session,
                    peer_id,
                    out,
                    &mut self.transmits,
                    &mut self.events,
                );
            }
            return None;
        }
        if !peer.spec.direction.sends() {
            return None; // that leg's remote holds the call: it wants no media from us
        }
        if packet == Packet::Rtcp && peer.rewrite.is_some() {
            // Its reports name SSRCs and timestamps the rewritten stream no longer uses.
            return None;
        }
        let remote_settled = matches!(peer.remote, Remote::Fixed(_) | Remote::Latched(_));
        let (out_channel, dest, settled) = match packet {
            Packet::Rtcp if !peer.spec.rtcp_mux => match peer.rtcp_remote {
                Some(latched) => (Channel::Rtcp, latched, true),
                None => {
                    let rtp = peer.remote.send_to()?;
                    let guess = SocketAddr::new(rtp.ip(), rtp.port().checked_add(1)?);
                    (Channel::Rtcp, guess, false)
                }
            },
            _ => (Channel::Rtp, peer.remote.send_to()?, remote_settled),
        };
        if let (Packet::Rtp(h), Some(rw)) = (packet, &mut peer.rewrite) {
            rw.apply(&mut buf[..len], &h, peer.spec.codec.clock_rate, now);
        }
        let len = match (&mut peer.srtp, packet) {
            (None, _) => len,
            (Some(srtp), Packet::Rtp(_)) => srtp.outbound.protect_rtp(buf, len).ok()?,
            (Some(srtp), Packet::Rtcp) => srtp.outbound.protect_rtcp(buf, len).ok()?,
        };
        peer.counters.packets_out += 1;
        peer.counters.bytes_out += len as u64;
        self.packets_relayed += 1;
        Some(Forward {
            session,
            leg: peer_id,
            channel: out_channel,
            dest,
            len,
            settled,
        })
    }

    /// [`Shard::on_packet`] on a copy of `data`: for tests, fuzzing and benchmarks of plain RTP.
    pub fn on_datagram(
        &mut self,
        session: SessionId,
        leg: LegId,
        channel: Channel,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        let mut buf = [0u8; PACKET_BUF];
        let len = data.len().min(MAX_DATAGRAM + 1);
        buf[..len].copy_from_slice(&data[..len]);
        self.on_packet(session, leg, channel, src, &mut buf, len, now)
    }

    /// Runs timers: RTP timeouts and periodic stream stats. Call at least every few hundred ms.
    pub fn on_tick(&mut self, now: Instant) {
        let timeout = self.timers.rtp_timeout;
        let report_stats = self
            .timers
            .stats_interval
            .is_some_and(|iv| now.saturating_duration_since(self.last_stats) >= iv);
        if report_stats {
            self.last_stats = now;
        }
        for (&sid, s) in &mut self.sessions {
            // A held call may carry no RTP for as long as the hold lasts, on the held leg and
            // on the other (a peer that hears nothing may send nothing): no timeout then.
            let held = s.legs.values().any(|l| l.spec.direction.is_hold());
            for (&lid, l) in &mut s.legs {
                let idle = now.saturating_duration_since(l.last_activity);
                if !l.timeout_reported && idle >= timeout && !held {
                    l.timeout_reported = true;
                    self.events.push(Event::RtpTimeout {
                        session: sid,
                        leg: lid,
                        idle_ms: idle.as_millis() as u64,
                    });
                }
                if report_stats && l.active_since_report {
                    l.active_since_report = false;
                    self.events.push(Event::StreamStats {
                        session: sid,
                        stats: l.stats(lid, now),
                    });
                }
            }
        }
    }

    /// Moves queued events into `out`.
    pub fn drain_events(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.events);
    }

    /// Drives a Telegram leg from the signalling (`Command::Telegram`).
    pub fn telegram(
        &mut self,
        session: SessionId,
        leg: LegId,
        op: TelegramOp,
        now: Instant,
    ) -> Result<(), CommandError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(CommandError::UnknownSession(session))?;
        let l = s
            .legs
            .get_mut(&leg)
            .ok_or(CommandError::UnknownLeg { session, leg })?;
        let tg =
            l.tg.as_mut()
                .ok_or_else(|| CommandError::Invalid(format!("leg {leg} is not a Telegram leg")))?;
        let mut out = BridgeOutput::default();
        let r = tg.apply(op, now, &mut out);
        route_bridge(s, session, leg, out, &mut self.transmits, &mut self.events);
        r.map_err(|e| CommandError::Invalid(format!("telegram leg {leg}: {e}")))
    }

    /// Closes the Telegram legs of a session (or just `leg`) before they are deleted: DTLS
    /// close-notify to the peer and TURN allocations released, queued as transmits.
    pub fn close_telegram(&mut self, session: SessionId, leg: Option<LegId>, now: Instant) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let ids: Vec<LegId> = s
            .legs
            .iter()
            .filter(|(id, l)| l.tg.is_some() && leg.is_none_or(|want| want == **id))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let mut out = BridgeOutput::default();
            if let Some(tg) = s.legs.get_mut(&id).and_then(|l| l.tg.as_mut()) {
                tg.close(now, &mut out);
            }
            // Only the leg's own datagrams: nothing more goes to the SIP side or the control side.
            out.sip.clear();
            out.events.clear();
            route_bridge(s, session, id, out, &mut self.transmits, &mut self.events);
        }
    }

    /// Whether any Telegram leg lives here: their timers (ICE pacing, DTLS) need ticks every few
    /// milliseconds instead of every [`crate::driver::TICK`].
    pub fn has_telegram(&self) -> bool {
        self.telegram_legs > 0
    }

    /// Runs the Telegram legs' due timers.
    pub fn on_telegram_timers(&mut self, now: Instant) {
        if self.telegram_legs == 0 {
            return;
        }
        for (&sid, s) in &mut self.sessions {
            let due: Vec<LegId> = s
                .legs
                .iter()
                .filter(|(_, l)| {
                    l.tg.as_ref()
                        .and_then(|t| t.poll_timeout())
                        .is_some_and(|t| t <= now)
                })
                .map(|(&id, _)| id)
                .collect();
            for lid in due {
                let mut out = BridgeOutput::default();
                if let Some(tg) = s.legs.get_mut(&lid).and_then(|l| l.tg.as_mut()) {
                    if let Err(e) = tg.handle_timeout(now, &mut out) {
                        out.events.push(TelegramEvent::Failed(e.to_string()));
                    }
                }
                route_bridge(s, sid, lid, out, &mut self.transmits, &mut self.events);
            }
        }
    }

    /// Moves the datagrams originated here into `out`; the driver sends each from its leg.
    pub fn take_transmits(&mut self, out: &mut Vec<Transmit>) {
        out.append(&mut self.transmits);
    }

    fn leg_mut(&mut self, session: SessionId, leg: LegId) -> Result<&mut Leg, CommandError> {
        self.sessions
            .get_mut(&session)
            .ok_or(CommandError::UnknownSession(session))?
            .legs
            .get_mut(&leg)
            .ok_or(CommandError::UnknownLeg { session, leg })
    }
}

/// When `sip` (a plain leg) is bridged to a Telegram leg, tells that leg's bridge what `sip`
/// negotiated (its audio codec and telephone-event payload type).
fn tell_bridge_sip_codec(s: &mut Session, sip: LegId) {
    let Some((codec, peer)) = s
        .legs
        .get(&sip)
        .filter(|l| l.tg.is_none())
        .and_then(|l| Some((l.spec.codec.clone(), l.peer?)))
    else {
        return;
    };
    if let Some(tg) = s.legs.get_mut(&peer).and_then(|l| l.tg.as_mut()) {
        tg.set_sip_codec(&codec);
    }
}

/// Sends what a Telegram leg's bridge produced: its own datagrams from its socket, transcoded
/// RTP to the bridged SIP leg (SRTP-protected when that leg is), events to the control side.
fn route_bridge(
    s: &mut Session,
    session: SessionId,
    leg: LegId,
    out: BridgeOutput,
    transmits: &mut Vec<Transmit>,
    events: &mut Vec<Event>,
) {
    let peer_id = match s.legs.get_mut(&leg) {
        Some(l) => {
            for (dest, data) in out.telegram {
                l.counters.packets_out += 1;
                l.counters.bytes_out += data.len() as u64;
                transmits.push(Transmit {
                    session,
                    leg,
                    channel: Channel::Rtp,
                    dest,
                    data,
                });
            }
            l.peer
        }
        None => None,
    };
    for event in out.events {
        events.push(Event::Telegram {
            session,
            leg,
            event,
        });
    }
    let Some(peer) = peer_id.and_then(|p| s.legs.get_mut(&p)) else {
        return;
    };
    if !peer.spec.direction.sends() {
        return; // the PBX holds the call (sendonly/inactive): it gets no audio from Telegram
    }
    let Some(dest) = peer.remote.send_to() else {
        return;
    };
    for mut pkt in out.sip {
        if let Some(srtp) = peer.srtp.as_mut() {
            let len = pkt.len();
            pkt.resize(len + MAX_OVERHEAD, 0);
            match srtp.outbound.protect_rtp(&mut pkt, len) {
                Ok(n) => pkt.truncate(n),
                Err(_) => continue,
            }
        }
        peer.counters.packets_out += 1;
        peer.counters.bytes_out += pkt.len() as u64;
        transmits.push(Transmit {
            session,
            leg: peer_id.unwrap_or_default(),
            channel: Channel::Rtp,
            dest,
            data: pkt,
        });
    }
}

/// Whether a datagram from `src` on `channel` belongs to the leg; latches where the leg learns.
fn accept_source(l: &mut Leg, channel: Channel, src: SocketAddr) -> bool {
    match channel {
        Channel::Rtp => match l.remote {
            Remote::Fixed(a) | Remote::Latched(a) => a == src,
            Remote::Latching { .. } => {
                l.remote = Remote::Latched(src);
                true
            }
            Remote::Unknown => true,
        },
        Channel::Rtcp => match l.rtcp_remote {
            Some(a) => a == src,
            None => {
                // RTCP on its own port latches only once RTP has a settled remote, and only from
                // that host (behind NAT its port is not the RTP port + 1).
                let from_peer = match l.remote {
                    Remote::Fixed(a) | Remote::Latched(a) => a.ip() == src.ip(),
                    Remote::Latching { .. } | Remote::Unknown => false,
                };
                if from_peer {
                    l.rtcp_remote = Some(src);
                }
                from_peer
            }
        },
    }
}

fn validate_spec(spec: &LegSpec) -> Result<(), CommandError> {
    if spec.codec.clock_rate == 0 {
        return Err(CommandError::Invalid(format!(
            "codec {} has clock rate 0",
            spec.codec.name
        )));
    }
    if spec.codec.payload_type > 127 {
        return Err(CommandError::Invalid(format!(
            "payload type {} is not 0-127",
            spec.codec.payload_type
        )));
    }
    leg_srtp(spec)?;
    Ok(())
}

fn detect_dtmf(
    session: SessionId,
    leg: LegId,
    l: &mut Leg,
    h: &rtp::RtpHeader,
    data: &[u8],
    events: &mut Vec<Event>,
) {
    let Some(ev) = data.get(h.payload_offset..).and_then(rtp::telephone_event) else {
        return;
    };
    // RFC 4733 §2.5.1.4: the end packet is sent three times with the same timestamp.
    if !ev.end || l.last_dtmf_ts == Some(h.timestamp) {
        return;
    }
    l.last_dtmf_ts = Some(h.timestamp);
    if let Some(digit) = rtp::dtmf_digit(ev.event) {
        let rate = l.spec.codec.clock_rate.max(1);
        events.push(Event::Dtmf {
            session,
            leg,
            digit,
            duration_ms: (ev.duration as u64 * 1000 / rate as u64) as u32,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use siptg_proto::Codec;

    fn spec(remote: Option<&str>, latch: bool) -> LegSpec {
        LegSpec {
            remote: remote.map(|r| r.parse().unwrap()),
            latch,
            local_ip: None,
            rtcp_mux: true,
            codec: Codec::pcma(),
            srtp: None,
            continuity: false,
            telegram: None,
            direction: Default::default(),
        }
    }

    fn rtp(pt: u8, seq: u16, ts: u32) -> Vec<u8> {
        let mut p = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&[0xd5; 160]);
        p
    }

    fn timers() -> ShardTimers {
        ShardTimers {
            rtp_timeout: Duration::from_secs(10),
            stats_interval: None,
        }
    }

    /// A shard with session 1 holding legs 1 and 2 bridged.
    fn bridged(a: LegSpec, b: LegSpec, now: Instant) -> Shard {
        let mut sh = Shard::new(0, (40_000, 40_099), timers(), now);
        sh.create_session(1, "t".into(), now);
        for s in [a, b] {
            let port = sh.begin_add_leg(1, &s).unwrap();
            let local = SocketAddr::from(([127, 0, 0, 1], port));
            sh.complete_add_leg(1, s, port, local, now).unwrap();
        }
        sh.bridge(1, 1, 2).unwrap();
        sh
    }

    #[test]
    fn digits_for_a_telegram_leg_play_as_rfc4733_events_on_the_bridged_sip_leg() {
        let t0 = Instant::now();
        let mut sip = spec(Some("127.0.0.1:7000"), false);
        sip.codec = Codec::pcma(); // telephone-event 101
        let mut tg = spec(None, false);
        tg.telegram = Some(siptg_proto::TelegramLegSpec {
            caller: true,
            relay_only: false,
            turn: vec![],
            connect_timeout_ms: 10_000,
        });
        let mut sh = Shard::new(0, (40_000, 40_099), timers(), t0);
        sh.create_session(1, "t".into(), t0);
        let mut add = |s: LegSpec| {
            let port = sh.begin_add_leg(1, &s).unwrap();
            let local = SocketAddr::from(([127, 0, 0, 1], port));
            sh.complete_add_leg(1, s, port, local, t0).unwrap()
        };
        let tg_info = add(tg);
        let sip_info = add(sip);
        sh.bridge(1, tg_info.leg, sip_info.leg).unwrap();
        sh.telegram(1, tg_info.leg, TelegramOp::SendDtmf { digit: '7' }, t0)
            .unwrap();
        sh.telegram(1, tg_info.leg, TelegramOp::SendDtmf { digit: '#' }, t0)
            .unwrap();
        assert!(sh
            .telegram(1, tg_info.leg, TelegramOp::SendDtmf { digit: 'x' }, t0)
            .is_err());
        let mut events = Vec::new();
        for ms in (0..1000).step_by(5) {
            sh.on_telegram_timers(t0 + Duration::from_millis(ms));
            let mut tx = Vec::new();
            sh.take_transmits(&mut tx);
            events.extend(
                tx.into_iter()
                    .filter(|t| t.leg == sip_info.leg && t.data[1] & 0x7f == 101),
            );
        }
        assert_eq!(events.len(), 16, "8 packets per digit");
        assert!(events
            .iter()
            .all(|t| t.dest == "127.0.0.1:7000".parse().unwrap()));
        let codes: Vec<u8> = events.iter().map(|t| t.data[12]).collect();
        assert_eq!(&codes[..8], &[7; 8]);
        assert_eq!(&codes[8..], &[11; 8]);
        // Marker on each event's first packet; one timestamp per event; sequence continuous.
        let markers: Vec<bool> = events.iter().map(|t| t.data[1] & 0x80 != 0).collect();
        assert!(markers[0] && markers[8] && markers.iter().filter(|m| **m).count() == 2);
        let ts = |t: &Transmit| u32::from_be_bytes(t.data[4..8].try_into().unwrap());
        assert!(events[..8].iter().all(|t| ts(t) == ts(&events[0])));
        let seq = |t: &Transmit| u16::from_be_bytes([t.data[2], t.data[3]]);
        for w in events.windows(2) {
            assert_eq!(seq(&w[1]), seq(&w[0]).wrapping_add(1));
        }
        // The end bit on the last three of each digit.
        let ends = events.iter().filter(|t| t.data[13] & 0x80 != 0).count();
        assert_eq!(ends, 6);
    }

    /// The phone's side of [`telegram_round_trip`]: its codec, as a PBX would speak it.
    // One value per test: boxing the G.722 state would only add noise.
    #[allow(clippy::large_enum_variant)]
    enum PhoneCodec {
        Pcma,
        G722(
            crate::tgmedia::g722::G722Encoder,
            crate::tgmedia::g722::G722Decoder,
        ),
        Opus(
            crate::tgmedia::opus::OpusEncoder,
            crate::tgmedia::opus::OpusDecoder,
        ),
    }

    impl PhoneCodec {
        fn codec(&self) -> Codec {
            let (payload_type, name, clock_rate) = match self {
                PhoneCodec::Pcma => (8, "PCMA", 8000),
                PhoneCodec::G722(..) => (9, "G722", 8000),
                PhoneCodec::Opus(..) => (111, "opus", 48_000),
            };
            Codec {
                payload_type,
                name: name.into(),
                clock_rate,
                telephone_event: Some(101),
            }
        }
        /// PCM rate of the phone's audio.
        fn rate(&self) -> u32 {
            match self {
                PhoneCodec::Pcma => 8000,
                _ => 16_000,
            }
        }
        /// RTP timestamp ticks per 20 ms.
        fn ticks(&self) -> u32 {
            match self {
                PhoneCodec::Opus(..) => 960,
                _ => 160,
            }
        }
        fn encode(&mut self, pcm: &[i16]) -> Vec<u8> {
            let mut out = vec![0u8; 1500];
            let n = match self {
                PhoneCodec::Pcma => {
                    crate::tgmedia::g711::Law::A.encode(pcm, &mut out);
                    pcm.len()
                }
                PhoneCodec::G722(e, _) => e.encode(pcm, &mut out),
                PhoneCodec::Opus(e, _) => e.encode(pcm, &mut out).unwrap(),
            };
            out.truncate(n);
            out
        }
        fn decode(&mut self, payload: &[u8]) -> Vec<i16> {
            let mut out = vec![0i16; crate::tgmedia::opus::MAX_FRAME_SAMPLES];
            let n = match self {
                PhoneCodec::Pcma => {
                    crate::tgmedia::g711::Law::A.decode(payload, &mut out);
                    payload.len()
                }
                PhoneCodec::G722(_, d) => d.decode(payload, &mut out),
                PhoneCodec::Opus(_, d) => d.decode(payload, &mut out).unwrap(),
            };
            out.truncate(n);
            out
        }
    }

    #[test]
    fn a_telegram_leg_transcodes_g711_to_opus_and_back_with_a_telegram_peer() {
        telegram_round_trip(PhoneCodec::Pcma);
    }

    #[test]
    fn a_telegram_leg_transcodes_g722_to_opus_and_back() {
        telegram_round_trip(PhoneCodec::G722(
            crate::tgmedia::g722::G722Encoder::new(),
            crate::tgmedia::g722::G722Decoder::new(),
        ));
    }

    #[test]
    fn a_telegram_leg_passes_opus_from_the_pbx_through() {
        use crate::tgmedia::opus::{OpusDecoder, OpusEncoder, OpusSettings};
        telegram_round_trip(PhoneCodec::Opus(
            OpusEncoder::new(OpusSettings::default()).unwrap(),
            OpusDecoder::new(16_000).unwrap(),
        ));
    }

    /// A phone on a SIP leg bridged to a Telegram leg, with another bridge as the Telegram peer
    /// (its PBX side on PCMA): tones cross both ways.
    fn telegram_round_trip(mut phone_codec: PhoneCodec) {
        use crate::tgmedia::bridge::{BridgeOutput, TelegramBridge};
        use crate::tgmedia::g711::Law;
        use crate::tgmedia::opus::{hears_tone, Tone};
        use siptg_proto::{TelegramLegSpec, TelegramLocal};

        let mut now = Instant::now();
        let tg_spec = |caller| TelegramLegSpec {
            caller,
            relay_only: false,
            turn: vec![],
            connect_timeout_ms: 10_000,
        };
        let phone: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let mut sip = spec(Some("127.0.0.1:7000"), false);
        sip.codec = phone_codec.codec();
        let (rate, pt) = (phone_codec.rate(), phone_codec.codec().payload_type);
        let mut tg = spec(None, false);
        tg.telegram = Some(tg_spec(true));
        let mut sh = Shard::new(0, (40_000, 40_099), timers(), now);
        sh.create_session(1, "t".into(), now);
        let add = |sh: &mut Shard, s: LegSpec| {
            let port = sh.begin_add_leg(1, &s).unwrap();
            let local = SocketAddr::from(([127, 0, 0, 1], port));
            sh.complete_add_leg(1, s, port, local, now).unwrap()
        };
        let tg_info = add(&mut sh, tg);
        let sip_info = add(&mut sh, sip);
        sh.bridge(1, tg_info.leg, sip_info.leg).unwrap();
        assert!(sh.has_telegram());

        // The far end: a Telegram peer (another bridge) at its own address.
        let far_addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let mut far = TelegramBridge::new(&tg_spec(false), far_addr, now).unwrap();
        let ours = tg_info.telegram.clone().unwrap();
        let theirs = far.local();
        let ops = |l: &TelegramLocal| {
            let mut v = vec![TelegramOp::RemoteParams {
                ufrag: l.ufrag.clone(),
                pwd: l.pwd.clone(),
                hash: l.hash.clone(),
                fingerprint: l.fingerprint.clone(),
            }];
            v.extend(
                l.candidates
                    .iter()
                    .cloned()
                    .map(TelegramOp::RemoteCandidate),
            );
            v.push(TelegramOp::RemoteAudio {
                ssrc: l.ssrc,
                payload_type: 111,
            });
            v.push(TelegramOp::SendAudio { payload_type: 111 });
            v
        };
        let mut out = BridgeOutput::default();
        for op in ops(&theirs) {
            sh.telegram(1, tg_info.leg, op, now).unwrap();
        }
        for op in ops(&ours) {
            far.apply(op, now, &mut out).unwrap();
        }
        assert!(sh
            .telegram(
                1,
                sip_info.leg,
                TelegramOp::SendAudio { payload_type: 111 },
                now
            )
            .is_err());

        let (mut tone_sip, mut tone_far) = (
            Tone::new(440.0, 8000.0, rate),
            Tone::new(1000.0, 8000.0, 8000),
        );
        let (mut heard_phone, mut heard_far) = (Vec::new(), Vec::new());
        let mut connected = false;
        let mut ev = Vec::new();
        for i in 0..300u32 {
            now += Duration::from_millis(20);
            // Both ends speak 20 ms of G.711: the phone into the SIP leg, the far end's PBX into it.
            let mut phone_pcm = vec![0i16; rate as usize / 50];
            tone_sip.fill(&mut phone_pcm);
            let mut pkt = rtp(pt, i as u16, i * phone_codec.ticks());
            pkt.truncate(12);
            pkt.extend(phone_codec.encode(&phone_pcm));
            let mut pcm = [0i16; 160];
            assert!(sh
                .on_datagram(1, sip_info.leg, Channel::Rtp, phone, &pkt, now)
                .is_none());
            tone_far.fill(&mut pcm);
            let mut g = [0u8; 160];
            Law::A.encode(&pcm, &mut g);
            far.from_sip(now, 8, i * 160, &g, &mut out).unwrap();
            far.handle_timeout(now, &mut out).unwrap();
            sh.on_telegram_timers(now);
            // Shuttle datagrams until quiet.
            for _ in 0..20 {
                let mut tx = Vec::new();
                sh.take_transmits(&mut tx);
                let far_tx: Vec<_> = out.telegram.drain(..).collect();
                for g in out.sip.drain(..) {
                    let mut pcm = vec![0i16; g.len() - 12];
                    Law::A.decode(&g[12..], &mut pcm);
                    heard_far.extend(pcm);
                }
                if tx.is_empty() && far_tx.is_empty() {
                    break;
                }
                for t in tx {
                    if t.leg == sip_info.leg {
                        assert_eq!(t.dest, phone);
                        assert_eq!(t.data[1] & 0x7f, pt, "the phone's codec towards it");
                        heard_phone.extend(phone_codec.decode(&t.data[12..]));
                    } else {
                        assert_eq!(t.dest, far_addr);
                        far.on_datagram(now, tg_info.local, &t.data, &mut out)
                            .unwrap();
                    }
                }
                for (dest, data) in far_tx {
                    assert_eq!(dest, tg_info.local);
                    sh.on_datagram(1, tg_info.leg, Channel::Rtp, far_addr, &data, now);
                }
            }
            sh.drain_events(&mut ev);
            connected |= ev.iter().any(|e| {
                matches!(
                    e,
                    Event::Telegram {
                        event: TelegramEvent::Connected,
                        ..
                    }
                )
            });
        }
        assert!(connected, "no Connected event: {ev:?}");
        assert!(heard_far.len() > 8000 && heard_phone.len() > rate as usize);
        let tail = |v: &[i16]| v[v.len() - 8000..].to_vec();
        let phone_tail = heard_phone[heard_phone.len() - rate as usize..].to_vec();
        assert!(
            hears_tone(&tail(&heard_far), 8000, 440.0, 1000.0),
            "far end did not hear the phone"
        );
        assert!(
            hears_tone(&phone_tail, rate, 1000.0, 440.0),
            "phone did not hear the far end"
        );

        // Deleting the session closes the Telegram leg: its last datagrams (DTLS close) queue up.
        sh.close_telegram(1, None, now);
        let mut tx = Vec::new();
        sh.take_transmits(&mut tx);
        assert!(tx
            .iter()
            .all(|t| t.leg == tg_info.leg && t.dest == far_addr));
        sh.delete_session(1).unwrap();
        assert!(!sh.has_telegram());
    }

    #[test]
    fn bridged_rtp_goes_to_the_peer_remote() {
        let now = Instant::now();
        let mut sh = bridged(
            spec(Some("127.0.0.1:5000"), false),
            spec(Some("127.0.0.1:6000"), false),
            now,
        );
        let fwd = sh.on_datagram(
            1,
            1,
            Channel::Rtp,
            "127.0.0.1:5000".parse().unwrap(),
            &rtp(8, 1, 0),
            now,
        );
        assert_eq!(
            fwd,
            Some(Forward {
                session: 1,
                leg: 2,
                channel: Channel::Rtp,
                dest: "127.0.0.1:6000".parse().unwrap(),
                len: 172,
                settled: true,
            })
        );
        let st = sh.stats(1, now).unwrap();
        assert_eq!(st.legs[0].packets_in, 1);
        assert_eq!(st.legs[1].packets_out, 1);
        assert_eq!(st.legs[1].bytes_out, 172);
    }

    #[test]
    fn latching_leg_learns_first_source_and_then_drops_others() {
        let now = Instant::now();
        let mut sh = bridged(spec(None, true), spec(Some("127.0.0.1:6000"), false), now);
        let first: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        assert!(sh
            .on_datagram(1, 1, Channel::Rtp, first, &rtp(8, 1, 0), now)
            .is_some());
        assert!(sh
            .on_datagram(1, 1, Channel::Rtp, other, &rtp(8, 2, 160), now)
            .is_none());
        // And the latched address is where the peer's media now goes.
        let back = sh.on_datagram(
            1,
            2,
            Channel::Rtp,
            "127.0.0.1:6000".parse().unwrap(),
            &rtp(8, 1, 0),
            now,
        );
        assert_eq!(back.map(|f| f.dest), Some(first));
        let st = sh.stats(1, now).unwrap();
        assert_eq!(st.legs[0].dropped_foreign, 1);
        assert_eq!(st.legs[0].remote, Some(first));
    }

    #[test]
    fn update_leg_relatches_after_reinvite() {
        let now = Instant::now();
        let mut sh = bridged(spec(None, true), spec(Some("127.0.0.1:6000"), false), now);
        sh.on_datagram(
            1,
            1,
            Channel::Rtp,
            "127.0.0.1:7000".parse().unwrap(),
            &rtp(8, 1, 0),
            now,
        );
        sh.update_leg(1, 1, spec(Some("127.0.0.1:8000"), true), now)
            .unwrap();
        let moved: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        assert!(sh
            .on_datagram(1, 1, Channel::Rtp, moved, &rtp(8, 2, 160), now)
            .is_some());
    }

    #[test]
    fn unbridged_leg_counts_but_does_not_forward() {
        let now = Instant::now();
        let mut sh = bridged(spec(None, true), spec(None, true), now);
        sh.delete_leg(1, 2).unwrap();
        assert!(sh
            .on_datagram(
                1,
                1,
                Channel::Rtp,
                "127.0.0.1:7000".parse().unwrap(),
                &rtp(8, 1, 0),
                now
            )
            .is_none());
        assert_eq!(sh.stats(1, now).unwrap().legs[0].packets_in, 1);
    }

    #[test]
    fn rtp_timeout_reported_once_until_media_resumes() {
        let t0 = Instant::now();
        let mut sh = bridged(spec(None, true), spec(None, true), t0);
        let mut ev = Vec::new();
        sh.on_tick(t0 + Duration::from_secs(5));
        sh.drain_events(&mut ev);
        assert!(ev.is_empty());
        sh.on_tick(t0 + Duration::from_secs(11));
        sh.on_tick(t0 + Duration::from_secs(12));
        sh.drain_events(&mut ev);
        assert_eq!(ev.len(), 2, "{ev:?}"); // one per leg, not repeated
        assert!(matches!(ev[0], Event::RtpTimeout { session: 1, .. }));
    }

    #[test]
    fn a_held_leg_has_no_rtp_timeout_and_gets_no_media_until_resumed() {
        use siptg_proto::MediaDirection;
        let t0 = Instant::now();
        let mut sh = bridged(
            spec(Some("127.0.0.1:7000"), false),
            spec(Some("127.0.0.1:6000"), false),
            t0,
        );
        // Leg 2's remote holds with a=inactive: we neither send nor expect anything.
        let mut held = spec(Some("127.0.0.1:6000"), false);
        held.direction = MediaDirection::Inactive;
        sh.update_leg(1, 2, held, t0 + Duration::from_secs(1))
            .unwrap();
        let from_a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let mut ev = Vec::new();
        for s in 1..=60u16 {
            let t = t0 + Duration::from_secs(s as u64);
            // Leg 1 talks for a while, then falls silent too; nothing of it reaches the
            // holding side.
            if s < 20 {
                assert!(sh
                    .on_datagram(1, 1, Channel::Rtp, from_a, &rtp(8, s, s as u32 * 160), t)
                    .is_none());
            }
            sh.on_tick(t);
        }
        sh.drain_events(&mut ev);
        assert!(ev.is_empty(), "no timeout while held: {ev:?}");
        // Resumed at 60 s: media flows again and the timeout counts from the resume.
        let resumed_at = t0 + Duration::from_secs(60);
        sh.update_leg(1, 2, spec(Some("127.0.0.1:6000"), false), resumed_at)
            .unwrap();
        assert!(sh
            .on_datagram(
                1,
                1,
                Channel::Rtp,
                from_a,
                &rtp(8, 61, 61 * 160),
                resumed_at
            )
            .is_some());
        sh.on_tick(resumed_at + Duration::from_secs(5));
        sh.drain_events(&mut ev);
        assert!(ev.is_empty(), "{ev:?}");
        sh.on_tick(resumed_at + Duration::from_secs(11));
        sh.drain_events(&mut ev);
        assert!(
            ev.iter().any(|e| matches!(
                e,
                Event::RtpTimeout {
                    session: 1,
                    leg: 2,
                    ..
                }
            )),
            "a silent resumed leg times out again: {ev:?}"
        );
    }

    #[test]
    fn dtmf_end_packets_report_one_digit() {
        let now = Instant::now();
        let mut sh = bridged(spec(None, true), spec(None, true), now);
        let src: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        for (seq, end) in [(1u16, false), (2, true), (3, true), (4, true)] {
            let mut p = rtp(101, seq, 8000);
            p.truncate(12);
            p.extend_from_slice(&[5, if end { 0x80 } else { 0 }, 0x03, 0x20]);
            sh.on_datagram(1, 1, Channel::Rtp, src, &p, now);
        }
        let mut ev = Vec::new();
        sh.drain_events(&mut ev);
        assert_eq!(
            ev,
            vec![Event::Dtmf {
                session: 1,
                leg: 1,
                digit: '5',
                duration_ms: 100
            }]
        );
    }

    #[test]
    fn ports_return_to_the_pool_on_delete() {
        let now = Instant::now();
        let mut sh = bridged(spec(None, true), spec(None, true), now);
        let before = sh.status().ports_free;
        sh.delete_session(1).unwrap();
        assert_eq!(sh.status().ports_free, before + 2);
        assert_eq!(sh.status().sessions, 0);
    }

    #[test]
    fn exhausted_ports_are_a_clear_error() {
        let now = Instant::now();
        let mut sh = Shard::new(3, (50_000, 50_003), timers(), now);
        sh.create_session(1, "t".into(), now);
        for _ in 0..2 {
            let p = sh.begin_add_leg(1, &spec(None, true)).unwrap();
            sh.complete_add_leg(
                1,
                spec(None, true),
                p,
                SocketAddr::from(([127, 0, 0, 1], p)),
                now,
            )
            .unwrap();
        }
        let err = sh.begin_add_leg(1, &spec(None, true)).unwrap_err();
        assert_eq!(
            err,
            CommandError::PortsExhausted {
                core: 3,
                min: 50_000,
                max: 50_003
            }
        );
    }

    fn srtp_keys(local: u8, remote: u8) -> siptg_proto::SrtpKeys {
        siptg_proto::SrtpKeys {
            suite: siptg_proto::SrtpSuite::AesCm128HmacSha1_80,
            local_key: vec![local; 16],
            local_salt: vec![local; 14],
            remote_key: vec![remote; 16],
            remote_salt: vec![remote; 14],
        }
    }

    #[test]
    fn srtp_leg_is_decrypted_toward_plain_and_encrypted_from_it() {
        use crate::srtp::SrtpContext;
        use siptg_proto::SrtpSuite::AesCm128HmacSha1_80 as SUITE;
        let now = Instant::now();
        let mut protected = spec(Some("127.0.0.1:5000"), false);
        protected.srtp = Some(srtp_keys(1, 2));
        let mut sh = bridged(protected, spec(Some("127.0.0.1:6000"), false), now);
        // The phone on leg 1 encrypts with the keys we know as "remote" (2) and decrypts with
        // ours (1).
        let mut phone_tx = SrtpContext::new(SUITE, &[2; 16], &[2; 14]).unwrap();
        let mut phone_rx = SrtpContext::new(SUITE, &[1; 16], &[1; 14]).unwrap();
        let plain = rtp(8, 7, 1120);
        let mut buf = vec![0u8; PACKET_BUF];
        buf[..plain.len()].copy_from_slice(&plain);
        let n = phone_tx.protect_rtp(&mut buf, plain.len()).unwrap();
        let src: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let fwd = sh
            .on_packet(1, 1, Channel::Rtp, src, &mut buf, n, now)
            .unwrap();
        assert_eq!(
            &buf[..fwd.len],
            &plain[..],
            "plain RTP toward the plain leg"
        );

        let mut buf = vec![0u8; PACKET_BUF];
        buf[..plain.len()].copy_from_slice(&plain);
        let from_plain: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        let fwd = sh
            .on_packet(1, 2, Channel::Rtp, from_plain, &mut buf, plain.len(), now)
            .unwrap();
        assert_eq!(fwd.len, plain.len() + 10, "80-bit tag added");
        let n = phone_rx.unprotect_rtp(&mut buf, fwd.len).unwrap();
        assert_eq!(&buf[..n], &plain[..]);

        // A forged or replayed packet is dropped and counted, and does not latch anything.
        let mut forged = vec![0u8; PACKET_BUF];
        forged[..plain.len()].copy_from_slice(&plain);
        assert!(sh
            .on_packet(1, 1, Channel::Rtp, src, &mut forged, plain.len() + 10, now)
            .is_none());
        let st = sh.stats(1, now).unwrap();
        assert_eq!(st.legs[0].dropped_srtp, 1);
        assert_eq!(st.legs[0].packets_in, 1);
    }

    #[test]
    fn continuity_leg_hides_a_source_change() {
        let t0 = Instant::now();
        let mut out = spec(Some("127.0.0.1:6000"), false);
        out.continuity = true;
        let mut sh = bridged(spec(None, true), out, t0);
        let src: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let mut seen = Vec::new();
        let mut send = |sh: &mut Shard, ssrc: u32, seq: u16, ts: u32, at: Instant| {
            let mut p = rtp(8, seq, ts);
            p[8..12].copy_from_slice(&ssrc.to_be_bytes());
            let mut buf = vec![0u8; PACKET_BUF];
            buf[..p.len()].copy_from_slice(&p);
            let f = sh
                .on_packet(1, 1, Channel::Rtp, src, &mut buf, p.len(), at)
                .unwrap();
            let h = match rtp::classify(&buf[..f.len]) {
                Some(Packet::Rtp(h)) => h,
                other => panic!("{other:?}"),
            };
            seen.push((h.ssrc, h.sequence, h.timestamp));
        };
        for i in 0..3u16 {
            send(
                &mut sh,
                9,
                100 + i,
                1000 + 160 * i as u32,
                t0 + Duration::from_millis(20 * i as u64),
            );
        }
        // The source changes (transfer): new SSRC, unrelated numbering, 40 ms later.
        for i in 0..2u16 {
            send(
                &mut sh,
                77,
                5000 + i,
                90_000 + 160 * i as u32,
                t0 + Duration::from_millis(80 + 20 * i as u64),
            );
        }
        let ssrcs: Vec<u32> = seen.iter().map(|s| s.0).collect();
        assert!(ssrcs.iter().all(|&s| s == ssrcs[0]), "one SSRC: {seen:?}");
        let seqs: Vec<u16> = seen.iter().map(|s| s.1).collect();
        assert_eq!(seqs, vec![100, 101, 102, 103, 104]);
        assert_eq!(
            seen[3].2,
            seen[2].2 + 320,
            "timestamp advanced by the 40 ms elapsed"
        );
        assert_eq!(seen[4].2, seen[3].2 + 160);
    }

    #[test]
    fn bad_srtp_keys_are_refused_without_using_a_port() {
        let now = Instant::now();
        let mut sh = Shard::new(0, (40_000, 40_099), timers(), now);
        sh.create_session(1, "t".into(), now);
        let free = sh.status().ports_free;
        let mut s = spec(None, true);
        let mut keys = srtp_keys(1, 2);
        keys.remote_key.truncate(5);
        s.srtp = Some(keys);
        let err = sh.begin_add_leg(1, &s).unwrap_err();
        assert!(
            matches!(err, CommandError::Invalid(ref m) if m.contains("remote")),
            "{err:?}"
        );
        assert_eq!(sh.status().ports_free, free);
    }

    #[test]
    fn rtcp_port_takes_rtcp_only_and_only_from_the_latched_host() {
        let now = Instant::now();
        let mut a = spec(None, true);
        a.rtcp_mux = false;
        let mut sh = bridged(a, spec(Some("127.0.0.1:6000"), false), now);
        let rtcp = [0x80, 200, 0, 1, 0, 0, 0, 9];
        // Before RTP latched, RTCP on the RTCP port is not taken from anyone.
        let early: SocketAddr = "127.0.0.5:7001".parse().unwrap();
        assert!(sh
            .on_datagram(1, 1, Channel::Rtcp, early, &rtcp, now)
            .is_none());
        let phone: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert!(sh
            .on_datagram(1, 1, Channel::Rtp, phone, &rtp(8, 1, 0), now)
            .is_some());
        // RTP sent to the RTCP port is dropped, even from the phone.
        let nat: SocketAddr = "127.0.0.1:40111".parse().unwrap();
        assert!(sh
            .on_datagram(1, 1, Channel::Rtcp, nat, &rtp(8, 2, 160), now)
            .is_none());
        // RTCP from the phone's host, any port (NAT), latches and is relayed.
        assert!(sh
            .on_datagram(1, 1, Channel::Rtcp, nat, &rtcp, now)
            .is_some());
        let other: SocketAddr = "127.0.0.1:40113".parse().unwrap();
        assert!(sh
            .on_datagram(1, 1, Channel::Rtcp, other, &rtcp, now)
            .is_none());
        let st = sh.stats(1, now).unwrap();
        assert_eq!(st.legs[0].dropped_malformed, 1);
        assert_eq!(st.legs[0].dropped_foreign, 2);
    }

    #[test]
    fn junk_datagram_is_counted_not_forwarded() {
        let now = Instant::now();
        let mut sh = bridged(spec(None, true), spec(Some("127.0.0.1:6000"), false), now);
        assert!(sh
            .on_datagram(
                1,
                1,
                Channel::Rtp,
                "127.0.0.1:7000".parse().unwrap(),
                b"hello",
                now
            )
            .is_none());
        assert_eq!(sh.stats(1, now).unwrap().legs[0].dropped_malformed, 1);
    }
}
