//! The tgcalls v2 signalling conversation of one call, sans-IO: which JSON message to send when,
//! and what each received message means for the media leg.
//!
//! Order (tgcalls `InstanceV2Impl`): the caller sends `InitialSetup` (setup `actpass`) and its
//! candidates; the callee answers with its own `InitialSetup` (`passive`) and candidates. Once a
//! side has the other's `InitialSetup`, it offers its send-only audio in `NegotiateChannels` with
//! a fresh `exchangeId`; the receiver answers with the same `exchangeId`, echoing the offered
//! SSRC with the payload types it accepts, and then offers its own. When both offers cross,
//! the caller's wins (`ContentNegotiation.cpp`): the callee drops its pending offer and answers,
//! the caller ignores the callee's offer, and the callee offers again afterwards.
//!
//! Framing and encryption are below this layer ([`super::crypto`], [`super::framing`]); the
//! media leg is the dataplane's, reached through [`MediaCommand`]s.

use std::collections::VecDeque;

use super::messages::{
    Candidate, Candidates, DtlsFingerprint, InitialSetup, MediaContent, MediaState,
    NegotiateChannels, PayloadType, RtpExtension, SignalingMessage,
};

/// The RTP header extension we keep when the peer offers it (abs-send-time; harmless and lets
/// libwebrtc peers estimate delay).
pub const ABS_SEND_TIME_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";

/// Our media leg's half of the setup, from the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMedia {
    pub ufrag: String,
    pub pwd: String,
    pub hash: String,
    pub fingerprint: String,
    pub candidates: Vec<String>,
    pub ssrc: u32,
}

/// What the media leg must be told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaCommand {
    /// The peer's ICE credentials and DTLS fingerprint: starts ICE checks and DTLS.
    RemoteParams {
        ufrag: String,
        pwd: String,
        hash: String,
        fingerprint: String,
    },
    /// One of the peer's candidates (SDP `candidate:` string).
    RemoteCandidate(String),
    /// The SSRC and Opus payload type the peer sends audio with.
    RemoteAudio { ssrc: u32, payload_type: u8 },
    /// The peer accepted our audio: send it with this payload type.
    SendAudio { payload_type: u8 },
}

/// Why a signalling message was refused; the call fails with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("InitialSetup carries no sha-256 DTLS fingerprint")]
    NoFingerprint,
    #[error("InitialSetup changed ICE credentials mid-call (ICE restart is not supported)")]
    IceRestart,
    #[error("the peer offered audio without Opus")]
    NoOpus,
}

/// One call's signalling state.
pub struct SignalingSession {
    caller: bool,
    local: LocalMedia,
    remote_setup: Option<InitialSetup>,
    /// Candidates that arrived before `InitialSetup`; applied once it has.
    early_candidates: Vec<String>,
    needs_offer: bool,
    pending_offer: Option<u32>,
    next_exchange: u32,
    outbox: VecDeque<SignalingMessage>,
    commands: VecDeque<MediaCommand>,
    remote_audio: Option<(u32, u8)>,
    send_pt: Option<u8>,
}

impl SignalingSession {
    /// Starts the conversation; the caller's first messages are queued at once.
    pub fn new(caller: bool, local: LocalMedia) -> Self {
        let mut s = SignalingSession {
            caller,
            local,
            remote_setup: None,
            early_candidates: Vec::new(),
            needs_offer: true,
            pending_offer: None,
            next_exchange: rand::random::<u32>() | 1,
            outbox: VecDeque::new(),
            commands: VecDeque::new(),
            remote_audio: None,
            send_pt: None,
        };
        if caller {
            s.queue_setup();
        }
        s
    }

    fn queue_setup(&mut self) {
        self.outbox
            .push_back(SignalingMessage::InitialSetup(InitialSetup {
                ufrag: self.local.ufrag.clone(),
                pwd: self.local.pwd.clone(),
                renomination: false,
                fingerprints: vec![DtlsFingerprint {
                    hash: self.local.hash.clone(),
                    setup: if self.caller { "actpass" } else { "passive" }.into(),
                    fingerprint: self.local.fingerprint.clone(),
                }],
            }));
        if !self.local.candidates.is_empty() {
            self.outbox.push_back(candidates(&self.local.candidates));
        }
    }

    /// Announces candidates found later (e.g. a TURN allocation that completed).
    pub fn add_local_candidates(&mut self, more: Vec<String>) {
        let sent = self.caller || self.remote_setup.is_some();
        self.local.candidates.extend(more.iter().cloned());
        if sent && !more.is_empty() {
            self.outbox.push_back(candidates(&more));
        }
    }

    /// Handles one message from the peer.
    pub fn handle(&mut self, msg: SignalingMessage) -> Result<(), SessionError> {
        match msg {
            SignalingMessage::InitialSetup(setup) => self.on_setup(setup)?,
            SignalingMessage::Candidates(c) => {
                for c in c.candidates {
                    if self.remote_setup.is_some() {
                        self.commands
                            .push_back(MediaCommand::RemoteCandidate(c.sdp_string));
                    } else {
                        self.early_candidates.push(c.sdp_string);
                    }
                }
            }
            SignalingMessage::NegotiateChannels(n) => self.on_negotiate(n)?,
            SignalingMessage::MediaState(_) => {}
        }
        self.offer_if_needed();
        Ok(())
    }

    fn on_setup(&mut self, setup: InitialSetup) -> Result<(), SessionError> {
        if let Some(old) = &self.remote_setup {
            if old.ufrag != setup.ufrag || old.pwd != setup.pwd {
                return Err(SessionError::IceRestart);
            }
            return Ok(());
        }
        let fp = setup
            .fingerprints
            .iter()
            .find(|f| f.hash.eq_ignore_ascii_case("sha-256"))
            .ok_or(SessionError::NoFingerprint)?;
        self.commands.push_back(MediaCommand::RemoteParams {
            ufrag: setup.ufrag.clone(),
            pwd: setup.pwd.clone(),
            hash: fp.hash.clone(),
            fingerprint: fp.fingerprint.clone(),
        });
        for c in self.early_candidates.drain(..) {
            self.commands.push_back(MediaCommand::RemoteCandidate(c));
        }
        self.remote_setup = Some(setup);
        if !self.caller {
            self.queue_setup();
        }
        Ok(())
    }

    fn on_negotiate(&mut self, n: NegotiateChannels) -> Result<(), SessionError> {
        if let Some(pending) = self.pending_offer {
            if n.exchange_id == pending {
                // The answer to our offer: the contents the peer will receive.
                self.pending_offer = None;
                self.needs_offer = false;
                let pt = n
                    .contents
                    .iter()
                    .filter(|c| c.ssrc == self.local.ssrc)
                    .flat_map(|c| c.payload_types.iter())
                    .find(|p| p.name.eq_ignore_ascii_case("opus"))
                    .map(|p| p.id);
                if let Some(pt) = pt {
                    if self.send_pt != Some(pt) {
                        self.send_pt = Some(pt);
                        self.commands
                            .push_back(MediaCommand::SendAudio { payload_type: pt });
                    }
                }
                return Ok(());
            }
            if self.caller {
                // Crossed offers: the caller's wins; the callee will offer again.
                return Ok(());
            }
            self.pending_offer = None;
        }
        let answer = self.answer(&n)?;
        self.outbox
            .push_back(SignalingMessage::NegotiateChannels(answer));
        Ok(())
    }

    fn answer(&mut self, offer: &NegotiateChannels) -> Result<NegotiateChannels, SessionError> {
        let mut contents = Vec::new();
        for c in offer.contents.iter().filter(|c| c.kind == "audio") {
            let opus: Vec<PayloadType> = c
                .payload_types
                .iter()
                .filter(|p| p.name.eq_ignore_ascii_case("opus") && p.clockrate == 48_000)
                .map(|p| PayloadType {
                    id: p.id,
                    name: p.name.clone(),
                    clockrate: p.clockrate,
                    channels: p.channels,
                    feedback_types: Vec::new(),
                    parameters: p.parameters.clone(),
                })
                .collect();
            let Some(first) = opus.first() else {
                return Err(SessionError::NoOpus);
            };
            if self.remote_audio != Some((c.ssrc, first.id)) {
                self.remote_audio = Some((c.ssrc, first.id));
                self.commands.push_back(MediaCommand::RemoteAudio {
                    ssrc: c.ssrc,
                    payload_type: first.id,
                });
            }
            contents.push(MediaContent {
                kind: "audio".into(),
                ssrc: c.ssrc,
                ssrc_groups: c.ssrc_groups.clone(),
                payload_types: opus,
                rtp_extensions: c
                    .rtp_extensions
                    .iter()
                    .filter(|e| e.uri == ABS_SEND_TIME_URI)
                    .cloned()
                    .collect(),
            });
        }
        Ok(NegotiateChannels {
            exchange_id: offer.exchange_id,
            contents,
        })
    }

    fn offer_if_needed(&mut self) {
        if self.remote_setup.is_none() || !self.needs_offer || self.pending_offer.is_some() {
            return;
        }
        let id = self.next_exchange;
        self.next_exchange = self.next_exchange.wrapping_add(2);
        self.pending_offer = Some(id);
        self.outbox
            .push_back(SignalingMessage::NegotiateChannels(NegotiateChannels {
                exchange_id: id,
                contents: vec![our_audio(self.local.ssrc)],
            }));
    }

    /// The next message to send to the peer, if any.
    pub fn poll_message(&mut self) -> Option<SignalingMessage> {
        self.outbox.pop_front()
    }

    /// The next instruction for the media leg, if any.
    pub fn poll_command(&mut self) -> Option<MediaCommand> {
        self.commands.pop_front()
    }

    /// Whether both directions of audio are negotiated.
    pub fn negotiated(&self) -> bool {
        self.send_pt.is_some() && self.remote_audio.is_some()
    }

    /// Our `MediaState`, sent over the data channel once it opens.
    pub fn media_state(muted: bool) -> SignalingMessage {
        SignalingMessage::MediaState(MediaState {
            muted,
            low_battery: false,
            video_state: "inactive".into(),
            video_rotation: 0,
            screencast_state: "inactive".into(),
        })
    }
}

fn candidates(list: &[String]) -> SignalingMessage {
    SignalingMessage::Candidates(Candidates {
        candidates: list
            .iter()
            .map(|s| Candidate {
                sdp_string: s.clone(),
            })
            .collect(),
    })
}

/// Our send-only audio content: Opus 48 kHz with in-band FEC, as tgcalls offers it.
fn our_audio(ssrc: u32) -> MediaContent {
    MediaContent {
        kind: "audio".into(),
        ssrc,
        ssrc_groups: Vec::new(),
        payload_types: vec![PayloadType {
            id: 111,
            name: "opus".into(),
            clockrate: 48_000,
            channels: 2,
            feedback_types: Vec::new(),
            parameters: [("minptime", "10"), ("useinbandfec", "1")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }],
        rtp_extensions: vec![RtpExtension {
            id: 2,
            uri: ABS_SEND_TIME_URI.into(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(n: u32) -> LocalMedia {
        LocalMedia {
            ufrag: format!("uf{n}xx"),
            pwd: format!("{n}").repeat(24),
            hash: "sha-256".into(),
            fingerprint: "AB:".repeat(31) + "AB",
            candidates: vec![format!(
                "candidate:1 1 udp 2122260223 10.0.0.{n} 500{n} typ host"
            )],
            ssrc: 1000 + n,
        }
    }

    /// Delivers every queued message both ways until quiet (optionally in crossed order).
    fn pump(a: &mut SignalingSession, b: &mut SignalingSession) -> usize {
        let mut n = 0;
        loop {
            let from_a: Vec<_> = std::iter::from_fn(|| a.poll_message()).collect();
            let from_b: Vec<_> = std::iter::from_fn(|| b.poll_message()).collect();
            if from_a.is_empty() && from_b.is_empty() {
                return n;
            }
            n += from_a.len() + from_b.len();
            for m in from_a {
                // Through JSON, as on the wire.
                let m = SignalingMessage::parse(&m.to_json()).unwrap();
                b.handle(m).unwrap();
            }
            for m in from_b {
                let m = SignalingMessage::parse(&m.to_json()).unwrap();
                a.handle(m).unwrap();
            }
        }
    }

    #[test]
    fn caller_and_callee_negotiate_audio_both_ways() {
        let mut a = SignalingSession::new(true, local(1));
        let mut b = SignalingSession::new(false, local(2));
        assert!(
            b.poll_message().is_none(),
            "the callee waits for InitialSetup"
        );
        pump(&mut a, &mut b);
        assert!(a.negotiated() && b.negotiated());
        let ca: Vec<_> = std::iter::from_fn(|| a.poll_command()).collect();
        let cb: Vec<_> = std::iter::from_fn(|| b.poll_command()).collect();
        assert!(matches!(&ca[0], MediaCommand::RemoteParams { ufrag, .. } if ufrag == "uf2xx"));
        assert!(ca.contains(&MediaCommand::RemoteCandidate(
            local(2).candidates[0].clone()
        )));
        assert!(ca.contains(&MediaCommand::RemoteAudio {
            ssrc: 1002,
            payload_type: 111
        }));
        assert!(ca.contains(&MediaCommand::SendAudio { payload_type: 111 }));
        assert!(cb.contains(&MediaCommand::RemoteAudio {
            ssrc: 1001,
            payload_type: 111
        }));
        assert!(cb.contains(&MediaCommand::SendAudio { payload_type: 111 }));
    }

    #[test]
    fn crossed_offers_resolve_with_the_callers_winning() {
        let mut a = SignalingSession::new(true, local(1));
        let mut b = SignalingSession::new(false, local(2));
        // Deliver the caller's InitialSetup so both have handshakes, then cross the offers.
        for m in std::iter::from_fn(|| a.poll_message()).collect::<Vec<_>>() {
            b.handle(m).unwrap();
        }
        for m in std::iter::from_fn(|| b.poll_message()).collect::<Vec<_>>() {
            a.handle(m).unwrap();
        }
        // Now a has an offer queued; give b an offer of its own by a no-op handle.
        b.handle(SignalingSession::media_state(false)).unwrap();
        assert!(b.pending_offer.is_some() && a.pending_offer.is_some());
        pump(&mut a, &mut b);
        assert!(a.negotiated() && b.negotiated());
    }

    #[test]
    fn bad_setups_and_offers_are_typed_errors() {
        let mut a = SignalingSession::new(true, local(1));
        let err = a.handle(SignalingMessage::InitialSetup(InitialSetup {
            ufrag: "x".into(),
            pwd: "y".into(),
            renomination: false,
            fingerprints: vec![],
        }));
        assert_eq!(err, Err(SessionError::NoFingerprint));
        let mut b = SignalingSession::new(false, local(2));
        for m in std::iter::from_fn(|| a.poll_message()).collect::<Vec<_>>() {
            b.handle(m).unwrap();
        }
        let err = b.handle(SignalingMessage::NegotiateChannels(NegotiateChannels {
            exchange_id: 7,
            contents: vec![MediaContent {
                kind: "audio".into(),
                ssrc: 5,
                ssrc_groups: vec![],
                payload_types: vec![],
                rtp_extensions: vec![],
            }],
        }));
        assert_eq!(err, Err(SessionError::NoOpus));
        let mut setup = match a_setup(&local(1)) {
            SignalingMessage::InitialSetup(s) => s,
            _ => unreachable!(),
        };
        setup.ufrag = "changed".into();
        assert_eq!(
            b.handle(SignalingMessage::InitialSetup(setup)),
            Err(SessionError::IceRestart)
        );
    }

    fn a_setup(l: &LocalMedia) -> SignalingMessage {
        let mut s = SignalingSession::new(true, l.clone());
        s.poll_message().unwrap()
    }
}
