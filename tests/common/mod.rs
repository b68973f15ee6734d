//! Helpers for tests that run the real `siptg` binary: temp state, free ports, process groups
//! that are killed when the test ends, and waiting for conditions.
#![allow(dead_code)]

pub mod pbx;
pub mod tgapp;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn siptg() -> &'static str {
    env!("CARGO_BIN_EXE_siptg")
}

/// A free TCP port on loopback (the OS picks it; a race with other tests is unlikely).
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free UDP port on loopback.
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An RTP port range of `len` ports that no other test in this run uses.
pub fn rtp_range(len: u16) -> (u16, u16) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread by process id too, so parallel test binaries do not collide.
    let base = 20_000 + (std::process::id() % 20) as u16 * 1_000;
    let start = base + NEXT.fetch_add(len, Ordering::Relaxed) % 1000;
    (start, start + len - 1)
}

/// A child process in its own process group, killed (with its children) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `siptg args…` with output to `log`.
    pub fn start(args: &[&str], log: &Path) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(siptg())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .process_group(0)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL to this process only (its children, e.g. the dataplane, survive).
    pub fn kill_only(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A graceful stop first: `up`/`worker` then stop the dataplane they started (it runs in
        // its own process group, so killing ours would leave it behind).
        // SAFETY: signals the process group we created for this child; no memory is touched.
        unsafe {
            libc::kill(-self.pid(), libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Kills a process by pid (e.g. an adopted dataplane) on drop.
pub struct PidGuard(pub i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A config for one test: its own state dir, admin port, SIP port and RTP range.
pub struct TestNode {
    /// The dataplane driver written into the config (`auto`, `glommio`, `portable`).
    pub driver: &'static str,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub sip: SocketAddr,
    /// A SIP TCP listener besides UDP, when set before the config is written.
    pub sip_tcp: Option<SocketAddr>,
    pub rtp: (u16, u16),
}

impl TestNode {
    pub fn new() -> Self {
        Self {
            driver: "auto",
            dir: tempfile::tempdir().unwrap(),
            admin: free_tcp(),
            sip: free_udp(),
            sip_tcp: None,
            rtp: rtp_range(100),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes `siptg.toml` with the common sections plus `extra`, returns its path.
    pub fn write_config(&self, name: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[node]
state_dir = "var"
[log]
format = "pretty"
level = "info"
[admin]
listen = "{admin}"
[dataplane]
cores = "all"
pin_cores = false
rtp_port_min = {rmin}
rtp_port_max = {rmax}
media_ip = "127.0.0.1"
socket = "var/dp.sock"
stats_interval = "0s"
driver = "{driver}"
[sip]
listen = ["udp:{sip}"{tcp}]
{extra}
"#,
            tcp = self
                .sip_tcp
                .map(|t| format!(", \"tcp:{t}\""))
                .unwrap_or_default(),
            admin = self.admin,
            rmin = self.rtp.0,
            rmax = self.rtp.1,
            sip = self.sip,
            driver = self.driver,
        );
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// GET /status as JSON.
    pub fn status(&self) -> Option<serde_json::Value> {
        http_get(self.admin, "/status").and_then(|b| serde_json::from_str(&b).ok())
    }
}

/// A blocking HTTP GET against an admin endpoint; `None` when unreachable or not 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Sends one SIP request over UDP and returns the first final (non-1xx) response line.
pub fn sip_request(to: SocketAddr, method: &str) -> Option<String> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let me = sock.local_addr().unwrap();
    let branch: u32 = rand_u32();
    let msg = format!(
        "{method} sip:gw@{to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {me};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:pbx@{me}>;tag=t{branch}\r\n\
         To: <sip:gw@{to}>\r\n\
         Call-ID: {branch}@test\r\n\
         CSeq: 1 {method}\r\n\
         Contact: <sip:pbx@{me}>\r\n\
         Content-Length: 0\r\n\r\n"
    );
    sock.send_to(msg.as_bytes(), to).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let line = text.lines().next()?.to_string();
        if !line.starts_with("SIP/2.0 1") {
            return Some(line);
        }
    }
}

fn rand_u32() -> u32 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// One INVITE (PCMA offer) from 127.0.0.1 to `user` at `to`, with `X-Line: line` unless
/// `line` is empty; ACKs the final response and returns its status and reason.
#[allow(dead_code)]
pub fn sip_invite(to: SocketAddr, line: &str, user: &str) -> (u16, String) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let me = sock.local_addr().unwrap();
    let n: u32 = rand_u32();
    let line_hdr = if line.is_empty() {
        String::new()
    } else {
        format!("X-Line: {line}\r\n")
    };
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n",
        me.port() + 2
    );
    let msg = format!(
        "INVITE sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{n};rport\r\nMax-Forwards: 70\r\n\
         From: <sip:pbx@{me}>;tag=t{n}\r\nTo: <sip:{user}@{to}>\r\nCall-ID: {n}@gwtest\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:pbx@{me}>\r\n{line_hdr}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    sock.send_to(msg.as_bytes(), to).unwrap();
    let mut buf = [0u8; 8192];
    loop {
        let Ok((len, _)) = sock.recv_from(&mut buf) else {
            return (0, "no answer".into());
        };
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        let status = text.lines().next().unwrap_or_default().to_string();
        let Some(rest) = status.strip_prefix("SIP/2.0 ") else {
            continue;
        };
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code.parse().unwrap_or(0);
        if code < 200 {
            continue;
        }
        // ACK the final response (RFC 3261 §17.1.1.3).
        let to_hdr = text
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("to:"))
            .unwrap_or("To: <sip:x@x>")
            .to_string();
        let ack = format!(
            "ACK sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=t{n}\r\n{to_hdr}\r\nCall-ID: {n}@gwtest\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        );
        let _ = sock.send_to(ack.as_bytes(), to);
        return (code, reason.to_string());
    }
}

/// Registers `login`/`password` from 127.0.0.1 at `to`, answering one digest challenge;
/// the final status and reason.
#[allow(dead_code)]
pub fn sip_register(to: SocketAddr, login: &str, password: &str) -> (u16, String) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = sock.local_addr().unwrap();
    let uri = format!("sip:{to}");
    let call = rand_u32();
    let mut auth = String::new();
    let mut buf = [0u8; 4096];
    for cseq in 1..=2 {
        let n = rand_u32();
        let msg = format!(
            "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{n};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:{login}@{to}>;tag=r{n}\r\nTo: <sip:{login}@{to}>\r\nCall-ID: reg{call}@test\r\n\
             CSeq: {cseq} REGISTER\r\nContact: <sip:{login}@{me}>\r\nExpires: 300\r\n{auth}Content-Length: 0\r\n\r\n"
        );
        sock.send_to(msg.as_bytes(), to).unwrap();
        let text = loop {
            let Ok((len, _)) = sock.recv_from(&mut buf) else {
                return (0, "no answer".into());
            };
            let text = String::from_utf8_lossy(&buf[..len]).to_string();
            if !text.starts_with("SIP/2.0 1") {
                break text;
            }
        };
        let status = text.lines().next().unwrap_or_default();
        let rest = status.strip_prefix("SIP/2.0 ").unwrap_or_default();
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code.parse().unwrap_or(0);
        if code != 401 || cseq == 2 {
            return (code, reason.to_string());
        }
        let challenge = text
            .lines()
            .find_map(|l| l.strip_prefix("WWW-Authenticate:"))
            .unwrap_or_default()
            .trim()
            .to_string();
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
    unreachable!()
}

/// `siptg up` with the simulated Telegram cloud embedded: what the gateway tests share. Fields
/// left empty add nothing.
#[derive(Default)]
pub struct SimUp<'a> {
    /// The cloud's users (TOML, `[[users]]`), written to `world.toml`.
    pub world: &'a str,
    /// Accounts logged in at start, `name = "+phone", …`; `start` waits for all of them.
    pub autologin: &'a str,
    /// More lines of `[storage]` (e.g. `rpc_timeout = "2s"`).
    pub storage: &'a str,
    /// More lines of `[telegram]` (e.g. `sim_echo_users`).
    pub telegram: &'a str,
    /// The rest: connections, gateways.
    pub setup: &'a str,
}

impl SimUp<'_> {
    /// Writes the world and `siptg.toml` into `node` and starts `siptg up`; returns once every
    /// `autologin` account is logged in (and the admin endpoint answers).
    pub fn start(&self, node: &TestNode) -> Proc {
        std::fs::write(node.path("world.toml"), self.world).unwrap();
        let cfg = node.write_config(
            "siptg.toml",
            &format!(
                r#"
[storage]
key_file = "var/storage.key"
{storage}
[telegram]
backend = "sim"
sim_address = "{sim}"
sim_world = "world.toml"
sim_autologin = {{ {autologin} }}
{telegram}
[database]
path = "var/db.redb"
{setup}
"#,
                storage = self.storage,
                sim = free_tcp(),
                autologin = self.autologin,
                telegram = self.telegram,
                setup = self.setup,
            ),
        );
        let proc = Proc::start(
            &["up", "--config", cfg.to_str().unwrap()],
            &node.path("up.log"),
        );
        let accounts = self.autologin.matches('=').count();
        wait_for("the accounts logged in", Duration::from_secs(40), || {
            (proc.log().matches("simulated account logged in").count() >= accounts).then_some(())
        });
        wait_for("the admin endpoint", Duration::from_secs(30), || {
            node.status()
        });
        proc
    }

    /// The simulated cloud's address, as written in `node`'s config.
    pub fn sim_address(node: &TestNode) -> SocketAddr {
        let text = std::fs::read_to_string(node.path("siptg.toml")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("sim_address = "))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .expect("sim_address in siptg.toml")
    }
}

/// Runs `siptg GROUP --admin <node's admin> ARGS…` (`args[0]` is the group: `gateway`,
/// `connection`); whether it succeeded, and its stdout and stderr.
pub fn admin_cli(node: &TestNode, args: &[&str]) -> (bool, String) {
    let admin = node.admin.to_string();
    let mut all = vec![args[0], "--admin", admin.as_str()];
    all.extend_from_slice(&args[1..]);
    let out = Command::new(siptg()).args(&all).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
