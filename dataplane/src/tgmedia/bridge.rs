//! The Telegram side of a gateway call inside a shard: a [`TgEndpoint`] plus what joins it to
//! the SIP leg, sans-IO.
//!
//! - **Opus on the SIP leg** (`opus/48000`): passthrough. Opus payloads cross unchanged; only the
//!   RTP header is the bridge's own (SSRC, sequence, timestamp offset), so there is no codec
//!   state and no added delay. The PBX's jitter buffer does the rest.
//! - **G.711 (8 kHz) or G.722 (16 kHz)**: transcoding. SIP → Telegram: payloads are decoded and
//!   gathered into 20 ms of PCM, each encoded as one Opus packet at the SIP codec's rate (no
//!   resampling). Telegram → SIP: Opus packets go through a [`JitterBuffer`] played on a steady
//!   20 ms clock; holes are concealed by Opus (from the next packet's in-band FEC when it is
//!   already here, else PLC) and every frame is cut into 20 ms SIP packets with the bridge's own
//!   continuous SSRC, sequence and timestamp, so the PBX sees one steady stream whatever
//!   Telegram does.
//!
//! The Opus codec state (~60 KiB) is made only when the SIP leg needs transcoding.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use siptg_proto::{Codec, TelegramEvent, TelegramLegSpec, TelegramLocal, TelegramOp};

use super::dtmf::{DtmfError, DtmfSender};
use super::endpoint::{TgEndpoint, TgEndpointConfig, TgEndpointEvent};
use super::g711::Law;
use super::g722::{G722Decoder, G722Encoder};
use super::jitter::{JitterBuffer, Playout};
use super::leg::{TgMediaError, TgMediaEvent};
use super::opus::{OpusDecoder, OpusEncoder, OpusSettings, MAX_FRAME_SAMPLES, MAX_PACKET};

/// The Opus RTP clock rate.
const OPUS_CLOCK: u32 = 48_000;

/// What the SIP leg speaks, from its negotiated codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SipAudio {
    /// G.711 at 8 kHz, static payload type 0 or 8.
    G711(Law),
    /// G.722: 16 kHz audio on an 8 kHz RTP clock, payload type 9.
    G722,
    /// Opus with the PBX's payload type: passed through.
    Opus { payload_type: u8 },
}

impl SipAudio {
    /// From a negotiated codec; `None` for one the bridge cannot take.
    pub fn of(codec: &Codec) -> Option<Self> {
        match codec.name.to_ascii_lowercase().as_str() {
            "pcma" => Some(SipAudio::G711(Law::A)),
            "pcmu" => Some(SipAudio::G711(Law::Mu)),
            "g722" => Some(SipAudio::G722),
            "opus" => Some(SipAudio::Opus {
                payload_type: codec.payload_type,
            }),
            _ => Law::from_payload_type(codec.payload_type).map(SipAudio::G711),
        }
    }

    fn payload_type(self) -> u8 {
        match self {
            SipAudio::G711(Law::Mu) => 0,
            SipAudio::G711(Law::A) => 8,
            SipAudio::G722 => 9,
            SipAudio::Opus { payload_type } => payload_type,
        }
    }

    /// PCM rate of the transcoder (none for Opus).
    fn pcm_rate(self) -> u32 {
        match self {
            SipAudio::G722 => 16_000,
            _ => 8_000,
        }
    }

    /// PCM samples in 20 ms.
    fn frame_samples(self) -> usize {
        self.pcm_rate() as usize / 50
    }
}

/// The codec state of a transcoded call (absent on Opus passthrough).
struct Transcoder {
    /// The PCM rate it was made for.
    rate: u32,
    enc: OpusEncoder,
    dec: OpusDecoder,
    g722_enc: G722Encoder,
    g722_dec: G722Decoder,
    /// PCM from the SIP leg not yet encoded (less than one frame).
    pending: Vec<i16>,
    jitter: JitterBuffer,
}

impl Transcoder {
    fn new(rate: u32) -> Result<Self, BridgeError> {
        Ok(Transcoder {
            rate,
            enc: OpusEncoder::new(OpusSettings {
                rate,
                ..OpusSettings::default()
            })?,
            dec: OpusDecoder::new(rate)?,
            g722_enc: G722Encoder::new(),
            g722_dec: G722Decoder::new(),
            pending: Vec::with_capacity(rate as usize / 25),
            jitter: JitterBuffer::new(),
        })
    }
}

/// What one step of the bridge produced, for the shard to send and report.
#[derive(Debug, Default)]
pub struct BridgeOutput {
    /// Datagrams for the Telegram leg's socket: (destination, bytes).
    pub telegram: Vec<(SocketAddr, Vec<u8>)>,
    /// RTP packets (plain, unprotected) for the bridged SIP leg.
    pub sip: Vec<Vec<u8>>,
    /// Events for the control side.
    pub events: Vec<TelegramEvent>,
}

/// The Telegram side of one bridged call.
pub struct TelegramBridge {
    ep: TgEndpoint,
    /// What the SIP leg speaks; PCMA until told otherwise.
    audio: SipAudio,
    /// Made on first need when `audio` is transcoded.
    codec: Option<Box<Transcoder>>,
    opus_ts: u32,
    sip_ssrc: u32,
    sip_seq: u16,
    sip_ts: u32,
    /// Passthrough: Telegram timestamp + this = SIP timestamp (and the reverse for SIP →
    /// Telegram), fixed at each direction's first packet.
    pass_to_sip: Option<u32>,
    pass_to_tg: Option<u32>,
    /// RFC 4733 digits towards the SIP leg, with its telephone-event payload type; `None`
    /// until the SIP leg negotiates telephone-event.
    dtmf: Option<(u8, DtmfSender)>,
    /// RTP timestamp of the event playing now (all its packets carry the start's).
    event_ts: u32,
}

impl std::fmt::Debug for TelegramBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramBridge")
            .field("audio", &self.audio)
            .finish_non_exhaustive()
    }
}

/// Why a bridge step failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Media(#[from] TgMediaError),
    #[error(transparent)]
    Opus(#[from] super::opus::OpusError),
    #[error("DTMF: {0}")]
    Dtmf(#[from] DtmfError),
    #[error("DTMF: the SIP leg did not negotiate telephone-event")]
    NoTelephoneEvent,
    #[error("no transcoder for the SIP leg's codec")]
    NoTranscoder,
}

impl TelegramBridge {
    /// A Telegram leg on the socket bound at `local`.
    pub fn new(
        spec: &TelegramLegSpec,
        local: SocketAddr,
        now: Instant,
    ) -> Result<Self, BridgeError> {
        let config = TgEndpointConfig {
            caller: spec.caller,
            relay_only: spec.relay_only,
            turn: spec
                .turn
                .iter()
                .map(|t| (t.addr, t.username.clone(), t.password.clone()))
                .collect(),
            connect_timeout: std::time::Duration::from_millis(spec.connect_timeout_ms as u64),
        };
        Ok(TelegramBridge {
            ep: TgEndpoint::new(&config, local, now)?,
            audio: SipAudio::G711(Law::A),
            codec: None,
            pass_to_sip: None,
            pass_to_tg: None,
            opus_ts: rand::random(),
            sip_ssrc: rand::random(),
            sip_seq: rand::random(),
            sip_ts: rand::random(),
            dtmf: None,
            event_ts: 0,
        })
    }

    /// What the bridged SIP leg negotiated: its telephone-event payload type enables RFC 4733
    /// digits towards it (kept across renegotiation while the payload type stays the same).
    pub fn set_sip_codec(&mut self, codec: &Codec) {
        if let Some(audio) = SipAudio::of(codec) {
            if audio != self.audio {
                tracing::debug!(?audio, "Telegram bridge: SIP leg codec");
                self.audio = audio;
                self.pass_to_sip = None;
                self.pass_to_tg = None;
            }
        }
        self.dtmf = match (codec.telephone_event, self.dtmf.take()) {
            (Some(pt), Some((old, sender))) if pt == old => Some((pt, sender)),
            (Some(pt), _) => Some((pt, DtmfSender::new(codec.clock_rate))),
            (None, _) => None,
        };
    }

    /// What the signalling must announce for this leg.
    pub fn local(&mut self) -> TelegramLocal {
        self.ep.local()
    }

    /// Applies a signalling command.
    pub fn apply(
        &mut self,
        op: TelegramOp,
        now: Instant,
        out: &mut BridgeOutput,
    ) -> Result<(), BridgeError> {
        if let TelegramOp::SendDtmf { digit } = op {
            let (_, sender) = self.dtmf.as_mut().ok_or(BridgeError::NoTelephoneEvent)?;
            sender.push(digit, now)?;
            return self.play_dtmf(now, out);
        }
        let r = self.ep.apply(op, now);
        self.drain(now, out)?;
        Ok(r?)
    }

    /// Sends the event packets due at `now` to the SIP leg.
    fn play_dtmf(&mut self, now: Instant, out: &mut BridgeOutput) -> Result<(), BridgeError> {
        let Some((pt, sender)) = self.dtmf.as_mut() else {
            return Ok(());
        };
        while let Some(p) = sender.poll(now) {
            if p.starts_event {
                self.event_ts = self.sip_ts;
            }
            let pkt = rtp_packet(
                *pt | if p.marker { 0x80 } else { 0 },
                self.sip_seq,
                self.event_ts,
                self.sip_ssrc,
                &p.payload,
            );
            self.sip_seq = self.sip_seq.wrapping_add(1);
            out.sip.push(pkt);
        }
        Ok(())
    }

    /// A datagram on the Telegram leg's socket.
    pub fn on_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        bytes: &[u8],
        out: &mut BridgeOutput,
    ) -> Result<bool, BridgeError> {
        let r = self.ep.receive(now, src, bytes);
        self.drain(now, out)?;
        Ok(r?)
    }

    /// Audio from the SIP leg: one RTP payload of payload type `pt` with RTP `timestamp`.
    pub fn from_sip(
        &mut self,
        now: Instant,
        pt: u8,
        timestamp: u32,
        payload: &[u8],
        out: &mut BridgeOutput,
    ) -> Result<(), BridgeError> {
        // A static G.711 payload type names its law even before the codec is known.
        let audio = match self.audio {
            SipAudio::G711(_) => match Law::from_payload_type(pt) {
                Some(law) => SipAudio::G711(law),
                None => return Ok(()), // comfort noise, telephone-event, …
            },
            a if pt == a.payload_type() => a,
            _ => return Ok(()),
        };
        self.audio = audio;
        if let SipAudio::Opus { .. } = audio {
            let offset = *self
                .pass_to_tg
                .get_or_insert(self.opus_ts.wrapping_sub(timestamp));
            if self.ep.can_send_audio() {
                self.ep
                    .send_audio(now, timestamp.wrapping_add(offset), payload)?;
            }
            return self.drain(now, out);
        }
        let frame = audio.frame_samples();
        let codec = transcoder(&mut self.codec, audio)?;
        let start = codec.pending.len();
        match audio {
            SipAudio::G711(law) => {
                codec.pending.resize(start + payload.len(), 0);
                law.decode(payload, &mut codec.pending[start..]);
            }
            _ => {
                codec.pending.resize(start + 2 * payload.len(), 0);
                let n = codec.g722_dec.decode(payload, &mut codec.pending[start..]);
                codec.pending.truncate(start + n);
            }
        }
        let ticks = frame as u32 * (OPUS_CLOCK / audio.pcm_rate());
        while codec.pending.len() >= frame {
            let mut pkt = [0u8; MAX_PACKET];
            let n = codec.enc.encode(&codec.pending[..frame], &mut pkt)?;
            codec.pending.drain(..frame);
            if self.ep.can_send_audio() {
                self.ep.send_audio(now, self.opus_ts, &pkt[..n])?;
            }
            self.opus_ts = self.opus_ts.wrapping_add(ticks);
        }
        self.drain(now, out)
    }

    /// Runs due timers.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        out: &mut BridgeOutput,
    ) -> Result<(), BridgeError> {
        let r = self.ep.handle_timeout(now);
        self.drain(now, out)?;
        self.play_out(now, out);
        self.play_dtmf(now, out)?;
        Ok(r?)
    }

    /// When [`TelegramBridge::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ep = self.ep.poll_timeout();
        let playout = self.codec.as_ref().and_then(|c| c.jitter.poll_timeout());
        let ep = match (ep, playout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let dtmf = self.dtmf.as_ref().and_then(|(_, s)| s.poll_timeout());
        match (ep, dtmf) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ends the Telegram media (DTLS close, TURN released).
    pub fn close(&mut self, now: Instant, out: &mut BridgeOutput) {
        self.ep.close(now);
        let _ = self.drain(now, out);
    }

    fn drain(&mut self, now: Instant, out: &mut BridgeOutput) -> Result<(), BridgeError> {
        while let Some(t) = self.ep.poll_transmit() {
            out.telegram.push(t);
        }
        while let Some(e) = self.ep.poll_event() {
            match e {
                TgEndpointEvent::Media(TgMediaEvent::Audio {
                    seq,
                    timestamp,
                    payload,
                    ..
                }) => self.on_telegram_audio(now, seq, timestamp, payload, out),
                TgEndpointEvent::Media(TgMediaEvent::Connected) => {
                    out.events.push(TelegramEvent::Connected)
                }
                TgEndpointEvent::Media(TgMediaEvent::Disconnected) => {
                    out.events.push(TelegramEvent::Disconnected)
                }
                TgEndpointEvent::Media(TgMediaEvent::DataOpen) => {
                    out.events.push(TelegramEvent::DataOpen)
                }
                TgEndpointEvent::Media(TgMediaEvent::Data(d)) => {
                    out.events.push(TelegramEvent::Data(d))
                }
                TgEndpointEvent::Media(TgMediaEvent::Failed(why)) => {
                    out.events.push(TelegramEvent::Failed(why.to_string()))
                }
                TgEndpointEvent::LocalCandidate(c) => {
                    out.events.push(TelegramEvent::LocalCandidate(c))
                }
                TgEndpointEvent::TurnFailed { server, reason } => {
                    tracing::warn!(%server, "TURN allocation failed: {reason}");
                }
            }
        }
        Ok(())
    }

    /// One Opus packet from Telegram: straight to the SIP leg on passthrough, else into the
    /// jitter buffer (played by [`TelegramBridge::play_out`]).
    fn on_telegram_audio(
        &mut self,
        now: Instant,
        seq: u64,
        timestamp: u32,
        payload: std::sync::Arc<[u8]>,
        out: &mut BridgeOutput,
    ) {
        let audio = self.audio;
        if let SipAudio::Opus { payload_type } = audio {
            if self.dtmf.as_ref().is_some_and(|(_, s)| s.is_playing()) {
                return; // a digit is sounding on the SIP leg
            }
            let offset = *self
                .pass_to_sip
                .get_or_insert(self.sip_ts.wrapping_sub(timestamp));
            let ts = timestamp.wrapping_add(offset);
            self.sip_ts = ts;
            out.sip.push(self.rtp(payload_type, false, ts, &payload));
            return;
        }
        match transcoder(&mut self.codec, audio) {
            Ok(codec) => codec.jitter.push(now, seq, timestamp, payload),
            Err(e) => tracing::debug!("no transcoder: {e}"),
        }
        self.play_out(now, out);
    }

    /// Decodes what the jitter buffer has due at `now` (concealing holes) into 20 ms packets
    /// of the SIP codec.
    fn play_out(&mut self, now: Instant, out: &mut BridgeOutput) {
        let audio = self.audio;
        if let SipAudio::Opus { .. } = audio {
            return;
        }
        let frame = audio.frame_samples();
        let muted = self.dtmf.as_ref().is_some_and(|(_, s)| s.is_playing());
        let Some(codec) = self.codec.as_deref_mut() else {
            return;
        };
        let mut pcm = [0i16; MAX_FRAME_SAMPLES];
        while let Some(item) = codec.jitter.pop(now) {
            let decoded = match &item {
                Playout::Packet(p) => codec.dec.decode(p, &mut pcm),
                Playout::Missing { next } => codec.dec.recover(next.as_deref(), &mut pcm),
            };
            let n = match decoded {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("undecodable Opus packet: {e}");
                    continue;
                }
            };
            codec.jitter.played_for(Duration::from_micros(
                n as u64 * 1_000_000 / codec.rate as u64,
            ));
            for chunk in pcm[..n].chunks(frame) {
                // The SIP clock: 8 kHz for G.711 and G.722 alike (RFC 3551).
                let ticks = (chunk.len() * 8_000 / codec.rate as usize) as u32;
                if muted {
                    // A digit is sounding: the stream's clock runs on, its audio is held back.
                    self.sip_ts = self.sip_ts.wrapping_add(ticks);
                    continue;
                }
                let mut payload = [0u8; MAX_SIP_PAYLOAD];
                let len = match audio {
                    SipAudio::G711(law) => {
                        law.encode(chunk, &mut payload);
                        chunk.len()
                    }
                    _ => codec.g722_enc.encode(chunk, &mut payload),
                };
                let pkt = rtp_packet(
                    audio.payload_type(),
                    self.sip_seq,
                    self.sip_ts,
                    self.sip_ssrc,
                    &payload[..len.min(MAX_SIP_PAYLOAD)],
                );
                self.sip_seq = self.sip_seq.wrapping_add(1);
                self.sip_ts = self.sip_ts.wrapping_add(ticks);
                out.sip.push(pkt);
            }
        }
    }

    /// An RTP packet of the SIP-bound stream (advances the sequence number).
    fn rtp(&mut self, pt: u8, marker: bool, ts: u32, payload: &[u8]) -> Vec<u8> {
        let pkt = rtp_packet(
            pt | if marker { 0x80 } else { 0 },
            self.sip_seq,
            ts,
            self.sip_ssrc,
            payload,
        );
        self.sip_seq = self.sip_seq.wrapping_add(1);
        pkt
    }
}

/// Largest SIP payload the bridge makes: 20 ms of G.711 at 8 kHz (G.722 is half as many bytes
/// per sample at twice the rate: the same).
const MAX_SIP_PAYLOAD: usize = 160;

/// A plain RTP packet (version 2, no CSRC, no extension); `pt_marker` may carry the marker bit.
fn rtp_packet(pt_marker: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut pkt = Vec::with_capacity(12 + payload.len());
    pkt.extend_from_slice(&[0x80, pt_marker]);
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(&ts.to_be_bytes());
    pkt.extend_from_slice(&ssrc.to_be_bytes());
    pkt.extend_from_slice(payload);
    pkt
}

/// The transcoder for `audio` in `slot`, made (or remade for a new rate) on first need.
fn transcoder(
    slot: &mut Option<Box<Transcoder>>,
    audio: SipAudio,
) -> Result<&mut Transcoder, BridgeError> {
    let rate = audio.pcm_rate();
    if slot.as_ref().is_none_or(|c| c.rate != rate) {
        *slot = Some(Box::new(Transcoder::new(rate)?));
    }
    slot.as_deref_mut().ok_or(BridgeError::NoTranscoder)
}
