//! A PBX that authenticates what the gateway sends it, against a real `siptg up`: on a
//! `register_to_pbx` connection (our login and password at the PBX) a Telegram user's call
//! (INVITE) and text (MESSAGE) that the PBX challenges with 401/407 go out once more with the
//! digest answer (same Call-ID, CSeq + 1, a new branch), checked here by the real digest
//! server with SHA-256 and MD5; a second challenge fails them as before. The PBX is a fake UA
//! on 127.0.0.1; the Telegram user is an app on the embedded simulated cloud.

mod common;

use common::{free_tcp, wait_for, Proc, TestNode};
use siptg_control::sip::digest::{Algorithm, DigestServer};
use siptg_control::telegram::account::{Account, AccountOptions, LoginStep};
use siptg_control::telegram::resolve::Peer;
use siptg_control::telegram::simclient::SimClient;
use siptg_control::telegram::tl;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::UdpSocket;

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
username = "alice_tg"
first_name = "Alice"
"#;

const LOGIN: &str = "gw-login";
const PASSWORD: &str = "gw-secret-1";

/// A fake PBX that authenticates requests with a real digest server.
struct Pbx {
    sock: UdpSocket,
    addr: SocketAddr,
    digest: DigestServer,
}

struct Msg {
    text: String,
    from: SocketAddr,
}

impl Msg {
    fn method(&self) -> &str {
        self.text.split(' ').next().unwrap_or_default()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
    fn branch(&self) -> Option<&str> {
        self.header("Via")?
            .split(';')
            .find_map(|p| p.strip_prefix("branch="))
    }
}

impl Pbx {
    async fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        Pbx {
            sock,
            addr,
            digest: DigestServer::new("pbx.test", [5u8; 32], Duration::from_secs(60)),
        }
    }

    /// The next request with `method` within `wait` (REGISTERs are answered 200 on the way).
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
            if m.method() == "REGISTER" {
                self.respond(&m, 200, "OK", &[]).await;
            }
            if m.method() == method {
                return Some(m);
            }
        }
    }

    /// Answers `req` with `code` and `extra` headers (a 200 to an INVITE carries our SDP).
    async fn respond(&self, req: &Msg, code: u16, reason: &str, extra: &[(&str, String)]) {
        let to = req.header("To").unwrap_or_default();
        let to = if to.contains(";tag=") {
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
        let mut headers = String::new();
        for (n, v) in extra {
            headers.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            headers.push_str("Content-Type: application/sdp\r\n");
        }
        let msg = format!(
            "SIP/2.0 {code} {reason}\r\nVia: {}\r\nFrom: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
             Contact: <sip:100@{}>\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            req.header("Via").unwrap_or_default(),
            req.header("From").unwrap_or_default(),
            req.header("Call-ID").unwrap_or_default(),
            req.header("CSeq").unwrap_or_default(),
            self.addr,
            body.len()
        );
        self.sock.send_to(msg.as_bytes(), req.from).await.unwrap();
    }

    /// Challenges `req` (401 with WWW-Authenticate, or 407 with Proxy-Authenticate), offering
    /// SHA-256 then MD5.
    async fn challenge(&self, req: &Msg, code: u16) {
        let name = if code == 401 {
            "WWW-Authenticate"
        } else {
            "Proxy-Authenticate"
        };
        let values: Vec<(&str, String)> = self
            .digest
            .challenge(
                SystemTime::now(),
                false,
                &[Algorithm::Sha256, Algorithm::Md5],
            )
            .into_iter()
            .map(|v| (name, v))
            .collect();
        let reason = if code == 401 {
            "Unauthorized"
        } else {
            "Proxy Authentication Required"
        };
        self.respond(req, code, reason, &values).await;
    }

    /// Checks `req`'s answer to a challenge of `code`: the user it names, or why it fails.
    fn verify(&self, req: &Msg, code: u16) -> Result<String, String> {
        let name = if code == 401 {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        let answer = req.header(name).ok_or(format!("no {name}"))?;
        self.digest
            .verify(
                req.method(),
                answer,
                |u| (u == LOGIN).then(|| PASSWORD.to_string()),
                SystemTime::now(),
            )
            .map(|v| format!("{} {}", v.username, v.algorithm))
            .map_err(|e| e.to_string())
    }
}

/// `siptg up` with gateway `gw` whose one connection registers to `pbx` with our login.
fn start(node: &TestNode, pbx: &Pbx) -> Proc {
    std::fs::write(node.path("world.toml"), WORLD).unwrap();
    let sim = free_tcp();
    let cfg = node.write_config(
        "siptg.toml",
        &format!(
            r#"
[storage]
key_file = "var/storage.key"
rpc_timeout = "2s"
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ gateway = "+10000000001" }}
[database]
path = "var/db.redb"
[[connection]]
name = "carrier"
type = "register_to_pbx"
server = "{pbx}"
login = "{LOGIN}"
password = "{PASSWORD}"
keepalive = "0s"
codecs = ["PCMA"]
[[gateway]]
name = "gw"
account = "gateway"
connections = ["carrier"]
pbx_number = "100"
"#,
            pbx = pbx.addr
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

async fn alice(node: &TestNode) -> (Account, Peer) {
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
    let tl::enums::contacts::ResolvedPeer::Peer(r) = a
        .invoke(&tl::functions::contacts::ResolvePhone {
            phone: "10000000001".into(),
        })
        .await
        .unwrap();
    let gw = r.users.iter().find_map(Peer::from_user).unwrap();
    (a, gw)
}

/// Alice calls the gateway's account until the PBX gets an INVITE.
async fn call_until_invited(a: &Account, gw: &Peer, pbx: &Pbx, first_id: i64) -> Msg {
    for attempt in 0..10 {
        a.invoke(&tl::functions::phone::RequestCall {
            video: false,
            user_id: gw.input_user(),
            random_id: (first_id + attempt) as i32,
            g_a_hash: vec![3; 32],
            protocol: siptg_control::gateway::tgcall::protocol(),
        })
        .await
        .unwrap();
        if let Some(inv) = pbx.request("INVITE", Duration::from_secs(3)).await {
            return inv;
        }
    }
    panic!("no INVITE reached the PBX");
}

/// The challenged request came again as RFC 3261 §22.2 says.
fn assert_resent(first: &Msg, again: &Msg, method: &str) {
    assert_eq!(again.header("Call-ID"), first.header("Call-ID"));
    assert_eq!(again.header("From"), first.header("From"));
    let n: u32 = first
        .header("CSeq")
        .and_then(|c| c.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(
        again.header("CSeq"),
        Some(format!("{} {method}", n + 1).as_str())
    );
    assert_ne!(again.branch(), first.branch(), "a new transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenged_invites_and_messages_are_answered_once() {
    let pbx = Pbx::new().await;
    let node = TestNode::new();
    let up = start(&node, &pbx);
    let (app, gw) = alice(&node).await;

    // A text: the PBX wants Authorization.
    // The Manager and Worker may still be linking: resend until it arrives.
    let mut got = None;
    for _ in 0..10 {
        app.invoke(&siptg_control::gateway::text_message(&gw, "hello, PBX"))
            .await
            .unwrap();
        if let Some(m) = pbx.request("MESSAGE", Duration::from_secs(3)).await {
            got = Some(m);
            break;
        }
    }
    let m = got.unwrap_or_else(|| panic!("no MESSAGE reached the PBX:\n{}", up.log()));
    assert!(m.header("Authorization").is_none());
    pbx.challenge(&m, 401).await;
    let again = pbx
        .request("MESSAGE", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the MESSAGE comes again with credentials:\n{}", up.log()));
    assert_resent(&m, &again, "MESSAGE");
    assert_eq!(
        pbx.verify(&again, 401).as_deref(),
        Ok(format!("{LOGIN} SHA-256").as_str())
    );
    assert!(again.text.ends_with("hello, PBX"));
    pbx.respond(&again, 200, "OK", &[]).await;
    wait_for("the delivered text", Duration::from_secs(5), || {
        up.log()
            .contains("text message delivered to the PBX")
            .then_some(())
    });

    // A text challenged twice is not delivered.
    let undelivered = up.log().matches("text message not delivered").count();
    app.invoke(&siptg_control::gateway::text_message(&gw, "again"))
        .await
        .unwrap();
    let m = pbx
        .request("MESSAGE", Duration::from_secs(5))
        .await
        .expect("MESSAGE");
    pbx.challenge(&m, 407).await;
    let again = pbx
        .request("MESSAGE", Duration::from_secs(3))
        .await
        .expect("the MESSAGE comes again");
    assert!(pbx.verify(&again, 407).is_ok());
    pbx.challenge(&again, 407).await;
    assert!(
        pbx.request("MESSAGE", Duration::from_secs(2))
            .await
            .is_none(),
        "a second challenge is not answered"
    );
    wait_for("the undelivered text", Duration::from_secs(5), || {
        (up.log().matches("text message not delivered").count() > undelivered).then_some(())
    });
    // A call challenged twice (the password is wrong for this PBX): it fails.
    let inv = call_until_invited(&app, &gw, &pbx, 100).await;
    pbx.challenge(&inv, 401).await;
    let again = pbx
        .request("INVITE", Duration::from_secs(3))
        .await
        .expect("the INVITE comes again with credentials");
    assert_resent(&inv, &again, "INVITE");
    assert!(pbx.verify(&again, 401).is_ok());
    pbx.challenge(&again, 401).await;
    assert!(
        pbx.request("INVITE", Duration::from_secs(2))
            .await
            .is_none(),
        "a second challenge is not answered"
    );
    wait_for("the failed fork", Duration::from_secs(5), || {
        up.log().contains("hunt: fork failed").then_some(())
    });

    // A call: the proxy in front of the PBX wants Proxy-Authorization.
    let inv = call_until_invited(&app, &gw, &pbx, 200).await;
    assert!(inv.header("Proxy-Authorization").is_none());
    pbx.challenge(&inv, 407).await;
    pbx.request("ACK", Duration::from_secs(3))
        .await
        .expect("the 407 is ACKed");
    let again = pbx
        .request("INVITE", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the INVITE comes again with credentials:\n{}", up.log()));
    assert_resent(&inv, &again, "INVITE");
    assert_eq!(
        pbx.verify(&again, 407).as_deref(),
        Ok(format!("{LOGIN} SHA-256").as_str())
    );
    pbx.respond(&again, 200, "OK", &[]).await;
    let ack = pbx
        .request("ACK", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the answer is ACKed:\n{}", up.log()));
    assert_eq!(ack.header("Call-ID"), inv.header("Call-ID"));
    assert_eq!(ack.header("CSeq"), Some("2 ACK"));
    wait_for("the answered call", Duration::from_secs(5), || {
        up.log().contains("hunt: answered").then_some(())
    });
}
