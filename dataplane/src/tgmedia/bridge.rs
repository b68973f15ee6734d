//! The Telegram side of a gateway call inside a shard: a [`TgEndpoint`] plus the transcoder that
//! joins it to a SIP leg (G.711 at 8 kHz ⇄ Opus), sans-IO.
//!
//! SIP → Telegram: G.711 payloads are decoded and gathered into 20 ms of PCM, each encoded as one
//! Opus packet. Telegram → SIP: each Opus packet (20–60 ms) is decoded at 8 kHz and cut into
//! 20 ms G.711 packets with their own continuous SSRC, sequence and timestamp, so the PBX sees
//! one steady stream whatever Telegram does.

use std::net::SocketAddr;
use std::time::Instant;

use siptg_proto::{Codec, TelegramEvent, TelegramLegSpec, TelegramLocal, TelegramOp};

use super::dtmf::{DtmfError, DtmfSender};
use super::endpoint::{TgEndpoint, TgEndpointConfig, TgEndpointEvent};
use super::g711::Law;
use super::leg::{TgMediaError, TgMediaEvent};
use super::opus::{OpusDecoder, OpusEncoder, OpusSettings, MAX_FRAME_SAMPLES, MAX_PACKET};

/// PCM rate between the codecs: G.711's own, so no resampling is needed.
const RATE: u32 = 8_000;
/// 20 ms at 8 kHz.
const FRAME: usize = 160;
/// The Opus RTP clock advances 48 000 / 8 000 = 6 ticks per PCM sample.
const OPUS_TICKS_PER_SAMPLE: u32 = 6;

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
    enc: OpusEncoder,
    dec: OpusDecoder,
    /// PCM from the SIP leg not yet encoded (less than one frame).
    pending: Vec<i16>,
    opus_ts: u32,
    sip_ssrc: u32,
    sip_seq: u16,
    sip_ts: u32,
    /// The G.711 law the SIP leg speaks (from its payload type); PCMA until it says otherwise.
    pub law: Law,
    /// RFC 4733 digits towards the SIP leg, with its telephone-event payload type; `None`
    /// until the SIP leg negotiates telephone-event.
    dtmf: Option<(u8, DtmfSender)>,
    /// RTP timestamp of the event playing now (all its packets carry the start's).
    event_ts: u32,
}

impl std::fmt::Debug for TelegramBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramBridge")
            .field("law", &self.law)
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
            enc: OpusEncoder::new(OpusSettings {
                rate: RATE,
                ..OpusSettings::default()
            })?,
            dec: OpusDecoder::new(RATE)?,
            pending: Vec::with_capacity(FRAME * 2),
            opus_ts: rand::random(),
            sip_ssrc: rand::random(),
            sip_seq: rand::random(),
            sip_ts: rand::random(),
            law: Law::A,
            dtmf: None,
            event_ts: 0,
        })
    }

    /// What the bridged SIP leg negotiated: its telephone-event payload type enables RFC 4733
    /// digits towards it (kept across renegotiation while the payload type stays the same).
    pub fn set_sip_codec(&mut self, codec: &Codec) {
        if let Some(law) = Law::from_payload_type(codec.payload_type) {
            self.law = law;
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
        self.drain(out)?;
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
            let mut pkt = vec![0u8; 16];
            pkt[0] = 0x80;
            pkt[1] = *pt | if p.marker { 0x80 } else { 0 };
            pkt[2..4].copy_from_slice(&self.sip_seq.to_be_bytes());
            pkt[4..8].copy_from_slice(&self.event_ts.to_be_bytes());
            pkt[8..12].copy_from_slice(&self.sip_ssrc.to_be_bytes());
            pkt[12..16].copy_from_slice(&p.payload);
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
        self.drain(out)?;
        Ok(r?)
    }

    /// Audio from the SIP leg: one G.711 RTP payload of payload type `pt`.
    pub fn from_sip(
        &mut self,
        now: Instant,
        pt: u8,
        payload: &[u8],
        out: &mut BridgeOutput,
    ) -> Result<(), BridgeError> {
        let Some(law) = Law::from_payload_type(pt) else {
            return Ok(()); // comfort noise, telephone-event, …: not audio to transcode
        };
        self.law = law;
        let start = self.pending.len();
        self.pending.resize(start + payload.len(), 0);
        law.decode(payload, &mut self.pending[start..]);
        while self.pending.len() >= FRAME {
            let mut pkt = [0u8; MAX_PACKET];
            let n = self.enc.encode(&self.pending[..FRAME], &mut pkt)?;
            self.pending.drain(..FRAME);
            if self.ep.can_send_audio() {
                self.ep.send_audio(now, self.opus_ts, &pkt[..n])?;
            }
            self.opus_ts = self
                .opus_ts
                .wrapping_add(FRAME as u32 * OPUS_TICKS_PER_SAMPLE);
        }
        self.drain(out)
    }

    /// Runs due timers.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        out: &mut BridgeOutput,
    ) -> Result<(), BridgeError> {
        let r = self.ep.handle_timeout(now);
        self.drain(out)?;
        self.play_dtmf(now, out)?;
        Ok(r?)
    }

    /// When [`TelegramBridge::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ep = self.ep.poll_timeout();
        let dtmf = self.dtmf.as_ref().and_then(|(_, s)| s.poll_timeout());
        match (ep, dtmf) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ends the Telegram media (DTLS close, TURN released).
    pub fn close(&mut self, now: Instant, out: &mut BridgeOutput) {
        self.ep.close(now);
        let _ = self.drain(out);
    }

    fn drain(&mut self, out: &mut BridgeOutput) -> Result<(), BridgeError> {
        while let Some(t) = self.ep.poll_transmit() {
            out.telegram.push(t);
        }
        while let Some(e) = self.ep.poll_event() {
            match e {
                TgEndpointEvent::Media(TgMediaEvent::Audio { payload, .. }) => {
                    self.transcode_to_sip(&payload, out)
                }
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

    /// One Opus packet from Telegram → 20 ms G.711 RTP packets for the SIP leg.
    fn transcode_to_sip(&mut self, opus: &[u8], out: &mut BridgeOutput) {
        let mut pcm = [0i16; MAX_FRAME_SAMPLES];
        let n = match self.dec.decode(opus, &mut pcm) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("undecodable Opus packet dropped: {e}");
                return;
            }
        };
        let pt = match self.law {
            Law::Mu => 0,
            Law::A => 8,
        };
        let muted = self.dtmf.as_ref().is_some_and(|(_, s)| s.is_playing());
        for chunk in pcm[..n].chunks(FRAME) {
            if muted {
                // A digit is sounding: the stream's clock runs on, its audio is held back.
                self.sip_ts = self.sip_ts.wrapping_add(chunk.len() as u32);
                continue;
            }
            let mut pkt = vec![0u8; 12 + chunk.len()];
            pkt[0] = 0x80;
            pkt[1] = pt;
            pkt[2..4].copy_from_slice(&self.sip_seq.to_be_bytes());
            pkt[4..8].copy_from_slice(&self.sip_ts.to_be_bytes());
            pkt[8..12].copy_from_slice(&self.sip_ssrc.to_be_bytes());
            self.law.encode(chunk, &mut pkt[12..]);
            self.sip_seq = self.sip_seq.wrapping_add(1);
            self.sip_ts = self.sip_ts.wrapping_add(chunk.len() as u32);
            out.sip.push(pkt);
        }
    }
}
