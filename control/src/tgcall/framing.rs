//! Signalling framing of tgcalls v2, sans-IO: how JSON signalling messages become the byte
//! blobs exchanged through `phone.sendSignalingData` / `updatePhoneCallSignalingData`, for each
//! library version the server may pick.
//!
//! - `7.0.0` ([`RawFraming`]): one encrypted packet per message, payload = the JSON.
//! - `8.0.0`/`9.0.0` ([`ReliableFraming`]): tgcalls `EncryptedConnection`'s reliable framing
//!   (`prepareForSendingRawMessage`, `processRawPacket`): acks, resends, duplicate suppression.
//!   This is what ntgcalls speaks.
//! - `12.0.0`/`13.0.0` ([`SctpFraming`]): payload = gzip(JSON), encrypted like 7.0.0, carried as
//!   user data of an SCTP association ([`super::sctp`]) whose packets are the signalling blobs.
//!
//! Every receiver gunzips a payload that starts with the gzip magic `1F 8B`, as tgcalls does.
//! Nothing here does I/O or reads a clock: callers pass `Instant`s, send what is returned, and
//! call [`SignalingFraming::handle_timeout`] at [`SignalingFraming::poll_timeout`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::crypto::{SignalingCrypto, SignalingCryptoError, MAX_PACKET};
use super::sctp::{SctpAssociation, SctpError};

/// Every `library_versions` entry this module can frame, newest first.
pub const SUPPORTED_LIBRARY_VERSIONS: [&str; 5] = ["13.0.0", "12.0.0", "9.0.0", "8.0.0", "7.0.0"];

/// Largest decompressed payload accepted (tgcalls' `gunzipData` limit).
pub const MAX_DECOMPRESSED: usize = 2 * 1024 * 1024;
const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];
/// Length of msg_key in front of every encrypted packet.
const MSG_KEY_LEN: usize = 16;

// 8.0.0 reliable framing (tgcalls EncryptedConnection.cpp).
const SINGLE_MESSAGE_PACKET_BIT: u32 = 1 << 31;
const REQUIRES_ACK_BIT: u32 = 1 << 30;
const COUNTER_MASK: u32 = REQUIRES_ACK_BIT - 1;
const TYPE_CUSTOM: u8 = 127;
const TYPE_ACK: u8 = 0xFF;
const TYPE_EMPTY: u8 = 0xFE;
/// Packet limit of the signalling connection (`kMaxSignalingPacketSize`), msg_key included.
pub const MAX_RELIABLE_PACKET: usize = 16 * 1024;
/// seq + type + length in front of a custom message's JSON.
const CUSTOM_HEADER: usize = 4 + 1 + 4;
/// seq + type of an ack.
const ACK_LEN: usize = 5;
/// Largest JSON a single 8.0.0 message can carry.
pub const MAX_RELIABLE_MESSAGE: usize = MAX_RELIABLE_PACKET - MSG_KEY_LEN - CUSTOM_HEADER;
/// `DeserializeRawMessage` refuses longer bodies.
const MAX_CUSTOM_BODY: usize = 1024 * 1024;
/// `kNotAckedMessagesLimit`.
const NOT_ACKED_LIMIT: usize = 64 * 1024;
/// `DelayIntervalsByType(Signaling)`: a message is not re-appended sooner than this …
const MIN_RESEND_DELAY: Duration = Duration::from_secs(3);
/// … and is resent in a dedicated packet after this; acks wait at most this long.
const MAX_RESEND_DELAY: Duration = Duration::from_secs(5);
const MAX_ACK_DELAY: Duration = Duration::from_secs(5);

/// Why a message could not be framed or a received packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("unsupported signalling library version {0:?}")]
    UnknownVersion(String),
    #[error(transparent)]
    Crypto(#[from] SignalingCryptoError),
    #[error(transparent)]
    Sctp(#[from] SctpError),
    #[error("signalling message of {len} bytes exceeds {max}")]
    MessageTooLarge { len: usize, max: usize },
    #[error("too many signalling messages wait for an ack")]
    TooManyUnacked,
    #[error("signalling packet is truncated")]
    Truncated,
    #[error("signalling packet has unknown message type {0}")]
    UnknownMessageType(u8),
    #[error("signalling packet breaks the framing rules: {0}")]
    BadFraming(&'static str),
    #[error("signalling payload is not valid gzip")]
    BadGzip,
    #[error("signalling payload inflates past {MAX_DECOMPRESSED} bytes")]
    GzipTooLarge,
}

/// What a received packet produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Received {
    /// Decoded JSON payloads, in order, each delivered once.
    pub messages: Vec<Vec<u8>>,
    /// Packets to send to the peer now (acks, SCTP handshake replies and SACKs).
    pub replies: Vec<Vec<u8>>,
    /// Payloads dropped inside an otherwise valid packet (bad gzip, a V3 payload that fails to
    /// decrypt); the packet's replies still matter, so these do not fail the whole call.
    pub errors: Vec<FramingError>,
}

/// The framing families of tgcalls v2, chosen by the negotiated library version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalingVersion {
    /// 7.0.0: raw encrypted JSON.
    V1Raw,
    /// 8.0.0, 9.0.0: reliable message framing.
    V2Reliable,
    /// 12.0.0, 13.0.0: gzip + encryption over a tunnelled SCTP association.
    V3Sctp,
}

impl SignalingVersion {
    /// Maps the `library_versions` entry the server chose (`phoneCall.protocol`). Unlike tgcalls,
    /// which falls back to V2 for unknown strings, an unknown version is an error: guessing
    /// would only produce garbage on the wire.
    pub fn from_library_version(version: &str) -> Result<Self, FramingError> {
        match version {
            "7.0.0" => Ok(Self::V1Raw),
            "8.0.0" | "9.0.0" => Ok(Self::V2Reliable),
            "12.0.0" | "13.0.0" => Ok(Self::V3Sctp),
            other => Err(FramingError::UnknownVersion(other.to_owned())),
        }
    }
}

/// The signalling framing of one call, for whichever version was negotiated.
#[derive(Debug)]
pub enum SignalingFraming {
    /// 7.0.0.
    Raw(RawFraming),
    /// 8.0.0 / 9.0.0.
    Reliable(ReliableFraming),
    /// 12.0.0 / 13.0.0.
    Sctp(SctpFraming),
}

impl SignalingFraming {
    /// Framing for the library version the server chose, with the call's 256-byte key.
    pub fn new(version: &str, key: [u8; 256], is_caller: bool) -> Result<Self, FramingError> {
        Ok(Self::with_version(
            SignalingVersion::from_library_version(version)?,
            key,
            is_caller,
        ))
    }

    /// Framing for an already parsed version.
    pub fn with_version(version: SignalingVersion, key: [u8; 256], is_caller: bool) -> Self {
        let crypto = SignalingCrypto::new(key, is_caller);
        match version {
            SignalingVersion::V1Raw => Self::Raw(RawFraming::new(crypto)),
            SignalingVersion::V2Reliable => Self::Reliable(ReliableFraming::new(crypto)),
            SignalingVersion::V3Sctp => Self::Sctp(SctpFraming::new(crypto)),
        }
    }

    /// Which family this is.
    pub fn version(&self) -> SignalingVersion {
        match self {
            Self::Raw(_) => SignalingVersion::V1Raw,
            Self::Reliable(_) => SignalingVersion::V2Reliable,
            Self::Sctp(_) => SignalingVersion::V3Sctp,
        }
    }

    /// Call once when signalling begins: V3 opens its SCTP association (INIT), as tgcalls does
    /// on both sides; the others return nothing.
    pub fn start(&mut self, now: Instant) -> Vec<Vec<u8>> {
        match self {
            Self::Sctp(f) => f.start(now),
            Self::Raw(_) | Self::Reliable(_) => Vec::new(),
        }
    }

    /// Frames one JSON message; returns the packets to hand to `phone.sendSignalingData`.
    pub fn send(&mut self, json: &[u8], now: Instant) -> Result<Vec<Vec<u8>>, FramingError> {
        match self {
            Self::Raw(f) => f.send(json),
            Self::Reliable(f) => f.send(json, now),
            Self::Sctp(f) => f.send(json, now),
        }
    }

    /// Handles one packet from `updatePhoneCallSignalingData`.
    pub fn receive(&mut self, packet: &[u8], now: Instant) -> Result<Received, FramingError> {
        match self {
            Self::Raw(f) => f.receive(packet),
            Self::Reliable(f) => f.receive(packet, now),
            Self::Sctp(f) => f.receive(packet, now),
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next (resends, acks, SCTP timers).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Raw(_) => None,
            Self::Reliable(f) => f.poll_timeout(),
            Self::Sctp(f) => f.poll_timeout(),
        }
    }

    /// Runs due timers; returns packets to send.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        match self {
            Self::Raw(_) => Vec::new(),
            Self::Reliable(f) => f.handle_timeout(now),
            Self::Sctp(f) => f.handle_timeout(now),
        }
    }
}

/// gzip as tgcalls' `gzipData` produces it (any standard gzip stream is accepted).
fn gzip(data: &[u8]) -> Result<Vec<u8>, FramingError> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).map_err(|_| FramingError::BadGzip)?;
    enc.finish().map_err(|_| FramingError::BadGzip)
}

/// A received payload: gunzipped (bounded) when it starts with the gzip magic.
fn decode_payload(payload: &[u8]) -> Result<Vec<u8>, FramingError> {
    if !payload.starts_with(&GZIP_MAGIC) {
        return Ok(payload.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(payload)
        .take(MAX_DECOMPRESSED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| FramingError::BadGzip)?;
    if out.len() > MAX_DECOMPRESSED {
        return Err(FramingError::GzipTooLarge);
    }
    Ok(out)
}

/// Refuses a payload whose encrypted packet (msg_key + counter + payload) the peer would drop.
fn check_raw_size(payload_len: usize, json_len: usize) -> Result<(), FramingError> {
    let max = MAX_PACKET - MSG_KEY_LEN - 4;
    if payload_len > max {
        return Err(FramingError::MessageTooLarge { len: json_len, max });
    }
    Ok(())
}

/// 7.0.0: `encrypt(counter ‖ JSON)` per message, no acks (`InstanceV2Impl::sendRawSignalingMessage`).
#[derive(Debug)]
pub struct RawFraming {
    crypto: SignalingCrypto,
}

impl RawFraming {
    /// Raw framing over the call's signalling encryption.
    pub fn new(crypto: SignalingCrypto) -> Self {
        Self { crypto }
    }

    /// One packet carrying `json` as is (7.0.0 does not compress).
    pub fn send(&mut self, json: &[u8]) -> Result<Vec<Vec<u8>>, FramingError> {
        check_raw_size(json.len(), json.len())?;
        Ok(vec![self.crypto.encrypt_raw(json)?])
    }

    /// Decrypts one packet into one message.
    pub fn receive(&mut self, packet: &[u8]) -> Result<Received, FramingError> {
        let payload = self.crypto.decrypt_raw(packet)?;
        Ok(Received {
            messages: vec![decode_payload(&payload)?],
            ..Received::default()
        })
    }
}

/// A message of ours the peer has not acked yet, serialized with its seq.
#[derive(Debug)]
struct Unacked {
    seq: u32,
    bytes: Vec<u8>,
    /// `None`: due for (re)sending in the next packet that has room.
    last_sent: Option<Instant>,
}

/// One message parsed out of an 8.0.0 plaintext.
enum Item<'a> {
    Empty,
    Ack(u32),
    Custom {
        seq: u32,
        body: &'a [u8],
        first: bool,
    },
}

/// Splits a decrypted 8.0.0 plaintext into its messages, checking every rule of
/// `processRawPacket` before anything takes effect.
fn parse_reliable(plain: &[u8]) -> Result<Vec<Item<'_>>, FramingError> {
    let read_u32 = |at: usize| -> Option<u32> {
        let b = plain.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut seq = read_u32(0).ok_or(FramingError::Truncated)?;
    let mut at = 4;
    let mut first = true;
    let mut items = Vec::new();
    loop {
        let kind = *plain.get(at).ok_or(FramingError::Truncated)?;
        at += 1;
        let single = seq & SINGLE_MESSAGE_PACKET_BIT != 0;
        if single && !first {
            return Err(FramingError::BadFraming(
                "single-message bit on a later message",
            ));
        }
        match kind {
            TYPE_EMPTY if first => items.push(Item::Empty),
            TYPE_EMPTY => return Err(FramingError::BadFraming("empty message after the first")),
            TYPE_ACK if first => return Err(FramingError::BadFraming("ack as first message")),
            TYPE_ACK => items.push(Item::Ack(seq)),
            TYPE_CUSTOM => {
                let len = read_u32(at).ok_or(FramingError::Truncated)? as usize;
                at += 4;
                if len > MAX_CUSTOM_BODY {
                    return Err(FramingError::MessageTooLarge {
                        len,
                        max: MAX_CUSTOM_BODY,
                    });
                }
                let body = plain.get(at..at + len).ok_or(FramingError::Truncated)?;
                at += len;
                items.push(Item::Custom { seq, body, first });
            }
            other => return Err(FramingError::UnknownMessageType(other)),
        }
        if at == plain.len() {
            return Ok(items);
        }
        if single {
            return Err(FramingError::BadFraming(
                "single message does not fill its packet",
            ));
        }
        seq = read_u32(at).ok_or(FramingError::Truncated)?;
        if plain.len() - at < 5 {
            return Err(FramingError::Truncated);
        }
        at += 4;
        first = false;
    }
}

/// `16 + buffer + amount` fits the signalling packet limit (`enoughSpaceInPacket`).
fn enough_space(buffer_len: usize, amount: usize) -> bool {
    amount < MAX_RELIABLE_PACKET && MSG_KEY_LEN + buffer_len + amount <= MAX_RELIABLE_PACKET
}

/// 8.0.0/9.0.0: tgcalls `EncryptedConnection` reliable framing of raw (type 127) messages.
///
/// Plaintext = messages, each `u32 BE seq ‖ type ‖ body`; seq bit 31 = single-message packet,
/// bit 30 = requires ack, low 30 bits = counter. Every message and every service packet takes a
/// fresh counter; the first message's counter is the packet counter of the anti-replay window.
/// A new message goes out at once with any pending acks when nothing is unacked, otherwise a
/// service packet (`0xFE` empty first) carries acks and all unacked messages in order.
#[derive(Debug)]
pub struct ReliableFraming {
    crypto: SignalingCrypto,
    unacked: VecDeque<Unacked>,
    /// Full seqs (flags included) of the peer's messages to ack.
    acks_to_send: Vec<u32>,
    /// Counters of the peer's ack-requiring messages already delivered (`_acksSentCounters`).
    delivered: Vec<u32>,
    /// Every ack-requiring counter below this was delivered: the peer only sends its oldest
    /// unacked message first, so older ones were acked by us. Guards against stale replays
    /// that tgcalls' list alone would deliver again.
    delivered_floor: u32,
    ack_deadline: Option<Instant>,
    resend_deadline: Option<Instant>,
}

impl ReliableFraming {
    /// Reliable framing over the call's signalling encryption.
    pub fn new(crypto: SignalingCrypto) -> Self {
        Self {
            crypto,
            unacked: VecDeque::new(),
            acks_to_send: Vec::new(),
            delivered: Vec::new(),
            delivered_floor: 0,
            ack_deadline: None,
            resend_deadline: None,
        }
    }

    /// Frames `json` as a type-127 message that requires an ack
    /// (`prepareForSendingRawMessage(message, true)`).
    pub fn send(&mut self, json: &[u8], now: Instant) -> Result<Vec<Vec<u8>>, FramingError> {
        if !enough_space(CUSTOM_HEADER + json.len(), 0) {
            return Err(FramingError::MessageTooLarge {
                len: json.len(),
                max: MAX_RELIABLE_MESSAGE,
            });
        }
        if self.unacked.len() >= NOT_ACKED_LIMIT {
            return Err(FramingError::TooManyUnacked);
        }
        let seq = self.crypto.next_counter()? | REQUIRES_ACK_BIT;
        let len = u32::try_from(json.len()).map_err(|_| FramingError::MessageTooLarge {
            len: json.len(),
            max: MAX_RELIABLE_MESSAGE,
        })?;
        let mut bytes = Vec::with_capacity(CUSTOM_HEADER + json.len());
        bytes.extend_from_slice(&seq.to_be_bytes());
        bytes.push(TYPE_CUSTOM);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(json);
        if self.unacked.is_empty() {
            let mut packet = bytes.clone();
            self.append_acks(&mut packet, now);
            self.unacked.push_back(Unacked {
                seq,
                bytes,
                last_sent: Some(now),
            });
            // tgcalls arms the resend timer only when a later packet is built; arming it here
            // too means a lone lost message is still resent.
            self.arm_resend(now);
            return Ok(vec![self.crypto.seal(&packet)]);
        }
        // Unacked messages must go in order, oldest first, in one packet: resend them all.
        self.unacked.push_back(Unacked {
            seq,
            bytes,
            last_sent: None,
        });
        for m in &mut self.unacked {
            m.last_sent = None;
        }
        Ok(self.service_packet(now)?.into_iter().collect())
    }

    /// Decrypts a packet, applies its acks, and returns the peer's new messages plus, when one
    /// of them needs an ack, the service packet that acks it (sent at once, as tgcalls does).
    pub fn receive(&mut self, packet: &[u8], now: Instant) -> Result<Received, FramingError> {
        let plain = self.crypto.open(packet)?;
        let items = parse_reliable(&plain)?;
        let mut out = Received::default();
        let mut first_requiring_ack = true;
        let mut new_requiring_ack = false;
        for item in items {
            match item {
                Item::Empty => {}
                Item::Ack(seq) => {
                    if let Some(i) = self.unacked.iter().position(|m| m.seq == seq) {
                        self.unacked.remove(i);
                    }
                }
                Item::Custom { seq, body, first } => {
                    let counter = seq & COUNTER_MASK;
                    let requires_ack = seq & REQUIRES_ACK_BIT != 0;
                    let skip = if requires_ack {
                        !self.register_delivered(counter, first_requiring_ack)
                    } else {
                        !first && self.crypto.register_counter(counter).is_err()
                    };
                    if requires_ack {
                        first_requiring_ack = false;
                        new_requiring_ack |= !skip;
                        // Bounded: a peer that floods us gets acks for the first ones, and
                        // resends the rest.
                        if !self.acks_to_send.contains(&seq)
                            && self.acks_to_send.len() < NOT_ACKED_LIMIT
                        {
                            self.acks_to_send.push(seq);
                        }
                    }
                    if !skip {
                        match decode_payload(body) {
                            Ok(m) => out.messages.push(m),
                            Err(e) => out.errors.push(e),
                        }
                    }
                }
            }
        }
        if self.unacked.is_empty() {
            self.resend_deadline = None;
        }
        if !self.acks_to_send.is_empty() {
            if new_requiring_ack {
                match self.service_packet(now) {
                    Ok(p) => out.replies.extend(p),
                    Err(e) => out.errors.push(e),
                }
            } else if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + MAX_ACK_DELAY);
            }
        }
        Ok(out)
    }

    /// The earliest of the ack and resend timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.ack_deadline, self.resend_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends a service packet when the ack or resend timer is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut due = false;
        if self.ack_deadline.is_some_and(|t| t <= now) {
            self.ack_deadline = None;
            due = true;
        }
        if self.resend_deadline.is_some_and(|t| t <= now) {
            self.resend_deadline = None;
            due = true;
        }
        if !due {
            return Vec::new();
        }
        match self.service_packet(now) {
            Ok(p) => p.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "signalling service packet not sent");
                Vec::new()
            }
        }
    }

    /// `registerSentAck`: whether the message with this counter is new.
    fn register_delivered(&mut self, counter: u32, first_in_packet: bool) -> bool {
        if counter < self.delivered_floor {
            return false;
        }
        let pos = self.delivered.partition_point(|&c| c < counter);
        let already = self.delivered.get(pos) == Some(&counter);
        if first_in_packet {
            self.delivered.drain(..pos);
            self.delivered_floor = counter;
            if !already {
                self.delivered.insert(0, counter);
            }
        } else if !already {
            self.delivered.insert(pos, counter);
            if self.delivered.len() > NOT_ACKED_LIMIT {
                let oldest = self.delivered.remove(0);
                self.delivered_floor = oldest + 1;
            }
        }
        !already
    }

    fn arm_resend(&mut self, now: Instant) {
        if !self.unacked.is_empty() && self.resend_deadline.is_none() {
            self.resend_deadline = Some(now + MAX_RESEND_DELAY);
        }
    }

    fn append_acks(&mut self, buf: &mut Vec<u8>, now: Instant) {
        let mut n = 0;
        while n < self.acks_to_send.len() && enough_space(buf.len(), ACK_LEN) {
            buf.extend_from_slice(&self.acks_to_send[n].to_be_bytes());
            buf.push(TYPE_ACK);
            n += 1;
        }
        self.acks_to_send.drain(..n);
        if self.acks_to_send.is_empty() {
            self.ack_deadline = None;
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + MAX_ACK_DELAY);
        }
    }

    fn is_due(m: &Unacked, now: Instant) -> bool {
        m.last_sent.is_none_or(|t| t + MIN_RESEND_DELAY <= now)
    }

    /// `prepareForSendingService`: empty message, acks, then unacked messages in order from the
    /// oldest while they are due and fit. `None` when there is nothing to carry.
    fn service_packet(&mut self, now: Instant) -> Result<Option<Vec<u8>>, FramingError> {
        let resend = self.unacked.front().is_some_and(|m| Self::is_due(m, now));
        if self.acks_to_send.is_empty() && !resend {
            self.arm_resend(now);
            return Ok(None);
        }
        let counter = self.crypto.next_counter()?;
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&counter.to_be_bytes());
        buf.push(TYPE_EMPTY);
        self.append_acks(&mut buf, now);
        for m in &mut self.unacked {
            if !Self::is_due(m, now) || !enough_space(buf.len(), m.bytes.len()) {
                break;
            }
            buf.extend_from_slice(&m.bytes);
            m.last_sent = Some(now);
        }
        self.arm_resend(now);
        Ok(Some(self.crypto.seal(&buf)))
    }
}

/// 12.0.0/13.0.0: `encrypt(counter ‖ gzip(JSON))` as SCTP user data, SCTP packets as the
/// signalling blobs (`SignalingSctpConnection`).
#[derive(Debug)]
pub struct SctpFraming {
    crypto: SignalingCrypto,
    sctp: SctpAssociation,
}

impl SctpFraming {
    /// SCTP framing over the call's signalling encryption, association not yet started.
    pub fn new(crypto: SignalingCrypto) -> Self {
        Self {
            crypto,
            sctp: SctpAssociation::new(),
        }
    }

    /// Whether the SCTP association is up.
    pub fn is_established(&self) -> bool {
        self.sctp.is_established()
    }

    /// Sends the SCTP INIT (if no handshake is under way).
    pub fn start(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.sctp.start(now)
    }

    /// Compresses, encrypts and queues `json`; returns SCTP packets (INIT while the association
    /// is not up, DATA once it is).
    pub fn send(&mut self, json: &[u8], now: Instant) -> Result<Vec<Vec<u8>>, FramingError> {
        let compressed = gzip(json)?;
        check_raw_size(compressed.len(), json.len())?;
        let packet = self.crypto.encrypt_raw(&compressed)?;
        Ok(self.sctp.send(packet, now)?)
    }

    /// Feeds one SCTP packet; each complete user message is decrypted and gunzipped.
    pub fn receive(&mut self, packet: &[u8], now: Instant) -> Result<Received, FramingError> {
        let out = self.sctp.receive(packet, now)?;
        let mut received = Received {
            replies: out.packets,
            ..Received::default()
        };
        for message in out.messages {
            match self
                .crypto
                .decrypt_raw(&message)
                .map_err(FramingError::from)
                .and_then(|payload| decode_payload(&payload))
            {
                Ok(m) => received.messages.push(m),
                Err(e) => received.errors.push(e),
            }
        }
        Ok(received)
    }

    /// SCTP handshake and retransmission timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sctp.poll_timeout()
    }

    /// Runs SCTP timers.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.sctp.handle_timeout(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; 256] {
        let mut k = [0u8; 256];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i * 13 + 5) as u8;
        }
        k
    }

    fn pair(version: &str) -> (SignalingFraming, SignalingFraming) {
        (
            SignalingFraming::new(version, key(), true).unwrap(),
            SignalingFraming::new(version, key(), false).unwrap(),
        )
    }

    /// An independent reader/writer of the callee's or caller's packets, to check wire bytes.
    fn crypto_as(is_caller: bool) -> SignalingCrypto {
        SignalingCrypto::new(key(), is_caller)
    }

    fn json(tag: &str) -> Vec<u8> {
        format!(r#"{{"@type":"Candidates","candidates":[{{"sdpString":"{tag}"}}]}}"#).into_bytes()
    }

    /// Delivers packets back and forth until both sides are quiet; returns what each received.
    fn exchange(
        a: &mut SignalingFraming,
        b: &mut SignalingFraming,
        mut to_b: Vec<Vec<u8>>,
        mut to_a: Vec<Vec<u8>>,
        now: Instant,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            for p in std::mem::take(&mut to_b) {
                let r = b.receive(&p, now).unwrap();
                assert!(r.errors.is_empty(), "{:?}", r.errors);
                got_b.extend(r.messages);
                to_a.extend(r.replies);
            }
            for p in std::mem::take(&mut to_a) {
                let r = a.receive(&p, now).unwrap();
                assert!(r.errors.is_empty(), "{:?}", r.errors);
                got_a.extend(r.messages);
                to_b.extend(r.replies);
            }
        }
        (got_a, got_b)
    }

    fn reliable(f: &SignalingFraming) -> &ReliableFraming {
        match f {
            SignalingFraming::Reliable(r) => r,
            _ => panic!("not V2"),
        }
    }

    #[test]
    fn versions_select_framings_and_unknown_ones_are_refused() {
        for (v, want) in [
            ("7.0.0", SignalingVersion::V1Raw),
            ("8.0.0", SignalingVersion::V2Reliable),
            ("9.0.0", SignalingVersion::V2Reliable),
            ("12.0.0", SignalingVersion::V3Sctp),
            ("13.0.0", SignalingVersion::V3Sctp),
        ] {
            assert_eq!(
                SignalingFraming::new(v, key(), true).unwrap().version(),
                want
            );
        }
        for v in SUPPORTED_LIBRARY_VERSIONS {
            assert!(SignalingVersion::from_library_version(v).is_ok());
        }
        for v in ["10.0.0", "11.0.0", "5.0.0", "", "8.0"] {
            assert_eq!(
                SignalingFraming::new(v, key(), true).unwrap_err(),
                FramingError::UnknownVersion(v.to_owned())
            );
        }
    }

    #[test]
    fn v1_is_one_encrypted_json_per_packet_and_accepts_gzip() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("7.0.0");
        assert!(caller.start(now).is_empty());
        let packets = caller.send(&json("a"), now).unwrap();
        assert_eq!(packets.len(), 1);
        // Wire: msg_key ‖ AES-CTR(counter 1 ‖ JSON), nothing else.
        let mut reader = crypto_as(false);
        assert_eq!(
            reader.open(&packets[0]).unwrap(),
            [&[0, 0, 0, 1][..], &json("a")].concat()
        );
        let r = callee.receive(&packets[0], now).unwrap();
        assert_eq!(r.messages, vec![json("a")]);
        assert!(r.replies.is_empty());
        assert_eq!(callee.poll_timeout(), None);
        // A peer that gzips anyway is understood.
        let mut writer = crypto_as(false);
        writer.next_counter().unwrap();
        let gz = writer.encrypt_raw(&gzip(&json("z")).unwrap()).unwrap();
        assert_eq!(caller.receive(&gz, now).unwrap().messages, vec![json("z")]);
        // Replay.
        assert_eq!(
            callee.receive(&packets[0], now),
            Err(FramingError::Crypto(SignalingCryptoError::Replayed(1)))
        );
    }

    #[test]
    fn v1_refuses_bad_input_with_typed_errors() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("7.0.0");
        let p = caller.send(&json("a"), now).unwrap().remove(0);
        assert_eq!(
            callee.receive(&p[..20], now),
            Err(FramingError::Crypto(SignalingCryptoError::BadLength(20)))
        );
        assert_eq!(
            callee.receive(&[7; 100], now),
            Err(FramingError::Crypto(SignalingCryptoError::BadMsgKey))
        );
        assert_eq!(
            callee.receive(&vec![7; MAX_PACKET + 1], now),
            Err(FramingError::Crypto(SignalingCryptoError::BadLength(
                MAX_PACKET + 1
            )))
        );
        let mut stranger = SignalingFraming::new("7.0.0", [9; 256], false).unwrap();
        assert_eq!(
            stranger.receive(&p, now),
            Err(FramingError::Crypto(SignalingCryptoError::BadMsgKey))
        );
        assert!(matches!(
            caller.send(&vec![b' '; MAX_PACKET], now),
            Err(FramingError::MessageTooLarge { .. })
        ));
        // A corrupt gzip payload.
        let mut writer = crypto_as(true);
        let bad = writer.encrypt_raw(&[0x1F, 0x8B, 1, 2, 3]).unwrap();
        assert_eq!(callee.receive(&bad, now), Err(FramingError::BadGzip));
    }

    #[test]
    fn v2_wire_layout_matches_encrypted_connection() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("8.0.0");
        let a = json("a");
        let p = caller.send(&a, now).unwrap().remove(0);
        // seq = counter 1 | requires-ack bit, type 127, u32 BE length, JSON.
        let mut reader = crypto_as(false);
        let mut want = vec![0x40, 0, 0, 1, 127];
        want.extend_from_slice(&(a.len() as u32).to_be_bytes());
        want.extend_from_slice(&a);
        assert_eq!(reader.open(&p).unwrap(), want);

        // The callee delivers it and acks at once in a service packet:
        // counter 1 (no flags) ‖ 0xFE, then the acked seq ‖ 0xFF.
        let r = callee.receive(&p, now).unwrap();
        assert_eq!(r.messages, vec![a.clone()]);
        assert_eq!(r.replies.len(), 1);
        let mut reader = crypto_as(true);
        assert_eq!(
            reader.open(&r.replies[0]).unwrap(),
            vec![0, 0, 0, 1, 0xFE, 0x40, 0, 0, 1, 0xFF]
        );
        assert_eq!(callee.poll_timeout(), None);
        let r2 = caller.receive(&r.replies[0], now).unwrap();
        assert_eq!(r2, Received::default());
        assert!(reliable(&caller).unacked.is_empty());
        assert_eq!(caller.poll_timeout(), None);

        // Two messages while the first is unacked: the second goes in a service packet
        // that repeats the first, oldest first.
        let b = json("b");
        let c = json("c");
        caller.send(&b, now).unwrap();
        let p = caller.send(&c, now).unwrap().remove(0);
        let mut want = vec![0, 0, 0, 4, 0xFE];
        for (ctr, m) in [(2u8, &b), (3u8, &c)] {
            want.extend_from_slice(&[0x40, 0, 0, ctr, 127]);
            want.extend_from_slice(&(m.len() as u32).to_be_bytes());
            want.extend_from_slice(m);
        }
        let mut reader = crypto_as(false);
        assert_eq!(reader.open(&p).unwrap(), want);
    }

    #[test]
    fn v2_round_trip_both_ways_with_piggybacked_acks() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("8.0.0");
        let to_callee = caller.send(&json("setup"), now).unwrap();
        let (got_caller, got_callee) = exchange(&mut caller, &mut callee, to_callee, vec![], now);
        assert!(got_caller.is_empty());
        assert_eq!(got_callee, vec![json("setup")]);
        let to_caller = callee.send(&json("answer"), now).unwrap();
        let (got_caller, got_callee) = exchange(&mut caller, &mut callee, vec![], to_caller, now);
        assert_eq!(got_caller, vec![json("answer")]);
        assert!(got_callee.is_empty());
        assert!(reliable(&caller).unacked.is_empty() && reliable(&callee).unacked.is_empty());

        // An ack waiting for its timer rides on the next message instead.
        let r = callee
            .receive(&caller.send(&json("x"), now).unwrap()[0], now)
            .unwrap();
        let ack_only = r.replies;
        // Replay the ack-carrying service packet's content by losing it, then deliver a
        // resend: the callee now owes an ack without a new message, so it waits.
        drop(ack_only);
        let resent = caller.handle_timeout(now + MAX_RESEND_DELAY);
        assert_eq!(resent.len(), 1);
        let r = callee.receive(&resent[0], now + MAX_RESEND_DELAY).unwrap();
        assert!(r.messages.is_empty(), "duplicate suppressed");
        assert!(r.replies.is_empty(), "ack postponed");
        assert_eq!(callee.poll_timeout(), Some(now + MAX_RESEND_DELAY * 2));
        let p = callee
            .send(&json("y"), now + MAX_RESEND_DELAY)
            .unwrap()
            .remove(0);
        let plain = crypto_as(true).open(&p).unwrap();
        assert_eq!(plain[4], 127);
        // Caller counters so far: "setup" 1, its ack of "answer" 2, "x" 3.
        assert_eq!(&plain[plain.len() - 5..], &[0x40, 0, 0, 3, 0xFF]);
        assert_eq!(
            callee.poll_timeout(),
            Some(now + MAX_RESEND_DELAY * 2),
            "resend timer"
        );
        let r = caller.receive(&p, now + MAX_RESEND_DELAY).unwrap();
        assert_eq!(r.messages, vec![json("y")]);
        assert!(reliable(&caller).unacked.is_empty());
    }

    #[test]
    fn v2_lost_packet_is_resent_after_the_timer_and_delivered_once() {
        let t0 = Instant::now();
        let (mut caller, mut callee) = pair("8.0.0");
        let lost = caller.send(&json("a"), t0).unwrap();
        drop(lost);
        assert_eq!(caller.poll_timeout(), Some(t0 + MAX_RESEND_DELAY));
        assert!(caller
            .handle_timeout(t0 + Duration::from_secs(4))
            .is_empty());
        let t5 = t0 + MAX_RESEND_DELAY;
        let resend = caller.handle_timeout(t5);
        assert_eq!(resend.len(), 1);
        let r = callee.receive(&resend[0], t5).unwrap();
        assert_eq!(r.messages, vec![json("a")]);
        // The same packet again is a replay; its ack is also lost, so the caller resends
        // once more and the callee suppresses the duplicate but acks it (after its timer).
        assert_eq!(
            callee.receive(&resend[0], t5),
            Err(FramingError::Crypto(SignalingCryptoError::Replayed(2)))
        );
        let t10 = t5 + MAX_RESEND_DELAY;
        assert_eq!(caller.poll_timeout(), Some(t10));
        let resend2 = caller.handle_timeout(t10);
        let r = callee.receive(&resend2[0], t10).unwrap();
        assert!(r.messages.is_empty());
        let acks = callee.handle_timeout(callee.poll_timeout().unwrap());
        assert_eq!(acks.len(), 1);
        caller.receive(&acks[0], t10).unwrap();
        assert!(reliable(&caller).unacked.is_empty());
        assert_eq!(caller.poll_timeout(), None);
        assert!(caller.handle_timeout(t10 + MAX_RESEND_DELAY * 4).is_empty());
    }

    #[test]
    fn v2_reordered_and_stale_packets_deliver_each_message_once() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("8.0.0");
        let p1 = caller.send(&json("a"), now).unwrap().remove(0);
        let p2 = caller.send(&json("b"), now).unwrap().remove(0);
        // p2 (service packet carrying a and b) overtakes p1.
        let r = callee.receive(&p2, now).unwrap();
        assert_eq!(r.messages, vec![json("a"), json("b")]);
        let r1 = callee.receive(&p1, now).unwrap();
        assert!(r1.messages.is_empty(), "a already delivered");
        caller.receive(&r.replies[0], now).unwrap();
        assert!(reliable(&caller).unacked.is_empty());

        // A stale copy that tgcalls' list alone would deliver again after a newer first
        // message trimmed it: the floor catches it.
        let (mut caller, mut callee) = pair("8.0.0");
        let p1 = caller.send(&json("a"), now).unwrap().remove(0);
        let p2 = caller.send(&json("b"), now).unwrap().remove(0);
        let r = callee.receive(&p2, now).unwrap();
        caller.receive(&r.replies[0], now).unwrap();
        let p3 = caller.send(&json("c"), now).unwrap().remove(0);
        assert_eq!(callee.receive(&p3, now).unwrap().messages, vec![json("c")]);
        let late = callee.receive(&p1, now).unwrap();
        assert!(late.messages.is_empty());
        assert_eq!(
            late.replies.len(),
            0,
            "ack of a repeat waits for the ack timer"
        );
    }

    /// Seals a hand-made 8.0.0 plaintext as the caller would.
    fn forged(writer: &mut SignalingCrypto, body: &[u8]) -> Vec<u8> {
        let c = writer.next_counter().unwrap();
        writer.seal(&[&c.to_be_bytes()[..], body].concat())
    }

    #[test]
    fn v2_malformed_plaintexts_are_typed_errors() {
        let now = Instant::now();
        let mut callee = SignalingFraming::new("8.0.0", key(), false).unwrap();
        let mut w = crypto_as(true);
        let cases: Vec<(Vec<u8>, FramingError)> = vec![
            (vec![0xFF], FramingError::BadFraming("ack as first message")),
            (
                vec![0xFE, 0, 0, 0, 9, 0xFE],
                FramingError::BadFraming("empty message after the first"),
            ),
            (vec![7], FramingError::UnknownMessageType(7)),
            (vec![127, 0, 0, 0, 10, 1, 2, 3], FramingError::Truncated),
            (vec![127, 0, 0], FramingError::Truncated),
            (vec![0xFE, 1, 2, 3], FramingError::Truncated),
            (vec![0xFE, 1, 2, 3, 4], FramingError::Truncated),
            (
                vec![127, 0, 0x20, 0, 0],
                FramingError::MessageTooLarge {
                    len: 0x0020_0000,
                    max: MAX_CUSTOM_BODY,
                },
            ),
        ];
        for (body, want) in cases {
            let p = forged(&mut w, &body);
            assert_eq!(callee.receive(&p, now), Err(want), "{body:?}");
        }
        // Single-message bit followed by more data.
        let p = w.seal(&[0x80, 0, 0, 100, 0xFE, 0, 0, 0, 9, 0xFF]);
        assert_eq!(
            callee.receive(&p, now),
            Err(FramingError::BadFraming(
                "single message does not fill its packet"
            ))
        );
        let p = w.seal(&[0, 0, 0, 101, 0xFE, 0x80, 0, 0, 9, 0xFF]);
        assert_eq!(
            callee.receive(&p, now),
            Err(FramingError::BadFraming(
                "single-message bit on a later message"
            ))
        );
        // A bad gzip body is reported but still acked; a good one is inflated.
        let mut body = vec![0x40, 0, 0, 102, 127, 0, 0, 0, 4, 0x1F, 0x8B, 0, 0];
        let gz = gzip(&json("g")).unwrap();
        body.extend_from_slice(&[0x40, 0, 0, 103, 127]);
        body.extend_from_slice(&(gz.len() as u32).to_be_bytes());
        body.extend_from_slice(&gz);
        let r = callee.receive(&w.seal(&body), now).unwrap();
        assert_eq!(r.errors, vec![FramingError::BadGzip]);
        assert_eq!(r.messages, vec![json("g")]);
        assert_eq!(r.replies.len(), 1);
        // Non-ack messages after the first go through the anti-replay window.
        let mut body = vec![0, 0, 0, 110, 0xFE];
        for _ in 0..2 {
            body.extend_from_slice(&[0, 0, 0, 111, 127, 0, 0, 0, 1, b'x']);
        }
        let r = callee.receive(&w.seal(&body), now).unwrap();
        assert_eq!(r.messages, vec![b"x".to_vec()]);
    }

    #[test]
    fn v2_size_limits() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("8.0.0");
        let max = vec![b'x'; MAX_RELIABLE_MESSAGE];
        let p = caller.send(&max, now).unwrap().remove(0);
        assert_eq!(p.len(), MAX_RELIABLE_PACKET);
        assert_eq!(callee.receive(&p, now).unwrap().messages, vec![max]);
        assert_eq!(
            caller.send(&vec![b'x'; MAX_RELIABLE_MESSAGE + 1], now),
            Err(FramingError::MessageTooLarge {
                len: MAX_RELIABLE_MESSAGE + 1,
                max: MAX_RELIABLE_MESSAGE
            })
        );
        assert_eq!(
            callee.receive(&[0; 10], now),
            Err(FramingError::Crypto(SignalingCryptoError::BadLength(10)))
        );
    }

    #[test]
    fn v3_round_trip_with_colliding_inits_and_gzip_on_the_wire() {
        let now = Instant::now();
        let (mut caller, mut callee) = pair("13.0.0");
        let init_a = caller.start(now);
        let init_b = callee.start(now);
        assert_eq!((init_a.len(), init_b.len()), (1, 1));
        let mut to_callee = init_a;
        to_callee.extend(caller.send(&json("setup"), now).unwrap());
        let mut to_caller = init_b;
        to_caller.extend(callee.send(&json("answer"), now).unwrap());
        let (got_caller, got_callee) =
            exchange(&mut caller, &mut callee, to_callee, to_caller, now);
        assert_eq!(got_caller, vec![json("answer")]);
        assert_eq!(got_callee, vec![json("setup")]);
        assert_eq!(caller.poll_timeout(), None);
        assert_eq!(callee.poll_timeout(), None);

        // DATA user data = msg_key ‖ AES-CTR(counter ‖ gzip(JSON)).
        let p = caller.send(&json("more"), now).unwrap().remove(0);
        assert_eq!(&p[0..4], &[0x13, 0x88, 0x13, 0x88]);
        assert_eq!(p[12], 0, "DATA chunk");
        assert_eq!(p[13], 0x03, "B|E");
        assert_eq!(&p[24..28], &53u32.to_be_bytes(), "PPID binary");
        let chunk_len = usize::from(u16::from_be_bytes([p[14], p[15]]));
        let user = &p[28..12 + chunk_len];
        let plain = crypto_as(false).decrypt_raw(user).unwrap();
        assert_eq!(&plain[..2], &GZIP_MAGIC);
        assert_eq!(decode_payload(&plain).unwrap(), json("more"));
        let r = callee.receive(&p, now).unwrap();
        assert_eq!(r.messages, vec![json("more")]);
        assert_eq!(r.replies.len(), 1, "SACK");
    }

    #[test]
    fn v3_loss_fragmentation_and_bad_input() {
        let t0 = Instant::now();
        let (mut caller, mut callee) = pair("12.0.0");
        let init = caller.start(t0);
        exchange(&mut caller, &mut callee, init, vec![], t0);
        // Incompressible content so that gzip stays above one fragment.
        let mut seed = 0x9E37_79B9u32;
        let noise: String = (0..3000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                char::from(b'a' + (seed % 26) as u8)
            })
            .collect();
        let big = json(&noise);
        let packets = caller.send(&big, t0).unwrap();
        assert!(
            packets.len() >= 2,
            "fragmented into {} packets",
            packets.len()
        );
        // Lose the second fragment: nothing is delivered until the retransmission.
        let mut sacks = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            if i != 1 {
                let r = callee.receive(p, t0).unwrap();
                assert!(r.messages.is_empty());
                sacks.extend(r.replies);
            }
        }
        for s in sacks {
            caller.receive(&s, t0).unwrap();
        }
        let t = caller.poll_timeout().unwrap();
        let resent = caller.handle_timeout(t);
        assert_eq!(resent.len(), 1, "only the missing fragment");
        let r = callee.receive(&resent[0], t).unwrap();
        assert_eq!(r.messages, vec![big.clone()]);
        // Duplicated fragments deliver nothing more.
        for p in &packets {
            assert!(callee.receive(p, t).unwrap().messages.is_empty());
        }

        // Garbage, truncation, oversize: typed SCTP errors.
        assert_eq!(
            callee.receive(&[0; 5], t),
            Err(FramingError::Sctp(SctpError::TooShort(5)))
        );
        assert!(matches!(
            callee.receive(&[0x13; 40], t),
            Err(FramingError::Sctp(_))
        ));
        assert!(matches!(
            callee.receive(&vec![0x13; 200 * 1024], t),
            Err(FramingError::Sctp(SctpError::TooLarge(_)))
        ));
        let mut bad = packets[0].clone();
        bad[30] ^= 0x55;
        assert_eq!(
            callee.receive(&bad, t),
            Err(FramingError::Sctp(SctpError::BadChecksum))
        );

        // A peer with another key: SCTP works, the payload is reported, the SACK still goes.
        let (mut a, _) = pair("13.0.0");
        let mut stranger = SignalingFraming::new("13.0.0", [3; 256], false).unwrap();
        let init = a.start(t0);
        exchange(&mut a, &mut stranger, init, vec![], t0);
        let p = a.send(&json("secret"), t0).unwrap().remove(0);
        let r = stranger.receive(&p, t0).unwrap();
        assert!(r.messages.is_empty());
        assert_eq!(
            r.errors,
            vec![FramingError::Crypto(SignalingCryptoError::BadMsgKey)]
        );
        assert_eq!(r.replies.len(), 1);
    }

    #[test]
    fn v3_messages_wait_for_the_association_and_init_backs_off() {
        let t0 = Instant::now();
        let (mut caller, mut callee) = pair("13.0.0");
        let lost_init = caller.send(&json("early"), t0).unwrap();
        assert_eq!(lost_init.len(), 1);
        drop(lost_init);
        assert_eq!(caller.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        let init = caller.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(caller.poll_timeout(), Some(t0 + Duration::from_secs(3)));
        let (_, got) = exchange(&mut caller, &mut callee, init, vec![], t0);
        assert_eq!(got, vec![json("early")]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_framing() {
        let now = Instant::now();
        let mut seed = 0xDEAD_BEEFu32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for v in ["7.0.0", "8.0.0", "13.0.0"] {
            let mut f = SignalingFraming::new(v, key(), false).unwrap();
            f.start(now);
            let mut w = crypto_as(true);
            for len in 0..300usize {
                let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let _ = f.receive(&bytes, now);
                // Authenticated garbage reaches the framing parsers.
                let _ = f.receive(&forged(&mut w, &bytes), now);
            }
        }
    }
}
