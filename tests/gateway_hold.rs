//! Call hold on a gateway call, against a real `siptg up` (embedded simulated Telegram cloud,
//! the demo's echo user as the Telegram side, which reflects the audio it hears): a fake PBX
//! on 127.0.0.1 calls the echo user, talks, holds with `a=sendonly` (music on hold: it keeps
//! sending), then with `a=inactive` and silence for longer than the RTP timeout, and resumes.
//! Asserted: each 200 OK mirrors the direction, nothing reaches the PBX while it holds, the
//! Telegram user's app receives `MediaState` muted true then false, the call survives the
//! silent hold, the echo comes back after the resume, and the RTP timeout still ends a call
//! that falls silent once resumed.

mod common;

use common::{free_tcp, Proc, TestNode};
use siptg_dataplane::tgmedia::g711::Law;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORLD: &str = r#"
[flood]
calls_per_minute = 100
stranger_calls = 100
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
username = "private_one"
first_name = "Private"
calls = "nobody"
"#;

/// The dataplane's RTP timeout in this test (the default is 10 s; 1 s is the minimum).
const RTP_TIMEOUT: Duration = Duration::from_secs(3);

fn config(sim: SocketAddr) -> String {
    format!(
        r#"
[storage]
key_file = "var/storage.key"
rpc_timeout = "2s"
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ gateway = "+10000000001" }}
sim_echo_users = ["+10000000002"]
[database]
path = "var/db.redb"
[[connection]]
name = "main"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
codecs = ["PCMA"]
[[gateway]]
name = "gw"
account = "gateway"
connections = ["main"]
"#
    )
}

struct Up {
    node: TestNode,
    _proc: Proc,
}

impl Up {
    fn start() -> Self {
        let node = TestNode::new();
        std::fs::write(node.path("world.toml"), WORLD).unwrap();
        let cfg = node.write_config("siptg.toml", &config(free_tcp()));
        // The common config has the [dataplane] table: the short timeout goes into it.
        let text = std::fs::read_to_string(&cfg).unwrap().replacen(
            "[dataplane]\n",
            &format!(
                "[dataplane]\nrtp_timeout = \"{}s\"\n",
                RTP_TIMEOUT.as_secs()
            ),
            1,
        );
        std::fs::write(&cfg, text).unwrap();
        let proc = Proc::start(
            &["up", "--config", cfg.to_str().unwrap()],
            &node.path("up.log"),
        );
        let end = Instant::now() + Duration::from_secs(40);
        let mut last = (0, String::new());
        while Instant::now() < end {
            last = common::sip_invite(node.sip, "", "+10000000003");
            if last.0 == 403 {
                return Up { node, _proc: proc };
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let log = std::fs::read_to_string(node.path("up.log")).unwrap_or_default();
        panic!("siptg up not ready (last answer {last:?}); its log:\n{log}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.node.path("up.log")).unwrap_or_default()
    }

    /// What the echo user's app read in the gateway's `MediaState`s, in order.
    fn media_states(&self) -> Vec<bool> {
        self.log()
            .lines()
            .filter_map(|l| {
                let (_, v) = l.split_once("the caller's MediaState says muted=")?;
                v.trim().parse().ok()
            })
            .collect()
    }
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

/// The PBX's RTP: a 440 Hz tone while `sending`, and counters of what comes back (every
/// packet, and those that carry sound: the echo of the tone).
struct Media {
    sock: UdpSocket,
    sending: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    loud: Arc<AtomicU64>,
}

impl Media {
    fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Media {
            sock,
            sending: Arc::new(AtomicBool::new(true)),
            received: Arc::new(AtomicU64::new(0)),
            loud: Arc::new(AtomicU64::new(0)),
        }
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    /// Starts sending to `to` and counting what arrives.
    fn run(&self, to: SocketAddr) {
        let tx = self.sock.try_clone().unwrap();
        let sending = self.sending.clone();
        std::thread::spawn(move || {
            let ssrc = rand_u32();
            let mut pcm = [0i16; 160];
            let mut payload = [0u8; 160];
            let start = Instant::now();
            for n in 0u32.. {
                if sending.load(Ordering::Relaxed) {
                    for (i, s) in pcm.iter_mut().enumerate() {
                        let t = (n * 160 + i as u32) as f64 / 8000.0;
                        *s = (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
                    }
                    Law::A.encode(&pcm, &mut payload);
                    let mut pkt = vec![0x80, 8];
                    pkt.extend_from_slice(&(n as u16).to_be_bytes());
                    pkt.extend_from_slice(&(n * 160).to_be_bytes());
                    pkt.extend_from_slice(&ssrc.to_be_bytes());
                    pkt.extend_from_slice(&payload);
                    if tx.send_to(&pkt, to).is_err() {
                        return;
                    }
                }
                let next = start + Duration::from_millis(20 * (n as u64 + 1));
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        let rx = self.sock.try_clone().unwrap();
        let (received, loud) = (self.received.clone(), self.loud.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut pcm = [0i16; 1024];
            loop {
                let Ok(len) = rx.recv(&mut buf) else {
                    continue;
                };
                if len <= 12 || buf[1] & 0x7f != 8 {
                    continue; // not PCMA audio (telephone-event, RTCP)
                }
                received.fetch_add(1, Ordering::Relaxed);
                let payload = &buf[12..len];
                let n = payload.len().min(pcm.len());
                Law::A.decode(&payload[..n], &mut pcm[..n]);
                let energy =
                    pcm[..n].iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / n.max(1) as f64;
                if energy.sqrt() > 300.0 {
                    loud.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.loud.load(Ordering::Relaxed),
        )
    }
}

/// The PBX's side of the dialog.
struct Pbx {
    sock: UdpSocket,
    me: SocketAddr,
    gw: SocketAddr,
    n: u32,
    cseq: u32,
    to: String,
    target: String,
    media_port: u16,
}

impl Pbx {
    fn sdp(&self, version: u32, direction: &str) -> String {
        format!(
            "v=0\r\no=- 1 {version} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
             a=fmtp:101 0-16\r\na={direction}\r\n",
            self.media_port
        )
    }

    fn invite(&self, uri: &str, to: &str, direction: &str) -> String {
        let (me, n, cseq) = (self.me, self.n, self.cseq);
        let sdp = self.sdp(cseq, direction);
        format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKh{n}x{cseq};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\nTo: {to}\r\nCall-ID: {n}@hold\r\nCSeq: {cseq} INVITE\r\n\
             Contact: <sip:pbx@{me}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
    }

    fn ack(&self) {
        let (me, n, cseq) = (self.me, self.n, self.cseq);
        let ack = format!(
            "ACK {} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKa{n}x{cseq};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\nTo: {}\r\nCall-ID: {n}@hold\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
            self.target, self.to
        );
        self.sock.send_to(ack.as_bytes(), self.gw).unwrap();
    }

    /// The next SIP message within `wait`; a BYE from the gateway is answered and returned.
    fn recv(&self, wait: Duration) -> Option<String> {
        let end = Instant::now() + wait;
        let mut buf = [0u8; 8192];
        while Instant::now() < end {
            let Ok((len, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..len]).to_string();
            if text.starts_with("BYE ") {
                let ok = format!(
                    "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
                    header(&text, "Via").unwrap_or_default(),
                    header(&text, "From").unwrap_or_default(),
                    header(&text, "To").unwrap_or_default(),
                    header(&text, "Call-ID").unwrap_or_default(),
                    header(&text, "CSeq").unwrap_or_default(),
                );
                self.sock.send_to(ok.as_bytes(), from).unwrap();
            }
            return Some(text);
        }
        None
    }

    /// The final response to the INVITE with CSeq `cseq`, within `wait`.
    fn final_response(&self, wait: Duration) -> String {
        let end = Instant::now() + wait;
        while Instant::now() < end {
            let Some(msg) = self.recv(Duration::from_millis(200)) else {
                continue;
            };
            assert!(!msg.starts_with("BYE "), "BYE during the call:\n{msg}");
            let is_final = msg
                .strip_prefix("SIP/2.0 ")
                .and_then(|r| r.get(..3))
                .and_then(|c| c.parse::<u16>().ok())
                .is_some_and(|c| c >= 200);
            let ours = header(&msg, "CSeq") == Some(format!("{} INVITE", self.cseq).as_str());
            if is_final && ours {
                return msg;
            }
        }
        panic!("no final response to INVITE {} within {wait:?}", self.cseq);
    }

    /// A re-INVITE with `direction`; returns the 200's SDP direction attribute (ACKed).
    fn reinvite(&mut self, direction: &str) -> String {
        self.cseq += 1;
        let req = self.invite(&self.target.clone(), &self.to.clone(), direction);
        self.sock.send_to(req.as_bytes(), self.gw).unwrap();
        let resp = self.final_response(Duration::from_secs(5));
        assert!(resp.starts_with("SIP/2.0 200 "), "{resp}");
        self.ack();
        sdp_direction(&resp)
    }

    /// No BYE (nor anything else ending the call) for `wait`.
    fn no_bye_for(&self, wait: Duration) {
        let end = Instant::now() + wait;
        while Instant::now() < end {
            if let Some(msg) = self.recv(end.saturating_duration_since(Instant::now())) {
                assert!(
                    !msg.starts_with("BYE "),
                    "the call ended while held:\n{msg}"
                );
            }
        }
    }
}

fn sdp_direction(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .find(|l| ["a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"].contains(l))
        .unwrap_or("a=sendrecv (none stated)")
        .to_string()
}

/// The gateway's media address from its SDP.
fn media_address(msg: &str) -> SocketAddr {
    let ip = msg
        .lines()
        .find_map(|l| l.trim().strip_prefix("c=IN IP4 "))
        .expect("c= line");
    let port = msg
        .lines()
        .find_map(|l| l.trim().strip_prefix("m=audio "))
        .and_then(|r| r.split_whitespace().next())
        .expect("m= line");
    format!("{ip}:{port}").parse().unwrap()
}

/// Waits until `f` holds or `wait` passes; false on timeout.
fn until(wait: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + wait;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn a_held_call_survives_the_rtp_timeout_and_the_telegram_user_sees_the_hold() {
    let up = Up::start();
    let media = Media::new();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut pbx = Pbx {
        me: sock.local_addr().unwrap(),
        sock,
        gw: up.node.sip,
        n: rand_u32(),
        cseq: 1,
        to: String::new(),
        target: String::new(),
        media_port: media.port(),
    };
    let uri = format!("sip:+10000000002@{}", pbx.gw);
    let invite = pbx.invite(&uri, &format!("<{uri}>"), "sendrecv");
    pbx.sock.send_to(invite.as_bytes(), pbx.gw).unwrap();
    let ok = pbx.final_response(Duration::from_secs(30));
    assert!(
        ok.starts_with("SIP/2.0 200 "),
        "the echo user answers:\n{ok}"
    );
    pbx.to = header(&ok, "To").unwrap().to_string();
    pbx.target = header(&ok, "Contact")
        .unwrap()
        .trim_matches(['<', '>'])
        .to_string();
    pbx.ack();
    media.run(media_address(&ok));

    // Talking: the tone comes back from the echo user.
    assert!(
        until(Duration::from_secs(10), || media.counts().1 > 25),
        "no echo before the hold: {:?}\n{}",
        media.counts(),
        up.log()
    );

    // Hold with music on hold: the PBX keeps sending, the gateway sends it nothing.
    assert_eq!(pbx.reinvite("sendonly"), "a=recvonly");
    std::thread::sleep(Duration::from_millis(500)); // what was already on its way
    let before = media.counts().0;
    pbx.no_bye_for(Duration::from_secs(2));
    assert_eq!(
        media.counts().0 - before,
        0,
        "RTP to a PBX that holds with sendonly"
    );

    // Hold with a=inactive and no RTP at all, for more than twice the RTP timeout.
    assert_eq!(pbx.reinvite("inactive"), "a=inactive");
    media.sending.store(false, Ordering::Relaxed);
    let before = media.counts().0;
    pbx.no_bye_for(RTP_TIMEOUT * 2 + Duration::from_secs(2));
    assert_eq!(media.counts().0 - before, 0, "RTP to an inactive PBX");

    // Resume: the echo comes back.
    assert_eq!(pbx.reinvite("sendrecv"), "a=sendrecv");
    media.sending.store(true, Ordering::Relaxed);
    let loud = media.counts().1;
    assert!(
        until(Duration::from_secs(RTP_TIMEOUT.as_secs() - 1), || media
            .counts()
            .1
            > loud + 25),
        "no echo after the resume: {:?}\n{}",
        media.counts(),
        up.log()
    );

    // The Telegram user's app read our MediaState: unmuted at the start, muted by the hold
    // (once: sendonly then inactive is one hold), unmuted by the resume.
    assert!(
        until(Duration::from_secs(3), || up.media_states()
            == [false, true, false]),
        "MediaStates the echo user received: {:?}",
        up.media_states()
    );

    // Resumed, the RTP timeout is back: silence ends the call.
    media.sending.store(false, Ordering::Relaxed);
    let silent = Instant::now();
    let mut bye = false;
    while silent.elapsed() < RTP_TIMEOUT + Duration::from_secs(4) {
        if pbx
            .recv(Duration::from_millis(200))
            .is_some_and(|m| m.starts_with("BYE "))
        {
            bye = true;
            break;
        }
    }
    assert!(
        bye,
        "no BYE after {:?} of silence once resumed",
        silent.elapsed()
    );
    assert!(
        silent.elapsed() >= RTP_TIMEOUT - Duration::from_millis(500),
        "BYE after only {:?}",
        silent.elapsed()
    );
}
