//! Every SIP.TG error of a gateway call, triggered by the condition it names against a real
//! `siptg up` (with its embedded simulated Telegram cloud) and asserted word for word. A PBX on
//! an IP trunk from 127.0.0.1 dials; the world file sets up the users and limits each case needs.

mod common;

use common::{free_tcp, wait_for, Proc, TestNode};
use std::net::SocketAddr;
use std::time::Duration;

const WORLD: &str = r#"
offline_ring_timeout = 15
{unanswered}
[flood]
calls_per_minute = {cpm}
stranger_calls = {strangers}
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
[[users]]
id = 3
phone = "10000000003"
username = "private_one"
first_name = "Private"
calls = "nobody"
[[users]]
id = 4
phone = "10000000004"
username = "anon_user"
first_name = "Anon"
anonymous = true
[[users]]
id = 5
phone = "10000000005"
username = "stale_tg"
first_name = "Stale"
"#;

/// One `siptg up` with trunks: `X-Line: N` selects gateway N's connection.
struct Gw {
    node: TestNode,
    proc: Option<Proc>,
}

fn world(cpm: u32, strangers: u32, unanswered: bool) -> String {
    WORLD
        .replace("{cpm}", &cpm.to_string())
        .replace("{strangers}", &strangers.to_string())
        .replace(
            "{unanswered}",
            if unanswered {
                "unanswered = [\"phone.requestCall\"]"
            } else {
                ""
            },
        )
}

fn config(node: &TestNode, sim: SocketAddr, autologin: &str, extra: &str) -> String {
    format!(
        r#"
[storage]
key_file = "var/storage.key"
rpc_timeout = "1s"
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ {autologin} }}
[database]
path = "var/db.redb"
[[connection]]
name = "two"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
header = "X-Line: two"
[[connection]]
name = "three"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
header = "X-Line: three"
[[connection]]
name = "four"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
header = "X-Line: four"
[[connection]]
name = "five"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
header = "X-Line: five"
[[connection]]
name = "six"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
header = "X-Line: six"
worker = "worker-9"
[[connection]]
name = "trunk"
type = "ip"
server = "127.0.0.1:9"
keepalive = "0s"
trusted_ips = ["127.0.0.1"]
codecs = ["PCMA"]
[[gateway]]
name = "gw"
account = "gateway"
connections = ["trunk"]
[[gateway]]
name = "ghost"
account = "ghost"
connections = ["two"]
[[gateway]]
name = "off"
account = "gateway"
connections = ["three"]
enabled = false
[[gateway]]
name = "far"
account = "gateway"
storage = "storage-9"
connections = ["four"]
[[gateway]]
name = "stale"
account = "stale"
connections = ["five"]
[[gateway]]
name = "pinned"
account = "gateway"
connections = ["six"]
{extra}
"#,
        sim = sim
    )
    .replace("{node}", &node.dir.path().display().to_string())
}

impl Gw {
    fn start(node: TestNode, world_text: &str, autologin: &str, extra: &str) -> Self {
        let sim = free_tcp();
        std::fs::write(node.path("world.toml"), world_text).unwrap();
        let cfg = node.write_config("siptg.toml", &config(&node, sim, autologin, extra));
        let log = node.path("up.log");
        let proc = Proc::start(&["up", "--config", cfg.to_str().unwrap()], &log);
        let gw = Gw {
            node,
            proc: Some(proc),
        };
        // Ready when the dataplane answers and the accounts are logged in (a call to the
        // privacy-restricted user gets Telegram's answer rather than a start-up error).
        let end = std::time::Instant::now() + Duration::from_secs(40);
        let mut last = (0, String::new());
        while std::time::Instant::now() < end {
            last = gw.invite("", "+10000000003");
            if last.0 == 403 {
                return gw;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let log = std::fs::read_to_string(gw.node.path("up.log")).unwrap_or_default();
        panic!("siptg up not ready (last answer {last:?}); its log:\n{log}");
    }

    /// Stops siptg gracefully (it stops its dataplane too).
    fn stop(&mut self) {
        drop(self.proc.take());
    }

    /// One INVITE on the trunk `line` (empty: the main trunk) to `user`; the final status.
    fn invite(&self, line: &str, user: &str) -> (u16, String) {
        common::sip_invite(self.node.sip, line, user)
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.stop();
    }
}

fn expect(gw: &Gw, line: &str, user: &str, code: u16, reason: &str) {
    let got = gw.invite(line, user);
    assert_eq!(
        got,
        (code, reason.to_string()),
        "INVITE {user} on line {line:?}: {}",
        gw.node.path("up.log").display()
    );
}

#[test]
fn telegram_errors_become_siptg_responses() {
    let gw = Gw::start(
        TestNode::new(),
        &world(100, 100, false),
        "gateway = \"+10000000001\", stale = \"+10000000005\"",
        "",
    );
    // The called user's privacy allows calls from nobody.
    expect(&gw, "", "+10000000003", 403, "USER_PRIVACY_RESTRICTED");
    // No such username (tg# form, escaped as PBXs send it).
    expect(&gw, "", "tg%23nobody_here", 404, "USERNAME_NOT_OCCUPIED");
    // A number that is not a Telegram user.
    expect(&gw, "", "+19999999999", 404, "Not Found");
    // A user id the account has never met (no access hash).
    expect(&gw, "", "id4242", 404, "Chat not found");
    // Telegram shows the user without an access hash.
    expect(&gw, "", "tg%23anon_user", 470, "Anonymous user");
    // The gateway's account was never logged in.
    expect(&gw, "two", "+10000000002", 503, "Account is not running");
    // A disabled gateway.
    expect(&gw, "three", "+10000000002", 403, "Route is not permitted");
    // A gateway whose Session Storage is not linked.
    expect(
        &gw,
        "four",
        "+10000000002",
        403,
        "Session storage is inactive",
    );
    // A connection pinned to a Worker that is not running.
    expect(&gw, "six", "+10000000002", 403, "Worker is inactive");
    // A dialled string that is no phone, username or id.
    expect(&gw, "", "hello", 404, "Not Found");
}

#[test]
fn a_session_telegram_no_longer_accepts_is_inactive() {
    // Log `stale` in, stop; the next start's simulated cloud does not know its session.
    let node = TestNode::new();
    let mut first = Gw::start(
        node,
        &world(100, 100, false),
        "gateway = \"+10000000001\", stale = \"+10000000005\"",
        "",
    );
    first.stop();
    let node = std::mem::replace(&mut first.node, TestNode::new());
    drop(first);
    let second = Gw::start(
        node,
        &world(100, 100, false),
        "gateway = \"+10000000001\"",
        "",
    );
    expect(
        &second,
        "five",
        "+10000000002",
        403,
        "Telegram session is inactive",
    );
}

#[test]
fn flood_limits_become_503_with_the_wait() {
    let gw = Gw::start(
        TestNode::new(),
        &world(1, 100, false),
        "gateway = \"+10000000001\"",
        "",
    );
    // Gw::start's readiness probe used the one call a minute this world allows.
    let (code, reason) = gw.invite("", "+10000000002");
    assert_eq!(code, 503, "{reason}");
    let secs: u32 = reason
        .strip_prefix("Too Many Requests: retry after ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reason {reason:?}"));
    assert!((1..=60).contains(&secs));
}

#[test]
fn peer_flood_is_503_peer_flood() {
    // One stranger allowed: the readiness probe (the private user) is it; Alice is one too many.
    let gw = Gw::start(
        TestNode::new(),
        &world(100, 1, false),
        "gateway = \"+10000000001\"",
        "",
    );
    expect(&gw, "", "+10000000002", 503, "PEER_FLOOD");
}

#[test]
fn telegram_not_answering_is_408() {
    let node = TestNode::new();
    let sim = free_tcp();
    std::fs::write(node.path("world.toml"), world(100, 100, true)).unwrap();
    let cfg = node.write_config(
        "siptg.toml",
        &config(&node, sim, "gateway = \"+10000000001\"", ""),
    );
    let _p = Proc::start(
        &["up", "--config", cfg.to_str().unwrap()],
        &node.path("up.log"),
    );
    let gw = Gw { node, proc: None };
    let mut seen = Vec::new();
    let got = wait_for("an answer", Duration::from_secs(30), || {
        let got = gw.invite("", "+10000000002");
        seen.push(got.clone());
        (got.0 == 408 || seen.len() > 20).then_some(got)
    });
    assert_eq!(
        got,
        (408, "Timeout of waiting RPC result".to_string()),
        "answers seen: {seen:?}"
    );
}

#[test]
fn without_its_dataplane_a_worker_is_not_ready() {
    let node = TestNode::new();
    let sim = free_tcp();
    std::fs::write(node.path("world.toml"), world(100, 100, false)).unwrap();
    let cfg = node.write_config(
        "siptg.toml",
        &config(&node, sim, "gateway = \"+10000000001\"", ""),
    );
    // `spawn = false` and no dataplane on the socket: the Worker has no media.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("driver = \"auto\"", "driver = \"auto\"\nspawn = false");
    std::fs::write(&cfg, text).unwrap();
    let _p = Proc::start(
        &["up", "--config", cfg.to_str().unwrap()],
        &node.path("up.log"),
    );
    let gw = Gw { node, proc: None };
    let got = wait_for("an answer", Duration::from_secs(30), || {
        let got = gw.invite("", "+10000000002");
        (got.0 != 0 && got.1 != "No response from Manager").then_some(got)
    });
    assert_eq!(got, (503, "Worker is not ready".to_string()));
}
