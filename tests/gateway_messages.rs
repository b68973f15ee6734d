//! Text messages both ways through a real `siptg up` (its embedded simulated Telegram cloud):
//! a Telegram user's text to the gateway's account reaches the PBX as an RFC 3428 `MESSAGE`
//! (body, Caller ID, `X-TG-*`), a PBX's `MESSAGE` reaches the Telegram user, Telegram's
//! refusals become SIP answers as for calls, `messages = false` switches both ways off, and
//! bodies other than plain text are refused. The PBXs are fake UAs on 127.0.0.1 (IP trunks).

mod common;

use common::pbx::{Msg, Pbx};
use common::tgapp::{app, user};
use common::{free_tcp, wait_for, Proc, SimUp, TestNode};
use siptg_control::telegram::account::Account;
use siptg_control::telegram::tl;
use siptg_control::telegram::transport::UpdateRx;
use std::net::SocketAddr;
use std::time::Duration;

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
last_name = "Smith"
[[users]]
id = 3
phone = "10000000003"
username = "private_one"
first_name = "Private"
messages = "contacts"
[[users]]
id = 4
phone = "10000000004"
username = "blocker"
first_name = "Blocker"
blocked = [1]
[[users]]
id = 7
phone = "10000000007"
username = "bob_tg"
first_name = "Bob"
[[users]]
id = 8
phone = "10000000008"
username = "echo_tg"
first_name = "Echo"
[[users]]
id = 6
phone = "10000000006"
username = "quiet_tg"
first_name = "Quiet"
"#;

/// What the texts' fake PBX does besides the shared answers.
impl Pbx {
    /// The next MESSAGE request within `wait` (anything else skipped).
    async fn message(&self, wait: Duration) -> Option<Msg> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv(left).await?;
            if m.first_line().starts_with("MESSAGE ") {
                return Some(m);
            }
        }
    }

    /// Sends siptg at `to` a MESSAGE for `user` with `content_type` (none when empty) and
    /// `body`; the final answer.
    async fn send(&self, to: SocketAddr, user: &str, content_type: &str, body: &str) -> Msg {
        self.send_from("pbx", to, user, content_type, body).await
    }

    /// As [`Pbx::send`], from login `login`.
    async fn send_from(
        &self,
        login: &str,
        to: SocketAddr,
        user: &str,
        content_type: &str,
        body: &str,
    ) -> Msg {
        let n: u32 = rand::random();
        let ctype = if content_type.is_empty() {
            String::new()
        } else {
            format!("Content-Type: {content_type}\r\n")
        };
        let msg = format!(
            "MESSAGE sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:{login}@{me}>;tag=t{n}\r\nTo: <sip:{user}@{to}>\r\nCall-ID: {n}@msgtest\r\nCSeq: 1 MESSAGE\r\n\
             {ctype}Content-Length: {}\r\n\r\n{body}",
            body.len(),
            me = self.addr,
        );
        self.sock.send_to(msg.as_bytes(), to).await.unwrap();
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self
                .recv(left)
                .await
                .unwrap_or_else(|| panic!("no final answer to MESSAGE {user}"));
            if m.first_line().starts_with("SIP/2.0 ") && m.status().0 >= 200 {
                assert_eq!(m.header("Call-ID"), Some(format!("{n}@msgtest").as_str()));
                return m;
            }
        }
    }
}

impl Pbx {
    /// A MESSAGE with `body` in the dialog of `invite` (which we answered with a To tag);
    /// siptg's final answer.
    async fn send_in_dialog(&self, invite: &Msg, body: &str) -> Msg {
        let n: u32 = rand::random();
        let target = invite
            .header("Contact")
            .map(|c| c.trim_matches(|ch| ch == '<' || ch == '>').to_string())
            .unwrap_or_default();
        let msg = format!(
            "MESSAGE {target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKdlg{n};rport\r\nMax-Forwards: 70\r\n\
             From: {to};tag=pbx{port}\r\nTo: {from}\r\nCall-ID: {cid}\r\nCSeq: 2 MESSAGE\r\n\
             Content-Type: text/plain\r\nContent-Length: {len}\r\n\r\n{body}",
            me = self.addr,
            port = self.addr.port(),
            to = invite.header("To").unwrap_or_default(),
            from = invite.header("From").unwrap_or_default(),
            cid = invite.header("Call-ID").unwrap_or_default(),
            len = body.len(),
        );
        self.sock
            .send_to(msg.as_bytes(), invite.from)
            .await
            .unwrap();
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self
                .recv(left)
                .await
                .expect("an answer to the in-dialog MESSAGE");
            if m.first_line().starts_with("SIP/2.0 ")
                && m.header("CSeq") == Some("2 MESSAGE")
                && m.status().0 >= 200
            {
                return m;
            }
        }
    }

    /// Registers as `login`/`password` at siptg `to` (digest); the final status.
    async fn register(&self, to: SocketAddr, login: &str, password: &str) -> (u16, String) {
        let uri = format!("sip:{to}");
        let mut auth = String::new();
        for cseq in 1..=2 {
            let n: u32 = rand::random();
            let msg = format!(
                "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{n};rport\r\nMax-Forwards: 70\r\n\
                 From: <sip:{login}@{to}>;tag=r{n}\r\nTo: <sip:{login}@{to}>\r\nCall-ID: reg{port}@msgtest\r\n\
                 CSeq: {cseq} REGISTER\r\nContact: <sip:{login}@{me}>\r\nExpires: 300\r\n{auth}Content-Length: 0\r\n\r\n",
                me = self.addr,
                port = self.addr.port(),
            );
            self.sock.send_to(msg.as_bytes(), to).await.unwrap();
            let r = loop {
                let m = self
                    .recv(Duration::from_secs(5))
                    .await
                    .expect("REGISTER answered");
                if m.first_line().starts_with("SIP/2.0 ") && m.status().0 >= 200 {
                    break m;
                }
            };
            if r.status().0 != 401 {
                return r.status();
            }
            let challenge = r.header("WWW-Authenticate").unwrap_or_default().to_string();
            let value = siptg_control::sip::digest::respond(
                &challenge,
                "REGISTER",
                &uri,
                login,
                password,
                siptg_control::sip::digest::new_cnonce,
                1,
            )
            .unwrap();
            auth = format!("Authorization: {value}\r\n");
        }
        (401, "Unauthorized".into())
    }
}

/// `siptg up` with `setup` (its connections and gateways), the accounts of `autologin` logged
/// in.
fn start_with(node: &TestNode, setup: &str, autologin: &str) -> Proc {
    start_echo(node, setup, autologin, "")
}

/// As [`start_with`], with `echo` in `[telegram]` (`sim_echo_users`).
fn start_echo(node: &TestNode, setup: &str, autologin: &str, echo: &str) -> Proc {
    SimUp {
        world: WORLD,
        autologin,
        storage: r#"rpc_timeout = "2s""#,
        telegram: echo,
        setup,
    }
    .start(node)
}

/// `siptg up` with gateway `gw` (account `gateway`) on an IP trunk to `main`, and gateway
/// `quiet` (account `quiet`, `messages = false`) on an IP trunk to `other`.
fn start(node: &TestNode, main: &Pbx, other: &Pbx) -> Proc {
    start_with(
        node,
        &format!(
            r#"
[[connection]]
name = "main"
type = "ip"
server = "{main}"
keepalive = "0s"
[[connection]]
name = "other"
type = "ip"
server = "{other}"
keepalive = "0s"
[[gateway]]
name = "gw"
account = "gateway"
connections = ["main"]
pbx_number = "100"
[[gateway]]
name = "quiet"
account = "quiet"
connections = ["other"]
pbx_number = "200"
messages = false
"#,
            main = main.addr,
            other = other.addr,
        ),
        r#"gateway = "+10000000001", quiet = "+10000000006""#,
    )
}

/// SIP address of `siptg up` in `node`.
fn sip(node: &TestNode) -> SocketAddr {
    node.sip
}

/// Alice's app on the simulated cloud, and her updates.
async fn alice(node: &TestNode) -> (Account, UpdateRx) {
    app(node, "+10000000002").await
}

/// The next text Alice receives from user `from` within `wait`.
async fn text_from(updates: &mut UpdateRx, from: i64, wait: Duration) -> Option<String> {
    let end = tokio::time::Instant::now() + wait;
    loop {
        let u = tokio::time::timeout_at(end, updates.recv()).await.ok()??;
        if let tl::enums::Update::NewMessage(m) = u.update {
            if let tl::enums::Message::Message(m) = m.message {
                if m.from_id == Some(tl::enums::Peer::User(tl::types::PeerUser { user_id: from })) {
                    return Some(m.message);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_go_both_ways_and_refusals_are_answered() {
    let (main, other) = (Pbx::new().await, Pbx::new().await);
    let node = TestNode::new();
    let up = start(&node, &main, &other);
    let (app, mut updates) = alice(&node).await;
    let gw = user(&app, "10000000001").await;

    // (a) Telegram → PBX. The Manager and Worker may still be linking: resend until it arrives
    // (a refused try tells Alice in the chat).
    let mut got = None;
    for _ in 0..10 {
        app.invoke(&siptg_control::gateway::text_message(&gw, "Привет, PBX"))
            .await
            .unwrap();
        if let Some(m) = main.message(Duration::from_secs(3)).await {
            got = Some(m);
            break;
        }
    }
    let m = got.unwrap_or_else(|| panic!("no MESSAGE reached the PBX:\n{}", up.log()));
    assert!(
        m.first_line().starts_with("MESSAGE sip:100@"),
        "{}",
        m.first_line()
    );
    assert_eq!(m.header("Content-Type"), Some("text/plain;charset=UTF-8"));
    assert_eq!(m.body(), "Привет, PBX");
    let from = m.header("From").unwrap_or_default();
    assert!(
        from.starts_with("\"Alice Smith\" <sip:+10000000002@"),
        "From {from}"
    );
    assert_eq!(m.header("X-TG-ID"), Some("2"));
    assert_eq!(m.header("X-TG-Username"), Some("alice_tg"));
    assert_eq!(m.header("X-TG-Phone"), Some("10000000002"));
    assert_eq!(m.header("X-TG-Name"), Some("Alice Smith"));
    main.respond(&m, 200, "OK").await;
    // Keypad-looking digits outside a call are an ordinary text.
    app.invoke(&siptg_control::gateway::text_message(&gw, "123#"))
        .await
        .unwrap();
    let m = main
        .message(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("digits outside a call are a MESSAGE:\n{}", up.log()));
    assert_eq!(m.body(), "123#");
    main.respond(&m, 200, "OK").await;
    // Drop what Alice read so far (notices of early tries while the links came up).
    while text_from(&mut updates, 1, Duration::from_millis(300))
        .await
        .is_some()
    {}
    // The PBX refuses: Alice reads why.
    app.invoke(&siptg_control::gateway::text_message(&gw, "to nobody"))
        .await
        .unwrap();
    let m = main.message(Duration::from_secs(5)).await.expect("MESSAGE");
    main.respond(&m, 404, "Not Found").await;
    assert_eq!(
        text_from(&mut updates, 1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("Message not delivered: 404 Not Found"),
        "{}",
        up.log()
    );

    // (b) PBX → Telegram, by phone and by tg#username.
    let ok = main
        .send(
            sip(&node),
            "+10000000002",
            "text/plain;charset=UTF-8",
            "Hello Alice",
        )
        .await;
    assert_eq!(ok.status(), (200, "OK".into()), "{}", up.log());
    assert_eq!(
        text_from(&mut updates, 1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("Hello Alice")
    );
    let ok = main
        .send(sip(&node), "tg%23alice_tg", "text/plain", "by username")
        .await;
    assert_eq!(ok.status(), (200, "OK".into()));
    assert_eq!(
        text_from(&mut updates, 1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("by username")
    );

    // (c) Telegram's refusals, mapped as for calls.
    let cases = [
        ("tg%23nobody_here", 404, "USERNAME_NOT_OCCUPIED"),
        ("id4242", 404, "Chat not found"),
        ("+10000000003", 403, "PRIVACY_PREMIUM_REQUIRED"),
        ("+10000000004", 403, "USER_IS_BLOCKED"),
        ("hello", 404, "Not Found"),
    ];
    for (to, code, reason) in cases {
        let r = main.send(sip(&node), to, "text/plain", "hi").await;
        assert_eq!(r.status(), (code, reason.to_string()), "MESSAGE {to}");
    }

    // (e) Bodies other than plain text, and empty ones.
    let r = main
        .send(sip(&node), "+10000000002", "application/json", "{}")
        .await;
    assert_eq!(r.status(), (415, "Unsupported Media Type".into()));
    assert_eq!(r.header("Accept"), Some("text/plain"));
    let r = main
        .send(sip(&node), "+10000000002", "text/plain", "")
        .await;
    assert_eq!(r.status().0, 400);
    let metrics = common::http_get(node.admin, "/metrics").unwrap_or_default();
    for line in [
        r#"siptg_gateway_messages_total{direction="to_telegram",code="200"} 2"#,
        r#"siptg_gateway_messages_total{direction="to_telegram",code="415"} 1"#,
        r#"siptg_gateway_messages_total{direction="to_pbx",code="404"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // (d) messages = false: the PBX's MESSAGE is refused, and a text to the account stays in
    // Telegram.
    let r = other
        .send(sip(&node), "+10000000002", "text/plain", "hi")
        .await;
    assert_eq!(r.status(), (403, "Messages are disabled".into()));
    let quiet = user(&app, "10000000006").await;
    app.invoke(&siptg_control::gateway::text_message(&quiet, "stay here"))
        .await
        .unwrap();
    assert!(
        other.message(Duration::from_secs(2)).await.is_none(),
        "a gateway with messages off forwarded a text"
    );
    assert!(
        up.log().contains("the gateway's messages are off"),
        "{}",
        up.log()
    );
}

/// The PBXs by priority: a refusal from the first sends the text to the next; only allowed
/// callers' texts go out; keypad digits during a call with the user are DTMF, not a MESSAGE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_hunt_by_priority_and_respect_allowed_callers_and_calls() {
    let (first, second) = (Pbx::new().await, Pbx::new().await);
    let node = TestNode::new();
    let up = start_with(
        &node,
        &format!(
            r#"
[[connection]]
name = "first"
type = "ip"
server = "{}"
keepalive = "0s"
codecs = ["PCMA"]
priority = 1
[[connection]]
name = "second"
type = "ip"
server = "{}"
keepalive = "0s"
codecs = ["PCMA"]
priority = 2
[[gateway]]
name = "gw"
account = "gateway"
connections = ["first", "second"]
pbx_number = "100"
allowed_callers = ["@alice_tg"]
caller_id = ["tg{{userid}}"]
caller_name = ["@{{username}}"]
"#,
            first.addr, second.addr
        ),
        r#"gateway = "+10000000001""#,
    );
    let (alice, mut alice_updates) = alice(&node).await;
    let gw = user(&alice, "10000000001").await;
    let mut got = None;
    for _ in 0..10 {
        alice
            .invoke(&siptg_control::gateway::text_message(&gw, "hunt me"))
            .await
            .unwrap();
        if let Some(m) = first.message(Duration::from_secs(3)).await {
            got = Some(m);
            break;
        }
    }
    let m = got.unwrap_or_else(|| panic!("no MESSAGE reached the first PBX:\n{}", up.log()));
    let from = m.header("From").unwrap_or_default();
    assert!(from.starts_with("\"@alice_tg\" <sip:tg2@"), "From {from}");
    first.respond(&m, 480, "Temporarily Unavailable").await;
    let m2 = second
        .message(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the next priority gets the text:\n{}", up.log()));
    assert_eq!(m2.body(), "hunt me");
    assert_ne!(m.header("Call-ID"), m2.header("Call-ID"));
    second.respond(&m2, 202, "Accepted").await;
    wait_for(
        "the 202 counts as delivered",
        Duration::from_secs(5),
        || {
            up.log()
                .contains("text message delivered to the PBX")
                .then_some(())
        },
    );

    // Bob is not an allowed caller: his text stays in Telegram.
    let (bob, _bob_updates) = app(&node, "+10000000007").await;
    let gw_for_bob = user(&bob, "10000000001").await;
    bob.invoke(&siptg_control::gateway::text_message(
        &gw_for_bob,
        "from bob",
    ))
    .await
    .unwrap();
    wait_for("Bob's text refused", Duration::from_secs(5), || {
        up.log()
            .contains("text message from outside allowed_callers")
            .then_some(())
    });
    assert!(first.message(Duration::from_millis(500)).await.is_none());
    assert!(second.message(Duration::from_millis(100)).await.is_none());

    // Alice calls the gateway; while the PBX rings, her keypad digits are the call's.
    alice
        .invoke(&tl::functions::phone::RequestCall {
            video: false,
            user_id: gw.input_user(),
            random_id: 7,
            g_a_hash: vec![3; 32],
            protocol: siptg_control::gateway::tgcall::protocol(),
        })
        .await
        .unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    let invite = loop {
        let m = first
            .recv(end.saturating_duration_since(tokio::time::Instant::now()))
            .await
            .unwrap_or_else(|| panic!("the call rings the first PBX:\n{}", up.log()));
        if m.first_line().starts_with("INVITE ") {
            first.respond(&m, 180, "Ringing").await;
            break m;
        }
    };
    alice
        .invoke(&siptg_control::gateway::text_message(&gw, "5#"))
        .await
        .unwrap();
    alice
        .invoke(&siptg_control::gateway::text_message(
            &gw,
            "after the digits",
        ))
        .await
        .unwrap();
    let m = first
        .message(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("a text during the call is a MESSAGE:\n{}", up.log()));
    assert_eq!(
        m.body(),
        "after the digits",
        "keypad digits during a call went out as a MESSAGE"
    );
    first.respond(&m, 200, "OK").await;
    assert!(up.log().contains("keypad digits during a call"));
    // The PBX writes in the call's (early) dialog: the text goes to the call's Telegram user.
    while text_from(&mut alice_updates, 1, Duration::from_millis(300))
        .await
        .is_some()
    {}
    let r = first.send_in_dialog(&invite, "in the call").await;
    assert_eq!(r.status(), (200, "OK".into()), "{}", up.log());
    assert_eq!(
        text_from(&mut alice_updates, 1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("in the call")
    );
    let r = first.send_in_dialog(&invite, "").await;
    assert_eq!(r.status().0, 400);
}

/// A user whose app answers every text (the echo user) and a PBX that refuses: the gateway
/// tells the user once, the user's echo of the notice fails again, and there it stops (one
/// notice a minute), rather than looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoreplying_user_and_a_refusing_pbx_do_not_loop() {
    let pbx = Pbx::new().await;
    let node = TestNode::new();
    let up = start_echo(
        &node,
        &format!(
            r#"
[[connection]]
name = "main"
type = "ip"
server = "{}"
keepalive = "0s"
[[gateway]]
name = "gw"
account = "gateway"
connections = ["main"]
pbx_number = "100"
"#,
            pbx.addr
        ),
        r#"gateway = "+10000000001""#,
        r#"sim_echo_users = ["+10000000008"]"#,
    );
    wait_for("the echo user online", Duration::from_secs(20), || {
        up.log().contains("demo echo user online").then_some(())
    });
    // The PBX writes to the echo user, which answers; the answer comes back as a MESSAGE.
    let mut echoed = None;
    for _ in 0..10 {
        let r = pbx
            .send(sip(&node), "+10000000008", "text/plain", "ping")
            .await;
        if r.status().0 == 200 {
            echoed = pbx.message(Duration::from_secs(5)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = echoed.unwrap_or_else(|| panic!("the echo reaches the PBX:\n{}", up.log()));
    assert_eq!(m.body(), "ping");
    assert_eq!(m.header("X-TG-ID"), Some("8"));
    pbx.respond(&m, 404, "Not Found").await;
    // The notice is echoed too, and refused again; no notice follows it.
    let m = pbx
        .message(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the echoed notice:\n{}", up.log()));
    assert_eq!(m.body(), "Message not delivered: 404 Not Found");
    pbx.respond(&m, 404, "Not Found").await;
    assert!(
        pbx.message(Duration::from_secs(3)).await.is_none(),
        "the gateway and the echo user loop:\n{}",
        up.log()
    );
}

/// Gateway `gw` on line `office`, a PBX that registers to siptg (`office` / `office-secret`).
const OFFICE: &str = r#"
[[connection]]
name = "office"
type = "pbx_registers"
login = "office"
password = "office-secret"
trusted_ips = ["127.0.0.1"]
[[gateway]]
name = "gw"
account = "gateway"
connections = ["office"]
pbx_number = "100"
"#;

/// A PBX that registers to siptg: its MESSAGE is refused until it has registered (as its
/// INVITE would be), then accepted by its login; a Telegram user's text goes to its binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_pbx_sends_and_receives_texts() {
    let pbx = Pbx::new().await;
    let node = TestNode::new();
    let up = start_with(&node, OFFICE, r#"gateway = "+10000000001""#);
    let (alice, mut alice_updates) = alice(&node).await;
    let gw = user(&alice, "10000000001").await;
    // Before REGISTER (retried while the Manager and Worker link up).
    let mut before = (0, String::new());
    for _ in 0..20 {
        before = pbx
            .send_from("office", sip(&node), "+10000000002", "text/plain", "early")
            .await
            .status();
        if before.0 != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        before,
        (405, "REGISTER is required first".into()),
        "{}",
        up.log()
    );
    assert_eq!(
        pbx.register(sip(&node), "office", "office-secret").await,
        (200, "OK".into()),
        "{}",
        up.log()
    );
    let r = pbx
        .send_from(
            "office",
            sip(&node),
            "+10000000002",
            "text/plain",
            "from the office",
        )
        .await;
    assert_eq!(r.status(), (200, "OK".into()), "{}", up.log());
    assert_eq!(
        text_from(&mut alice_updates, 1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("from the office")
    );
    alice
        .invoke(&siptg_control::gateway::text_message(&gw, "to the office"))
        .await
        .unwrap();
    let m = pbx
        .message(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the registered PBX gets the text:\n{}", up.log()));
    assert_eq!(
        m.first_line(),
        format!("MESSAGE sip:100@{} SIP/2.0", pbx.addr)
    );
    assert_eq!(m.body(), "to the office");
    pbx.respond(&m, 200, "OK").await;
}

/// One SIP message off a TCP stream (framed by Content-Length), within `wait`.
async fn read_tcp(
    stream: &mut tokio::net::TcpStream,
    pending: &mut Vec<u8>,
    wait: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let end = tokio::time::Instant::now() + wait;
    loop {
        if let Some(head) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&pending[..head]).to_string();
            let len: usize = text
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let total = head + 4 + len;
            if pending.len() >= total {
                let msg: Vec<u8> = pending.drain(..total).collect();
                return Some(String::from_utf8_lossy(&msg).to_string());
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(end, stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// A PBX that registered over TCP is not reachable over UDP: the text goes over its own
/// connection, with a TCP Via and a Contact at siptg's TCP listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pbx_registered_over_tcp_gets_texts_over_its_connection() {
    use tokio::io::AsyncWriteExt;
    let mut node = TestNode::new();
    let tcp = free_tcp();
    node.sip_tcp = Some(tcp);
    let up = start_with(&node, OFFICE, r#"gateway = "+10000000001""#);
    let stream = wait_for("the TCP listener", Duration::from_secs(30), || {
        std::net::TcpStream::connect(tcp).ok()
    });
    stream.set_nonblocking(true).unwrap();
    let mut stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let me = stream.local_addr().unwrap();
    let mut pending = Vec::new();
    let uri = format!("sip:{tcp}");
    let mut auth = String::new();
    let mut status = String::new();
    // REGISTER over the connection (retried while the Manager and Worker link up), answering
    // the digest challenge.
    for cseq in 1..=20 {
        let msg = format!(
            "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bKtcp{cseq}\r\nMax-Forwards: 70\r\n\
             From: <sip:office@{tcp}>;tag=r1\r\nTo: <sip:office@{tcp}>\r\nCall-ID: tcpreg@msgtest\r\n\
             CSeq: {cseq} REGISTER\r\nContact: <sip:office@{me};transport=tcp>\r\nExpires: 300\r\n{auth}\
             Content-Length: 0\r\n\r\n"
        );
        stream.write_all(msg.as_bytes()).await.unwrap();
        let resp = loop {
            let m = read_tcp(&mut stream, &mut pending, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("REGISTER over TCP answered:\n{}", up.log()));
            if !m.starts_with("SIP/2.0 1") {
                break m;
            }
        };
        status = resp.lines().next().unwrap_or_default().to_string();
        if status.starts_with("SIP/2.0 200") {
            break;
        }
        if status.starts_with("SIP/2.0 401") {
            let challenge = resp
                .lines()
                .find_map(|l| l.strip_prefix("WWW-Authenticate:"))
                .unwrap_or_default()
                .trim()
                .to_string();
            let value = siptg_control::sip::digest::respond(
                &challenge,
                "REGISTER",
                &uri,
                "office",
                "office-secret",
                siptg_control::sip::digest::new_cnonce,
                1,
            )
            .unwrap();
            auth = format!("Authorization: {value}\r\n");
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(status, "SIP/2.0 200 OK", "{}", up.log());

    let (alice, _alice_updates) = alice(&node).await;
    let gw = user(&alice, "10000000001").await;
    alice
        .invoke(&siptg_control::gateway::text_message(&gw, "over tcp"))
        .await
        .unwrap();
    let m = loop {
        let m = read_tcp(&mut stream, &mut pending, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the TCP-registered PBX gets the text:\n{}", up.log()));
        if m.starts_with("MESSAGE ") {
            break Msg { text: m, from: tcp };
        }
    };
    assert_eq!(m.first_line(), format!("MESSAGE sip:100@{me} SIP/2.0"));
    assert_eq!(m.body(), "over tcp");
    let via = m.header("Via").unwrap_or_default();
    assert!(via.starts_with(&format!("SIP/2.0/TCP {tcp}")), "{via}");
    let answer = format!(
        "SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: {}\r\nTo: {};tag=tcppbx\r\nCall-ID: {}\r\nCSeq: {}\r\n\
         Content-Length: 0\r\n\r\n",
        m.header("From").unwrap_or_default(),
        m.header("To").unwrap_or_default(),
        m.header("Call-ID").unwrap_or_default(),
        m.header("CSeq").unwrap_or_default(),
    );
    stream.write_all(answer.as_bytes()).await.unwrap();
    // Answered: no retransmission follows (TCP has none, and the transaction is over).
    assert!(
        read_tcp(&mut stream, &mut pending, Duration::from_secs(2))
            .await
            .is_none_or(|x| !x.starts_with("MESSAGE ")),
        "the MESSAGE came again"
    );
    drop(up);
}
