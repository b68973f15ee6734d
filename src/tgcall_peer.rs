//! `siptg tgcall-peer`: one Telegram call endpoint (caller or callee) whose MTProto side is
//! played by a harness over stdin/stdout, one JSON object per line.
//!
//! The conformance suite (`tests/interop/run tgcalls`) runs this against ntgcalls and against
//! itself, relaying DH values and signalling bytes exactly as Telegram's servers would
//! (`phone.requestCall` / `acceptCall` / `confirmCall`, `phone.sendSignalingData`). Everything
//! below that line is the product's own code: DH and key checks, signalling encryption and
//! framing, the signalling session, and the media leg (ICE, DTLS-SRTP, Opus).
//!
//! Harness → peer:
//! `{"op":"dh_config","g":3,"p":"<hex>","random":"<hex>"}`;
//! callee only: `{"op":"requested","g_a_hash":"<hex>"}`, later
//! `{"op":"confirmed","g_a":"<hex>","fingerprint":N}`;
//! caller only: `{"op":"accepted","g_b":"<hex>"}`;
//! `{"op":"connect","version":"8.0.0","p2p_allowed":true,"servers":[{"ip":"..","port":N,
//! "username":"..","password":"..","turn":true}]}`; `{"op":"signal","hex":".."}`;
//! `{"op":"hangup"}` (or end of input).
//!
//! Peer → harness: `{"ev":"g_a_hash",..}` (caller), `{"ev":"accept","g_b":..}` (callee),
//! `{"ev":"confirm","g_a":..,"fingerprint":N}` (caller), `{"ev":"key","fingerprint":N,
//! "emoji":[..]}`, `{"ev":"signal","hex":..}`, `{"ev":"state","state":"connected"}`,
//! `{"ev":"heard",..}` after `--seconds` of audio, `{"ev":"ended","reason":..}`.

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use siptg_control::tgcall::dh::{self, DhParams, DhSecret};
use siptg_control::tgcall::emoji::emoji_fingerprint;
use siptg_control::tgcall::framing::SignalingFraming;
use siptg_control::tgcall::messages::SignalingMessage;
use siptg_control::tgcall::session::{LocalMedia, MediaCommand, SignalingSession};
use siptg_dataplane::tgmedia::leg::{TgMediaConfig, TgMediaEvent, TgMediaLeg, TgMediaOutput};
use siptg_dataplane::tgmedia::opus::{
    hears_tone, rms, OpusDecoder, OpusEncoder, OpusSettings, Tone, MAX_FRAME_SAMPLES, MAX_PACKET,
};

/// PCM rate on our side of Opus, as in a call bridged to SIP.
const PCM_RATE: u32 = 16_000;

/// Command-line settings of the peer.
pub struct PeerArgs {
    pub caller: bool,
    pub bind: IpAddr,
    pub tone: f64,
    pub expect: f64,
    pub seconds: f64,
}

fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd-length hex ({} chars)", s.len()));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad hex at {i}"))
        })
        .collect()
}

fn field<'a>(v: &'a Value, k: &str) -> Result<&'a str, String> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string field {k:?}"))
}

struct Call {
    args: PeerArgs,
    params: Option<DhParams>,
    secret: Option<DhSecret>,
    g_a_hash: Option<Vec<u8>>,
    key: Option<[u8; 256]>,
    framing: Option<SignalingFraming>,
    session: Option<SignalingSession>,
    leg: Option<TgMediaLeg>,
    sock: UdpSocket,
    local: SocketAddr,
    leg_timeout: Option<Instant>,
    connected_at: Option<Instant>,
    sending: bool,
    enc: OpusEncoder,
    dec: OpusDecoder,
    tone: Tone,
    rtp_ts: u32,
    next_frame: Option<Instant>,
    heard: Vec<i16>,
    reported: bool,
}

/// Runs the peer until hang-up or end of input; the exit code tells the harness the outcome.
pub fn run(args: PeerArgs) -> Result<(), String> {
    let sock = UdpSocket::bind((args.bind, 0)).map_err(|e| format!("bind {}: {e}", args.bind))?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let tone = Tone::new(args.tone, 8000.0, PCM_RATE);
    let mut call = Call {
        args,
        params: None,
        secret: None,
        g_a_hash: None,
        key: None,
        framing: None,
        session: None,
        leg: None,
        sock,
        local,
        leg_timeout: None,
        connected_at: None,
        sending: false,
        enc: OpusEncoder::new(OpusSettings::default()).map_err(|e| e.to_string())?,
        dec: OpusDecoder::new(PCM_RATE).map_err(|e| e.to_string())?,
        tone,
        rtp_ts: rand::random(),
        next_frame: None,
        heard: Vec::new(),
        reported: false,
    };
    let mut buf = vec![0u8; 2048];
    loop {
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: Value =
                        serde_json::from_str(&line).map_err(|e| format!("bad input line: {e}"))?;
                    if v.get("op").and_then(Value::as_str) == Some("hangup") {
                        return call.hang_up("hangup");
                    }
                    call.on_op(&v)?;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return call.hang_up("input closed"),
            }
        }
        let now = Instant::now();
        call.drive(now)?;
        // Sleep on the socket until the next deadline (leg timer or audio frame), at most 5 ms.
        let mut wait = Duration::from_millis(5);
        for t in [call.leg_timeout, call.next_frame].into_iter().flatten() {
            wait = wait.min(t.saturating_duration_since(now));
        }
        let _ = call
            .sock
            .set_read_timeout(Some(wait.max(Duration::from_micros(200))));
        match call.sock.recv_from(&mut buf) {
            Ok((n, src)) => {
                let now = Instant::now();
                if let Some(leg) = call.leg.as_mut() {
                    if let Err(e) = leg.receive(now, src, call.local, &buf[..n]) {
                        return call.fail(&format!("media: {e}"));
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return call.fail(&format!("socket: {e}")),
        }
    }
}

impl Call {
    fn on_op(&mut self, v: &Value) -> Result<(), String> {
        let op = field(v, "op")?;
        match op {
            "dh_config" => {
                let g = v.get("g").and_then(Value::as_i64).ok_or("missing g")? as i32;
                let p = unhex(field(v, "p")?)?;
                let random = unhex(field(v, "random")?)?;
                let params = DhParams::check(g, &p, &mut rand::thread_rng())
                    .map_err(|e| format!("getDhConfig: {e}"))?;
                let secret = params
                    .secret(&random, || {
                        let mut b = [0u8; 256];
                        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
                        b
                    })
                    .map_err(|e| e.to_string())?;
                if self.args.caller {
                    emit(json!({"ev": "g_a_hash", "hex": hex(&dh::g_a_hash(&secret.public))}));
                } else if let Some(h) = self.g_a_hash.clone() {
                    self.accept(&params, &secret, &h);
                }
                self.params = Some(params);
                self.secret = Some(secret);
            }
            "requested" => {
                let h = unhex(field(v, "g_a_hash")?)?;
                if h.len() != 32 {
                    return self.fail("g_a_hash is not 32 bytes");
                }
                if let (Some(p), Some(s)) = (self.params.clone(), self.secret.clone()) {
                    self.accept(&p, &s, &h);
                }
                self.g_a_hash = Some(h);
            }
            "accepted" => {
                // Caller: phoneCallAccepted{g_b} → key, fingerprint, confirmCall.
                let g_b = unhex(field(v, "g_b")?)?;
                let (params, secret) = self.dh()?;
                let key = match params.shared_key(&secret, &g_b) {
                    Ok(k) => k,
                    Err(e) => return self.fail(&format!("g_b: {e}")),
                };
                let fp = dh::key_fingerprint(&key);
                emit(json!({"ev": "confirm", "g_a": hex(&secret.public), "fingerprint": fp}));
                self.set_key(key, &secret.public);
            }
            "confirmed" => {
                // Callee: phoneCall{g_a_or_b = g_a, key_fingerprint}.
                let g_a = unhex(field(v, "g_a")?)?;
                let fp = v
                    .get("fingerprint")
                    .and_then(Value::as_i64)
                    .ok_or("missing fingerprint")?;
                let committed = self.g_a_hash.clone().unwrap_or_default();
                if let Err(e) = dh::verify_g_a(&g_a, &committed) {
                    return self.fail(&e.to_string());
                }
                let (params, secret) = self.dh()?;
                let key = match params.shared_key(&secret, &g_a) {
                    Ok(k) => k,
                    Err(e) => return self.fail(&format!("g_a: {e}")),
                };
                if let Err(e) = dh::verify_fingerprint(&key, fp) {
                    return self.fail(&e.to_string());
                }
                self.set_key(key, &g_a);
            }
            "connect" => self.connect(v)?,
            "signal" => {
                let bytes = unhex(field(v, "hex")?)?;
                self.on_signal(&bytes)?;
            }
            other => return Err(format!("unknown op {other:?}")),
        }
        Ok(())
    }

    fn dh(&self) -> Result<(DhParams, DhSecret), String> {
        match (&self.params, &self.secret) {
            (Some(p), Some(s)) => Ok((p.clone(), s.clone())),
            _ => Err("DH values before dh_config".into()),
        }
    }

    fn accept(&self, _params: &DhParams, secret: &DhSecret, _g_a_hash: &[u8]) {
        emit(json!({"ev": "accept", "g_b": hex(&secret.public)}));
    }

    fn set_key(&mut self, key: [u8; 256], g_a: &[u8]) {
        let fp = dh::key_fingerprint(&key);
        let emoji = emoji_fingerprint(&key, g_a);
        emit(json!({"ev": "key", "fingerprint": fp, "emoji": emoji}));
        self.key = Some(key);
    }

    fn connect(&mut self, v: &Value) -> Result<(), String> {
        let key = self.key.ok_or("connect before the key exchange finished")?;
        let version = field(v, "version")?;
        let mut framing = SignalingFraming::new(version, key, self.args.caller)
            .map_err(|e| format!("version {version}: {e}"))?;
        // 13.0.0 opens its SCTP association from both sides at once.
        for p in framing.start(Instant::now()) {
            emit(json!({"ev": "signal", "hex": hex(&p)}));
        }
        let relay_only = !v
            .get("p2p_allowed")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let config = TgMediaConfig {
            caller: self.args.caller,
            host_addrs: vec![self.local],
            relay_addrs: vec![],
            relay_only,
        };
        let now = Instant::now();
        let mut leg = TgMediaLeg::new(&config, now).map_err(|e| e.to_string())?;
        let p = leg.local_params();
        let local = LocalMedia {
            ufrag: p.ufrag,
            pwd: p.pwd,
            hash: p.hash,
            fingerprint: p.fingerprint,
            candidates: leg.local_candidates().to_vec(),
            ssrc: leg.audio_ssrc(),
        };
        self.session = Some(SignalingSession::new(self.args.caller, local));
        self.framing = Some(framing);
        self.leg = Some(leg);
        self.leg_timeout = Some(now);
        eprintln!(
            "tgcall-peer: {} on {} speaking {version}",
            if self.args.caller { "caller" } else { "callee" },
            self.local
        );
        Ok(())
    }

    fn on_signal(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (Some(framing), Some(session)) = (self.framing.as_mut(), self.session.as_mut()) else {
            return Err("signalling before connect".into());
        };
        let got = match framing.receive(bytes, Instant::now()) {
            Ok(got) => got,
            Err(e) => {
                // A bad packet is dropped and logged; the call goes on (as tgcalls does).
                eprintln!("tgcall-peer: dropped signalling packet: {e}");
                return Ok(());
            }
        };
        for p in got.replies {
            emit(json!({"ev": "signal", "hex": hex(&p)}));
        }
        for e in got.errors {
            eprintln!("tgcall-peer: dropped signalling payload: {e}");
        }
        for m in got.messages {
            match SignalingMessage::parse(&m) {
                Ok(msg) => {
                    if let Err(e) = session.handle(msg) {
                        return self.fail(&format!("signalling: {e}"));
                    }
                }
                Err(e) => eprintln!("tgcall-peer: ignored signalling message: {e}"),
            }
        }
        Ok(())
    }

    fn drive(&mut self, now: Instant) -> Result<(), String> {
        let (Some(leg), Some(session), Some(framing)) = (
            self.leg.as_mut(),
            self.session.as_mut(),
            self.framing.as_mut(),
        ) else {
            return Ok(());
        };
        while let Some(cmd) = session.poll_command() {
            let r = match cmd {
                MediaCommand::RemoteParams {
                    ufrag,
                    pwd,
                    hash,
                    fingerprint,
                } => leg.set_remote_params(&ufrag, &pwd, &hash, &fingerprint),
                MediaCommand::RemoteCandidate(c) => leg.add_remote_candidate(&c).map(|_| ()),
                MediaCommand::RemoteAudio { ssrc, .. } => {
                    leg.set_remote_audio_ssrc(ssrc);
                    Ok(())
                }
                MediaCommand::SendAudio { .. } => {
                    self.sending = true;
                    Ok(())
                }
            };
            if let Err(e) = r {
                eprintln!("tgcall-peer: media command failed: {e}");
            }
        }
        while let Some(msg) = session.poll_message() {
            match framing.send(&msg.to_json(), now) {
                Ok(packets) => {
                    for p in packets {
                        emit(json!({"ev": "signal", "hex": hex(&p)}));
                    }
                }
                Err(e) => return Err(format!("signalling send: {e}")),
            }
        }
        if framing.poll_timeout().is_some_and(|t| t <= now) {
            for p in framing.handle_timeout(now) {
                emit(json!({"ev": "signal", "hex": hex(&p)}));
            }
        }
        if self.leg_timeout.is_some_and(|t| t <= now) {
            if let Err(e) = leg.handle_timeout(now) {
                return self.fail(&format!("media: {e}"));
            }
        }
        // Audio: a 20 ms frame of our tone whenever one is due.
        if self.sending && leg.is_connected() {
            let due = *self.next_frame.get_or_insert(now);
            if due <= now {
                let mut pcm = [0i16; (PCM_RATE / 50) as usize];
                let mut pkt = [0u8; MAX_PACKET];
                self.tone.fill(&mut pcm);
                let n = self.enc.encode(&pcm, &mut pkt).map_err(|e| e.to_string())?;
                if let Err(e) = leg.send_audio(now, self.rtp_ts, &pkt[..n]) {
                    eprintln!("tgcall-peer: audio not sent: {e}");
                }
                self.rtp_ts = self.rtp_ts.wrapping_add(960); // RTP clock: 48 kHz
                self.next_frame = Some(due + Duration::from_millis(20));
            }
        }
        let mut events = Vec::new();
        loop {
            match leg.poll() {
                Ok(TgMediaOutput::Transmit {
                    destination,
                    contents,
                    ..
                }) => {
                    let _ = self.sock.send_to(&contents, destination);
                }
                Ok(TgMediaOutput::Event(e)) => events.push(e),
                Ok(TgMediaOutput::Timeout(t)) => {
                    self.leg_timeout = Some(t);
                    break;
                }
                Err(e) => return self.fail(&format!("media: {e}")),
            }
        }
        for e in events {
            self.on_media_event(e, now)?;
        }
        if let Some(at) = self.connected_at {
            let secs = self.args.seconds;
            if !self.reported && now.duration_since(at).as_secs_f64() >= secs {
                self.reported = true;
                let tail = &self.heard[self.heard.len().saturating_sub(PCM_RATE as usize)..];
                let ok = hears_tone(tail, PCM_RATE, self.args.expect, self.args.tone);
                emit(json!({"ev": "heard", "freq": self.args.expect, "ok": ok,
                            "rms": rms(tail).round(), "samples": self.heard.len()}));
            }
        }
        Ok(())
    }

    fn on_media_event(&mut self, e: TgMediaEvent, now: Instant) -> Result<(), String> {
        match e {
            TgMediaEvent::Connected => {
                self.connected_at = Some(now);
                emit(json!({"ev": "state", "state": "connected"}));
            }
            TgMediaEvent::Disconnected => {
                emit(json!({"ev": "state", "state": "disconnected"}));
            }
            TgMediaEvent::Audio { payload, .. } => {
                let mut out = vec![0i16; MAX_FRAME_SAMPLES];
                match self.dec.decode(&payload, &mut out) {
                    Ok(n) => self.heard.extend_from_slice(&out[..n]),
                    Err(e) => eprintln!("tgcall-peer: undecodable audio: {e}"),
                }
            }
            TgMediaEvent::DataOpen => {
                let state = SignalingSession::media_state(false).to_json();
                if let Some(leg) = self.leg.as_mut() {
                    let _ = leg.send_data(&state);
                }
            }
            TgMediaEvent::Data(_) => {}
        }
        Ok(())
    }

    fn fail(&mut self, reason: &str) -> Result<(), String> {
        eprintln!("tgcall-peer: call failed: {reason}");
        let _ = self.hang_up(reason);
        Err(reason.to_string())
    }

    fn hang_up(&mut self, reason: &str) -> Result<(), String> {
        if let Some(leg) = self.leg.as_mut() {
            leg.close();
            while let Ok(TgMediaOutput::Transmit {
                destination,
                contents,
                ..
            }) = leg.poll()
            {
                let _ = self.sock.send_to(&contents, destination);
            }
        }
        emit(json!({"ev": "ended", "reason": reason}));
        Ok(())
    }
}
