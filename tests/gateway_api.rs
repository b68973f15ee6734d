//! Gateways made through the control API (`siptg gateway …`): they route calls at once, are kept
//! in the database across a restart, and bad ones are refused with the reason.

mod common;

use common::{admin_cli, sip_invite, Proc, SimUp, TestNode};
use std::time::{Duration, Instant};

const WORLD: &str = r#"
[[users]]
id = 1
phone = "10000000001"
username = "gateway_tg"
[[users]]
id = 3
phone = "10000000003"
username = "private_one"
calls = "nobody"
"#;

const SETUP: &str = r#"
[[connection]]
name = "trunk"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
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

fn cli(node: &TestNode, args: &[&str]) -> (bool, String) {
    admin_cli(node, &[&["gateway"], args].concat())
}

/// The status of an INVITE once it is past start-up answers.
fn invite(node: &TestNode, user: &str, want: u16) -> (u16, String) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let got = sip_invite(node.sip, "", user);
        if got.0 == want || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn gateways_through_the_control_api() {
    let node = TestNode::new();
    let p = start(&node);
    // No gateway on the trunk yet: an ordinary route lookup.
    assert_eq!(
        invite(&node, "+10000000003", 404),
        (404, "Route not found".into())
    );
    // Bad input is refused with the reason.
    let (ok, out) = cli(
        &node,
        &["add", "gw", "--account", "gateway", "--connection", "nope"],
    );
    assert!(!ok && out.contains("no connection named \"nope\""), "{out}");
    // A gateway routes the trunk's calls to Telegram at once.
    let (ok, out) = cli(
        &node,
        &[
            "add",
            "gw",
            "--account",
            "gateway",
            "--connection",
            "trunk",
            "--pbx-number",
            "100",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        invite(&node, "+10000000003", 403),
        (403, "USER_PRIVACY_RESTRICTED".into())
    );
    let (ok, out) = cli(&node, &["list"]);
    assert!(
        ok && out.contains("gw") && out.contains("trunk") && out.contains("api"),
        "{out}"
    );
    let (ok, out) = cli(
        &node,
        &["set", "gw", "enabled=false", "lines=3", "messages=false"],
    );
    assert!(ok, "{out}");
    assert_eq!(
        invite(&node, "+10000000003", 403),
        (403, "Route is not permitted".into())
    );
    let (ok, out) = cli(&node, &["show", "gw"]);
    assert!(
        ok && out.contains("\"lines\": 3")
            && out.contains("\"enabled\": false")
            && out.contains("\"messages\": false"),
        "{out}"
    );
    // Plan limits: a plan without this node's Worker refuses the calls with SIP.TG's 402.
    let (ok, out) = cli(
        &node,
        &["set", "gw", "enabled=true", "allowed_workers=worker-7"],
    );
    assert!(ok, "{out}");
    assert_eq!(
        invite(&node, "+10000000003", 402),
        (402, "SIP account has disallowed settings".into())
    );
    let (ok, out) = cli(
        &node,
        &[
            "set",
            "gw",
            "allowed_workers=",
            "monthly_duration=90m",
            "failed_calls_per_hour=5",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(&node, &["show", "gw"]);
    assert!(
        ok && out.contains("\"monthly_duration\": \"5400s\"")
            && out.contains("\"failed_calls_per_hour\": 5")
            && out.contains("\"allowed_workers\": []"),
        "{out}"
    );
    let (ok, out) = cli(&node, &["set", "gw", "monthly_duration=800h"]);
    assert!(!ok && out.contains("longer than 744h"), "{out}");
    let (ok, out) = cli(&node, &["set", "gw", "enabled=false"]);
    assert!(ok, "{out}");
    // Kept across a restart.
    drop(p);
    let p = start(&node);
    assert_eq!(
        invite(&node, "+10000000003", 403),
        (403, "Route is not permitted".into())
    );
    let (ok, out) = cli(&node, &["rm", "gw"]);
    assert!(ok, "{out}");
    assert_eq!(
        invite(&node, "+10000000003", 404),
        (404, "Route not found".into())
    );
    let (ok, out) = cli(&node, &["rm", "gw"]);
    assert!(!ok && out.contains("no such gateway"), "{out}");
    drop(p);
}
