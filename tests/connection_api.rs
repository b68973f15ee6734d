//! SIP connections made through the control API (`siptg connection …`): a `pbx_registers` one
//! takes registrations at once with the password it was given, a `register_to_pbx` one is
//! registered at its PBX by the Worker (and un-registered when removed), they are kept in the
//! database across a restart, and bad ones are refused with the reason.

mod common;

use common::{admin_cli, sip_register, Proc, SimUp, TestNode};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const WORLD: &str = r#"
[[users]]
id = 1
phone = "10000000001"
username = "gateway_tg"
"#;

const SETUP: &str = r#"
[[connection]]
name = "trunk"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
"#;

fn start(node: &TestNode) -> Proc {
    SimUp {
        world: WORLD,
        autologin: r#"gateway = "+10000000001""#,
        setup: SETUP,
        ..Default::default()
    }
    .start(node)
}

/// The password `siptg connection add|reset-password` printed.
fn printed_password(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "password")
        .nth(1)
        .unwrap_or_else(|| panic!("no password in {out:?}"))
        .to_string()
}

/// The next REGISTER the fake PBX registrar at `sock` receives: its Expires, after answering
/// it 200 OK.
fn next_register(sock: &UdpSocket, within: Duration) -> Option<u32> {
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if !text.starts_with("REGISTER ") {
            continue;
        }
        let header = |name: &str| {
            text.lines()
                .find(|l| {
                    l.to_ascii_lowercase()
                        .starts_with(&format!("{}:", name.to_ascii_lowercase()))
                })
                .map(|l| l[name.len() + 1..].trim().to_string())
                .unwrap_or_default()
        };
        let expires = header("Expires").parse().unwrap_or(3600);
        let reply = format!(
            "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {};tag=reg\r\nCall-ID: {}\r\nCSeq: {}\r\n\
             Contact: {};expires={expires}\r\nContent-Length: 0\r\n\r\n",
            header("Via"),
            header("From"),
            header("To"),
            header("Call-ID"),
            header("CSeq"),
            header("Contact"),
        );
        sock.send_to(reply.as_bytes(), from).unwrap();
        return Some(expires);
    }
    None
}

#[test]
fn connections_through_the_control_api() {
    let node = TestNode::new();
    let p = start(&node);
    let (ok, out) = admin_cli(&node, &["connection", "list"]);
    assert!(
        ok && out.contains("trunk") && out.contains("config"),
        "{out}"
    );

    // A PBX-registers connection: login from the name, a made-up password printed.
    let (ok, out) = admin_cli(
        &node,
        &[
            "connection",
            "add",
            "office",
            "--type",
            "pbx_registers",
            "trusted_ips=127.0.0.1",
        ],
    );
    assert!(ok, "{out}");
    let password = printed_password(&out);
    assert_eq!(password.len(), 20, "{out}");
    assert_eq!(
        sip_register(node.sip, "office", &password),
        (200, "OK".into())
    );
    assert_eq!(sip_register(node.sip, "office", "guess").0, 403);

    // Bad input is refused with the reason, and nothing changes.
    for (args, want) in [
        (
            &["connection", "set", "office", "codecs=PCMA,GSM"][..],
            "unknown codec \"GSM\"",
        ),
        (
            &["connection", "set", "office", "trusted_ips=10.0.0.0/33"][..],
            "trusted_ips",
        ),
        (
            &["connection", "set", "office", "colour=red"][..],
            "unknown setting",
        ),
        (
            &[
                "connection",
                "add",
                "trunk",
                "--type",
                "ip",
                "server=127.0.0.1:7",
            ][..],
            "defined in the config file",
        ),
        (
            &[
                "connection",
                "add",
                "other",
                "--type",
                "pbx_registers",
                "login=office",
            ][..],
            "already the login of connection \"office\"",
        ),
        (
            &[
                "connection",
                "add",
                "x",
                "--type",
                "register_to_pbx",
                "login=a",
            ][..],
            "server: is required",
        ),
        (
            &["connection", "add", "y", "--type", "fax"][..],
            "--type \"fax\"",
        ),
        (
            &["connection", "show", "nope"][..],
            "no connection \"nope\"",
        ),
    ] {
        let (ok, out) = admin_cli(&node, args);
        assert!(!ok && out.contains(want), "{args:?}: {out}");
    }
    assert_eq!(
        sip_register(node.sip, "office", &password),
        (200, "OK".into())
    );

    // A gateway can use it; while it does, the connection cannot be removed.
    let (ok, out) = admin_cli(
        &node,
        &[
            "gateway",
            "add",
            "gw",
            "--account",
            "gateway",
            "--connection",
            "office",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = admin_cli(&node, &["connection", "rm", "office"]);
    assert!(!ok && out.contains("belongs to gateway \"gw\""), "{out}");

    // A register-to-PBX connection: the Worker registers at the PBX at once.
    let registrar = UdpSocket::bind("127.0.0.1:0").unwrap();
    registrar
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let server = registrar.local_addr().unwrap().to_string();
    let (ok, out) = admin_cli(
        &node,
        &[
            "connection",
            "add",
            "upstream",
            "--type",
            "register_to_pbx",
            &format!("server={server}"),
            "login=gw1",
            "password=secret",
            "expires=120",
            "keepalive=0s",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        next_register(&registrar, Duration::from_secs(10)),
        Some(120),
        "the Worker did not register the new connection"
    );
    let status = node.status().unwrap().to_string();
    assert!(status.contains("upstream"), "{status}");
    let (ok, out) = admin_cli(&node, &["connection", "list"]);
    assert!(
        ok && out.contains("gw1@") && out.contains("api") && !out.contains("secret"),
        "{out}"
    );
    let (ok, out) = admin_cli(&node, &["connection", "show", "upstream"]);
    assert!(ok && out.contains("\"password\": \"secret\""), "{out}");

    // Kept across a restart, with the same password.
    drop(p);
    let p = start(&node);
    assert_eq!(
        sip_register(node.sip, "office", &password),
        (200, "OK".into())
    );
    // (The stopping siptg withdrew its registration first: Expires 0.)
    let mut seen = Vec::new();
    while let Some(e) = next_register(&registrar, Duration::from_secs(10)) {
        seen.push(e);
        if e == 120 {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&120),
        "the restarted Worker did not register the stored connection: {seen:?}"
    );
    // A new password takes over from the old one.
    let (ok, out) = admin_cli(&node, &["connection", "reset-password", "office"]);
    assert!(ok, "{out}");
    let fresh = printed_password(&out);
    assert_ne!(fresh, password);
    assert_eq!(sip_register(node.sip, "office", &password).0, 403);
    assert_eq!(sip_register(node.sip, "office", &fresh), (200, "OK".into()));

    // Removed: the registration at the PBX is withdrawn (Expires: 0).
    let (ok, out) = admin_cli(&node, &["connection", "rm", "upstream"]);
    assert!(ok, "{out}");
    assert_eq!(
        next_register(&registrar, Duration::from_secs(10)),
        Some(0),
        "no un-REGISTER after removal"
    );
    let (ok, out) = admin_cli(&node, &["connection", "rm", "upstream"]);
    assert!(!ok && out.contains("no connection"), "{out}");
    drop(p);
}
