//! Commands, replies and events exchanged after the handshake.
//!
//! A session is one call's media on the dataplane; it lives on exactly one core. A leg is one
//! media endpoint of it (a local UDP port facing one remote). Bridging two legs makes RTP received
//! on one leave through the other.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// Dataplane-wide session identifier, assigned by the dataplane.
pub type SessionId = u64;
/// Leg identifier, unique within its session.
pub type LegId = u32;

/// Everything that crosses the control socket after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Control → dataplane; answered by exactly one [`Message::Response`] with the same id.
    Request { id: u64, command: Command },
    /// Dataplane → control.
    Response {
        id: u64,
        result: Result<Reply, CommandError>,
    },
    /// Dataplane → control, unsolicited.
    Event(Event),
}

/// What the control side asks of the dataplane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Cores, sessions and ports: the dataplane's health.
    Status,
    /// A new, empty session; `tag` is the control side's name for it (e.g. a SIP Call-ID), kept
    /// so that a restarted control side can recognise its sessions.
    CreateSession { tag: String },
    /// Allocates a local port on the session's core and opens a leg on it.
    AddLeg { session: SessionId, spec: LegSpec },
    /// Changes a leg's remote, codec or keys (re-INVITE); the local port stays.
    UpdateLeg {
        session: SessionId,
        leg: LegId,
        spec: LegSpec,
    },
    /// Relays media both ways between two legs of one session; replaces earlier bridges of either.
    Bridge {
        session: SessionId,
        a: LegId,
        b: LegId,
    },
    /// Closes one leg and frees its port.
    DeleteLeg { session: SessionId, leg: LegId },
    /// Closes the session, all its legs and ports.
    DeleteSession { session: SessionId },
    /// Per-leg counters of one session.
    Stats { session: SessionId },
    /// Every session the dataplane holds (used to reconcile after a reconnect).
    List,
    /// Drives a Telegram leg from the signalling.
    Telegram {
        session: SessionId,
        leg: LegId,
        op: TelegramOp,
    },
}

/// How a leg talks to its remote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegSpec {
    /// Where to send media; `None` until known (then `latch` must be set to learn it).
    pub remote: Option<SocketAddr>,
    /// Symmetric RTP: take the remote from the first packet received and ignore other sources.
    pub latch: bool,
    /// Local address to bind; `None` uses the dataplane's configured media address.
    pub local_ip: Option<IpAddr>,
    /// RTP and RTCP share the port (RFC 5761).
    pub rtcp_mux: bool,
    /// The audio codec negotiated for this leg.
    pub codec: Codec,
    /// SDES-SRTP keys; `None` means plain RTP.
    pub srtp: Option<SrtpKeys>,
    /// Rewrite SSRC, sequence numbers and timestamps of what this leg sends, so its remote sees
    /// one continuous stream even when the source behind the other leg changes (transfer,
    /// re-INVITE, a new Telegram media session). Phones that reset their jitter buffer or drop
    /// audio on an SSRC change need it.
    pub continuity: bool,
    /// This leg is the Telegram side of a call: WebRTC (ICE, DTLS-SRTP, Opus) instead of plain
    /// RTP, bridged to its peer leg by transcoding (G.711 ⇄ Opus). `None` for SIP legs.
    #[serde(default)]
    pub telegram: Option<TelegramLegSpec>,
    /// Which way media flows with the leg's remote, as the SDP offer/answer left it (RFC 3264).
    /// A leg that is not `SendRecv` is on hold: the dataplane sends it nothing unless the
    /// direction `sends()`, and its RTP timeout is suspended, because a holding PBX may send no
    /// RTP at all for minutes.
    #[serde(default)]
    pub direction: MediaDirection,
}

/// A leg's media direction from the dataplane's side: `SendOnly` means the dataplane sends to
/// the remote and receives nothing (the remote said `recvonly`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaDirection {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl MediaDirection {
    /// May the dataplane send media to the leg's remote?
    pub fn sends(self) -> bool {
        matches!(self, MediaDirection::SendRecv | MediaDirection::SendOnly)
    }

    /// Does the leg's remote send media to the dataplane?
    pub fn receives(self) -> bool {
        matches!(self, MediaDirection::SendRecv | MediaDirection::RecvOnly)
    }

    /// Is the leg on hold (either side stopped one direction)?
    pub fn is_hold(self) -> bool {
        self != MediaDirection::SendRecv
    }
}

/// How a Telegram leg connects (from `phoneCall`: who called, `p2p_allowed`, the TURN entries
/// of `connections`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelegramLegSpec {
    /// We placed the Telegram call: ICE controlling, DTLS client, data-channel opener.
    pub caller: bool,
    /// `p2p_allowed == false`: only relayed candidates.
    pub relay_only: bool,
    /// TURN servers (`phoneConnectionWebrtc` with `turn`), one allocation each.
    pub turn: Vec<TurnServer>,
    /// ICE + DTLS must complete within this long after the peer's parameters arrive.
    pub connect_timeout_ms: u32,
}

/// A TURN server and its long-term credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnServer {
    pub addr: SocketAddr,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for TurnServer {
    // Credentials never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Our half of the Telegram leg's setup, for the signalling (`InitialSetup`, `Candidates`,
/// `NegotiateChannels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelegramLocal {
    pub ufrag: String,
    pub pwd: String,
    pub hash: String,
    pub fingerprint: String,
    pub candidates: Vec<String>,
    pub ssrc: u32,
}

/// What the signalling tells a Telegram leg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TelegramOp {
    /// The peer's `InitialSetup`: ICE credentials and DTLS fingerprint.
    RemoteParams {
        ufrag: String,
        pwd: String,
        hash: String,
        fingerprint: String,
    },
    /// One of the peer's candidates (SDP `candidate:` string).
    RemoteCandidate(String),
    /// The SSRC and Opus payload type the peer sends with.
    RemoteAudio { ssrc: u32, payload_type: u8 },
    /// The peer accepted our audio: start sending it with this payload type.
    SendAudio { payload_type: u8 },
    /// A data-channel message (`MediaState`).
    SendData(Vec<u8>),
    /// A keypad digit for the bridged SIP leg as an RFC 4733 telephone-event (the digits the
    /// Telegram user types): played in the SIP leg's own RTP stream. Refused when that leg did
    /// not negotiate telephone-event.
    SendDtmf { digit: char },
}

/// What a Telegram leg reports to the signalling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TelegramEvent {
    /// ICE and DTLS are up.
    Connected,
    /// Every path was lost.
    Disconnected,
    /// The leg gave up (connect deadline, DTLS failure, …): end the call with this reason.
    Failed(String),
    /// A candidate found later (a TURN allocation): send it in a `Candidates` message.
    LocalCandidate(String),
    /// The data channel opened.
    DataOpen,
    /// A data-channel message from the peer.
    Data(Vec<u8>),
}

/// A negotiated audio payload format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Codec {
    /// RTP payload type number (e.g. 8 for PCMA).
    pub payload_type: u8,
    /// Encoding name as in SDP (e.g. `PCMA`, `opus`).
    pub name: String,
    /// RTP clock rate in Hz.
    pub clock_rate: u32,
    /// Payload type of RFC 4733 telephone-event on this leg, if negotiated (DTMF detection).
    pub telephone_event: Option<u8>,
}

impl Codec {
    /// G.711 A-law at 8 kHz with telephone-event 101: the usual PBX default.
    pub fn pcma() -> Self {
        Self {
            payload_type: 8,
            name: "PCMA".into(),
            clock_rate: 8000,
            telephone_event: Some(101),
        }
    }
}

/// SRTP crypto suites of RFC 4568 / RFC 7714 that siptg negotiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SrtpSuite {
    AesCm128HmacSha1_80,
    AesCm128HmacSha1_32,
    AeadAes128Gcm,
}

/// Master keys for both directions of an SRTP leg.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrtpKeys {
    pub suite: SrtpSuite,
    /// Key and salt we encrypt with (from our `a=crypto`).
    pub local_key: Vec<u8>,
    pub local_salt: Vec<u8>,
    /// Key and salt the remote encrypts with (from its `a=crypto`).
    pub remote_key: Vec<u8>,
    pub remote_salt: Vec<u8>,
}

impl std::fmt::Debug for SrtpKeys {
    // Keys never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpKeys")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// Successful answers, one variant per command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Status(DataplaneStatus),
    SessionCreated {
        session: SessionId,
        core: u16,
    },
    Leg(LegInfo),
    Bridged,
    Deleted,
    Stats(SessionStats),
    Sessions(Vec<SessionSummary>),
    /// A command that returns nothing succeeded.
    Done,
}

/// Where a leg lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegInfo {
    pub session: SessionId,
    pub leg: LegId,
    /// The bound local address to put in SDP.
    pub local: SocketAddr,
    /// Set for Telegram legs: what the signalling must announce.
    #[serde(default)]
    pub telegram: Option<TelegramLocal>,
}

/// The dataplane's health, for `siptg status` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataplaneStatus {
    pub pid: u32,
    pub boot_id: u64,
    pub driver: String,
    pub uptime_ms: u64,
    pub shards: Vec<ShardStatus>,
}

/// One core's shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub core: u16,
    /// False when the shard's thread has died or stopped answering.
    pub running: bool,
    pub sessions: u32,
    pub legs: u32,
    /// This core's slice of the RTP port range, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    pub ports_free: u32,
    pub packets_relayed: u64,
    /// Datagrams dropped on this core since start: not RTP/RTCP or oversized, from a source
    /// other than the leg's remote, or failing SRTP authentication/replay checks.
    pub dropped_malformed: u64,
    pub dropped_foreign: u64,
    pub dropped_srtp: u64,
}

/// One session in a [`Command::List`] reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub session: SessionId,
    pub tag: String,
    pub core: u16,
    pub legs: Vec<LegInfo>,
    pub age_ms: u64,
}

/// Counters of one session's legs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStats {
    pub session: SessionId,
    pub legs: Vec<LegStats>,
}

/// RFC 3550-style counters of one leg, as seen by the dataplane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LegStats {
    pub leg: LegId,
    pub local: Option<SocketAddr>,
    /// Current remote (configured or latched).
    pub remote: Option<SocketAddr>,
    /// Bridged peer leg, if any.
    pub peer: Option<LegId>,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets from a source other than the latched/configured remote, dropped.
    pub dropped_foreign: u64,
    /// Datagrams too short or not RTP/RTCP, dropped.
    pub dropped_malformed: u64,
    /// SRTP/SRTCP packets that failed authentication or replay checks, dropped.
    pub dropped_srtp: u64,
    /// RTP packets expected minus received (RFC 3550 A.3), never negative.
    pub lost: u64,
    /// Interarrival jitter in milliseconds (RFC 3550 A.8).
    pub jitter_ms: f64,
    /// Estimated listening quality (E-model MOS, 1–4.5) from loss and jitter; 0 before media.
    pub mos: f64,
    /// Milliseconds since the last packet arrived, `None` if none yet.
    pub idle_ms: Option<u64>,
}

/// Why a command failed; every variant names what it was about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("no session {0}")]
    UnknownSession(SessionId),
    #[error("session {session} has no leg {leg}")]
    UnknownLeg { session: SessionId, leg: LegId },
    #[error("core {core} has no free RTP port in {min}-{max}")]
    PortsExhausted { core: u16, min: u16, max: u16 },
    #[error("cannot bind {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("not supported by this dataplane: {0}")]
    Unsupported(String),
    #[error("shard on core {core} is not running")]
    ShardDown { core: u16 },
}

/// Things the dataplane reports without being asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// No media on a leg for the configured timeout (reported once until media resumes).
    RtpTimeout {
        session: SessionId,
        leg: LegId,
        idle_ms: u64,
    },
    /// An RFC 4733 telephone-event ended on a leg.
    Dtmf {
        session: SessionId,
        leg: LegId,
        digit: char,
        duration_ms: u32,
    },
    /// Periodic counters of a leg that saw traffic since the last report.
    StreamStats { session: SessionId, stats: LegStats },
    /// A shard stopped (its thread died); its sessions are gone.
    ShardDown { core: u16, reason: String },
    /// Something the signalling of a Telegram leg must act on.
    Telegram {
        session: SessionId,
        leg: LegId,
        event: TelegramEvent,
    },
}
