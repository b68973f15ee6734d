//! `siptg tgcall-peer`: one Telegram call endpoint (caller or callee) whose MTProto side is
//! played by a harness over stdin/stdout, one JSON object per line.
//!
//! It runs the product's real path: the signalling (DH and key checks, encryption, framing, the
//! session) drives a Telegram leg in a dataplane shard over the control socket, and that leg is
//! bridged to a plain G.711 leg — the SIP side of a gateway call. A small "phone" on a UDP socket
//! plays a tone into the SIP leg and listens to what comes back, so a tone crosses
//! G.711 → Opus → Telegram and back exactly as it would for a PBX. The conformance suite
//! (`tests/interop/run tgcalls`) runs this against ntgcalls and against itself, relaying DH values
//! and signalling bytes exactly as Telegram's servers would.
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

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use siptg_control::dataplane::{latching_leg, telegram_leg, DataplaneClient};
use siptg_control::tgcall::dh::{self, DhParams, DhSecret};
use siptg_control::tgcall::emoji::emoji_fingerprint;
use siptg_control::tgcall::framing::SignalingFraming;
use siptg_control::tgcall::messages::SignalingMessage;
use siptg_control::tgcall::session::{LocalMedia, MediaCommand, SignalingSession};
use siptg_dataplane::tgmedia::g711::Law;
use siptg_dataplane::tgmedia::opus::{hears_tone, rms, Tone};
use siptg_dataplane::{DataplaneConfig, DriverChoice};
use siptg_proto::{
    Codec, Event, LegId, SessionId, TelegramEvent, TelegramLegSpec, TelegramOp, TurnServer,
};
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;

/// The SIP side's PCM rate (G.711).
const RATE: u32 = 8_000;

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

/// Lower-case hex (the JSON-lines tools carry bytes so).
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex; an odd length or a non-hex digit is an error.
pub(crate) fn unhex(s: &str) -> Result<Vec<u8>, String> {
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

/// The call once `connect` set it up: dataplane session, legs, signalling.
struct Media {
    session: SessionId,
    tg_leg: LegId,
    framing: SignalingFraming,
    signaling: SignalingSession,
    /// The "phone" on the SIP leg: sends our tone as PCMA, hears the far end.
    phone: UdpSocket,
    sip_leg_addr: SocketAddr,
}

struct Call {
    args: PeerArgs,
    dp: DataplaneClient,
    params: Option<DhParams>,
    secret: Option<DhSecret>,
    g_a_hash: Option<Vec<u8>>,
    key: Option<[u8; 256]>,
    media: Option<Media>,
    connected_at: Option<Instant>,
    sending: bool,
    heard: Vec<i16>,
    reported: bool,
}

/// Runs the peer until hang-up or end of input.
pub fn run(args: PeerArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(main(args))
}

/// Starts a one-core dataplane in this process (the same code `siptg dataplane` runs) and
/// connects to its control socket.
async fn start_dataplane(bind: IpAddr) -> Result<(DataplaneClient, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 10;
    let cfg = DataplaneConfig {
        cores: vec![0],
        pin_cores: false,
        port_min: base,
        port_max: base + 9,
        media_ip: bind,
        socket: dir.path().join("dp.sock"),
        rtp_timeout: Duration::from_secs(30),
        stats_interval: None,
        driver: DriverChoice::Auto,
        poll_interval: Duration::from_micros(300),
    };
    let running = siptg_dataplane::Running::start(&cfg).map_err(|e| format!("dataplane: {e}"))?;
    std::thread::spawn(move || {
        if let Err(e) = running.serve() {
            eprintln!("tgcall-peer: dataplane stopped: {e}");
        }
    });
    let client = DataplaneClient::connect(&cfg.socket, "tgcall-peer")
        .await
        .map_err(|e| format!("dataplane socket: {e}"))?;
    Ok((client, dir))
}

async fn main(args: PeerArgs) -> Result<(), String> {
    let (dp, _dir) = start_dataplane(args.bind).await?;
    let mut events = dp.events();
    let mut call = Call {
        args,
        dp,
        params: None,
        secret: None,
        g_a_hash: None,
        key: None,
        media: None,
        connected_at: None,
        sending: false,
        heard: Vec::new(),
        reported: false,
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut tone = Tone::new(call.args.tone, 8000.0, RATE);
    let (mut seq, mut ts, ssrc) = (0u16, 0u32, rand::random::<u32>());
    let mut buf = vec![0u8; 2048];
    loop {
        let phone = call.media.as_ref().map(|m| &m.phone);
        tokio::select! {
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(l)) => l,
                    _ => return call.hang_up("input closed").await,
                };
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad input line: {e}"))?;
                if v.get("op").and_then(Value::as_str) == Some("hangup") {
                    return call.hang_up("hangup").await;
                }
                if let Err(e) = call.on_op(&v).await {
                    call.hang_up(&e).await?;
                    return Err(e);
                }
                call.flush().await?;
            }
            ev = events.recv() => {
                match ev {
                    Ok(Event::Telegram { session, event, .. })
                        if call.media.as_ref().is_some_and(|m| m.session == session) =>
                    {
                        if let Err(e) = call.on_event(event).await {
                            call.hang_up(&e).await?;
                            return Err(e);
                        }
                        call.flush().await?;
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return call.hang_up("dataplane gone").await,
                }
            }
            got = async { phone.expect("guarded").recv_from(&mut buf).await }, if phone.is_some() => {
                // What the SIP leg sends the phone: the far end's audio as G.711.
                if let Ok((n, _)) = got {
                    if n > 12 && call.connected_at.is_some() {
                        let law = Law::from_payload_type(buf[1] & 0x7f).unwrap_or(Law::A);
                        let mut pcm = vec![0i16; n - 12];
                        law.decode(&buf[12..n], &mut pcm);
                        call.heard.extend_from_slice(&pcm);
                    }
                }
            }
            _ = tick.tick() => {
                if let (true, Some(m)) = (call.sending, call.media.as_ref()) {
                    // 20 ms of our tone as PCMA into the SIP leg, as a PBX would send it.
                    let mut pcm = [0i16; 160];
                    tone.fill(&mut pcm);
                    let mut pkt = [0u8; 172];
                    pkt[0] = 0x80;
                    pkt[1] = 8;
                    pkt[2..4].copy_from_slice(&seq.to_be_bytes());
                    pkt[4..8].copy_from_slice(&ts.to_be_bytes());
                    pkt[8..12].copy_from_slice(&ssrc.to_be_bytes());
                    Law::A.encode(&pcm, &mut pkt[12..]);
                    let _ = m.phone.send_to(&pkt, m.sip_leg_addr).await;
                    seq = seq.wrapping_add(1);
                    ts = ts.wrapping_add(160);
                }
                call.framing_timers().await?;
                call.report();
            }
        }
    }
}

impl Call {
    async fn on_op(&mut self, v: &Value) -> Result<(), String> {
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
                } else if self.g_a_hash.is_some() {
                    emit(json!({"ev": "accept", "g_b": hex(&secret.public)}));
                }
                self.params = Some(params);
                self.secret = Some(secret);
            }
            "requested" => {
                let h = unhex(field(v, "g_a_hash")?)?;
                if h.len() != 32 {
                    return Err("g_a_hash is not 32 bytes".into());
                }
                if let Some(s) = &self.secret {
                    emit(json!({"ev": "accept", "g_b": hex(&s.public)}));
                }
                self.g_a_hash = Some(h);
            }
            "accepted" => {
                // Caller: phoneCallAccepted{g_b} → key, fingerprint, confirmCall.
                let g_b = unhex(field(v, "g_b")?)?;
                let (params, secret) = self.dh()?;
                let key = params
                    .shared_key(&secret, &g_b)
                    .map_err(|e| format!("g_b: {e}"))?;
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
                dh::verify_g_a(&g_a, &committed).map_err(|e| e.to_string())?;
                let (params, secret) = self.dh()?;
                let key = params
                    .shared_key(&secret, &g_a)
                    .map_err(|e| format!("g_a: {e}"))?;
                dh::verify_fingerprint(&key, fp).map_err(|e| e.to_string())?;
                self.set_key(key, &g_a);
            }
            "connect" => self.connect(v).await?,
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

    fn set_key(&mut self, key: [u8; 256], g_a: &[u8]) {
        let fp = dh::key_fingerprint(&key);
        let emoji = emoji_fingerprint(&key, g_a);
        emit(json!({"ev": "key", "fingerprint": fp, "emoji": emoji}));
        self.key = Some(key);
    }

    /// `phoneCall` arrived: open the dataplane session with a Telegram leg bridged to a G.711
    /// leg, and start the signalling.
    async fn connect(&mut self, v: &Value) -> Result<(), String> {
        let key = self.key.ok_or("connect before the key exchange finished")?;
        let version = field(v, "version")?;
        let mut framing = SignalingFraming::new(version, key, self.args.caller)
            .map_err(|e| format!("version {version}: {e}"))?;
        let relay_only = !v
            .get("p2p_allowed")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut turn = Vec::new();
        for srv in v
            .get("servers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !srv.get("turn").and_then(Value::as_bool).unwrap_or(false) {
                continue;
            }
            let ip: IpAddr = field(srv, "ip")?
                .parse()
                .map_err(|e| format!("TURN server ip: {e}"))?;
            let port = srv.get("port").and_then(Value::as_u64).unwrap_or(3478) as u16;
            turn.push(TurnServer {
                addr: SocketAddr::new(ip, port),
                username: field(srv, "username")?.to_string(),
                password: field(srv, "password")?.to_string(),
            });
        }
        if relay_only && turn.is_empty() {
            return Err("relay-only call without a TURN server".into());
        }
        let dp = &self.dp;
        let session = dp
            .create_session("tgcall-peer")
            .await
            .map_err(|e| e.to_string())?;
        let tg = dp
            .add_leg(
                session,
                telegram_leg(TelegramLegSpec {
                    caller: self.args.caller,
                    relay_only,
                    turn,
                    connect_timeout_ms: 20_000,
                }),
            )
            .await
            .map_err(|e| format!("telegram leg: {e}"))?;
        let local = tg
            .telegram
            .clone()
            .ok_or("dataplane gave no Telegram setup")?;
        let phone = UdpSocket::bind((self.args.bind, 0))
            .await
            .map_err(|e| e.to_string())?;
        let phone_addr = phone.local_addr().map_err(|e| e.to_string())?;
        let sip = dp
            .add_leg(session, latching_leg(Codec::pcma(), Some(phone_addr)))
            .await
            .map_err(|e| format!("SIP leg: {e}"))?;
        dp.bridge(session, tg.leg, sip.leg)
            .await
            .map_err(|e| e.to_string())?;
        for p in framing.start(Instant::now()) {
            emit(json!({"ev": "signal", "hex": hex(&p)}));
        }
        let signaling = SignalingSession::new(
            self.args.caller,
            LocalMedia {
                ufrag: local.ufrag,
                pwd: local.pwd,
                hash: local.hash,
                fingerprint: local.fingerprint,
                candidates: local.candidates,
                ssrc: local.ssrc,
            },
        );
        eprintln!(
            "tgcall-peer: {} speaking {version}; Telegram leg {} bridged to G.711 leg {}",
            if self.args.caller { "caller" } else { "callee" },
            tg.local,
            sip.local
        );
        self.media = Some(Media {
            session,
            tg_leg: tg.leg,
            framing,
            signaling,
            phone,
            sip_leg_addr: sip.local,
        });
        Ok(())
    }

    fn on_signal(&mut self, bytes: &[u8]) -> Result<(), String> {
        let m = self.media.as_mut().ok_or("signalling before connect")?;
        let got = match m.framing.receive(bytes, Instant::now()) {
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
        for msg in got.messages {
            match SignalingMessage::parse(&msg) {
                Ok(msg) => m
                    .signaling
                    .handle(msg)
                    .map_err(|e| format!("signalling: {e}"))?,
                Err(e) => eprintln!("tgcall-peer: ignored signalling message: {e}"),
            }
        }
        Ok(())
    }

    async fn on_event(&mut self, event: TelegramEvent) -> Result<(), String> {
        match event {
            TelegramEvent::Connected => {
                self.connected_at = Some(Instant::now());
                emit(json!({"ev": "state", "state": "connected"}));
            }
            TelegramEvent::Disconnected => emit(json!({"ev": "state", "state": "disconnected"})),
            TelegramEvent::Failed(why) => return Err(format!("media: {why}")),
            TelegramEvent::LocalCandidate(c) => {
                if let Some(m) = self.media.as_mut() {
                    m.signaling.add_local_candidates(vec![c]);
                }
            }
            TelegramEvent::DataOpen => {
                if let Some(m) = &self.media {
                    let state = SignalingSession::media_state(false).to_json();
                    let _ = self
                        .dp
                        .telegram(m.session, m.tg_leg, TelegramOp::SendData(state))
                        .await;
                }
            }
            TelegramEvent::Data(_) => {}
        }
        Ok(())
    }

    /// Sends what the signalling queued: media commands to the dataplane, messages to the peer.
    async fn flush(&mut self) -> Result<(), String> {
        let Some(m) = self.media.as_mut() else {
            return Ok(());
        };
        while let Some(cmd) = m.signaling.poll_command() {
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
                MediaCommand::SendAudio { payload_type } => {
                    self.sending = true;
                    TelegramOp::SendAudio { payload_type }
                }
            };
            if let Err(e) = self.dp.telegram(m.session, m.tg_leg, op).await {
                eprintln!("tgcall-peer: media command refused: {e}");
            }
        }
        let now = Instant::now();
        while let Some(msg) = m.signaling.poll_message() {
            for p in m
                .framing
                .send(&msg.to_json(), now)
                .map_err(|e| format!("signalling send: {e}"))?
            {
                emit(json!({"ev": "signal", "hex": hex(&p)}));
            }
        }
        Ok(())
    }

    async fn framing_timers(&mut self) -> Result<(), String> {
        if let Some(m) = self.media.as_mut() {
            let now = Instant::now();
            if m.framing.poll_timeout().is_some_and(|t| t <= now) {
                for p in m.framing.handle_timeout(now) {
                    emit(json!({"ev": "signal", "hex": hex(&p)}));
                }
            }
        }
        self.flush().await
    }

    /// After `--seconds` of connected audio: did the far end's tone arrive as that tone?
    fn report(&mut self) {
        let Some(at) = self.connected_at else { return };
        if self.reported || at.elapsed().as_secs_f64() < self.args.seconds {
            return;
        }
        self.reported = true;
        let tail = &self.heard[self.heard.len().saturating_sub(RATE as usize)..];
        let ok = hears_tone(tail, RATE, self.args.expect, self.args.tone);
        emit(json!({"ev": "heard", "freq": self.args.expect, "ok": ok,
                    "rms": rms(tail).round(), "samples": self.heard.len()}));
    }

    async fn hang_up(&mut self, reason: &str) -> Result<(), String> {
        if let Some(m) = self.media.take() {
            // Deleting the session closes the Telegram leg (DTLS close, TURN released).
            let _ = self.dp.delete_session(m.session).await;
        }
        emit(json!({"ev": "ended", "reason": reason}));
        Ok(())
    }
}
