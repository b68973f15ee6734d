//! Priority hunting for a Telegram user's call to the PBX against a real `siptg up`: the PBXs
//! of one priority ring in parallel (the first 2xx wins, the others get CANCEL), and the next
//! priority is tried only when every PBX of the previous one failed; and such a call is cut
//! when the gateway's monthly talk time runs out. The PBXs are fake UAs on 127.0.0.1 (IP
//! trunks); the Telegram user is an app on the embedded simulated cloud.

mod common;

use common::{free_tcp, wait_for, Proc, TestNode};
use siptg_control::telegram::account::{Account, AccountOptions, LoginStep};
use siptg_control::telegram::resolve::Peer;
use siptg_control::telegram::simclient::SimClient;
use siptg_control::telegram::tl;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

const WORLD: &str = r#"
[[users]]
id = 1
phone = "10000000001"
username = "gateway_tg"
first_name = "Gateway"
[[users]]
id = 2
phone = "10000000002"
username = "alice_tg"
first_name = "Alice"
"#;

/// A fake PBX: one UDP socket, SIP text in and out.
struct Pbx {
    sock: UdpSocket,
    addr: SocketAddr,
}

/// One SIP message as received.
struct Msg {
    text: String,
    from: SocketAddr,
}

impl Msg {
    fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or_default()
    }
    fn method(&self) -> &str {
        self.first_line().split(' ').next().unwrap_or_default()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl Pbx {
    async fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        Pbx { sock, addr }
    }

    /// The next request with `method` within `wait` (retransmissions and others skipped).
    async fn request(&self, method: &str, wait: Duration) -> Option<Msg> {
        let end = tokio::time::Instant::now() + wait;
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = tokio::time::timeout_at(end, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            let m = Msg {
                text: String::from_utf8_lossy(&buf[..n]).to_string(),
                from,
            };
            if m.method() == method {
                return Some(m);
            }
        }
    }

    /// Hangs up the call `invite` we answered: BYE in its dialog; returns siptg's status line.
    async fn bye(&self, invite: &Msg) -> Option<String> {
        let target = invite
            .header("Contact")
            .map(|c| c.trim_matches(|ch| ch == '<' || ch == '>').to_string())
            .unwrap_or_default();
        let msg = format!(
            "BYE {target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKbye{port};rport\r\nMax-Forwards: 70\r\n\
             From: {to};tag=pbx{port}\r\nTo: {from}\r\nCall-ID: {cid}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
            me = self.addr,
            port = self.addr.port(),
            to = invite.header("To").unwrap_or_default(),
            from = invite.header("From").unwrap_or_default(),
            cid = invite.header("Call-ID").unwrap_or_default(),
        );
        self.sock.send_to(msg.as_bytes(), invite.from).await.ok()?;
        let mut buf = vec![0u8; 65536];
        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let (n, _) = tokio::time::timeout_at(end, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if text.starts_with("SIP/2.0 ") && text.contains("BYE") {
                return text.lines().next().map(str::to_string);
            }
        }
    }

    /// Answers `req` with `code` (a 200 carries our SDP and Contact).
    async fn respond(&self, req: &Msg, code: u16, reason: &str) {
        let to = req.header("To").unwrap_or_default();
        let to = if to.contains(";tag=") || code == 100 {
            to.to_string()
        } else {
            format!("{to};tag=pbx{}", self.addr.port())
        };
        let body = if code == 200 && req.method() == "INVITE" {
            format!(
                "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n",
                self.addr.port() + 2
            )
        } else {
            String::new()
        };
        let ctype = if body.is_empty() {
            String::new()
        } else {
            "Content-Type: application/sdp\r\n".to_string()
        };
        let msg = format!(
            "SIP/2.0 {code} {reason}\r\nVia: {}\r\nFrom: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
             Contact: <sip:100@{}>\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
            req.header("Via").unwrap_or_default(),
            req.header("From").unwrap_or_default(),
            req.header("Call-ID").unwrap_or_default(),
            req.header("CSeq").unwrap_or_default(),
            self.addr,
            body.len()
        );
        self.sock.send_to(msg.as_bytes(), req.from).await.unwrap();
    }
}

/// `siptg up` with a gateway whose connections are IP trunks to `pbxs` with their priorities;
/// `extra` are more gateway settings.
fn start(node: &TestNode, pbxs: &[(&Pbx, u32)], extra: &str) -> Proc {
    std::fs::write(node.path("world.toml"), WORLD).unwrap();
    let sim = free_tcp();
    let mut conns = String::new();
    let mut names = Vec::new();
    for (i, (pbx, priority)) in pbxs.iter().enumerate() {
        conns.push_str(&format!(
            "[[connection]]\nname = \"pbx{i}\"\ntype = \"ip\"\nserver = \"{}\"\nkeepalive = \"0s\"\n\
             codecs = [\"PCMA\"]\npriority = {priority}\n",
            pbx.addr
        ));
        names.push(format!("\"pbx{i}\""));
    }
    let cfg = node.write_config(
        "siptg.toml",
        &format!(
            r#"
[storage]
key_file = "var/storage.key"
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ gateway = "+10000000001" }}
[database]
path = "var/db.redb"
{conns}
[[gateway]]
name = "gw"
account = "gateway"
connections = [{names}]
pbx_number = "100"
{extra}
"#,
            names = names.join(", ")
        ),
    );
    let proc = Proc::start(
        &["up", "--config", cfg.to_str().unwrap()],
        &node.path("up.log"),
    );
    wait_for(
        "the gateway's account logged in",
        Duration::from_secs(40),
        || {
            proc.log()
                .contains("simulated account logged in")
                .then_some(())
        },
    );
    proc
}

/// Alice's app on the simulated cloud (`siptg up`'s, at the configured address).
async fn alice(node: &TestNode) -> Account {
    let text = std::fs::read_to_string(node.path("siptg.toml")).unwrap();
    let sim: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("sim_address = "))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap();
    let (client, _updates) = SimClient::connect(sim, None).await.unwrap();
    let a = Account::new("alice-app", Arc::new(client), AccountOptions::default());
    let sent = a.send_code("+10000000002").await.unwrap();
    assert!(matches!(
        a.sign_in(&sent, "12345").await.unwrap(),
        LoginStep::Done(_)
    ));
    a
}

/// Alice calls the gateway's account until `first` gets an INVITE (the Manager and Worker may
/// still be linking when the first call is placed).
async fn call_until_invited(a: &Account, first: &Pbx) -> Msg {
    let tl::enums::contacts::ResolvedPeer::Peer(r) = a
        .invoke(&tl::functions::contacts::ResolvePhone {
            phone: "10000000001".into(),
        })
        .await
        .unwrap();
    let gw = r.users.iter().find_map(Peer::from_user).unwrap();
    for attempt in 0..10 {
        a.invoke(&tl::functions::phone::RequestCall {
            video: false,
            user_id: gw.input_user(),
            random_id: 100 + attempt,
            g_a_hash: vec![3; 32],
            protocol: siptg_control::gateway::tgcall::protocol(),
        })
        .await
        .unwrap();
        if let Some(inv) = first.request("INVITE", Duration::from_secs(3)).await {
            return inv;
        }
    }
    panic!("no INVITE reached the PBX");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rung_rings_every_pbx_and_the_first_answer_cancels_the_other() {
    let (a, b) = (Pbx::new().await, Pbx::new().await);
    let node = TestNode::new();
    let up = start(&node, &[(&a, 1), (&b, 1)], "");
    let app = alice(&node).await;
    let inv_a = call_until_invited(&app, &a).await;
    let inv_b = b
        .request("INVITE", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the same rung's other PBX rings too:\n{}", up.log()));
    assert_ne!(
        inv_a.header("Call-ID"),
        inv_b.header("Call-ID"),
        "each fork is its own dialog"
    );
    assert!(inv_a.first_line().starts_with("INVITE sip:100@"));
    assert_eq!(inv_a.header("X-TG-ID"), Some("2"));
    // Both ring; A answers.
    a.respond(&inv_a, 180, "Ringing").await;
    b.respond(&inv_b, 180, "Ringing").await;
    a.respond(&inv_a, 200, "OK").await;
    let ack = a
        .request("ACK", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the answer is ACKed:\n{}", up.log()));
    assert_eq!(ack.header("Call-ID"), inv_a.header("Call-ID"));
    // B is cancelled: its INVITE's Call-ID and branch.
    let cancel = b
        .request("CANCEL", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the other fork gets CANCEL:\n{}", up.log()));
    assert_eq!(cancel.header("Call-ID"), inv_b.header("Call-ID"));
    assert_eq!(cancel.header("Via"), inv_b.header("Via"));
    b.respond(&cancel, 200, "OK").await;
    b.respond(&inv_b, 487, "Request Terminated").await;
    let ack = b
        .request("ACK", Duration::from_secs(3))
        .await
        .expect("the 487 is ACKed");
    assert_eq!(ack.header("Call-ID"), inv_b.header("Call-ID"));
    assert!(
        up.log().contains("hunt: answered"),
        "the Worker logs the winner:\n{}",
        up.log()
    );
    // The winner's dialog is the call's: its BYE is answered.
    assert_eq!(a.bye(&inv_a).await.as_deref(), Some("SIP/2.0 200 OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_priority_rings_only_after_the_first_failed() {
    let (a, b) = (Pbx::new().await, Pbx::new().await);
    let node = TestNode::new();
    let up = start(&node, &[(&a, 1), (&b, 2)], "");
    let app = alice(&node).await;
    let inv_a = call_until_invited(&app, &a).await;
    // Priority 2 waits while priority 1 rings.
    assert!(
        b.request("INVITE", Duration::from_millis(800))
            .await
            .is_none(),
        "the second rung rang before the first failed"
    );
    a.respond(&inv_a, 486, "Busy Here").await;
    a.request("ACK", Duration::from_secs(3))
        .await
        .expect("the 486 is ACKed");
    let inv_b = b
        .request("INVITE", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the second rung rings after the first failed:\n{}",
                up.log()
            )
        });
    assert_ne!(inv_a.header("Call-ID"), inv_b.header("Call-ID"));
    b.respond(&inv_b, 200, "OK").await;
    let ack = b
        .request("ACK", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the answer is ACKed:\n{}", up.log()));
    assert_eq!(ack.header("Call-ID"), inv_b.header("Call-ID"));
}

/// The month's talk time counts Telegram users' calls too: the PBX's answered call gets BYE when
/// it runs out, and the call is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telegram_users_call_ends_when_the_months_talk_time_runs_out() {
    let a = Pbx::new().await;
    let node = TestNode::new();
    let up = start(&node, &[(&a, 1)], "monthly_duration = \"2s\"");
    let app = alice(&node).await;
    let inv = call_until_invited(&app, &a).await;
    a.respond(&inv, 200, "OK").await;
    a.request("ACK", Duration::from_secs(3))
        .await
        .expect("the answer is ACKed");
    let answered = std::time::Instant::now();
    let bye = a
        .request("BYE", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no BYE:\n{}", up.log()));
    let talked = answered.elapsed();
    a.respond(&bye, 200, "OK").await;
    assert!(
        talked >= Duration::from_millis(1500) && talked < Duration::from_secs(6),
        "BYE {talked:?} after the answer"
    );
    assert_eq!(bye.header("Call-ID"), inv.header("Call-ID"));
    wait_for("the call counted", Duration::from_secs(5), || {
        let log = up.log();
        (log.contains("the month's call duration is used up")
            && log.contains("gateway call counted")
            && log.contains("FromTelegram"))
        .then_some(())
    });
}
