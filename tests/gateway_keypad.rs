//! The in-call keypad through a real `siptg up` (its embedded simulated Telegram cloud): a
//! gateway with a `keypad_bot` puts the bot's inline keypad into the chat once a call is
//! answered; the Telegram user (a `siptg tgsim-app` on a second device of the answering echo
//! user) presses buttons, and the fake PBX on 127.0.0.1 gets the digits as SIP INFO or as
//! RFC 4733 events in the call's RTP, by the connection's `dtmf`. At hang-up the keypad
//! leaves the chat, and a press after it sends nothing.

mod common;

use common::{free_tcp, siptg, wait_for, Proc, TestNode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UdpSocket;
use tokio::time::Instant;

const BOT_TOKEN: &str = "77:keypad-secret";

/// One `siptg up` of this file at a time: each runs a dataplane, an echo user's media and a
/// Telegram call; the machines that run these suites have two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WORLD: &str = r#"
[[users]]
id = 1
phone = "10000000001"
username = "gateway_tg"
first_name = "Gateway"
[[users]]
id = 2
phone = "10000000002"
username = "echo_tg"
first_name = "Echo"
[[users]]
id = 3
phone = "10000000003"
username = "carol_tg"
first_name = "Carol"
[[users]]
id = 4
phone = "10000000004"
username = "inbound_tg"
first_name = "Inbound"
[[users]]
id = 77
phone = "4200000077"
username = "siptg_keypad_bot"
first_name = "Keypad"
bot = true
bot_token = "77:keypad-secret"
"#;

/// `siptg up`: gateway `gw` (account `gateway`, keypad bot `keypad`) on two IP trunks from
/// 127.0.0.1, `info` (DTMF by SIP INFO) and `rtp` (RFC 4733), told apart by `X-Line`; the
/// echo user answers calls.
fn start(node: &TestNode) -> (Proc, SocketAddr) {
    start_in(node, "", None)
}

/// As [`start`], with `top` at the top of the world file (e.g. `unanswered`), a gateway
/// `ghost` on line `ghost` whose keypad bot is no account of the Storage, and with `pbx` a
/// gateway `inbound` (account `inbound`, user 4, keypad bot `keypad`) whose Telegram calls go
/// to that PBX (`pbx_number` 100, DTMF by INFO).
fn start_in(node: &TestNode, top: &str, pbx: Option<SocketAddr>) -> (Proc, SocketAddr) {
    std::fs::write(node.path("world.toml"), format!("{top}\n{WORLD}")).unwrap();
    let sim = free_tcp();
    let trunk = |name: &str, dtmf: &str| {
        format!(
            "[[connection]]\nname = \"{name}\"\ntype = \"ip\"\nserver = \"127.0.0.1:9\"\nkeepalive = \"0s\"\n\
             trusted_ips = [\"127.0.0.1\"]\ncodecs = [\"PCMA\"]\ndtmf = [{dtmf}]\nheader = \"X-Line: {name}\"\n"
        )
    };
    let cfg = node.write_config(
        "siptg.toml",
        &format!(
            r#"
[storage]
key_file = "var/storage.key"
rpc_timeout = "5s"
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ gateway = "+10000000001", keypad = "{BOT_TOKEN}"{inbound_login} }}
sim_echo_users = ["+10000000002"]
[database]
path = "var/db.redb"
{info}{rtp}{ghost}
[[gateway]]
name = "gw"
account = "gateway"
connections = ["info", "rtp"]
keypad_bot = "keypad"
[[gateway]]
name = "ghost"
account = "gateway"
connections = ["ghost"]
keypad_bot = "ghost"
{inbound}"#,
            info = trunk("info", "\"info\""),
            rtp = trunk("rtp", "\"rfc2833\""),
            ghost = trunk("ghost", "\"info\""),
            inbound_login = if pbx.is_some() { ", inbound = \"+10000000004\"" } else { "" },
            inbound = pbx
                .map(|a| format!(
                    "[[connection]]\nname = \"pbx\"\ntype = \"ip\"\nserver = \"{a}\"\nkeepalive = \"0s\"\n\
                     codecs = [\"PCMA\"]\ndtmf = [\"info\"]\n\
                     [[gateway]]\nname = \"inbound\"\naccount = \"inbound\"\nconnections = [\"pbx\"]\n\
                     pbx_number = \"100\"\nkeypad_bot = \"keypad\"\n"
                ))
                .unwrap_or_default(),
        ),
    );
    let proc = Proc::start(
        &["up", "--config", cfg.to_str().unwrap()],
        &node.path("up.log"),
    );
    wait_for(
        "the gateway and the bot logged in, the echo user online, the dataplane up",
        Duration::from_secs(40),
        || {
            let log = proc.log();
            (log.matches("simulated account logged in").count() >= 2 + usize::from(pbx.is_some())
                && log.contains("demo echo user online")
                && log.contains("connected to the dataplane"))
            .then_some(())
        },
    );
    (proc, sim)
}

/// The echo user's second device: a `siptg tgsim-app` driven by JSON lines.
struct App {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl App {
    async fn start(sim: SocketAddr, phone: &str) -> App {
        let mut child = tokio::process::Command::new(siptg())
            .args(["tgsim-app", "--sim", &sim.to_string(), "--phone", phone])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut app = App {
            child,
            stdin,
            events,
        };
        app.expect("ready", Duration::from_secs(20)).await;
        app
    }

    async fn send(&mut self, cmd: Value) {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
    }

    /// The next event named `name` (others skipped); `None` after `wait`.
    async fn next(&mut self, name: &str, wait: Duration) -> Option<Value> {
        let end = Instant::now() + wait;
        loop {
            let v = tokio::time::timeout_at(end, self.events.recv())
                .await
                .ok()??;
            if v["event"] == name {
                return Some(v);
            }
        }
    }

    async fn expect(&mut self, name: &str, wait: Duration) -> Value {
        self.next(name, wait)
            .await
            .unwrap_or_else(|| panic!("no {name:?} event from the app within {wait:?}"))
    }

    /// Presses `key`: the app's `pressed` event, or its `error`.
    async fn press(&mut self, key: &str) -> Value {
        self.press_cmd(json!({"op": "press", "key": key})).await
    }

    /// Presses `key` on the keyboard before the last one.
    async fn press_on_previous(&mut self, key: &str) -> Value {
        self.press_cmd(json!({"op": "press", "key": key, "previous": true}))
            .await
    }

    async fn press_cmd(&mut self, cmd: Value) -> Value {
        let key = cmd["key"].clone();
        self.send(cmd).await;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let v = tokio::time::timeout_at(end, self.events.recv())
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("no answer to pressing {key}"));
            if v["event"] == "pressed" || (v["event"] == "error" && v["op"] == "press") {
                return v;
            }
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    let head = msg.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A PBX's call on one line: its SIP socket and its RTP socket.
struct PbxCall {
    sip: UdpSocket,
    rtp: std::sync::Arc<UdpSocket>,
    me: SocketAddr,
    to: SocketAddr,
    user: String,
    n: u32,
    /// The gateway's To (with its tag), once answered.
    to_hdr: String,
    /// Where the gateway wants our RTP.
    media: Option<SocketAddr>,
}

impl PbxCall {
    /// Dials `user` on `line` and waits for the answer (ACKed); `events` offers
    /// telephone-event.
    async fn answered(up: &Proc, to: SocketAddr, line: &str, user: &str, events: bool) -> PbxCall {
        let sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rtp = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let me = sip.local_addr().unwrap();
        let n: u32 = rand::random();
        let (fmts, extra) = if events {
            (
                "8 101",
                "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n",
            )
        } else {
            ("8", "")
        };
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP {fmts}\r\na=rtpmap:8 PCMA/8000\r\n{extra}a=ptime:20\r\n",
            rtp.local_addr().unwrap().port()
        );
        let invite = format!(
            "INVITE sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKk{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\nTo: <sip:{user}@{to}>\r\nCall-ID: {n}@keypad\r\nCSeq: 1 INVITE\r\n\
             Contact: <sip:pbx@{me}>\r\nX-Line: {line}\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        sip.send_to(invite.as_bytes(), to).await.unwrap();
        let mut call = PbxCall {
            sip,
            rtp,
            me,
            to,
            user: user.to_string(),
            n,
            to_hdr: String::new(),
            media: None,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let (text, _) = call
                .recv(end.saturating_duration_since(Instant::now()))
                .await
                .unwrap_or_else(|| panic!("the echo user answers the call:\n{}", up.log()));
            let first = text.lines().next().unwrap_or_default().to_string();
            let Some(rest) = first.strip_prefix("SIP/2.0 ") else {
                continue;
            };
            let code: u16 = rest.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if code < 200 {
                continue;
            }
            assert_eq!(code, 200, "the call is answered: {first}\n{}", up.log());
            call.to_hdr = header(&text, "To").unwrap_or_default().to_string();
            let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
            let ip = body
                .lines()
                .find_map(|l| l.strip_prefix("c=IN IP4 "))
                .map(str::trim);
            let port = body
                .lines()
                .find_map(|l| l.strip_prefix("m=audio "))
                .and_then(|l| l.split(' ').next());
            if let (Some(ip), Some(port)) = (ip, port) {
                call.media = format!("{ip}:{port}").parse().ok();
            }
            call.ack().await;
            return call;
        }
    }

    async fn recv(&self, wait: Duration) -> Option<(String, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        let (len, from) = tokio::time::timeout(wait, self.sip.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some((String::from_utf8_lossy(&buf[..len]).to_string(), from))
    }

    async fn ack(&self) {
        let (me, to, user, n) = (self.me, self.to, &self.user, self.n);
        let ack = format!(
            "ACK sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKa{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\nTo: {}\r\nCall-ID: {n}@keypad\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            self.to_hdr
        );
        self.sip.send_to(ack.as_bytes(), to).await.unwrap();
    }

    /// Answers a request from the gateway with 200 OK.
    async fn ok(&self, req: &str, from: SocketAddr) {
        let resp = format!(
            "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
            header(req, "Via").unwrap_or_default(),
            header(req, "From").unwrap_or_default(),
            header(req, "To").unwrap_or_default(),
            header(req, "Call-ID").unwrap_or_default(),
            header(req, "CSeq").unwrap_or_default(),
        );
        self.sip.send_to(resp.as_bytes(), from).await.unwrap();
    }

    /// The digits of the INFO requests that arrive within `wait` (each answered 200 OK).
    async fn info_digits(&self, count: usize, wait: Duration) -> String {
        let end = Instant::now() + wait;
        let mut digits = String::new();
        while digits.len() < count {
            let Some((text, from)) = self
                .recv(end.saturating_duration_since(Instant::now()))
                .await
            else {
                break;
            };
            if !text.starts_with("INFO ") {
                continue;
            }
            self.ok(&text, from).await;
            let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
            if let Some(d) = body
                .lines()
                .find_map(|l| l.strip_prefix("Signal="))
                .and_then(|v| v.trim().chars().next())
            {
                digits.push(d);
            }
        }
        digits
    }

    /// Sends PCMA silence to the gateway every 20 ms (a live stream, as a phone's).
    fn talk(&self) -> tokio::task::JoinHandle<()> {
        let (rtp, to) = (self.rtp.clone(), self.media.expect("the answer's SDP"));
        tokio::spawn(async move {
            let mut seq: u16 = 0;
            let mut ts: u32 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for _ in 0..3000 {
                tick.tick().await;
                let mut p = vec![0x80, 8];
                p.extend_from_slice(&seq.to_be_bytes());
                p.extend_from_slice(&ts.to_be_bytes());
                p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                p.extend(std::iter::repeat_n(0xd5u8, 160));
                let _ = rtp.send_to(&p, to).await;
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(160);
            }
        })
    }

    /// The RFC 4733 digits (one per event, at its end) that arrive on our RTP socket within
    /// `wait`.
    async fn rfc4733_digits(&self, count: usize, wait: Duration) -> String {
        let end = Instant::now() + wait;
        let mut digits = String::new();
        let mut last_ts = None;
        let mut buf = vec![0u8; 2048];
        while digits.len() < count {
            let Ok(Ok((len, _))) = tokio::time::timeout_at(end, self.rtp.recv_from(&mut buf)).await
            else {
                break;
            };
            let p = &buf[..len];
            if len < 16 || p[1] & 0x7f != 101 {
                continue;
            }
            let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
            let (event, end_bit) = (p[12], p[13] & 0x80 != 0);
            // The end packet is sent three times: count each event once.
            if end_bit && last_ts != Some(ts) {
                last_ts = Some(ts);
                let d = match event {
                    0..=9 => char::from(b'0' + event),
                    10 => '*',
                    11 => '#',
                    12..=15 => char::from(b'A' + event - 12),
                    _ => '?',
                };
                digits.push(d);
            }
        }
        digits
    }

    /// Hangs up: BYE, answered 200.
    async fn bye(&self) {
        let (me, to, user, n) = (self.me, self.to, &self.user, self.n);
        let bye = format!(
            "BYE sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKb{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\nTo: {}\r\nCall-ID: {n}@keypad\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            self.to_hdr
        );
        self.sip.send_to(bye.as_bytes(), to).await.unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let (text, _) = self
                .recv(end.saturating_duration_since(Instant::now()))
                .await
                .expect("the BYE is answered");
            if text.starts_with("SIP/2.0 ")
                && header(&text, "CSeq").is_some_and(|c| c.ends_with("BYE"))
            {
                assert!(text.starts_with("SIP/2.0 200"), "{text}");
                return;
            }
        }
    }
}

/// The keypad the app sees arrive: via the bot, the phone's twelve keys.
async fn keypad_arrives(app: &mut App, up: &Proc) -> i64 {
    let k = app
        .next("keypad", Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no keypad in the chat:\n{}", up.log()));
    assert_eq!(k["from"], 1, "the gateway's account sent it: {k}");
    assert_eq!(k["via_bot"], 77, "via the keypad bot: {k}");
    let keys: Vec<&str> = k["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        keys,
        ["1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "0", "#"]
    );
    k["id"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keypad_presses_reach_the_pbx_as_info_and_the_keypad_leaves_at_hang_up() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = TestNode::new();
    let (up, sim) = start(&node);
    let mut app = App::start(sim, "+10000000002").await;

    let call = PbxCall::answered(&up, node.sip, "info", "+10000000002", false).await;
    let keypad = keypad_arrives(&mut app, &up).await;
    let p = app.press("5").await;
    assert_eq!(p["answer"], "Sent: 5", "the bot answers the press: {p}");
    assert_eq!(app.press("#").await["answer"], "Sent: #");
    assert_eq!(
        call.info_digits(2, Duration::from_secs(10)).await,
        "5#",
        "the presses reach the PBX as INFO:\n{}",
        up.log()
    );

    call.bye().await;
    let d = app
        .next("deleted", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the keypad is not deleted at hang-up:\n{}", up.log()));
    assert!(d["ids"].as_array().unwrap().contains(&json!(keypad)), "{d}");
    // A press on the gone keypad is refused by Telegram, and no digit reaches the PBX.
    let late = app.press("7").await;
    assert_eq!(late["event"], "error", "{late}");
    assert_eq!(late["error"], "MESSAGE_ID_INVALID", "{late}");
    assert_eq!(call.info_digits(1, Duration::from_secs(2)).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keypad_presses_reach_the_pbx_as_rfc4733_events_when_the_line_says_so() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = TestNode::new();
    let (up, sim) = start(&node);
    let mut app = App::start(sim, "+10000000002").await;

    let call = PbxCall::answered(&up, node.sip, "rtp", "+10000000002", true).await;
    let talking = call.talk();
    keypad_arrives(&mut app, &up).await;
    assert_eq!(app.press("5").await["answer"], "Sent: 5");
    assert_eq!(app.press("#").await["answer"], "Sent: #");
    assert_eq!(
        call.rfc4733_digits(2, Duration::from_secs(10)).await,
        "5#",
        "the presses reach the PBX as RFC 4733 events:\n{}",
        up.log()
    );
    // Not as INFO as well.
    assert_eq!(call.info_digits(1, Duration::from_millis(500)).await, "");
    call.bye().await;
    app.expect("deleted", Duration::from_secs(10)).await;
    talking.abort();
}

/// The keypad stays in the chat when Telegram does not answer its deletion: a press on it
/// after the hang-up reaches the bot, which says the call has ended, and no digit goes
/// anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_press_on_an_ended_calls_keypad_is_answered_and_sends_no_dtmf() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = TestNode::new();
    let (up, sim) = start_in(&node, r#"unanswered = ["messages.deleteMessages"]"#, None);
    let mut app = App::start(sim, "+10000000002").await;

    let call = PbxCall::answered(&up, node.sip, "info", "+10000000002", false).await;
    keypad_arrives(&mut app, &up).await;
    assert_eq!(app.press("1").await["answer"], "Sent: 1");
    assert_eq!(call.info_digits(1, Duration::from_secs(10)).await, "1");
    call.bye().await;
    wait_for("the call ended", Duration::from_secs(10), || {
        up.log().contains("gateway call ended").then_some(())
    });
    // A second call of the same user is live meanwhile: the old keypad must not reach it.
    let second = PbxCall::answered(&up, node.sip, "info", "+10000000002", false).await;
    keypad_arrives(&mut app, &up).await;
    let old = app.press_on_previous("9").await;
    assert_eq!(old["answer"], "The call has ended", "{old}\n{}", up.log());
    assert_eq!(second.info_digits(1, Duration::from_secs(2)).await, "");
    assert_eq!(call.info_digits(1, Duration::from_millis(200)).await, "");
    // The new keypad works.
    assert_eq!(app.press("2").await["answer"], "Sent: 2");
    assert_eq!(second.info_digits(1, Duration::from_secs(10)).await, "2");
    second.bye().await;
}

/// A keypad bot that is not logged in: the call is answered and goes on without a keypad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_bot_a_call_goes_on_without_a_keypad() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = TestNode::new();
    let (up, sim) = start(&node);
    let mut app = App::start(sim, "+10000000002").await;
    let call = PbxCall::answered(&up, node.sip, "ghost", "+10000000002", false).await;
    wait_for("the keypad failure logged", Duration::from_secs(10), || {
        up.log().contains("no keypad for the call").then_some(())
    });
    assert!(
        up.log().contains("keypad bot \"ghost\" is not an account"),
        "{}",
        up.log()
    );
    assert!(app.next("keypad", Duration::from_secs(1)).await.is_none());
    // Still up: the BYE is answered 200.
    call.bye().await;
}

/// `siptg account login NAME --bot-token …` logs a bot into the Storage's database (against
/// a `siptg tgsim`); a wrong token is refused; `account list` shows it as a bot.
#[test]
fn the_account_cli_logs_a_bot_in_by_its_token() {
    let node = TestNode::new();
    std::fs::write(node.path("world.toml"), WORLD).unwrap();
    let sim = free_tcp();
    let _tgsim = Proc::start(
        &[
            "tgsim",
            "--listen",
            &sim.to_string(),
            "--world",
            node.path("world.toml").to_str().unwrap(),
        ],
        &node.path("tgsim.log"),
    );
    wait_for("tgsim listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(sim).ok()
    });
    let cfg = node.write_config(
        "siptg.toml",
        &format!(
            "[storage]\nkey_file = \"var/storage.key\"\n[telegram]\nbackend = \"sim\"\nsim_address = \"{sim}\"\n\
             sim_embedded = false\n[database]\npath = \"var/db.redb\"\n"
        ),
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new(siptg())
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("SIPTG_BOT_TOKEN")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = run(&["account", "login", "keypad", "--bot-token", "77:wrong"]);
    assert!(!ok && text.contains("ACCESS_TOKEN_INVALID"), "{text}");
    let (ok, text) = run(&["account", "login", "keypad", "--bot-token", BOT_TOKEN]);
    assert!(ok, "{text}");
    assert!(
        text.contains("logged in as bot 77 @siptg_keypad_bot"),
        "{text}"
    );
    let (ok, text) = run(&["account", "list"]);
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("keypad"))
        .unwrap_or_default();
    assert!(line.contains("active") && line.contains("bot 77"), "{text}");
}

/// A PBX that Telegram users' calls ring (the `inbound` gateway's connection).
struct InboundPbx {
    sock: UdpSocket,
}

impl InboundPbx {
    /// The next request with `method` within `wait` (anything else skipped).
    async fn request(&self, method: &str, wait: Duration) -> Option<(String, SocketAddr)> {
        let end = Instant::now() + wait;
        let mut buf = vec![0u8; 65536];
        loop {
            let (len, from) = tokio::time::timeout_at(end, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            let text = String::from_utf8_lossy(&buf[..len]).to_string();
            if text.starts_with(&format!("{method} ")) {
                return Some((text, from));
            }
        }
    }

    /// Answers `req` with `code`; an INVITE's 200 carries our tag, SDP and Contact.
    async fn respond(&self, req: &str, from: SocketAddr, code: u16) {
        let me = self.sock.local_addr().unwrap();
        let to = header(req, "To").unwrap_or_default();
        let invite = req.starts_with("INVITE ");
        let to = if invite && !to.contains(";tag=") {
            format!("{to};tag=pbx")
        } else {
            to.to_string()
        };
        let body = if invite {
            format!(
                "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n",
                me.port() + 2
            )
        } else {
            String::new()
        };
        let ctype = if invite {
            "Content-Type: application/sdp\r\n"
        } else {
            ""
        };
        let msg = format!(
            "SIP/2.0 {code} OK\r\nVia: {}\r\nFrom: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
             Contact: <sip:100@{me}>\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
            header(req, "Via").unwrap_or_default(),
            header(req, "From").unwrap_or_default(),
            header(req, "Call-ID").unwrap_or_default(),
            header(req, "CSeq").unwrap_or_default(),
            body.len()
        );
        self.sock.send_to(msg.as_bytes(), from).await.unwrap();
    }
}

/// A Telegram user's call to a gateway, answered by the PBX: the keypad comes to the caller's
/// chat and a press reaches the PBX as INFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telegram_callers_keypad_reaches_the_pbx_too() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let pbx = InboundPbx {
        sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let node = TestNode::new();
    let (up, sim) = start_in(&node, "", Some(pbx.sock.local_addr().unwrap()));
    let mut carol = App::start(sim, "+10000000003").await;
    let mut invite = None;
    for _ in 0..10 {
        carol
            .send(json!({"op": "call", "peer": "@inbound_tg", "g_a_hash": "03".repeat(32)}))
            .await;
        if let Some(i) = pbx.request("INVITE", Duration::from_secs(3)).await {
            invite = Some(i);
            break;
        }
    }
    let (invite, from) =
        invite.unwrap_or_else(|| panic!("Carol's call rings the PBX:\n{}", up.log()));
    pbx.respond(&invite, from, 200).await;
    pbx.request("ACK", Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the answer is ACKed:\n{}", up.log()));
    let k = carol
        .next("keypad", Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no keypad in Carol's chat:\n{}", up.log()));
    assert_eq!(
        (k["from"].as_i64(), k["via_bot"].as_i64()),
        (Some(4), Some(77)),
        "{k}"
    );
    assert_eq!(carol.press("5").await["answer"], "Sent: 5");
    let (info, from) = pbx
        .request("INFO", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the press reaches the PBX:\n{}", up.log()));
    assert!(info.contains("Signal=5"), "{info}");
    assert_eq!(header(&info, "Call-ID"), header(&invite, "Call-ID"));
    pbx.respond(&info, from, 200).await;
}
