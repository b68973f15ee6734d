//! A gateway's plan limits and their SIP.TG answers, each triggered by its real condition
//! against a real `siptg up` (embedded simulated Telegram cloud, a world file): the month's
//! talk time used up by a live call that is cut when it runs out (`402 Total calls duration
//! is exceeded`, still so after a restart), failed calls within the hour (`402 Amount of fail
//! calls is exceeded`), a connection on a Worker the plan does not allow (`402 SIP account has
//! disallowed settings`) and a gateway account that forbids incoming calls (`380 Callback is
//! restricted`). A PBX on IP trunks from 127.0.0.1 dials; `X-Line` picks the gateway.

mod common;

use common::{free_tcp, Proc, TestNode};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const WORLD: &str = r#"
offline_ring_timeout = 15
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
[[users]]
id = 4
phone = "10000000004"
username = "away_tg"
first_name = "Away"
offline = true
[[users]]
id = 7
phone = "10000000007"
username = "closed_gw"
first_name = "Closed"
calls = "nobody"
"#;

/// Hygiene is off: it would allow calls on the `closed` account (user 7) at connect.
fn config(sim: SocketAddr) -> String {
    let trunk = |name: &str, extra: &str| {
        format!(
            "[[connection]]\nname = \"{name}\"\ntype = \"ip\"\nserver = \"127.0.0.1:9\"\nkeepalive = \"0s\"\n\
             trusted_ips = [\"127.0.0.1\"]\ncodecs = [\"PCMA\"]\n{extra}\n"
        )
    };
    format!(
        r#"
[storage]
key_file = "var/storage.key"
rpc_timeout = "2s"
[storage.hygiene]
disable_calls_on_other_devices = false
allow_calls_from_everybody = false
allow_p2p_from_everybody = false
disallow_group_invites = false
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ gateway = "+10000000001", closed = "+10000000007" }}
sim_echo_users = ["+10000000002"]
[database]
path = "var/db.redb"
{month}{shared}{fails}{paid}{closed}{main}
[[gateway]]
name = "gw"
account = "gateway"
connections = ["main"]
[[gateway]]
name = "month"
account = "gateway"
connections = ["month"]
monthly_duration = "3s"
[[gateway]]
name = "shared"
account = "gateway"
connections = ["shared"]
monthly_duration = "6s"
[[gateway]]
name = "fails"
account = "gateway"
connections = ["fails"]
failed_calls_per_hour = 2
[[gateway]]
name = "paid"
account = "gateway"
connections = ["paid"]
allowed_workers = ["worker-1"]
[[gateway]]
name = "closed"
account = "closed"
connections = ["closed"]
"#,
        // Without a header it matches any INVITE from 127.0.0.1: last.
        main = trunk("main", ""),
        month = trunk("month", "header = \"X-Line: month\""),
        shared = trunk("shared", "header = \"X-Line: shared\""),
        fails = trunk("fails", "header = \"X-Line: fails\""),
        // Pinned to a Worker outside the gateway's allowed_workers.
        paid = trunk("paid", "header = \"X-Line: paid\"\nworker = \"worker-9\""),
        closed = trunk("closed", "header = \"X-Line: closed\""),
    )
}

struct Up {
    node: TestNode,
    sim: SocketAddr,
    proc: Option<Proc>,
}

impl Up {
    fn new() -> Self {
        let node = TestNode::new();
        std::fs::write(node.path("world.toml"), WORLD).unwrap();
        let mut up = Up {
            node,
            sim: free_tcp(),
            proc: None,
        };
        up.start();
        up
    }

    /// Starts `siptg up` and waits until a call reaches Telegram (the private user's refusal).
    fn start(&mut self) {
        let cfg = self.node.write_config("siptg.toml", &config(self.sim));
        let log = self.node.path("up.log");
        self.proc = Some(Proc::start(
            &["up", "--config", cfg.to_str().unwrap()],
            &log,
        ));
        let end = Instant::now() + Duration::from_secs(40);
        let mut last = (0, String::new());
        while Instant::now() < end {
            last = self.invite("", "+10000000003");
            if last.0 == 403 {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let log = std::fs::read_to_string(self.node.path("up.log")).unwrap_or_default();
        panic!("siptg up not ready (last answer {last:?}); its log:\n{log}");
    }

    fn stop(&mut self) {
        drop(self.proc.take());
    }

    fn invite(&self, line: &str, user: &str) -> (u16, String) {
        common::sip_invite(self.node.sip, line, user)
    }

    fn expect(&self, line: &str, user: &str, code: u16, reason: &str) {
        assert_eq!(
            self.invite(line, user),
            (code, reason.to_string()),
            "INVITE {user} on line {line:?}: {}",
            self.node.path("up.log").display()
        );
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A header line's value (`name: value`, case-insensitive name).
fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An answered call from the PBX on `line` to `user`: ACKs the 200, then waits for siptg's
/// BYE (answered 200 OK). Returns the time from the 200 to the BYE.
fn talk_until_bye(to: SocketAddr, line: &str, user: &str, wait: Duration) -> Duration {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let me = sock.local_addr().unwrap();
    let n: u32 = rand_u32();
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n",
        me.port() + 2
    );
    let invite = format!(
        "INVITE sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKl{n};rport\r\nMax-Forwards: 70\r\n\
         From: <sip:pbx@{me}>;tag=t{n}\r\nTo: <sip:{user}@{to}>\r\nCall-ID: {n}@limits\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:pbx@{me}>\r\nX-Line: {line}\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    sock.send_to(invite.as_bytes(), to).unwrap();
    let mut buf = [0u8; 8192];
    let end = Instant::now() + Duration::from_secs(20);
    let mut answered = None;
    while Instant::now() < end + wait {
        let Ok((len, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        let first = text.lines().next().unwrap_or_default().to_string();
        if let Some(rest) = first.strip_prefix("SIP/2.0 ") {
            let code: u16 = rest.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if code < 200 || answered.is_some() {
                continue;
            }
            assert_eq!(code, 200, "the echo user should answer: {first}");
            let to_hdr = header(&text, "To").unwrap_or_default();
            let ack = format!(
                "ACK sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKa{n};rport\r\nMax-Forwards: 70\r\n\
                 From: <sip:pbx@{me}>;tag=t{n}\r\nTo: {to_hdr}\r\nCall-ID: {n}@limits\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            );
            sock.send_to(ack.as_bytes(), to).unwrap();
            answered = Some(Instant::now());
        } else if first.starts_with("BYE ") {
            let ok = format!(
                "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
                header(&text, "Via").unwrap_or_default(),
                header(&text, "From").unwrap_or_default(),
                header(&text, "To").unwrap_or_default(),
                header(&text, "Call-ID").unwrap_or_default(),
                header(&text, "CSeq").unwrap_or_default(),
            );
            sock.send_to(ok.as_bytes(), from).unwrap();
            let at = answered.expect("a BYE before the answer");
            return at.elapsed();
        }
    }
    panic!("no BYE within {wait:?} of the answer (answered: {answered:?})");
}

/// A call from the PBX on `line` to `user` that the PBX cancels after `after` (its own ring
/// timeout); returns the INVITE's final status (487 expected).
fn invite_and_cancel(to: SocketAddr, line: &str, user: &str, after: Duration) -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let me = sock.local_addr().unwrap();
    let n: u32 = rand_u32();
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n",
        me.port() + 2
    );
    let head = |method: &str| {
        format!(
            "{method} sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKc{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\nTo: <sip:{user}@{to}>\r\nCall-ID: {n}@cancel\r\nCSeq: 1 {method}\r\n"
        )
    };
    let invite = format!(
        "{}Contact: <sip:pbx@{me}>\r\nX-Line: {line}\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        head("INVITE"),
        sdp.len()
    );
    sock.send_to(invite.as_bytes(), to).unwrap();
    std::thread::sleep(after);
    let cancel = format!("{}Content-Length: 0\r\n\r\n", head("CANCEL"));
    sock.send_to(cancel.as_bytes(), to).unwrap();
    let mut buf = [0u8; 8192];
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let Ok((len, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        let code: u16 = text
            .strip_prefix("SIP/2.0 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if code >= 200 && header(&text, "CSeq").is_some_and(|c| c.ends_with("INVITE")) {
            let ack = format!(
                "ACK sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKc{n};rport\r\nMax-Forwards: 70\r\n\
                 From: <sip:pbx@{me}>;tag=t{n}\r\nTo: {}\r\nCall-ID: {n}@cancel\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
                header(&text, "To").unwrap_or_default()
            );
            sock.send_to(ack.as_bytes(), to).unwrap();
            return code;
        }
    }
    0
}

fn rand_u32() -> u32 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

#[test]
fn the_monthly_duration_cuts_a_live_call_then_refuses_with_402_also_after_a_restart() {
    let mut up = Up::new();
    // 3 s of talk time this month: the call is answered and siptg ends it when they run out.
    let talked = talk_until_bye(
        up.node.sip,
        "month",
        "+10000000002",
        Duration::from_secs(10),
    );
    assert!(
        talked >= Duration::from_millis(2500) && talked < Duration::from_secs(8),
        "BYE {talked:?} after the answer"
    );
    // The Worker's report of the call's end reaches the Manager.
    std::thread::sleep(Duration::from_millis(800));
    let log = up.proc.as_ref().map(Proc::log).unwrap_or_default();
    assert!(
        log.contains("the month's call duration is used up"),
        "the call should end for its budget:\n{log}"
    );
    up.expect(
        "month",
        "+10000000002",
        402,
        "Total calls duration is exceeded",
    );
    // Other gateways are not affected.
    up.expect("", "+10000000003", 403, "USER_PRIVACY_RESTRICTED");
    // `siptg status` shows the month's use: the whole 3 s (the call's own talk time).
    let status = up.node.status().expect("/status");
    let used = &status["manager"]["usage"]["month"];
    let talk_ms = used["talk_ms"].as_u64().unwrap_or(0);
    assert!(
        (2500..8000).contains(&talk_ms) && used["monthly_ms"] == 3000,
        "{used}"
    );
    // The usage is in the Manager's database: a restarted siptg still refuses.
    up.stop();
    up.start();
    up.expect(
        "month",
        "+10000000002",
        402,
        "Total calls duration is exceeded",
    );
}

#[test]
fn failed_calls_disallowed_workers_and_closed_accounts_get_their_402_and_380() {
    let up = Up::new();
    // A call the PBX gives up on (its ring timeout: CANCEL) is not a failed call.
    for _ in 0..2 {
        let code = invite_and_cancel(
            up.node.sip,
            "fails",
            "+10000000004",
            Duration::from_millis(1500),
        );
        assert_eq!(code, 487, "{}", up.node.path("up.log").display());
        std::thread::sleep(Duration::from_millis(300));
    }
    // Calls Telegram refuses are failed calls: two per hour are allowed.
    for _ in 0..2 {
        up.expect("fails", "+10000000003", 403, "USER_PRIVACY_RESTRICTED");
        std::thread::sleep(Duration::from_millis(300));
    }
    up.expect(
        "fails",
        "+10000000003",
        402,
        "Amount of fail calls is exceeded",
    );
    // Also for a callee who would answer: the gateway is blocked, not the callee.
    up.expect(
        "fails",
        "+10000000002",
        402,
        "Amount of fail calls is exceeded",
    );
    // The connection is pinned to worker-9; the plan allows worker-1 only.
    up.expect(
        "paid",
        "+10000000002",
        402,
        "SIP account has disallowed settings",
    );
    // The `closed` account's own phone-call privacy is "nobody" (hygiene is off).
    up.expect("closed", "+10000000002", 380, "Callback is restricted");
    // The main gateway still works.
    up.expect("", "+10000000003", 403, "USER_PRIVACY_RESTRICTED");
}

/// Calls talking at the same time share the month's rest: with 6 s left, a second call
/// answered a second after the first leaves each (6 − 1) / 2 s more, so together they stop at
/// the limit instead of each running to it.
#[test]
fn talking_calls_share_the_months_rest_and_end_together_at_the_limit() {
    let up = Up::new();
    let sip = up.node.sip;
    let first = std::thread::spawn(move || {
        talk_until_bye(sip, "shared", "+10000000002", Duration::from_secs(10))
    });
    std::thread::sleep(Duration::from_millis(1000));
    let second = talk_until_bye(sip, "shared", "+10000000002", Duration::from_secs(10));
    let first = first.join().unwrap();
    let log = up.proc.as_ref().map(Proc::log).unwrap_or_default();
    assert!(
        first < Duration::from_millis(4800) && second < Duration::from_millis(4000),
        "each call should stop at its share, not run to the whole rest: {first:?} and {second:?}\n{log}"
    );
    let total = first + second;
    assert!(
        total > Duration::from_millis(4500) && total < Duration::from_millis(7500),
        "together about the 6 s of the month: {first:?} + {second:?}"
    );
    std::thread::sleep(Duration::from_millis(800));
    up.expect(
        "shared",
        "+10000000002",
        402,
        "Total calls duration is exceeded",
    );
}
