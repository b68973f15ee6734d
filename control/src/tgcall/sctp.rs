//! A minimal SCTP association (RFC 4960) for tgcalls 12.0.0/13.0.0 signalling, sans-IO.
//!
//! tgcalls V3 runs a dcsctp association over a fake packet transport whose every SCTP packet is
//! one `phone.sendSignalingData` blob (`v2/SignalingSctpConnection.cpp`: ports 5000/5000, stream
//! 0, ordered, binary PPID 53). No DTLS: the user data is already encrypted by the signalling
//! layer. This implements just what that peer needs (as telegram-tt's `sctpSignaling.ts` does):
//! the four-way handshake with a State Cookie, INIT collisions, DATA with fragmentation and
//! reassembly, SACK with gap blocks, retransmission, HEARTBEAT replies and ABORT. There is no
//! congestion control (signalling is a few kilobytes per call), no multi-homing, no SHUTDOWN.
//!
//! Fed whole packets and `Instant`s; returns packets to send and reassembled user messages.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Source and destination port of both sides (tgcalls `Start(5000, 5000, …)`).
pub const PORT: u16 = 5000;
/// Payload protocol identifier of WebRTC binary messages, which tgcalls sends.
pub const PPID_BINARY: u32 = 53;
/// PPIDs that WebRTC uses for empty string/binary messages; their one-byte body is not data.
const PPID_EMPTY: [u32; 2] = [56, 57];
/// Largest user data per DATA chunk: keeps each packet under dcsctp's 1191-byte MTU.
pub const MAX_FRAGMENT: usize = 1152;
/// Largest user message either way (tgcalls' `max_message_size` is 262144).
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Largest incoming SCTP packet considered; dcsctp never sends more than its MTU.
pub const MAX_PACKET: usize = 64 * 1024;

const COMMON_HEADER: usize = 12;
const CHUNK_DATA: u8 = 0;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const CHUNK_SACK: u8 = 3;
const CHUNK_HEARTBEAT: u8 = 4;
const CHUNK_HEARTBEAT_ACK: u8 = 5;
const CHUNK_ABORT: u8 = 6;
const CHUNK_COOKIE_ECHO: u8 = 10;
const CHUNK_COOKIE_ACK: u8 = 11;
const PARAM_STATE_COOKIE: u16 = 7;
const FLAG_END: u8 = 0x01;
const FLAG_BEGIN: u8 = 0x02;
/// ABORT's T bit: the verification tag is the sender's own (reflected) tag.
const FLAG_T: u8 = 0x01;
/// Advertised receive window (the value telegram-tt's port uses with native peers).
const RECEIVE_WINDOW: u32 = 0x0050_0000;
const STREAMS: u16 = 0xFFFF;
const STREAM_ID: u16 = 0;
const INITIAL_RTO: Duration = Duration::from_secs(1);
const MAX_RTO: Duration = Duration::from_secs(8);
/// Out-of-order DATA kept while waiting for a gap to fill.
const MAX_REORDER_CHUNKS: usize = 256;
const MAX_REORDER_BYTES: usize = 1 << 20;
const MAX_TSN_GAP: u32 = 1024;
/// Outgoing bytes (queued and unacknowledged) before `send` refuses more.
const MAX_QUEUED_BYTES: usize = 4 << 20;
const MAX_GAP_BLOCKS: usize = 16;
/// Our State Cookie: magic, our tag, the peer's tag, our initial TSN, the peer's initial TSN.
const COOKIE_MAGIC: [u8; 4] = *b"STG1";
const COOKIE_LEN: usize = 20;

/// Why an incoming SCTP packet, or a message to send, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SctpError {
    #[error("SCTP packet of {0} bytes is shorter than the common header")]
    TooShort(usize),
    #[error("SCTP packet of {0} bytes is larger than accepted")]
    TooLarge(usize),
    #[error("SCTP packet for ports {src}->{dst}, expected 5000->5000")]
    BadPorts { src: u16, dst: u16 },
    #[error("SCTP packet failed its CRC32c check")]
    BadChecksum,
    #[error("SCTP chunk at offset {0} is malformed")]
    MalformedChunk(usize),
    #[error("SCTP packet carries no chunk")]
    NoChunks,
    #[error("SCTP packet has verification tag {0:#010x}, which is not ours")]
    BadVerificationTag(u32),
    #[error("SCTP message of {0} bytes is empty or larger than 262144")]
    BadMessageSize(usize),
    #[error("SCTP send queue is full")]
    Backlog,
}

/// What an incoming packet produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SctpOutput {
    /// Complete user messages, in order.
    pub messages: Vec<Vec<u8>>,
    /// SCTP packets to send to the peer now (handshake replies, SACKs, queued data).
    pub packets: Vec<Vec<u8>>,
}

/// The association's handshake state (RFC 4960 §4, without the shutdown states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    CookieWait,
    CookieEchoed,
    Established,
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    tag: u32,
    /// Highest TSN received with every TSN before it.
    cum_tsn: u32,
}

#[derive(Debug)]
struct Outstanding {
    tsn: u32,
    flags: u8,
    ssn: u16,
    data: Vec<u8>,
    /// Covered by a gap block of a SACK (kept until the cumulative ack passes it).
    acked: bool,
}

#[derive(Debug)]
struct Buffered {
    flags: u8,
    ppid: u32,
    data: Vec<u8>,
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut v = i as u32;
        let mut bit = 0;
        while bit < 8 {
            v = if v & 1 != 0 {
                0x82F6_3B78 ^ (v >> 1)
            } else {
                v >> 1
            };
            bit += 1;
        }
        table[i] = v;
        i += 1;
    }
    table
};

/// CRC32c of `data` (the SCTP checksum, RFC 4960 appendix B).
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8)
    })
}

/// The checksum of an SCTP packet: CRC32c over the packet with its checksum field zeroed.
fn packet_checksum(packet: &[u8]) -> u32 {
    let mut crc = !0u32;
    for (i, &b) in packet.iter().enumerate() {
        let b = if (8..12).contains(&i) { 0 } else { b };
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Writes a correct checksum (little-endian at offset 8, as every SCTP stack stores it) into
/// `packet`; lets tests and fuzzers craft packets that pass the check.
pub fn seal_checksum(packet: &mut [u8]) {
    if packet.len() >= COMMON_HEADER {
        let crc = packet_checksum(packet);
        packet[8..12].copy_from_slice(&crc.to_le_bytes());
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `a` comes after `b` in serial-number arithmetic (RFC 1982, 32 bits).
fn tsn_after(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000_0000
}

fn random_nonzero() -> u32 {
    loop {
        let v: u32 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// One chunk of a packet, borrowed.
struct Chunk<'a> {
    kind: u8,
    flags: u8,
    body: &'a [u8],
}

/// Splits the chunks after the common header; any chunk that overruns the packet rejects it.
fn parse_chunks(packet: &[u8]) -> Result<Vec<Chunk<'_>>, SctpError> {
    let mut chunks = Vec::new();
    let mut at = COMMON_HEADER;
    while at < packet.len() {
        if packet.len() - at < 4 {
            return Err(SctpError::MalformedChunk(at));
        }
        let len = usize::from(be16(packet, at + 2));
        if len < 4 || len > packet.len() - at {
            return Err(SctpError::MalformedChunk(at));
        }
        chunks.push(Chunk {
            kind: packet[at],
            flags: packet[at + 1],
            body: &packet[at + 4..at + len],
        });
        // Chunks are padded to 4 bytes; the last one's padding may be absent.
        at += (len + 3) & !3;
    }
    if chunks.is_empty() {
        return Err(SctpError::NoChunks);
    }
    Ok(chunks)
}

/// One SCTP packet with a single chunk.
fn build_packet(vtag: u32, kind: u8, flags: u8, body: &[u8]) -> Vec<u8> {
    let chunk_len = 4 + body.len();
    let mut p = Vec::with_capacity(COMMON_HEADER + ((chunk_len + 3) & !3));
    p.extend_from_slice(&PORT.to_be_bytes());
    p.extend_from_slice(&PORT.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.push(kind);
    p.push(flags);
    // Bodies are bounded by MAX_FRAGMENT or by what we parsed from a u16 length.
    p.extend_from_slice(&u16::try_from(chunk_len).unwrap_or(u16::MAX).to_be_bytes());
    p.extend_from_slice(body);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    seal_checksum(&mut p);
    p
}

/// INIT and INIT ACK share this fixed part.
fn init_body(tag: u32, initial_tsn: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 4 + COOKIE_LEN);
    b.extend_from_slice(&tag.to_be_bytes());
    b.extend_from_slice(&RECEIVE_WINDOW.to_be_bytes());
    b.extend_from_slice(&STREAMS.to_be_bytes());
    b.extend_from_slice(&STREAMS.to_be_bytes());
    b.extend_from_slice(&initial_tsn.to_be_bytes());
    b
}

/// The value of the first parameter of type `kind` in a TLV parameter list.
fn find_param(mut params: &[u8], kind: u16) -> Option<&[u8]> {
    while params.len() >= 4 {
        let len = usize::from(be16(params, 2));
        if len < 4 || len > params.len() {
            return None;
        }
        if be16(params, 0) == kind {
            return Some(&params[4..len]);
        }
        let next = ((len + 3) & !3).min(params.len());
        params = &params[next..];
    }
    None
}

/// One side of the signalling SCTP association.
#[derive(Debug)]
pub struct SctpAssociation {
    state: State,
    started: bool,
    local_tag: u32,
    local_initial_tsn: u32,
    next_tsn: u32,
    next_ssn: u16,
    peer: Option<Peer>,
    /// The peer's State Cookie we echo (kept to retransmit COOKIE ECHO).
    cookie: Vec<u8>,
    t1: Option<Instant>,
    t1_retries: u32,
    /// User messages waiting for the association.
    pending: VecDeque<Vec<u8>>,
    pending_bytes: usize,
    /// Sent DATA not yet covered by the peer's cumulative TSN ack, in TSN order.
    outstanding: VecDeque<Outstanding>,
    outstanding_bytes: usize,
    rto: Duration,
    t3: Option<Instant>,
    reorder: HashMap<u32, Buffered>,
    reorder_bytes: usize,
    reassembly: Option<Vec<u8>>,
}

impl Default for SctpAssociation {
    fn default() -> Self {
        Self::new()
    }
}

impl SctpAssociation {
    /// A closed association with a fresh random tag and initial TSN.
    pub fn new() -> Self {
        let tsn = rand::random();
        Self {
            state: State::Closed,
            started: false,
            local_tag: random_nonzero(),
            local_initial_tsn: tsn,
            next_tsn: tsn,
            next_ssn: 0,
            peer: None,
            cookie: Vec::new(),
            t1: None,
            t1_retries: 0,
            pending: VecDeque::new(),
            pending_bytes: 0,
            outstanding: VecDeque::new(),
            outstanding_bytes: 0,
            rto: INITIAL_RTO,
            t3: None,
            reorder: HashMap::new(),
            reorder_bytes: 0,
            reassembly: None,
        }
    }

    /// Whether user data flows (queued messages are sent once this becomes true).
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Opens the association: sends INIT unless a handshake is already under way. tgcalls starts
    /// it on both sides at once, so INITs collide and are resolved as RFC 4960 §5.2.1 says.
    pub fn start(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.started = true;
        if self.state != State::Closed {
            return Vec::new();
        }
        self.state = State::CookieWait;
        self.t1_retries = 0;
        self.t1 = Some(now + INITIAL_RTO);
        vec![self.init_packet()]
    }

    /// Queues one user message (sent at once when established, else after the handshake, which
    /// this starts if needed).
    pub fn send(&mut self, message: Vec<u8>, now: Instant) -> Result<Vec<Vec<u8>>, SctpError> {
        if message.is_empty() || message.len() > MAX_MESSAGE {
            return Err(SctpError::BadMessageSize(message.len()));
        }
        if self.pending_bytes + self.outstanding_bytes + message.len() > MAX_QUEUED_BYTES {
            return Err(SctpError::Backlog);
        }
        if self.state == State::Established {
            return Ok(self.transmit(message, now));
        }
        self.pending_bytes += message.len();
        self.pending.push_back(message);
        Ok(self.start(now))
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run (handshake or DATA
    /// retransmission).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.t1, self.t3) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Retransmits INIT / COOKIE ECHO (1, 2, 4, 8, 8… s apart) and unacknowledged DATA.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if self.t1.is_some_and(|t| t <= now) {
            self.t1_retries = self.t1_retries.saturating_add(1);
            let delay = INITIAL_RTO
                .saturating_mul(1 << self.t1_retries.min(4))
                .min(MAX_RTO);
            self.t1 = None;
            match self.state {
                State::CookieWait => {
                    out.push(self.init_packet());
                    self.t1 = Some(now + delay);
                }
                State::CookieEchoed => {
                    if let Some(peer) = self.peer {
                        out.push(build_packet(peer.tag, CHUNK_COOKIE_ECHO, 0, &self.cookie));
                        self.t1 = Some(now + delay);
                    }
                }
                State::Closed | State::Established => {}
            }
        }
        if self.t3.is_some_and(|t| t <= now) {
            self.t3 = None;
            if let (State::Established, Some(peer)) = (self.state, self.peer) {
                for o in self.outstanding.iter().filter(|o| !o.acked) {
                    out.push(data_packet(peer.tag, o));
                }
                if self.outstanding.iter().any(|o| !o.acked) {
                    self.rto = (self.rto * 2).min(MAX_RTO);
                    self.t3 = Some(now + self.rto);
                }
            }
        }
        out
    }

    /// Handles one incoming SCTP packet. A packet that fails the checks of RFC 4960 §8.5 (ports,
    /// checksum, verification tag, chunk lengths) is refused whole with an error.
    pub fn receive(&mut self, packet: &[u8], now: Instant) -> Result<SctpOutput, SctpError> {
        if packet.len() < COMMON_HEADER {
            return Err(SctpError::TooShort(packet.len()));
        }
        if packet.len() > MAX_PACKET {
            return Err(SctpError::TooLarge(packet.len()));
        }
        let (src, dst) = (be16(packet, 0), be16(packet, 2));
        if src != PORT || dst != PORT {
            return Err(SctpError::BadPorts { src, dst });
        }
        let stored = u32::from_le_bytes([packet[8], packet[9], packet[10], packet[11]]);
        if stored != packet_checksum(packet) {
            return Err(SctpError::BadChecksum);
        }
        let vtag = be32(packet, 4);
        let chunks = parse_chunks(packet)?;
        if chunks.iter().any(|c| c.kind == CHUNK_INIT) {
            // INIT must be alone, with a zero tag (§8.5.1).
            if chunks.len() != 1 || vtag != 0 {
                return Err(SctpError::BadVerificationTag(vtag));
            }
        } else {
            let peer_tag = self.peer.map(|p| p.tag);
            let ok = chunks.iter().all(|c| {
                vtag == self.local_tag
                    || (c.kind == CHUNK_ABORT && c.flags & FLAG_T != 0 && Some(vtag) == peer_tag)
            });
            if !ok {
                return Err(SctpError::BadVerificationTag(vtag));
            }
        }

        let mut out = SctpOutput::default();
        let mut sack_needed = false;
        for chunk in chunks {
            match chunk.kind {
                CHUNK_INIT => self.on_init(chunk.body, &mut out),
                CHUNK_INIT_ACK => self.on_init_ack(chunk.body, now, &mut out),
                CHUNK_COOKIE_ECHO => self.on_cookie_echo(chunk.body, now, &mut out),
                CHUNK_COOKIE_ACK if self.state == State::CookieEchoed => {
                    self.establish(now, &mut out);
                }
                CHUNK_DATA => sack_needed |= self.on_data(chunk.flags, chunk.body, now, &mut out),
                CHUNK_SACK => self.on_sack(chunk.body, now, &mut out),
                CHUNK_HEARTBEAT => {
                    if let Some(peer) = self.peer {
                        out.packets.push(build_packet(
                            peer.tag,
                            CHUNK_HEARTBEAT_ACK,
                            0,
                            chunk.body,
                        ));
                    }
                }
                CHUNK_ABORT => {
                    tracing::debug!("signalling SCTP association aborted by the peer");
                    self.reset(now);
                    break;
                }
                // COOKIE ACK outside COOKIE ECHOED and HEARTBEAT ACK need nothing; SHUTDOWN, ERROR and extensions are not used by
                // tgcalls' signalling association.
                _ => {}
            }
        }
        if sack_needed {
            if let Some(peer) = self.peer {
                out.packets.push(self.sack_packet(peer));
            }
        }
        Ok(out)
    }

    fn init_packet(&self) -> Vec<u8> {
        build_packet(
            0,
            CHUNK_INIT,
            0,
            &init_body(self.local_tag, self.local_initial_tsn),
        )
    }

    fn on_init(&mut self, body: &[u8], out: &mut SctpOutput) {
        if body.len() < 16 {
            return;
        }
        let tag = be32(body, 0);
        let initial_tsn = be32(body, 12);
        if tag == 0 {
            return;
        }
        if self.state == State::Established && self.peer.is_some_and(|p| p.tag != tag) {
            // The peer lost its association and starts a new one: so do we, keeping our
            // unacknowledged messages for the new one.
            tracing::debug!("signalling SCTP peer restarted its association");
            let started = self.started;
            self.reset_local();
            self.started = started;
        }
        // Stateless reply (§5.1); in COOKIE WAIT this is the collision case of §5.2.1, and our
        // tag and initial TSN are the ones of the INIT we sent.
        let mut ack = init_body(self.local_tag, self.local_initial_tsn);
        ack.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
        ack.extend_from_slice(&((4 + COOKIE_LEN) as u16).to_be_bytes());
        ack.extend_from_slice(&COOKIE_MAGIC);
        ack.extend_from_slice(&self.local_tag.to_be_bytes());
        ack.extend_from_slice(&tag.to_be_bytes());
        ack.extend_from_slice(&self.local_initial_tsn.to_be_bytes());
        ack.extend_from_slice(&initial_tsn.to_be_bytes());
        out.packets.push(build_packet(tag, CHUNK_INIT_ACK, 0, &ack));
    }

    fn on_init_ack(&mut self, body: &[u8], now: Instant, out: &mut SctpOutput) {
        if self.state != State::CookieWait || body.len() < 16 {
            return;
        }
        let tag = be32(body, 0);
        let initial_tsn = be32(body, 12);
        let Some(cookie) = find_param(&body[16..], PARAM_STATE_COOKIE) else {
            tracing::debug!("signalling SCTP INIT ACK without a State Cookie ignored");
            return;
        };
        if tag == 0 {
            return;
        }
        self.learn_peer(tag, initial_tsn);
        self.cookie = cookie.to_vec();
        out.packets
            .push(build_packet(tag, CHUNK_COOKIE_ECHO, 0, &self.cookie));
        self.state = State::CookieEchoed;
        self.t1_retries = 0;
        self.t1 = Some(now + INITIAL_RTO);
    }

    fn on_cookie_echo(&mut self, body: &[u8], now: Instant, out: &mut SctpOutput) {
        if body.len() != COOKIE_LEN
            || body[..4] != COOKIE_MAGIC
            || be32(body, 4) != self.local_tag
            || be32(body, 12) != self.local_initial_tsn
        {
            tracing::debug!("signalling SCTP COOKIE ECHO with a foreign cookie ignored");
            return;
        }
        let tag = be32(body, 8);
        if tag == 0 {
            return;
        }
        self.learn_peer(tag, be32(body, 16));
        out.packets
            .push(build_packet(tag, CHUNK_COOKIE_ACK, 0, &[]));
        if self.state != State::Established {
            self.establish(now, out);
        }
    }

    /// Adopts the peer's tag; a new tag means a new TSN space on its side.
    fn learn_peer(&mut self, tag: u32, initial_tsn: u32) {
        if self.peer.map(|p| p.tag) != Some(tag) {
            self.peer = Some(Peer {
                tag,
                cum_tsn: initial_tsn.wrapping_sub(1),
            });
            self.reorder.clear();
            self.reorder_bytes = 0;
            self.reassembly = None;
        }
    }

    /// Called only once the peer's tag is known (every caller learned it first).
    fn establish(&mut self, now: Instant, out: &mut SctpOutput) {
        if self.peer.is_none() {
            return;
        }
        self.state = State::Established;
        self.t1 = None;
        self.started = true;
        while let Some(message) = self.pending.pop_front() {
            self.pending_bytes -= message.len();
            out.packets.extend(self.transmit(message, now));
        }
    }

    /// Fragments a message into DATA chunks, one packet each, and tracks them until SACKed.
    /// Only called when established, so the peer is known.
    fn transmit(&mut self, message: Vec<u8>, now: Instant) -> Vec<Vec<u8>> {
        let Some(peer) = self.peer else {
            return Vec::new();
        };
        let ssn = self.next_ssn;
        self.next_ssn = self.next_ssn.wrapping_add(1);
        let count = message.len().div_ceil(MAX_FRAGMENT);
        let mut packets = Vec::with_capacity(count);
        for (i, part) in message.chunks(MAX_FRAGMENT).enumerate() {
            let mut flags = 0;
            if i == 0 {
                flags |= FLAG_BEGIN;
            }
            if i + 1 == count {
                flags |= FLAG_END;
            }
            let o = Outstanding {
                tsn: self.next_tsn,
                flags,
                ssn,
                data: part.to_vec(),
                acked: false,
            };
            self.next_tsn = self.next_tsn.wrapping_add(1);
            self.outstanding_bytes += o.data.len();
            packets.push(data_packet(peer.tag, &o));
            self.outstanding.push_back(o);
        }
        if self.t3.is_none() {
            self.t3 = Some(now + self.rto);
        }
        packets
    }

    /// Returns whether the chunk was a well-formed DATA chunk (which must be SACKed).
    fn on_data(&mut self, flags: u8, body: &[u8], now: Instant, out: &mut SctpOutput) -> bool {
        if body.len() <= 12 {
            return false;
        }
        let Some(peer) = self.peer else {
            return false;
        };
        if self.state == State::CookieEchoed {
            // The peer only sends DATA once our COOKIE ECHO established it; its COOKIE ACK is
            // late or lost.
            self.establish(now, out);
        }
        let tsn = be32(body, 0);
        let ppid = be32(body, 8);
        let data = &body[12..];
        let expected = peer.cum_tsn.wrapping_add(1);
        if tsn == expected {
            self.accept(tsn, flags, ppid, data.to_vec(), out);
        } else if tsn_after(tsn, expected) {
            let gap = tsn.wrapping_sub(expected);
            if !self.reorder.contains_key(&tsn)
                && gap <= MAX_TSN_GAP
                && self.reorder.len() < MAX_REORDER_CHUNKS
                && self.reorder_bytes + data.len() <= MAX_REORDER_BYTES
            {
                self.reorder_bytes += data.len();
                self.reorder.insert(
                    tsn,
                    Buffered {
                        flags,
                        ppid,
                        data: data.to_vec(),
                    },
                );
            }
        }
        true
    }

    /// Takes the in-order chunk `tsn` and any buffered ones that follow it.
    fn accept(&mut self, tsn: u32, flags: u8, ppid: u32, data: Vec<u8>, out: &mut SctpOutput) {
        let mut current = Some((tsn, Buffered { flags, ppid, data }));
        while let Some((tsn, chunk)) = current.take() {
            if let Some(peer) = self.peer.as_mut() {
                peer.cum_tsn = tsn;
            }
            self.reassemble(chunk, out);
            let next = tsn.wrapping_add(1);
            if let Some(b) = self.reorder.remove(&next) {
                self.reorder_bytes -= b.data.len();
                current = Some((next, b));
            }
        }
    }

    fn reassemble(&mut self, chunk: Buffered, out: &mut SctpOutput) {
        let complete = match (chunk.flags & FLAG_BEGIN != 0, chunk.flags & FLAG_END != 0) {
            (true, true) => {
                self.reassembly = None;
                Some(chunk.data)
            }
            (true, false) => {
                self.reassembly = Some(chunk.data);
                None
            }
            (false, end) => match self.reassembly.as_mut() {
                Some(buf) if buf.len() + chunk.data.len() <= MAX_MESSAGE => {
                    buf.extend_from_slice(&chunk.data);
                    if end {
                        self.reassembly.take()
                    } else {
                        None
                    }
                }
                Some(_) => {
                    tracing::debug!("signalling SCTP message over 256 KiB dropped");
                    self.reassembly = None;
                    None
                }
                None => None,
            },
        };
        if let Some(message) = complete {
            if !PPID_EMPTY.contains(&chunk.ppid) {
                out.messages.push(message);
            }
        }
    }

    fn on_sack(&mut self, body: &[u8], now: Instant, out: &mut SctpOutput) {
        if body.len() < 12 {
            return;
        }
        if self.state == State::CookieEchoed {
            self.establish(now, out);
        }
        let cum = be32(body, 0);
        let gaps = usize::from(be16(body, 8));
        let mut newly_acked = false;
        while let Some(front) = self.outstanding.front() {
            if tsn_after(front.tsn, cum) {
                break;
            }
            if !front.acked {
                newly_acked = true;
            }
            self.outstanding_bytes -= front.data.len();
            self.outstanding.pop_front();
        }
        for block in body[12..].chunks_exact(4).take(gaps) {
            let (start, end) = (u32::from(be16(block, 0)), u32::from(be16(block, 2)));
            for o in self.outstanding.iter_mut() {
                let off = o.tsn.wrapping_sub(cum);
                if (start..=end).contains(&off) && !o.acked {
                    o.acked = true;
                    newly_acked = true;
                }
            }
        }
        if newly_acked {
            self.rto = INITIAL_RTO;
            self.t3 = self
                .outstanding
                .iter()
                .any(|o| !o.acked)
                .then(|| now + self.rto);
        }
    }

    fn sack_packet(&self, peer: Peer) -> Vec<u8> {
        let mut offsets: Vec<u32> = self
            .reorder
            .keys()
            .map(|t| t.wrapping_sub(peer.cum_tsn))
            .collect();
        offsets.sort_unstable();
        let mut blocks: Vec<(u32, u32)> = Vec::new();
        for off in offsets {
            match blocks.last_mut() {
                Some((_, end)) if *end + 1 == off => *end = off,
                _ => blocks.push((off, off)),
            }
        }
        blocks.truncate(MAX_GAP_BLOCKS);
        let mut body = Vec::with_capacity(12 + 4 * blocks.len());
        body.extend_from_slice(&peer.cum_tsn.to_be_bytes());
        body.extend_from_slice(&RECEIVE_WINDOW.to_be_bytes());
        body.extend_from_slice(&(blocks.len() as u16).to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        for (start, end) in blocks {
            // Offsets are at most MAX_TSN_GAP + 1, well inside u16.
            body.extend_from_slice(&(start as u16).to_be_bytes());
            body.extend_from_slice(&(end as u16).to_be_bytes());
        }
        build_packet(peer.tag, CHUNK_SACK, 0, &body)
    }

    /// New tag and TSN; messages not known to be delivered go back to the queue.
    fn reset_local(&mut self) {
        let mut requeue: Vec<Vec<u8>> = Vec::new();
        let mut partial: Option<Vec<u8>> = None;
        for o in self.outstanding.drain(..) {
            if o.flags & FLAG_BEGIN != 0 {
                partial = Some(Vec::new());
            }
            if let Some(buf) = partial.as_mut() {
                buf.extend_from_slice(&o.data);
            }
            if o.flags & FLAG_END != 0 {
                requeue.extend(partial.take());
            }
        }
        for m in requeue.into_iter().rev() {
            self.pending_bytes += m.len();
            self.pending.push_front(m);
        }
        let tsn = rand::random();
        self.state = State::Closed;
        self.started = false;
        self.local_tag = random_nonzero();
        self.local_initial_tsn = tsn;
        self.next_tsn = tsn;
        self.next_ssn = 0;
        self.peer = None;
        self.cookie.clear();
        self.t1 = None;
        self.t1_retries = 0;
        self.outstanding_bytes = 0;
        self.rto = INITIAL_RTO;
        self.t3 = None;
        self.reorder.clear();
        self.reorder_bytes = 0;
        self.reassembly = None;
    }

    /// After an ABORT: start over, sending INIT after a second (not at once, so two confused
    /// sides cannot ping-pong ABORT and INIT at packet rate).
    fn reset(&mut self, now: Instant) {
        let started = self.started;
        self.reset_local();
        if started || !self.pending.is_empty() {
            self.started = true;
            self.state = State::CookieWait;
            self.t1 = Some(now + INITIAL_RTO);
        }
    }
}

fn data_packet(peer_tag: u32, o: &Outstanding) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + o.data.len());
    body.extend_from_slice(&o.tsn.to_be_bytes());
    body.extend_from_slice(&STREAM_ID.to_be_bytes());
    body.extend_from_slice(&o.ssn.to_be_bytes());
    body.extend_from_slice(&PPID_BINARY.to_be_bytes());
    body.extend_from_slice(&o.data);
    build_packet(peer_tag, CHUNK_DATA, o.flags, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers every packet of `from` to `to`, returning what `to` produced.
    fn deliver(to: &mut SctpAssociation, packets: Vec<Vec<u8>>, now: Instant) -> SctpOutput {
        let mut all = SctpOutput::default();
        for p in packets {
            let out = to.receive(&p, now).expect("valid packet");
            all.messages.extend(out.messages);
            all.packets.extend(out.packets);
        }
        all
    }

    /// Runs both sides until no packet is in flight; returns messages received by a and b.
    fn settle(
        a: &mut SctpAssociation,
        b: &mut SctpAssociation,
        mut to_b: Vec<Vec<u8>>,
        now: Instant,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let mut to_a = Vec::new();
        for _ in 0..50 {
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            let out = deliver(b, std::mem::take(&mut to_b), now);
            got_b.extend(out.messages);
            to_a.extend(out.packets);
            let out = deliver(a, std::mem::take(&mut to_a), now);
            got_a.extend(out.messages);
            to_b.extend(out.packets);
        }
        (got_a, got_b)
    }

    #[test]
    fn crc32c_matches_the_standard_check_value_and_rfc_3720() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn packets_have_the_wire_layout() {
        let mut a = SctpAssociation::new();
        let init = a.start(Instant::now()).remove(0);
        assert_eq!(&init[0..4], &[0x13, 0x88, 0x13, 0x88]);
        assert_eq!(
            &init[4..8],
            &[0, 0, 0, 0],
            "INIT carries verification tag 0"
        );
        assert_eq!(init[12], CHUNK_INIT);
        assert_eq!(be16(&init, 14), 20);
        assert_eq!(be32(&init, 16), a.local_tag);
        assert_eq!(be32(&init, 20), RECEIVE_WINDOW);
        assert_eq!(be32(&init, 28), a.local_initial_tsn);
        // Checksum little-endian at offset 8.
        let mut zeroed = init.clone();
        zeroed[8..12].fill(0);
        assert_eq!(&init[8..12], &crc32c(&zeroed).to_le_bytes());
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let now = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let first = a.send(b"hello".to_vec(), now).unwrap();
        assert_eq!(first.len(), 1, "only INIT until established");
        let (_, got_b) = settle(&mut a, &mut b, first, now);
        assert!(a.is_established() && b.is_established());
        assert_eq!(got_b, vec![b"hello".to_vec()]);
        assert!(a.outstanding.is_empty(), "SACKed");
        assert_eq!(a.poll_timeout(), None);
        let to_a = b.send(b"back".to_vec(), now).unwrap();
        let (got_b2, got_a) = settle(&mut b, &mut a, to_a, now);
        assert!(got_b2.is_empty());
        assert_eq!(got_a, vec![b"back".to_vec()]);
    }

    #[test]
    fn simultaneous_init_collision_establishes_once() {
        let now = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let ia = a.send(b"from a".to_vec(), now).unwrap();
        let ib = b.send(b"from b".to_vec(), now).unwrap();
        // Both INITs cross.
        let ra = deliver(&mut a, ib, now).packets;
        let rb = deliver(&mut b, ia, now).packets;
        let mut to_a = rb;
        let mut to_b = ra;
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let oa = deliver(&mut a, std::mem::take(&mut to_a), now);
            let ob = deliver(&mut b, std::mem::take(&mut to_b), now);
            got_a.extend(oa.messages);
            got_b.extend(ob.messages);
            to_b.extend(oa.packets);
            to_a.extend(ob.packets);
        }
        assert!(a.is_established() && b.is_established());
        assert_eq!(a.peer.unwrap().tag, b.local_tag);
        assert_eq!(b.peer.unwrap().tag, a.local_tag);
        assert_eq!(got_a, vec![b"from b".to_vec()]);
        assert_eq!(got_b, vec![b"from a".to_vec()]);
    }

    #[test]
    fn large_message_is_fragmented_and_reassembled_even_out_of_order() {
        let now = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let init = a.start(now);
        settle(&mut a, &mut b, init, now);
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut packets = a.send(big.clone(), now).unwrap();
        assert_eq!(packets.len(), 5);
        assert!(packets.iter().all(|p| p.len() <= 12 + 16 + MAX_FRAGMENT));
        assert_eq!(packets[0][13], FLAG_BEGIN);
        assert_eq!(packets[2][13], 0);
        assert_eq!(packets[4][13], FLAG_END);
        packets.swap(1, 3);
        packets.reverse();
        let mut got = Vec::new();
        let mut sacks = Vec::new();
        for p in packets {
            let out = b.receive(&p, now).unwrap();
            got.extend(out.messages);
            sacks.extend(out.packets);
        }
        assert_eq!(got, vec![big]);
        // A SACK with a gap block was sent while chunks were missing; the final one acks all.
        let gap_sack = &sacks[0];
        assert_eq!(gap_sack[12], CHUNK_SACK);
        assert_eq!(be16(gap_sack, 24), 1, "one gap block");
        deliver(&mut a, sacks, now);
        assert!(a.outstanding.is_empty());
    }

    #[test]
    fn lost_data_is_retransmitted_and_delivered_once() {
        let t0 = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let init = a.start(t0);
        settle(&mut a, &mut b, init, t0);
        let lost = a.send(b"one".to_vec(), t0).unwrap();
        drop(lost);
        assert_eq!(a.poll_timeout(), Some(t0 + INITIAL_RTO));
        assert!(a.handle_timeout(t0).is_empty(), "not before the RTO");
        let again = a.handle_timeout(t0 + INITIAL_RTO);
        assert_eq!(again.len(), 1);
        let out = b.receive(&again[0], t0 + INITIAL_RTO).unwrap();
        assert_eq!(out.messages, vec![b"one".to_vec()]);
        // The SACK is lost too: a retransmits once more (backed off), b drops the duplicate.
        assert_eq!(a.poll_timeout(), Some(t0 + INITIAL_RTO * 3));
        let third = a.handle_timeout(t0 + INITIAL_RTO * 3);
        let out = b.receive(&third[0], t0 + INITIAL_RTO * 3).unwrap();
        assert!(out.messages.is_empty());
        deliver(&mut a, out.packets, t0 + INITIAL_RTO * 3);
        assert!(a.outstanding.is_empty());
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn init_is_retransmitted_with_backoff_and_data_waits() {
        let t0 = Instant::now();
        let mut a = SctpAssociation::new();
        assert_eq!(a.send(b"queued".to_vec(), t0).unwrap().len(), 1);
        assert!(a.send(b"second".to_vec(), t0).unwrap().is_empty());
        let mut t = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            let next = a.poll_timeout().unwrap();
            gaps.push((next - t).as_secs());
            t = next;
            let out = a.handle_timeout(t);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0][12], CHUNK_INIT);
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 8, 8]);
        let mut b = SctpAssociation::new();
        let last = a.init_packet();
        let (_, got_b) = settle(&mut a, &mut b, vec![last], t);
        assert_eq!(got_b, vec![b"queued".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn lost_cookie_echo_is_retransmitted() {
        let t0 = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let init = a.start(t0);
        let init_ack = deliver(&mut b, init, t0).packets;
        let echo = deliver(&mut a, init_ack, t0).packets;
        assert_eq!(echo[0][12], CHUNK_COOKIE_ECHO);
        let again = a.handle_timeout(t0 + INITIAL_RTO);
        assert_eq!(again, echo);
        let ack = deliver(&mut b, again, t0).packets;
        assert!(b.is_established());
        deliver(&mut a, ack, t0);
        assert!(a.is_established());
    }

    #[test]
    fn heartbeat_is_answered_and_abort_resets() {
        let now = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let init = a.start(now);
        settle(&mut a, &mut b, init, now);
        let hb = build_packet(a.local_tag, CHUNK_HEARTBEAT, 0, &[0, 1, 0, 8, 1, 2, 3, 4]);
        let out = a.receive(&hb, now).unwrap();
        assert_eq!(out.packets.len(), 1);
        assert_eq!(out.packets[0][12], CHUNK_HEARTBEAT_ACK);
        assert_eq!(&out.packets[0][16..24], &[0, 1, 0, 8, 1, 2, 3, 4]);
        assert_eq!(be32(&out.packets[0], 4), b.local_tag);
        let old_tag = a.local_tag;
        let abort = build_packet(a.local_tag, CHUNK_ABORT, 0, &[]);
        a.receive(&abort, now).unwrap();
        assert!(!a.is_established());
        assert_ne!(a.local_tag, old_tag);
        // It starts over a second later.
        assert_eq!(a.poll_timeout(), Some(now + INITIAL_RTO));
        let init = a.handle_timeout(now + INITIAL_RTO);
        assert_eq!(init[0][12], CHUNK_INIT);
    }

    #[test]
    fn bad_packets_are_refused_with_typed_errors() {
        let now = Instant::now();
        let (mut a, mut b) = (SctpAssociation::new(), SctpAssociation::new());
        let init = a.start(now);
        settle(&mut a, &mut b, init, now);
        assert_eq!(a.receive(&[1, 2, 3], now), Err(SctpError::TooShort(3)));
        assert_eq!(
            a.receive(&vec![0; MAX_PACKET + 1], now),
            Err(SctpError::TooLarge(MAX_PACKET + 1))
        );
        let mut p = build_packet(a.local_tag, CHUNK_HEARTBEAT, 0, &[0; 8]);
        p[20] ^= 1;
        assert_eq!(a.receive(&p, now), Err(SctpError::BadChecksum));
        let mut p = build_packet(a.local_tag, CHUNK_HEARTBEAT, 0, &[0; 8]);
        p[0] = 0;
        seal_checksum(&mut p);
        assert!(matches!(
            a.receive(&p, now),
            Err(SctpError::BadPorts { .. })
        ));
        let p = build_packet(a.local_tag ^ 1, CHUNK_HEARTBEAT, 0, &[0; 8]);
        assert!(matches!(
            a.receive(&p, now),
            Err(SctpError::BadVerificationTag(_))
        ));
        let mut p = build_packet(a.local_tag, CHUNK_HEARTBEAT, 0, &[0; 8]);
        p[14..16].copy_from_slice(&200u16.to_be_bytes());
        seal_checksum(&mut p);
        assert_eq!(a.receive(&p, now), Err(SctpError::MalformedChunk(12)));
        let mut p = build_packet(a.local_tag, CHUNK_HEARTBEAT, 0, &[]);
        p.truncate(12);
        seal_checksum(&mut p);
        assert_eq!(a.receive(&p, now), Err(SctpError::NoChunks));
        // A truncated DATA chunk and a COOKIE ECHO with a forged cookie are ignored.
        let p = build_packet(a.local_tag, CHUNK_DATA, 3, &[0; 8]);
        assert_eq!(a.receive(&p, now), Ok(SctpOutput::default()));
        let p = build_packet(a.local_tag, CHUNK_COOKIE_ECHO, 0, &[7; COOKIE_LEN]);
        assert_eq!(a.receive(&p, now), Ok(SctpOutput::default()));
        assert!(a.is_established());
        assert_eq!(a.send(Vec::new(), now), Err(SctpError::BadMessageSize(0)));
        assert_eq!(
            a.send(vec![0; MAX_MESSAGE + 1], now),
            Err(SctpError::BadMessageSize(MAX_MESSAGE + 1))
        );
    }

    #[test]
    fn random_bytes_with_a_valid_checksum_never_panic() {
        let now = Instant::now();
        let mut a = SctpAssociation::new();
        a.start(now);
        let mut seed = 0x1234_5678u32;
        for len in 12..400 {
            let mut p: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            p[0..4].copy_from_slice(&[0x13, 0x88, 0x13, 0x88]);
            if len % 2 == 0 {
                p[4..8].copy_from_slice(&a.local_tag.to_be_bytes());
            }
            seal_checksum(&mut p);
            let _ = a.receive(&p, now);
        }
    }
}
