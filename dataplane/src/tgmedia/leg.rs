//! One Telegram call's media: ICE, DTLS-SRTP, Opus RTP and the SCTP data channel, exactly as a
//! tgcalls v2 peer (libwebrtc) expects, driven sans-IO.
//!
//! str0m's Direct API does the WebRTC work without SDP, which matches tgcalls' JSON signalling
//! one to one: `InitialSetup` carries our ICE credentials and DTLS fingerprint, `Candidates` our
//! candidate strings, `NegotiateChannels` the audio SSRC. The owner feeds datagrams and time in
//! and sends what [`TgMediaLeg::poll`] returns; nothing here touches a socket or a clock.
//!
//! Roles follow tgcalls (`InstanceV2Impl`, `NativeNetworkingImpl::setRemoteParams`): the caller
//! is ICE-controlling and the DTLS client and opens the data channel; the callee is controlled,
//! the DTLS server, and accepts it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::config::Fingerprint;
use str0m::ice::IceCreds;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo, Ssrc};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

/// The RTP payload type of Opus in every tgcalls offer.
pub const OPUS_PT: u8 = 111;
/// The data channel's label in tgcalls.
pub const DATA_CHANNEL_LABEL: &str = "data";

/// Why the media leg refused an input or failed; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TgMediaError {
    #[error("bad DTLS fingerprint {0:?}: want sha-256 as colon-separated hex")]
    Fingerprint(String),
    #[error("bad ICE candidate {0:?}: {1}")]
    Candidate(String, String),
    #[error("ICE credentials too short (ufrag {ufrag} chars, pwd {pwd} chars)")]
    IceCredentials { ufrag: usize, pwd: usize },
    #[error("the remote parameters (InitialSetup) were already set")]
    RemoteAlreadySet,
    #[error("audio sent before the leg is connected")]
    NotConnected,
    #[error("data channel is not open")]
    NoDataChannel,
    #[error("the peer's DTLS certificate does not match the fingerprint it signalled")]
    FingerprintMismatch,
    #[error("webrtc: {0}")]
    Rtc(#[from] str0m::RtcError),
}

/// One DTLS certificate for every leg of this process, made on first use.
///
/// A certificate per call cost a key generation (CPU) and about 20 KiB per leg; tgcalls peers
/// only check that the certificate matches the fingerprint signalled for that call, so a
/// process-wide one is as good (a gateway is a server: linking its calls reveals nothing).
/// `None` when generation fails; each leg then makes its own as before.
fn shared_dtls_cert() -> Option<str0m::config::DtlsCert> {
    static CERT: std::sync::OnceLock<Option<str0m::config::DtlsCert>> = std::sync::OnceLock::new();
    CERT.get_or_init(|| {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    })
    .clone()
}

/// How the leg is set up; one per call.
#[derive(Debug, Clone)]
pub struct TgMediaConfig {
    /// True for the side that placed the Telegram call.
    pub caller: bool,
    /// Addresses of the local UDP sockets this leg owns (host candidates), unless relay-only.
    pub host_addrs: Vec<SocketAddr>,
    /// Relay candidates (TURN allocations) this leg can send through.
    pub relay_addrs: Vec<(SocketAddr, SocketAddr)>,
    /// `p2p_allowed == false`: offer relay candidates only.
    pub relay_only: bool,
    /// How long ICE and DTLS may take from the peer's `InitialSetup` before the call fails
    /// (Telegram's `call_connect_timeout_ms` is 30 s).
    pub connect_timeout: Duration,
}

/// Our half of `InitialSetup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalParams {
    pub ufrag: String,
    pub pwd: String,
    /// Always "sha-256".
    pub hash: String,
    /// Upper-case colon-separated hex, as libwebrtc writes it.
    pub fingerprint: String,
    /// "actpass" for the caller, "passive" for the callee.
    pub setup: &'static str,
}

/// What happened on the leg that its owner must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TgMediaEvent {
    /// ICE and DTLS are up: audio can flow.
    Connected,
    /// ICE lost every path, or the peer closed DTLS.
    Disconnected,
    /// One Opus packet from the peer.
    Audio {
        ssrc: u32,
        seq: u64,
        timestamp: u32,
        /// Shared with str0m's packet: no copy per packet.
        payload: std::sync::Arc<[u8]>,
    },
    /// The data channel opened (both sides can now send `MediaState`).
    DataOpen,
    /// A data-channel message (JSON, parsed like signalling).
    Data(Vec<u8>),
    /// The leg gave up: the call must end with this reason.
    Failed(TgMediaFailure),
}

/// Why a leg gave up on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TgMediaFailure {
    #[error("no ICE/DTLS connectivity to the peer within {0:?}")]
    ConnectTimeout(Duration),
}

/// What [`TgMediaLeg::poll`] asks of its owner.
#[derive(Debug)]
pub enum TgMediaOutput {
    /// Send `contents` from local `source` to `destination`.
    Transmit {
        source: SocketAddr,
        destination: SocketAddr,
        contents: Vec<u8>,
    },
    Event(TgMediaEvent),
    /// Call [`TgMediaLeg::handle_timeout`] at this time (or when a datagram arrives).
    Timeout(Instant),
}

/// The media of one Telegram call.
pub struct TgMediaLeg {
    rtc: Rtc,
    caller: bool,
    mid: Mid,
    tx_ssrc: Ssrc,
    rx_ssrc: Option<Ssrc>,
    remote_set: bool,
    connected: bool,
    channel: Option<ChannelId>,
    seq: u64,
    local_candidates: Vec<String>,
    connect_timeout: Duration,
    /// The latest time fed in, so calls without a `now` argument can start timers.
    last_now: Instant,
    /// When the peer's parameters arrived and the connect clock started.
    started: Option<Instant>,
    failed: bool,
    /// DTLS datagrams that arrived before ICE accepted their source (at most
    /// [`EARLY_DTLS_MAX`]), replayed once it does.
    early_dtls: Vec<Datagram>,
}

/// A datagram as it came: source, destination, bytes.
type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

/// DTLS datagrams held per leg before ICE accepts their source: a client's first flight.
const EARLY_DTLS_MAX: usize = 4;

/// RFC 7983 demultiplexing: the first byte of a DTLS record is 20..=63.
fn is_dtls(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(20..=63))
}

impl TgMediaLeg {
    /// A leg with fresh ICE credentials and DTLS certificate, its local candidates added.
    pub fn new(config: &TgMediaConfig, now: Instant) -> Result<Self, TgMediaError> {
        let mut builder = Rtc::builder();
        if let Some(cert) = shared_dtls_cert() {
            builder = builder.set_dtls_cert(cert);
        }
        let mut rtc = builder
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            // One Opus packet per write, polled right after: a short send buffer is enough
            // (str0m's default of 50 costs memory in every call and audio is not resent).
            .set_send_buffer_audio(8)
            // Only what our NegotiateChannels announces (abs-send-time, id 2): str0m's default
            // map adds transport-cc, whose send/receive registers cost ~28 KiB a call and 4
            // bytes a packet for feedback the peer never asked for.
            .clear_extension_map()
            .set_extension(2, str0m::rtp::Extension::AbsoluteSendTime)
            .set_local_ice_credentials(IceCreds::new())
            .build(now);
        let mut local_candidates = Vec::new();
        if !config.relay_only {
            for &addr in &config.host_addrs {
                let c = Candidate::host(addr, "udp")
                    .map_err(|e| TgMediaError::Candidate(addr.to_string(), e.to_string()))?;
                if let Some(c) = rtc.add_local_candidate(c) {
                    local_candidates.push(c.to_sdp_string());
                }
            }
        }
        for &(relayed, local) in &config.relay_addrs {
            let c = Candidate::relayed(relayed, local, "udp")
                .map_err(|e| TgMediaError::Candidate(relayed.to_string(), e.to_string()))?;
            if let Some(c) = rtc.add_local_candidate(c) {
                local_candidates.push(c.to_sdp_string());
            }
        }
        let mid: Mid = "0".into();
        let tx_ssrc;
        {
            let mut api = rtc.direct_api();
            api.set_ice_controlling(config.caller);
            api.declare_media(mid, MediaKind::Audio);
            tx_ssrc = api.new_ssrc();
            api.declare_stream_tx(tx_ssrc, None, mid, None);
        }
        Ok(TgMediaLeg {
            rtc,
            caller: config.caller,
            mid,
            tx_ssrc,
            rx_ssrc: None,
            remote_set: false,
            connected: false,
            channel: None,
            seq: rand::random::<u16>() as u64,
            local_candidates,
            connect_timeout: config.connect_timeout,
            last_now: now,
            started: None,
            failed: false,
            early_dtls: Vec::new(),
        })
    }

    /// Our ICE credentials and DTLS fingerprint for `InitialSetup`.
    pub fn local_params(&mut self) -> LocalParams {
        let api = self.rtc.direct_api();
        let creds = api.local_ice_credentials();
        let fp = api.local_dtls_fingerprint().clone();
        LocalParams {
            ufrag: creds.ufrag,
            pwd: creds.pass,
            hash: fp.hash_func.clone(),
            fingerprint: format_fingerprint(&fp.bytes),
            setup: if self.caller { "actpass" } else { "passive" },
        }
    }

    /// Adds a relayed candidate once a TURN allocation completes: `relayed` is the address the
    /// TURN server gave us, `base` our socket towards that server. Returns its SDP string for a
    /// `Candidates` message (None if str0m already had it).
    pub fn add_relay_candidate(
        &mut self,
        relayed: SocketAddr,
        base: SocketAddr,
    ) -> Result<Option<String>, TgMediaError> {
        let c = Candidate::relayed(relayed, base, "udp")
            .map_err(|e| TgMediaError::Candidate(relayed.to_string(), e.to_string()))?;
        let sdp = self.rtc.add_local_candidate(c).map(|c| c.to_sdp_string());
        if let Some(s) = &sdp {
            self.local_candidates.push(s.clone());
        }
        Ok(sdp)
    }

    /// Our candidates as SDP `candidate:` strings for the `Candidates` message.
    pub fn local_candidates(&self) -> &[String] {
        &self.local_candidates
    }

    /// The SSRC we send audio on (goes into our `NegotiateChannels` offer).
    pub fn audio_ssrc(&self) -> u32 {
        *self.tx_ssrc
    }

    /// Applies the peer's `InitialSetup`: ICE credentials and DTLS fingerprint; starts DTLS
    /// (client on the caller) and SCTP, and on the caller opens the data channel.
    pub fn set_remote_params(
        &mut self,
        ufrag: &str,
        pwd: &str,
        hash: &str,
        fingerprint: &str,
    ) -> Result<(), TgMediaError> {
        if self.remote_set {
            return Err(TgMediaError::RemoteAlreadySet);
        }
        // RFC 8445 §5.3: ufrag ≥ 4 characters, password ≥ 22.
        if ufrag.len() < 4 || pwd.len() < 22 {
            return Err(TgMediaError::IceCredentials {
                ufrag: ufrag.len(),
                pwd: pwd.len(),
            });
        }
        let bytes = parse_fingerprint(fingerprint)
            .filter(|_| hash.eq_ignore_ascii_case("sha-256"))
            .ok_or_else(|| TgMediaError::Fingerprint(format!("{hash} {fingerprint}")))?;
        let mut api = self.rtc.direct_api();
        api.set_remote_ice_credentials(IceCreds {
            ufrag: ufrag.to_string(),
            pass: pwd.to_string(),
        });
        api.set_remote_fingerprint(Fingerprint {
            hash_func: "sha-256".to_string(),
            bytes,
        });
        api.start_dtls(self.caller)?;
        api.start_sctp(self.caller);
        if self.caller {
            self.channel = Some(api.create_data_channel(ChannelConfig {
                label: DATA_CHANNEL_LABEL.to_string(),
                ordered: true,
                reliability: Reliability::Reliable,
                negotiated: None,
                protocol: String::new(),
            }));
        }
        self.remote_set = true;
        self.started = Some(self.rtc_now());
        Ok(())
    }

    fn rtc_now(&self) -> Instant {
        self.last_now
    }

    /// Adds one of the peer's candidates (an SDP `candidate:` string from `Candidates`).
    /// Telegram reflector pseudo-candidates (`*.reflector`) are skipped: we reach peers through
    /// standard TURN.
    pub fn add_remote_candidate(&mut self, sdp: &str) -> Result<bool, TgMediaError> {
        if sdp.contains(".reflector") {
            return Ok(false);
        }
        let c = Candidate::from_sdp_string(sdp)
            .map_err(|e| TgMediaError::Candidate(sdp.to_string(), e.to_string()))?;
        self.rtc.add_remote_candidate(c);
        Ok(true)
    }

    /// The peer's audio SSRC from its `NegotiateChannels` offer: packets on it become
    /// [`TgMediaEvent::Audio`].
    pub fn set_remote_audio_ssrc(&mut self, ssrc: u32) {
        let ssrc = Ssrc::from(ssrc);
        if self.rx_ssrc == Some(ssrc) {
            return;
        }
        let mid = self.mid;
        let mut api = self.rtc.direct_api();
        if let Some(old) = self.rx_ssrc.take() {
            api.remove_stream_rx(old);
        }
        api.expect_stream_rx(ssrc, None, mid, None);
        self.rx_ssrc = Some(ssrc);
    }

    /// Whether ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Feeds one datagram received on local `destination` from `source`. Datagrams that are
    /// not STUN, DTLS or SRTP for this leg are ignored (counted by the caller if it wishes).
    pub fn receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        bytes: &[u8],
    ) -> Result<bool, TgMediaError> {
        let Ok(r) = Receive::new(Protocol::Udp, source, destination, bytes) else {
            return Ok(false);
        };
        self.last_now = self.last_now.max(now);
        let input = Input::Receive(now, r);
        if !self.rtc.accepts(&input) {
            // The peer's first DTLS flight can overtake the STUN response that makes its address
            // a valid pair here; dropped, it would be resent only after DTLS's 1 s timer (seen
            // as ~1 s call setups under load). Hold a few until ICE accepts the source.
            if is_dtls(bytes) && !self.connected && self.early_dtls.len() < EARLY_DTLS_MAX {
                self.early_dtls.push((source, destination, bytes.to_vec()));
                return Ok(true);
            }
            return Ok(false);
        }
        self.rtc.handle_input(input)?;
        self.replay_early_dtls(now)?;
        Ok(true)
    }

    /// Feeds held DTLS datagrams whose source ICE now accepts; drops them once connected.
    fn replay_early_dtls(&mut self, now: Instant) -> Result<(), TgMediaError> {
        if self.early_dtls.is_empty() {
            return Ok(());
        }
        if self.connected {
            self.early_dtls.clear();
            return Ok(());
        }
        let held = std::mem::take(&mut self.early_dtls);
        for (source, destination, bytes) in held {
            let Ok(r) = Receive::new(Protocol::Udp, source, destination, &bytes) else {
                continue;
            };
            let input = Input::Receive(now, r);
            if self.rtc.accepts(&input) {
                self.rtc.handle_input(input)?;
            } else {
                self.early_dtls.push((source, destination, bytes));
            }
        }
        Ok(())
    }

    /// Advances timers (ICE checks, DTLS and SCTP retransmits, RTCP).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), TgMediaError> {
        self.last_now = self.last_now.max(now);
        self.rtc.handle_input(Input::Timeout(now))?;
        self.replay_early_dtls(now)
    }

    /// A failure the leg decided on by itself (the connect deadline), reported once.
    fn check_deadline(&mut self) -> Option<TgMediaEvent> {
        let started = self.started?;
        if self.connected || self.failed || self.last_now < started + self.connect_timeout {
            return None;
        }
        self.failed = true;
        Some(TgMediaEvent::Failed(TgMediaFailure::ConnectTimeout(
            self.connect_timeout,
        )))
    }

    /// The next thing to do; call until it returns [`TgMediaOutput::Timeout`].
    pub fn poll(&mut self) -> Result<TgMediaOutput, TgMediaError> {
        if let Some(e) = self.check_deadline() {
            return Ok(TgMediaOutput::Event(e));
        }
        loop {
            let out = self.rtc.poll_output().map_err(|e| match e {
                str0m::RtcError::RemoteSdp(ref m) if m.contains("fingerprint") => {
                    TgMediaError::FingerprintMismatch
                }
                e => TgMediaError::Rtc(e),
            })?;
            match out {
                Output::Timeout(t) => {
                    let t = match self.started {
                        Some(s) if !self.connected && !self.failed => {
                            t.min(s + self.connect_timeout)
                        }
                        _ => t,
                    };
                    return Ok(TgMediaOutput::Timeout(t));
                }
                Output::Transmit(t) => {
                    return Ok(TgMediaOutput::Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.to_vec(),
                    })
                }
                Output::Event(e) => {
                    if let Some(e) = self.translate(e) {
                        return Ok(TgMediaOutput::Event(e));
                    }
                }
            }
        }
    }

    fn translate(&mut self, e: Event) -> Option<TgMediaEvent> {
        match e {
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(ssrc = *self.tx_ssrc, ?state, since_remote = ?self.started.map(|s| self.last_now.saturating_duration_since(s)), "Telegram leg ICE state");
                if state == IceConnectionState::Disconnected {
                    let was = std::mem::replace(&mut self.connected, false);
                    return was.then_some(TgMediaEvent::Disconnected);
                }
                None
            }
            Event::Connected => {
                tracing::debug!(ssrc = *self.tx_ssrc, since_remote = ?self.started.map(|s| self.last_now.saturating_duration_since(s)), "Telegram leg connected (ICE and DTLS)");
                self.connected = true;
                Some(TgMediaEvent::Connected)
            }
            Event::Closed => {
                let was = std::mem::replace(&mut self.connected, false);
                was.then_some(TgMediaEvent::Disconnected)
            }
            Event::RtpPacket(p) => Some(TgMediaEvent::Audio {
                ssrc: *p.header.ssrc,
                seq: *p.seq_no,
                timestamp: p.header.timestamp,
                // str0m made this Vec for the packet already: move it, no second copy.
                payload: p.payload,
            }),
            Event::ChannelOpen(id, _) => {
                self.channel = Some(id);
                Some(TgMediaEvent::DataOpen)
            }
            Event::ChannelData(d) => Some(TgMediaEvent::Data(d.data.to_vec())),
            Event::ChannelClose(id) => {
                if self.channel == Some(id) {
                    self.channel = None;
                }
                None
            }
            _ => None,
        }
    }

    /// Sends one Opus packet covering `samples` samples at 48 kHz, with RTP timestamp
    /// `timestamp` (the owner keeps the media clock so silence gaps stay honest).
    pub fn send_audio(
        &mut self,
        now: Instant,
        timestamp: u32,
        opus: &[u8],
    ) -> Result<(), TgMediaError> {
        if !self.connected {
            return Err(TgMediaError::NotConnected);
        }
        let seq: SeqNo = self.seq.into();
        self.seq += 1;
        let ssrc = self.tx_ssrc;
        let mut api = self.rtc.direct_api();
        let Some(stream) = api.stream_tx(&ssrc) else {
            return Err(TgMediaError::NotConnected);
        };
        stream.write_rtp(RtpWrite::new(
            OPUS_PT.into(),
            seq,
            timestamp,
            now,
            opus.to_vec(),
        ));
        Ok(())
    }

    /// Sends a data-channel message (`MediaState` JSON).
    pub fn send_data(&mut self, bytes: &[u8]) -> Result<(), TgMediaError> {
        let id = self.channel.ok_or(TgMediaError::NoDataChannel)?;
        let mut ch = self.rtc.channel(id).ok_or(TgMediaError::NoDataChannel)?;
        ch.write(true, bytes)?;
        Ok(())
    }

    /// Ends the leg: DTLS close-notify goes out on the next polls, then nothing more.
    pub fn close(&mut self) {
        self.connected = false;
        self.rtc.disconnect();
    }
}

/// `AB:CD:…` upper-case hex, as libwebrtc and tgcalls write fingerprints.
pub fn format_fingerprint(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Parses `AB:CD:…` (either case) into 32 bytes; `None` unless it is a SHA-256 fingerprint.
pub fn parse_fingerprint(s: &str) -> Option<Vec<u8>> {
    let bytes: Option<Vec<u8>> = s
        .split(':')
        .map(|h| {
            if h.len() == 2 {
                u8::from_str_radix(h, 16).ok()
            } else {
                None
            }
        })
        .collect();
    bytes.filter(|b| b.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tgmedia::opus::*;
    use std::collections::VecDeque;
    use std::time::Duration;

    struct Side {
        leg: TgMediaLeg,
        addr: SocketAddr,
        events: Vec<TgMediaEvent>,
        next: Instant,
    }

    fn side(caller: bool, addr: &str, now: Instant) -> Side {
        let addr: SocketAddr = addr.parse().unwrap();
        let cfg = TgMediaConfig {
            caller,
            host_addrs: vec![addr],
            relay_addrs: vec![],
            relay_only: false,
            connect_timeout: Duration::from_secs(10),
        };
        Side {
            leg: TgMediaLeg::new(&cfg, now).unwrap(),
            addr,
            events: vec![],
            next: now,
        }
    }

    /// Drains one side's outputs into `wire`; returns its next timeout.
    fn drain(s: &mut Side, wire: &mut VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>) {
        loop {
            match s.leg.poll().unwrap() {
                TgMediaOutput::Transmit {
                    source,
                    destination,
                    contents,
                } => wire.push_back((source, destination, contents)),
                TgMediaOutput::Event(e) => s.events.push(e),
                TgMediaOutput::Timeout(t) => {
                    s.next = t;
                    return;
                }
            }
        }
    }

    /// Exchanges InitialSetup, candidates and SSRCs like the signalling would.
    fn pair(now: Instant) -> (Side, Side) {
        let mut a = side(true, "10.0.0.1:4000", now);
        let mut b = side(false, "10.0.0.2:5000", now);
        let (pa, pb) = (a.leg.local_params(), b.leg.local_params());
        assert_eq!((pa.setup, pb.setup), ("actpass", "passive"));
        b.leg
            .set_remote_params(&pa.ufrag, &pa.pwd, &pa.hash, &pa.fingerprint)
            .unwrap();
        a.leg
            .set_remote_params(&pb.ufrag, &pb.pwd, &pb.hash, &pb.fingerprint)
            .unwrap();
        for c in a.leg.local_candidates().to_vec() {
            assert!(b.leg.add_remote_candidate(&c).unwrap());
        }
        for c in b.leg.local_candidates().to_vec() {
            assert!(a.leg.add_remote_candidate(&c).unwrap());
        }
        let (sa, sb) = (a.leg.audio_ssrc(), b.leg.audio_ssrc());
        a.leg.set_remote_audio_ssrc(sb);
        b.leg.set_remote_audio_ssrc(sa);
        (a, b)
    }

    /// Runs both sides on simulated time until `until` holds or `limit` passes.
    fn run(
        a: &mut Side,
        b: &mut Side,
        now: &mut Instant,
        limit: Duration,
        mut tick: impl FnMut(&mut Side, &mut Side, Instant),
        until: impl Fn(&Side, &Side) -> bool,
    ) {
        let end = *now + limit;
        let mut wire = VecDeque::new();
        while *now < end && !until(a, b) {
            tick(a, b, *now);
            drain(a, &mut wire);
            drain(b, &mut wire);
            while let Some((src, dst, bytes)) = wire.pop_front() {
                let to = if dst == a.addr { &mut *a } else { &mut *b };
                assert!(to.leg.receive(*now, src, dst, &bytes).unwrap());
                drain(a, &mut wire);
                drain(b, &mut wire);
            }
            *now += Duration::from_millis(5);
            for s in [&mut *a, &mut *b] {
                if s.next <= *now {
                    s.leg.handle_timeout(*now).unwrap();
                }
            }
        }
    }

    /// The caller's first DTLS flight overtaking the STUN response that validates its address
    /// at the callee must not cost DTLS's 1 s retransmit: the callee holds it until ICE agrees.
    #[test]
    fn dtls_arriving_before_the_ice_pair_is_valid_is_held_not_dropped() {
        let start = Instant::now();
        let mut now = start;
        let (mut a, mut b) = pair(now);
        let mut wire = VecDeque::new();
        // STUN binding success responses to the callee, delivered 30 ms late.
        let mut late: Vec<(Instant, Datagram)> = Vec::new();
        let connected = |s: &Side| s.events.contains(&TgMediaEvent::Connected);
        while now < start + Duration::from_secs(3) && !(connected(&a) && connected(&b)) {
            drain(&mut a, &mut wire);
            drain(&mut b, &mut wire);
            while let Some((src, dst, bytes)) = wire.pop_front() {
                if dst == b.addr && bytes.starts_with(&[0x01, 0x01]) {
                    late.push((now + Duration::from_millis(30), (src, dst, bytes)));
                    continue;
                }
                let to = if dst == a.addr { &mut a } else { &mut b };
                to.leg.receive(now, src, dst, &bytes).unwrap();
                drain(&mut a, &mut wire);
                drain(&mut b, &mut wire);
            }
            let (due, keep): (Vec<_>, Vec<_>) = late.drain(..).partition(|(t, _)| *t <= now);
            late = keep;
            for (_, (src, dst, bytes)) in due {
                b.leg.receive(now, src, dst, &bytes).unwrap();
            }
            now += Duration::from_millis(5);
            for s in [&mut a, &mut b] {
                if s.next <= now {
                    s.leg.handle_timeout(now).unwrap();
                }
            }
        }
        assert!(connected(&a) && connected(&b), "not connected in 3 s");
        assert!(
            now - start < Duration::from_millis(500),
            "connected only after {:?}: the early DTLS flight was dropped",
            now - start
        );
    }

    #[test]
    fn two_legs_connect_open_the_data_channel_and_carry_tones_both_ways() {
        let mut now = Instant::now();
        let (mut a, mut b) = pair(now);
        run(
            &mut a,
            &mut b,
            &mut now,
            Duration::from_secs(10),
            |_, _, _| {},
            |a, b| {
                a.events.contains(&TgMediaEvent::DataOpen)
                    && b.events.contains(&TgMediaEvent::DataOpen)
            },
        );
        assert!(a.leg.is_connected() && b.leg.is_connected());
        a.leg.send_data(br#"{"@type":"MediaState"}"#).unwrap();

        let mut enc_a = OpusEncoder::new(OpusSettings::default()).unwrap();
        let mut enc_b = OpusEncoder::new(OpusSettings::default()).unwrap();
        let (mut tone_a, mut tone_b) = (
            Tone::new(440.0, 8000.0, 16_000),
            Tone::new(1000.0, 8000.0, 16_000),
        );
        let mut ts = 0u32;
        let mut last = now;
        run(
            &mut a,
            &mut b,
            &mut now,
            Duration::from_secs(2),
            |a, b, now| {
                if now.duration_since(last) < Duration::from_millis(20) {
                    return;
                }
                last = now;
                let mut pcm = [0i16; 320];
                let mut pkt = [0u8; MAX_PACKET];
                tone_a.fill(&mut pcm);
                let n = enc_a.encode(&pcm, &mut pkt).unwrap();
                a.leg.send_audio(now, ts, &pkt[..n]).unwrap();
                tone_b.fill(&mut pcm);
                let n = enc_b.encode(&pcm, &mut pkt).unwrap();
                b.leg.send_audio(now, ts, &pkt[..n]).unwrap();
                ts = ts.wrapping_add(960);
            },
            |_, _| false,
        );
        let heard = |s: &Side, from: u32| {
            let mut dec = OpusDecoder::new(16_000).unwrap();
            let mut out = vec![0i16; MAX_FRAME_SAMPLES];
            let mut pcm = Vec::new();
            for e in &s.events {
                if let TgMediaEvent::Audio { ssrc, payload, .. } = e {
                    assert_eq!(*ssrc, from);
                    let n = dec.decode(payload, &mut out).unwrap();
                    pcm.extend_from_slice(&out[..n]);
                }
            }
            pcm
        };
        let at_b = heard(&b, a.leg.audio_ssrc());
        let at_a = heard(&a, b.leg.audio_ssrc());
        assert!(at_b.len() > 16_000, "b got {} samples", at_b.len());
        assert!(hears_tone(
            &at_b[at_b.len() - 8_000..],
            16_000,
            440.0,
            1000.0
        ));
        assert!(hears_tone(
            &at_a[at_a.len() - 8_000..],
            16_000,
            1000.0,
            440.0
        ));
        assert!(b
            .events
            .contains(&TgMediaEvent::Data(br#"{"@type":"MediaState"}"#.to_vec())));
    }

    #[test]
    fn a_wrong_fingerprint_never_connects() {
        let mut now = Instant::now();
        let mut a = side(true, "10.0.0.1:4000", now);
        let mut b = side(false, "10.0.0.2:5000", now);
        let (pa, pb) = (a.leg.local_params(), b.leg.local_params());
        let forged = format_fingerprint(&[0xAB; 32]);
        b.leg
            .set_remote_params(&pa.ufrag, &pa.pwd, &pa.hash, &forged)
            .unwrap();
        a.leg
            .set_remote_params(&pb.ufrag, &pb.pwd, &pb.hash, &pb.fingerprint)
            .unwrap();
        for c in a.leg.local_candidates().to_vec() {
            b.leg.add_remote_candidate(&c).unwrap();
        }
        for c in b.leg.local_candidates().to_vec() {
            a.leg.add_remote_candidate(&c).unwrap();
        }
        let end = now + Duration::from_secs(5);
        let mut wire = VecDeque::new();
        let mut mismatch = false;
        'outer: while now < end {
            for s in [&mut a, &mut b] {
                loop {
                    match s.leg.poll() {
                        Ok(TgMediaOutput::Transmit {
                            source,
                            destination,
                            contents,
                        }) => wire.push_back((source, destination, contents)),
                        Ok(TgMediaOutput::Event(e)) => s.events.push(e),
                        Ok(TgMediaOutput::Timeout(_)) => break,
                        Err(TgMediaError::FingerprintMismatch) => {
                            mismatch = true;
                            break 'outer;
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            }
            while let Some((src, dst, bytes)) = wire.pop_front() {
                let to = if dst == a.addr { &mut a } else { &mut b };
                to.leg.receive(now, src, dst, &bytes).unwrap();
            }
            now += Duration::from_millis(5);
            a.leg.handle_timeout(now).unwrap();
            b.leg.handle_timeout(now).unwrap();
        }
        assert!(mismatch, "the forged fingerprint was not detected");
        assert!(!b.events.contains(&TgMediaEvent::DataOpen));
    }

    #[test]
    fn a_peer_that_never_answers_ice_fails_the_leg_after_the_connect_timeout() {
        let mut now = Instant::now();
        let (mut a, _b) = pair(now);
        let mut wire = VecDeque::new();
        let end = now + Duration::from_secs(15);
        while now < end && a.events.is_empty() {
            drain(&mut a, &mut wire);
            wire.clear(); // the peer is gone: nothing ever answers
            now += Duration::from_millis(50);
            a.leg.handle_timeout(now).unwrap();
        }
        assert_eq!(
            a.events,
            vec![TgMediaEvent::Failed(TgMediaFailure::ConnectTimeout(
                Duration::from_secs(10)
            ))]
        );
        assert!(!a.leg.is_connected());
    }

    #[test]
    fn bad_remote_parameters_are_typed_errors() {
        let now = Instant::now();
        let mut a = side(true, "10.0.0.1:4000", now);
        assert!(matches!(
            a.leg.set_remote_params("ab", "short", "sha-256", "AB"),
            Err(TgMediaError::IceCredentials { .. })
        ));
        assert!(matches!(
            a.leg
                .set_remote_params("abcd", &"p".repeat(24), "sha-256", "ZZ:00"),
            Err(TgMediaError::Fingerprint(_))
        ));
        assert!(matches!(
            a.leg.add_remote_candidate("candidate:garbage"),
            Err(TgMediaError::Candidate(..))
        ));
        assert!(!a
            .leg
            .add_remote_candidate("candidate:1 1 udp 1 reflector-1-2.reflector 9 typ relay")
            .unwrap());
        assert!(matches!(
            a.leg.send_audio(now, 0, &[1, 2, 3]),
            Err(TgMediaError::NotConnected)
        ));
        // Junk datagrams are ignored.
        assert!(!a
            .leg
            .receive(now, "10.0.0.9:1".parse().unwrap(), a.addr, &[0xff; 3])
            .unwrap());
    }

    #[test]
    fn fingerprints_round_trip_in_libwebrtc_format() {
        let fp = format_fingerprint(&[0x0a; 32]);
        assert!(fp.starts_with("0A:0A:"));
        assert_eq!(parse_fingerprint(&fp).unwrap(), vec![0x0a; 32]);
        assert_eq!(
            parse_fingerprint(&fp.to_lowercase()).unwrap(),
            vec![0x0a; 32]
        );
        assert!(parse_fingerprint("0A:0A").is_none());
    }
}
