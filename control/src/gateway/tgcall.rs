//! One Telegram call of the gateway, sans-IO: the MTProto call states (getDhConfig,
//! requestCall/acceptCall/confirmCall, phoneCall updates, discardCall) joined to the tgcalls
//! signalling (DH checks, key, framing, the JSON session) and the media leg's commands.
//!
//! The runtime feeds it Telegram's answers and updates, the signalling bytes that arrive, the
//! media leg's events and the time; it returns [`TgAction`]s: requests to send through the
//! Session Storage, when to create the media leg, commands for it, and call events.

use crate::tgcall::dh::{self, DhParams, DhSecret};
use crate::tgcall::emoji::emoji_fingerprint;
use crate::tgcall::framing::SignalingFraming;
use crate::tgcall::messages::SignalingMessage;
use crate::tgcall::session::{LocalMedia, MediaCommand, SignalingSession};
use grammers_tl_types as tl;
use siptg_proto::{TelegramEvent, TelegramOp, TurnServer};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// The library versions we speak, best first (advertised in `phoneCallProtocol`).
pub const LIBRARY_VERSIONS: &[&str] = &["13.0.0", "12.0.0", "9.0.0", "8.0.0", "7.0.0"];

/// Our `phoneCallProtocol`.
pub fn protocol() -> tl::enums::PhoneCallProtocol {
    tl::enums::PhoneCallProtocol::Protocol(tl::types::PhoneCallProtocol {
        udp_p2p: true,
        udp_reflector: true,
        min_layer: 65,
        max_layer: 92,
        library_versions: LIBRARY_VERSIONS.iter().map(|s| s.to_string()).collect(),
    })
}

/// A request for Telegram (through the Session Storage); the runtime adds the call's
/// `InputPhoneCall` and the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TgRequest {
    GetDhConfig,
    RequestCall { g_a_hash: Vec<u8> },
    ReceivedCall,
    AcceptCall { g_b: Vec<u8> },
    ConfirmCall { g_a: Vec<u8>, fingerprint: i64 },
    SendSignaling(Vec<u8>),
    DiscardCall { reason: Hangup, duration: i32 },
}

/// Why we end a call, as Telegram's discard reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hangup {
    /// A normal hang-up.
    Hangup,
    /// We decline an incoming call (the PBX was busy or refused).
    Busy,
    /// Media failed.
    Disconnect,
    /// Nobody answered.
    Missed,
}

impl Hangup {
    /// The TL reason.
    pub fn to_tl(self) -> tl::enums::PhoneCallDiscardReason {
        match self {
            Hangup::Hangup => tl::enums::PhoneCallDiscardReason::Hangup,
            Hangup::Busy => tl::enums::PhoneCallDiscardReason::Busy,
            Hangup::Disconnect => tl::enums::PhoneCallDiscardReason::Disconnect,
            Hangup::Missed => tl::enums::PhoneCallDiscardReason::Missed,
        }
    }
}

/// How a call ended, from the Telegram side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TgEnd {
    /// The Telegram user (or Telegram) discarded it with this reason.
    Discarded(Option<Hangup>),
    /// We hung up.
    Local(Hangup),
    /// The key exchange or the signalling failed.
    Failed(String),
}

/// What happened to the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TgCallEvent {
    /// The callee's device rings (phoneCallWaiting with receive_date).
    Ringing,
    /// Keys agreed; the four emoji both sides see.
    Keyed {
        fingerprint: i64,
        emoji: Vec<String>,
    },
    /// Media flows.
    Connected,
    /// The peer's `MediaState` arrived over the data channel: its microphone is muted or not
    /// (a Telegram app shows the same for us while the PBX holds the call).
    RemoteMuted(bool),
    /// The call is over.
    Ended(TgEnd),
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum TgAction {
    Request(TgRequest),
    /// Create the Telegram media leg (caller role and relay servers as given), then call
    /// [`TgCall::media_ready`].
    StartMedia {
        caller: bool,
        relay_only: bool,
        turn: Vec<TurnServer>,
    },
    /// A command for the media leg.
    Media(TelegramOp),
    Event(TgCallEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Caller: waiting for the DH config; callee: waiting for it and for `accept`.
    Dh,
    /// Caller: requestCall sent, waiting for the callee.
    Requested,
    /// Callee: waiting for the gateway's decision to accept.
    Ringing,
    /// Callee: acceptCall sent, waiting for phoneCall.
    Accepted,
    /// Keys agreed; waiting for the media leg.
    Keyed,
    /// Signalling and media running.
    Media,
    Ended,
}

/// One Telegram call.
pub struct TgCall {
    caller: bool,
    state: State,
    params: Option<DhParams>,
    secret: Option<DhSecret>,
    g_a_hash: Option<Vec<u8>>,
    key: Option<[u8; 256]>,
    version: Option<String>,
    accept_wanted: bool,
    framing: Option<SignalingFraming>,
    signaling: Option<SignalingSession>,
    /// Signalling that arrived before the media leg existed.
    early_signals: Vec<Vec<u8>>,
    connected_at: Option<Instant>,
    /// What our `MediaState` says: muted while the PBX holds the call.
    muted: bool,
    /// The data channel is open: a `MediaState` can go out now.
    data_open: bool,
    out: VecDeque<TgAction>,
}

impl TgCall {
    /// A call we place: asks for the DH config.
    pub fn outgoing() -> Self {
        let mut c = Self::new(true);
        c.out.push_back(TgAction::Request(TgRequest::GetDhConfig));
        c
    }

    /// A call to us (phoneCallRequested with `g_a_hash`): acknowledges it (the caller sees
    /// "ringing") and fetches the DH config; answer with [`accept`](Self::accept).
    pub fn incoming(g_a_hash: Vec<u8>) -> Self {
        let mut c = Self::new(false);
        c.g_a_hash = Some(g_a_hash);
        c.state = State::Ringing;
        c.out.push_back(TgAction::Request(TgRequest::ReceivedCall));
        c.out.push_back(TgAction::Request(TgRequest::GetDhConfig));
        c
    }

    fn new(caller: bool) -> Self {
        Self {
            caller,
            state: State::Dh,
            params: None,
            secret: None,
            g_a_hash: None,
            key: None,
            version: None,
            accept_wanted: false,
            framing: None,
            signaling: None,
            early_signals: Vec::new(),
            connected_at: None,
            muted: false,
            data_open: false,
            out: VecDeque::new(),
        }
    }

    /// Are we the caller?
    pub fn is_caller(&self) -> bool {
        self.caller
    }

    /// Is the call over?
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Seconds since media connected (for discardCall's duration).
    pub fn duration(&self, now: Instant) -> i32 {
        self.connected_at
            .map(|t| now.saturating_duration_since(t).as_secs() as i32)
            .unwrap_or(0)
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<TgAction> {
        self.out.pop_front()
    }

    fn fail(&mut self, why: String) {
        if self.state == State::Ended {
            return;
        }
        tracing::warn!(reason = %why, "Telegram call failed");
        self.state = State::Ended;
        self.out
            .push_back(TgAction::Request(TgRequest::DiscardCall {
                reason: Hangup::Disconnect,
                duration: 0,
            }));
        self.out
            .push_back(TgAction::Event(TgCallEvent::Ended(TgEnd::Failed(why))));
    }

    /// messages.getDhConfig answered.
    pub fn on_dh_config(&mut self, g: i32, p: &[u8], random: &[u8]) {
        let params = match DhParams::check(g, p, &mut rand::thread_rng()) {
            Ok(p) => p,
            Err(e) => return self.fail(format!("getDhConfig: {e}")),
        };
        let secret = match params.secret(random, || {
            let mut b = [0u8; 256];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
            b
        }) {
            Ok(s) => s,
            Err(e) => return self.fail(format!("DH secret: {e}")),
        };
        if self.caller && self.state == State::Dh {
            self.out
                .push_back(TgAction::Request(TgRequest::RequestCall {
                    g_a_hash: dh::g_a_hash(&secret.public).to_vec(),
                }));
            self.state = State::Requested;
        }
        self.params = Some(params);
        self.secret = Some(secret);
        if self.accept_wanted {
            self.send_accept();
        }
    }

    /// Callee: the gateway answers (the PBX picked up).
    pub fn accept(&mut self) {
        if self.caller || self.state != State::Ringing {
            return;
        }
        self.accept_wanted = true;
        if self.secret.is_some() {
            self.send_accept();
        }
    }

    fn send_accept(&mut self) {
        if let Some(s) = &self.secret {
            self.out.push_back(TgAction::Request(TgRequest::AcceptCall {
                g_b: s.public.to_vec(),
            }));
            self.state = State::Accepted;
            self.accept_wanted = false;
        }
    }

    /// We hang up (or decline).
    pub fn hang_up(&mut self, reason: Hangup, now: Instant) {
        if self.state == State::Ended {
            return;
        }
        self.state = State::Ended;
        let duration = self.duration(now);
        self.out
            .push_back(TgAction::Request(TgRequest::DiscardCall {
                reason,
                duration,
            }));
        self.out
            .push_back(TgAction::Event(TgCallEvent::Ended(TgEnd::Local(reason))));
    }

    /// A phoneCall state from Telegram (an answer to our request or an update).
    pub fn on_phone_call(&mut self, pc: &tl::enums::PhoneCall) {
        if self.state == State::Ended {
            return;
        }
        match pc {
            tl::enums::PhoneCall::Waiting(w) if self.caller && w.receive_date.is_some() => {
                self.out.push_back(TgAction::Event(TgCallEvent::Ringing));
            }
            tl::enums::PhoneCall::Accepted(a) if self.caller && self.state == State::Requested => {
                let (Some(params), Some(secret)) = (&self.params, &self.secret) else {
                    return self.fail("phoneCallAccepted before our DH".into());
                };
                let key = match params.shared_key(secret, &a.g_b) {
                    Ok(k) => k,
                    Err(e) => return self.fail(format!("g_b: {e}")),
                };
                let fingerprint = dh::key_fingerprint(&key);
                let g_a = secret.public.to_vec();
                self.out
                    .push_back(TgAction::Request(TgRequest::ConfirmCall {
                        g_a: g_a.clone(),
                        fingerprint,
                    }));
                self.set_key(key, &g_a);
            }
            tl::enums::PhoneCall::Call(c)
                if self.state == State::Keyed || self.state == State::Accepted =>
            {
                if !self.caller {
                    // Callee: g_a arrives now; check it against the hash we were given.
                    let committed = self.g_a_hash.clone().unwrap_or_default();
                    if let Err(e) = dh::verify_g_a(&c.g_a_or_b, &committed) {
                        return self.fail(e.to_string());
                    }
                    let (Some(params), Some(secret)) = (&self.params, &self.secret) else {
                        return self.fail("phoneCall before our DH".into());
                    };
                    let key = match params.shared_key(secret, &c.g_a_or_b) {
                        Ok(k) => k,
                        Err(e) => return self.fail(format!("g_a: {e}")),
                    };
                    if let Err(e) = dh::verify_fingerprint(&key, c.key_fingerprint) {
                        return self.fail(e.to_string());
                    }
                    self.set_key(key, &c.g_a_or_b.clone());
                }
                let tl::enums::PhoneCallProtocol::Protocol(p) = &c.protocol;
                let Some(version) = p
                    .library_versions
                    .iter()
                    .find(|v| LIBRARY_VERSIONS.contains(&v.as_str()))
                else {
                    return self.fail(format!(
                        "no common library version in {:?}",
                        p.library_versions
                    ));
                };
                self.version = Some(version.clone());
                let mut turn = Vec::new();
                for conn in &c.connections {
                    if let tl::enums::PhoneConnection::Webrtc(w) = conn {
                        if !w.turn {
                            continue;
                        }
                        let Ok(ip) = w.ip.parse::<IpAddr>() else {
                            continue;
                        };
                        let Ok(port) = u16::try_from(w.port) else {
                            continue;
                        };
                        turn.push(TurnServer {
                            addr: SocketAddr::new(ip, port),
                            username: w.username.clone(),
                            password: w.password.clone(),
                        });
                    }
                }
                let relay_only = !c.p2p_allowed;
                if relay_only && turn.is_empty() {
                    return self.fail("relay-only call without a TURN server".into());
                }
                self.state = State::Keyed;
                self.out.push_back(TgAction::StartMedia {
                    caller: self.caller,
                    relay_only,
                    turn,
                });
            }
            tl::enums::PhoneCall::Discarded(d) => {
                self.state = State::Ended;
                let reason = d.reason.as_ref().map(|r| match r {
                    tl::enums::PhoneCallDiscardReason::Busy => Hangup::Busy,
                    tl::enums::PhoneCallDiscardReason::Missed => Hangup::Missed,
                    tl::enums::PhoneCallDiscardReason::Disconnect => Hangup::Disconnect,
                    _ => Hangup::Hangup,
                });
                self.out
                    .push_back(TgAction::Event(TgCallEvent::Ended(TgEnd::Discarded(
                        reason,
                    ))));
            }
            _ => {}
        }
    }

    fn set_key(&mut self, key: [u8; 256], g_a: &[u8]) {
        let fingerprint = dh::key_fingerprint(&key);
        let emoji = emoji_fingerprint(&key, g_a)
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        self.key = Some(key);
        self.state = State::Keyed;
        self.out
            .push_back(TgAction::Event(TgCallEvent::Keyed { fingerprint, emoji }));
    }

    /// The media leg exists: start the signalling.
    pub fn media_ready(&mut self, local: LocalMedia, now: Instant) {
        if self.state != State::Keyed {
            return;
        }
        let (Some(key), Some(version)) = (self.key, self.version.clone()) else {
            return self.fail("media before keys".into());
        };
        let mut framing = match SignalingFraming::new(&version, key, self.caller) {
            Ok(f) => f,
            Err(e) => return self.fail(format!("version {version}: {e}")),
        };
        for p in framing.start(now) {
            self.out
                .push_back(TgAction::Request(TgRequest::SendSignaling(p)));
        }
        self.framing = Some(framing);
        self.signaling = Some(SignalingSession::new(self.caller, local));
        self.state = State::Media;
        for s in std::mem::take(&mut self.early_signals) {
            self.on_signaling(&s, now);
        }
        self.flush(now);
    }

    /// Signalling bytes from the peer (updatePhoneCallSignalingData).
    pub fn on_signaling(&mut self, bytes: &[u8], now: Instant) {
        match self.state {
            State::Media => {}
            State::Ended => return,
            _ => {
                if self.early_signals.len() < 64 {
                    self.early_signals.push(bytes.to_vec());
                }
                return;
            }
        }
        let (Some(framing), Some(signaling)) = (self.framing.as_mut(), self.signaling.as_mut())
        else {
            return;
        };
        let got = match framing.receive(bytes, now) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "dropped a signalling packet");
                return;
            }
        };
        for p in got.replies {
            self.out
                .push_back(TgAction::Request(TgRequest::SendSignaling(p)));
        }
        let mut failure = None;
        for msg in got.messages {
            match SignalingMessage::parse(&msg) {
                Ok(m) => {
                    if let Err(e) = signaling.handle(m) {
                        failure = Some(format!("signalling: {e}"));
                        break;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "ignored a signalling message"),
            }
        }
        if let Some(f) = failure {
            return self.fail(f);
        }
        self.flush(now);
    }

    /// An event of the media leg.
    pub fn on_media_event(&mut self, event: TelegramEvent, now: Instant) {
        if self.state == State::Ended {
            return;
        }
        match event {
            TelegramEvent::Connected => {
                if self.connected_at.is_none() {
                    self.connected_at = Some(now);
                    self.out.push_back(TgAction::Event(TgCallEvent::Connected));
                }
            }
            TelegramEvent::Disconnected => {}
            TelegramEvent::Failed(why) => self.fail(format!("media: {why}")),
            TelegramEvent::LocalCandidate(c) => {
                if let Some(s) = self.signaling.as_mut() {
                    s.add_local_candidates(vec![c]);
                }
                self.flush(now);
            }
            TelegramEvent::DataOpen => {
                self.data_open = true;
                self.send_media_state();
            }
            TelegramEvent::Data(bytes) => match SignalingMessage::parse(&bytes) {
                Ok(SignalingMessage::MediaState(m)) => {
                    self.out
                        .push_back(TgAction::Event(TgCallEvent::RemoteMuted(m.muted)));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "ignored a data-channel message"),
            },
        }
    }

    /// Our audio is muted (the PBX holds the call) or not (resumed): the Telegram user's app
    /// shows it, as when a Telegram user mutes. Sent as `MediaState` over the data channel (the
    /// only way tgcalls v2 takes it), now if it is open, else when it opens.
    pub fn set_muted(&mut self, muted: bool) {
        if self.muted == muted {
            return;
        }
        self.muted = muted;
        if self.data_open {
            self.send_media_state();
        }
    }

    fn send_media_state(&mut self) {
        if self.state == State::Ended {
            return;
        }
        let state = SignalingSession::media_state(self.muted).to_json();
        self.out
            .push_back(TgAction::Media(TelegramOp::SendData(state)));
    }

    fn flush(&mut self, now: Instant) {
        let (Some(framing), Some(signaling)) = (self.framing.as_mut(), self.signaling.as_mut())
        else {
            return;
        };
        while let Some(cmd) = signaling.poll_command() {
            let op = match cmd {
                MediaCommand::RemoteParams {
                    ufrag,
                    pwd,
                    hash,
                    fingerprint,
                } => TelegramOp::RemoteParams {
                    ufrag,
                    pwd,
                    hash,
                    fingerprint,
                },
                MediaCommand::RemoteCandidate(c) => TelegramOp::RemoteCandidate(c),
                MediaCommand::RemoteAudio { ssrc, payload_type } => {
                    TelegramOp::RemoteAudio { ssrc, payload_type }
                }
                MediaCommand::SendAudio { payload_type } => TelegramOp::SendAudio { payload_type },
            };
            self.out.push_back(TgAction::Media(op));
        }
        let mut failure = None;
        while let Some(msg) = signaling.poll_message() {
            match framing.send(&msg.to_json(), now) {
                Ok(packets) => {
                    for p in packets {
                        self.out
                            .push_back(TgAction::Request(TgRequest::SendSignaling(p)));
                    }
                }
                Err(e) => {
                    failure = Some(format!("signalling send: {e}"));
                    break;
                }
            }
        }
        if let Some(f) = failure {
            self.fail(f);
        }
    }

    /// When the framing wants to resend.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.framing.as_ref().and_then(|f| f.poll_timeout())
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(f) = self.framing.as_mut() {
            if f.poll_timeout().is_some_and(|t| t <= now) {
                for p in f.handle_timeout(now) {
                    self.out
                        .push_back(TgAction::Request(TgRequest::SendSignaling(p)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prime() -> Vec<u8> {
        let hex = crate::tgcall::dh::KNOWN_PRIME_HEX;
        let clean: Vec<u8> = hex.bytes().filter(u8::is_ascii_hexdigit).collect();
        clean
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn local(tag: &str) -> LocalMedia {
        LocalMedia {
            ufrag: format!("uf{tag}"),
            pwd: format!("pwd-{tag}-0123456789abcdef"),
            hash: "sha-256".into(),
            fingerprint: "AA:BB".repeat(16).chars().take(95).collect(),
            candidates: vec![format!(
                "candidate:1 1 udp 2130706431 10.0.0.{} 4000{} typ host",
                tag.len(),
                tag.len()
            )],
            ssrc: 1000 + tag.len() as u32,
        }
    }

    fn drain(c: &mut TgCall) -> Vec<TgAction> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn protocol_with(versions: &[&str]) -> tl::enums::PhoneCallProtocol {
        tl::enums::PhoneCallProtocol::Protocol(tl::types::PhoneCallProtocol {
            udp_p2p: true,
            udp_reflector: true,
            min_layer: 65,
            max_layer: 92,
            library_versions: versions.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn active(g_a_or_b: Vec<u8>, fp: i64, p2p: bool) -> tl::enums::PhoneCall {
        tl::enums::PhoneCall::Call(tl::types::PhoneCall {
            p2p_allowed: p2p,
            video: false,
            conference_supported: false,
            id: 1,
            access_hash: 2,
            date: 0,
            admin_id: 10,
            participant_id: 20,
            g_a_or_b,
            key_fingerprint: fp,
            protocol: protocol_with(&["8.0.0"]),
            connections: vec![],
            start_date: 0,
            custom_parameters: None,
        })
    }

    /// Delivers `from`'s signalling to `to`, noting the ICE user `from` was told to use.
    fn pump(from: &mut TgCall, to: &mut TgCall, params: &mut Option<String>, now: Instant) {
        for act in drain(from) {
            match act {
                TgAction::Request(TgRequest::SendSignaling(bytes)) => to.on_signaling(&bytes, now),
                TgAction::Media(TelegramOp::RemoteParams { ufrag, .. }) => *params = Some(ufrag),
                _ => {}
            }
        }
    }

    fn media_states(acts: &[TgAction]) -> Vec<bool> {
        acts.iter()
            .filter_map(|a| match a {
                TgAction::Media(TelegramOp::SendData(d)) => match SignalingMessage::parse(d) {
                    Ok(SignalingMessage::MediaState(m)) => Some(m.muted),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hold_mutes_our_media_state_when_the_data_channel_is_open() {
        let now = Instant::now();
        let mut c = TgCall::outgoing();
        drain(&mut c);
        // Held before the channel opens: the first MediaState already says muted.
        c.set_muted(true);
        assert!(media_states(&drain(&mut c)).is_empty());
        c.on_media_event(TelegramEvent::DataOpen, now);
        let first = drain(&mut c);
        assert_eq!(media_states(&first), vec![true]);
        // The full tgcalls object, as telegram-calls.md §2.3.3 shows it.
        let TgAction::Media(TelegramOp::SendData(json)) = &first[0] else {
            panic!("{first:?}")
        };
        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"@type": "MediaState", "muted": true, "lowBattery": false,
                "videoState": "inactive", "videoRotation": 0, "screencastState": "inactive"})
        );
        c.set_muted(true); // unchanged: nothing new
        assert!(drain(&mut c).is_empty());
        c.set_muted(false);
        assert_eq!(media_states(&drain(&mut c)), vec![false]);
        // The peer's own MediaState is an event.
        c.on_media_event(
            TelegramEvent::Data(br#"{"@type":"MediaState","muted":true}"#.to_vec()),
            now,
        );
        assert_eq!(
            drain(&mut c),
            vec![TgAction::Event(TgCallEvent::RemoteMuted(true))]
        );
    }

    /// Both sides of a call, with this test playing Telegram's servers.
    #[test]
    fn caller_and_callee_agree_on_keys_and_start_signalling() {
        let now = Instant::now();
        let p = prime();
        let mut a = TgCall::outgoing();
        assert_eq!(
            drain(&mut a),
            vec![TgAction::Request(TgRequest::GetDhConfig)]
        );
        a.on_dh_config(3, &p, &[1; 256]);
        let [TgAction::Request(TgRequest::RequestCall { g_a_hash })] = &drain(&mut a)[..] else {
            panic!()
        };
        let mut b = TgCall::incoming(g_a_hash.clone());
        assert_eq!(
            drain(&mut b),
            vec![
                TgAction::Request(TgRequest::ReceivedCall),
                TgAction::Request(TgRequest::GetDhConfig)
            ]
        );
        // The PBX answers before the DH config arrives: acceptCall waits for it.
        b.accept();
        assert!(drain(&mut b).is_empty());
        b.on_dh_config(3, &p, &[2; 256]);
        let [TgAction::Request(TgRequest::AcceptCall { g_b })] = &drain(&mut b)[..] else {
            panic!()
        };
        a.on_phone_call(&tl::enums::PhoneCall::Accepted(
            tl::types::PhoneCallAccepted {
                video: false,
                id: 1,
                access_hash: 2,
                date: 0,
                admin_id: 10,
                participant_id: 20,
                g_b: g_b.clone(),
                protocol: protocol_with(&["8.0.0"]),
            },
        ));
        let acts = drain(&mut a);
        let TgAction::Request(TgRequest::ConfirmCall { g_a, fingerprint }) = &acts[0] else {
            panic!("{acts:?}")
        };
        let TgAction::Event(TgCallEvent::Keyed { emoji: emoji_a, .. }) = &acts[1] else {
            panic!()
        };
        // Telegram tells the caller the call is active (g_b) and the callee (g_a).
        a.on_phone_call(&active(g_b.clone(), *fingerprint, true));
        assert!(matches!(
            drain(&mut a)[..],
            [TgAction::StartMedia {
                caller: true,
                relay_only: false,
                ..
            }]
        ));
        b.on_phone_call(&active(g_a.clone(), *fingerprint, true));
        let acts = drain(&mut b);
        let TgAction::Event(TgCallEvent::Keyed {
            fingerprint: fb,
            emoji: emoji_b,
        }) = &acts[0]
        else {
            panic!("{acts:?}")
        };
        assert_eq!((fb, emoji_b), (fingerprint, emoji_a));
        assert!(matches!(
            acts[1],
            TgAction::StartMedia { caller: false, .. }
        ));
        // Media legs exist: relay the signalling until both know the other's ICE parameters.
        a.media_ready(local("a"), now);
        b.media_ready(local("bb"), now);
        let (mut a_params, mut b_params) = (None, None);
        for _ in 0..20 {
            pump(&mut a, &mut b, &mut a_params, now);
            pump(&mut b, &mut a, &mut b_params, now);
            if a_params.is_some() && b_params.is_some() {
                break;
            }
        }
        assert_eq!(
            a_params.as_deref(),
            Some("ufbb"),
            "the caller learnt the callee's ICE"
        );
        assert_eq!(
            b_params.as_deref(),
            Some("ufa"),
            "the callee learnt the caller's ICE"
        );
        // Hang-up: a discardCall with the duration, and the end event.
        b.hang_up(Hangup::Hangup, now);
        assert!(matches!(
            drain(&mut b)[..],
            [
                TgAction::Request(TgRequest::DiscardCall {
                    reason: Hangup::Hangup,
                    ..
                }),
                TgAction::Event(TgCallEvent::Ended(TgEnd::Local(Hangup::Hangup)))
            ]
        ));
        a.on_phone_call(&tl::enums::PhoneCall::Discarded(
            tl::types::PhoneCallDiscarded {
                need_rating: false,
                need_debug: false,
                video: false,
                id: 1,
                reason: Some(tl::enums::PhoneCallDiscardReason::Hangup),
                duration: Some(3),
            },
        ));
        assert!(a.is_ended());
    }

    #[test]
    fn a_wrong_g_a_or_fingerprint_fails_the_call() {
        let p = prime();
        let mut a = TgCall::outgoing();
        a.on_dh_config(3, &p, &[1; 256]);
        let acts = drain(&mut a);
        let TgAction::Request(TgRequest::RequestCall { g_a_hash }) = &acts[1] else {
            panic!("{acts:?}")
        };
        let mut b = TgCall::incoming(g_a_hash.clone());
        b.accept();
        b.on_dh_config(3, &p, &[2; 256]);
        drain(&mut b);
        // A forged g_a (not the committed one).
        let mut other = TgCall::outgoing();
        other.on_dh_config(3, &p, &[9; 256]);
        b.on_phone_call(&active(vec![7; 256], 1, true));
        let acts = drain(&mut b);
        assert!(
            matches!(
                acts.last(),
                Some(TgAction::Event(TgCallEvent::Ended(TgEnd::Failed(_))))
            ),
            "{acts:?}"
        );
        assert!(b.is_ended());
        // A bad DH config.
        let mut c = TgCall::outgoing();
        c.on_dh_config(3, &[5; 256], &[0; 256]);
        assert!(c.is_ended());
    }
}
