//! A Telegram call's media endpoint on one UDP socket: the WebRTC leg plus its TURN allocations,
//! sans-IO. This is what a dataplane shard (and `siptg tgcall-peer`) owns per Telegram leg.
//!
//! Datagrams from a TURN server are unwrapped and handed to the leg as if they had arrived at
//! our relayed address; what the leg sends from a relayed candidate is wrapped for that server.
//! Everything else goes straight between the socket and the leg.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use siptg_proto::{TelegramLocal, TelegramOp};

use super::leg::{TgMediaConfig, TgMediaError, TgMediaEvent, TgMediaLeg, TgMediaOutput};
use super::turn::{TurnClient, TurnEvent};

/// How to set an endpoint up (from the control side's `TelegramLegSpec`).
#[derive(Debug, Clone)]
pub struct TgEndpointConfig {
    pub caller: bool,
    pub relay_only: bool,
    /// TURN servers with long-term credentials: (server, username, password).
    pub turn: Vec<(SocketAddr, String, String)>,
    pub connect_timeout: Duration,
}

/// What the endpoint reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TgEndpointEvent {
    /// From the WebRTC leg (connected, audio, data channel, failure).
    Media(TgMediaEvent),
    /// A relayed candidate from a completed TURN allocation: announce it to the peer.
    LocalCandidate(String),
    /// A TURN server refused us; the call may still work through others or P2P.
    TurnFailed { server: SocketAddr, reason: String },
}

/// One Telegram leg's media on the socket `base`.
pub struct TgEndpoint {
    leg: TgMediaLeg,
    base: SocketAddr,
    turns: Vec<TurnClient>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<TgEndpointEvent>,
    leg_timeout: Option<Instant>,
    audio_pt: Option<u8>,
}

impl TgEndpoint {
    /// Starts the leg (host candidate `base` unless relay-only) and one allocation per TURN
    /// server.
    pub fn new(
        config: &TgEndpointConfig,
        base: SocketAddr,
        now: Instant,
    ) -> Result<Self, TgMediaError> {
        let leg = TgMediaLeg::new(
            &TgMediaConfig {
                caller: config.caller,
                host_addrs: vec![base],
                relay_addrs: vec![],
                relay_only: config.relay_only,
                connect_timeout: config.connect_timeout,
            },
            now,
        )?;
        let turns = config
            .turn
            .iter()
            .map(|(server, user, pass)| TurnClient::new(*server, user, pass, now))
            .collect();
        let mut ep = TgEndpoint {
            leg,
            base,
            turns,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            leg_timeout: Some(now),
            audio_pt: None,
        };
        ep.pump(now)?;
        Ok(ep)
    }

    /// Our setup for the signalling: ICE credentials, fingerprint, candidates so far, SSRC.
    pub fn local(&mut self) -> TelegramLocal {
        let p = self.leg.local_params();
        TelegramLocal {
            ufrag: p.ufrag,
            pwd: p.pwd,
            hash: p.hash,
            fingerprint: p.fingerprint,
            candidates: self.leg.local_candidates().to_vec(),
            ssrc: self.leg.audio_ssrc(),
        }
    }

    /// Applies what the signalling learnt.
    pub fn apply(&mut self, op: TelegramOp, now: Instant) -> Result<(), TgMediaError> {
        match op {
            TelegramOp::RemoteParams {
                ufrag,
                pwd,
                hash,
                fingerprint,
            } => self
                .leg
                .set_remote_params(&ufrag, &pwd, &hash, &fingerprint)?,
            TelegramOp::RemoteCandidate(c) => {
                if self.leg.add_remote_candidate(&c)? {
                    // Relayed paths need a permission for the peer's address on every server.
                    if let Some(ip) = candidate_ip(&c) {
                        for t in &mut self.turns {
                            t.add_permission(now, ip);
                        }
                    }
                }
            }
            TelegramOp::RemoteAudio { ssrc, .. } => self.leg.set_remote_audio_ssrc(ssrc),
            TelegramOp::SendAudio { payload_type } => self.audio_pt = Some(payload_type),
            TelegramOp::SendData(bytes) => self.leg.send_data(&bytes)?,
            // The bridge plays digits into the SIP leg; nothing for the WebRTC side.
            TelegramOp::SendDtmf { .. } => {}
        }
        self.pump(now)
    }

    /// Whether audio may be sent: connected and accepted by the peer.
    pub fn can_send_audio(&self) -> bool {
        self.audio_pt.is_some() && self.leg.is_connected()
    }

    /// Sends one Opus packet (RTP timestamp on the 48 kHz clock).
    pub fn send_audio(
        &mut self,
        now: Instant,
        timestamp: u32,
        opus: &[u8],
    ) -> Result<(), TgMediaError> {
        self.leg.send_audio(now, timestamp, opus)?;
        self.pump(now)
    }

    /// Handles a datagram that arrived on `base` from `src`; false if it was not ours.
    pub fn receive(
        &mut self,
        now: Instant,
        src: SocketAddr,
        bytes: &[u8],
    ) -> Result<bool, TgMediaError> {
        let mut handled = false;
        if let Some(t) = self.turns.iter_mut().find(|t| t.is_from_server(src)) {
            match t.receive(now, bytes) {
                Ok(Some((peer, data))) => {
                    if let Some(relayed) = t.relayed() {
                        handled = self.leg.receive(now, peer, relayed, &data)?;
                    }
                }
                Ok(None) => handled = true,
                Err(e) => {
                    tracing::debug!(server = %t.server(), "TURN: {e}");
                }
            }
        } else {
            handled = self.leg.receive(now, src, self.base, bytes)?;
        }
        self.pump(now)?;
        Ok(handled)
    }

    /// Runs due timers (ICE, DTLS, RTCP, TURN refreshes).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), TgMediaError> {
        for t in &mut self.turns {
            if t.poll_timeout().is_some_and(|at| at <= now) {
                t.handle_timeout(now);
            }
        }
        if self.leg_timeout.is_some_and(|t| t <= now) {
            self.leg.handle_timeout(now)?;
        }
        self.pump(now)
    }

    /// When [`TgEndpoint::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.turns
            .iter()
            .filter_map(|t| t.poll_timeout())
            .chain(self.leg_timeout)
            .min()
    }

    /// The next datagram to send from `base`.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<TgEndpointEvent> {
        self.events.pop_front()
    }

    /// Ends the call's media: DTLS close, TURN allocations released.
    pub fn close(&mut self, now: Instant) {
        self.leg.close();
        for t in &mut self.turns {
            t.close(now);
        }
        let _ = self.pump(now);
    }

    /// Moves everything the leg and the TURN clients produced into the queues.
    fn pump(&mut self, now: Instant) -> Result<(), TgMediaError> {
        for t in &mut self.turns {
            while let Some(ev) = t.poll_event() {
                match ev {
                    TurnEvent::Allocated { relayed } => {
                        tracing::info!(server = %t.server(), %relayed, "TURN allocation");
                        if let Some(c) = self.leg.add_relay_candidate(relayed, self.base)? {
                            self.events.push_back(TgEndpointEvent::LocalCandidate(c));
                        }
                    }
                    TurnEvent::Failed(e) => self.events.push_back(TgEndpointEvent::TurnFailed {
                        server: t.server(),
                        reason: e.to_string(),
                    }),
                }
            }
            while let Some(p) = t.poll_transmit() {
                self.transmits.push_back((t.server(), p));
            }
        }
        loop {
            match self.leg.poll()? {
                TgMediaOutput::Transmit {
                    source,
                    destination,
                    contents,
                } => match self.turns.iter_mut().find(|t| t.relayed() == Some(source)) {
                    Some(t) => {
                        if let Some(p) = t.send_to(now, destination, &contents) {
                            self.transmits.push_back((t.server(), p));
                        }
                        while let Some(p) = t.poll_transmit() {
                            self.transmits.push_back((t.server(), p));
                        }
                    }
                    None => self.transmits.push_back((destination, contents)),
                },
                TgMediaOutput::Event(e) => self.events.push_back(TgEndpointEvent::Media(e)),
                TgMediaOutput::Timeout(t) => {
                    self.leg_timeout = Some(t);
                    return Ok(());
                }
            }
        }
    }
}

/// The connection address of an SDP `candidate:` line (fifth field).
fn candidate_ip(sdp: &str) -> Option<std::net::IpAddr> {
    sdp.split_whitespace().nth(4)?.parse().ok()
}
