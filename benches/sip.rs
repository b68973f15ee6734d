//! SIP call-setup and registration rates of a real `siptg up` (Worker + Manager + dataplane).
//!
//! The load generator (this process, one thread, UDP on loopback) registers two PBX connections,
//! `uac` and `uas`, then runs calls from `uac` to `uas` through siptg's B2BUA:
//! INVITE → 100 → 180 → 200 → ACK → BYE → 200 on the caller's side, the same mirrored on the
//! callee's, with a media session and two dataplane legs created and deleted per call. It keeps
//! a window of calls in flight. Then it sends digest-authenticated REGISTERs (each answered
//! without a new challenge, nonce count increasing).
//!
//! siptg's CPU time (utime + stime of the siptg process and its dataplane child) over each phase
//! gives rates per core: `cps_per_core` = completed calls / CPU-seconds, `reg_per_s` =
//! REGISTERs answered 200 / CPU-seconds. Last line:
//! `RESULT sip cps_per_core=… reg_per_s=… calls=… failed=… wall_cps=…`.
//! `-- --calls N` changes the number of calls (default 5000).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use siptg_control::sip::digest;
use siptg_control::sip::msg::{parse_datagram, Method, SipMessage, SipRequest, SipResponse};

const WINDOW: usize = 64;

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(5999)
}

fn cpu_us(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

/// siptg and its children (the dataplane), by parent pid.
fn family(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            if rest
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<i32>().ok())
                == Some(pid)
            {
                out.push(p);
            }
        }
    }
    out
}

fn family_cpu(pids: &[i32]) -> f64 {
    pids.iter().map(|&p| cpu_us(p)).sum()
}

struct Siptg {
    child: Child,
    _dir: tempfile::TempDir,
    sip: SocketAddr,
}

impl Drop for Siptg {
    fn drop(&mut self) {
        // SAFETY: signals the process group of a child we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_siptg() -> Siptg {
    let dir = tempfile::tempdir().expect("tempdir");
    let sip: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin = free_port();
    let cfg = format!(
        "[node]\nstate_dir = \"{d}/state\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [log]\nlevel = \"warn\"\n\
         [dataplane]\ncores = [1]\nsocket = \"{d}/state/dp.sock\"\nrtp_port_min = 48000\nrtp_port_max = 49999\n\
         [sip]\nlisten = [\"udp:{sip}\"]\n\
         [[connection]]\nname = \"uac\"\ntype = \"pbx_registers\"\nlogin = \"uac\"\npassword = \"uac-password\"\ntrusted_ips = [\"127.0.0.1/32\"]\n\
         [[connection]]\nname = \"uas\"\ntype = \"pbx_registers\"\nlogin = \"uas\"\npassword = \"uas-password\"\ntrusted_ips = [\"127.0.0.1/32\"]\n",
        d = dir.path().display()
    );
    let path = dir.path().join("siptg.toml");
    std::fs::write(&path, cfg).expect("config");
    let exe = env!("CARGO_BIN_EXE_siptg");
    let child = Command::new(exe)
        .args(["up", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start siptg up");
    Siptg {
        child,
        _dir: dir,
        sip,
    }
}

/// One UDP endpoint of the generator.
struct Ua {
    sock: UdpSocket,
    addr: SocketAddr,
    user: &'static str,
    cseq: u32,
}

impl Ua {
    fn new(user: &'static str) -> Ua {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        let addr = sock.local_addr().expect("addr");
        Ua {
            sock,
            addr,
            user,
            cseq: 0,
        }
    }

    fn recv(&self, buf: &mut [u8]) -> Option<SipMessage> {
        let (n, _) = self.sock.recv_from(buf).ok()?;
        parse_datagram(&buf[..n]).ok()
    }

    fn send(&self, to: SocketAddr, msg: &[u8]) {
        let _ = self.sock.send_to(msg, to);
    }

    fn register(&mut self, gw: SocketAddr, call_id: &str, auth: Option<&str>) -> Vec<u8> {
        self.cseq += 1;
        let mut r = SipRequest::new(Method::Register, format!("sip:{gw}"));
        let h = r.headers_mut();
        h.add(
            "Via",
            format!(
                "SIP/2.0/UDP {};branch=z9hG4bK{:x};rport",
                self.addr,
                rand::random::<u64>()
            ),
        );
        h.add("Max-Forwards", "70");
        h.add(
            "From",
            format!("<sip:{}@{}>;tag=r{}", self.user, gw.ip(), self.cseq),
        );
        h.add("To", format!("<sip:{}@{}>", self.user, gw.ip()));
        h.add("Call-ID", call_id.to_string());
        h.add("CSeq", format!("{} REGISTER", self.cseq));
        h.add("Contact", format!("<sip:{}@{}>", self.user, self.addr));
        h.add("Expires", "3600");
        if let Some(a) = auth {
            h.add("Authorization", a.to_string());
        }
        r.to_bytes()
    }
}

/// Waits for a final response on `ua` (other traffic ignored), at most `limit`.
fn final_response(ua: &Ua, limit: Duration) -> Option<SipResponse> {
    let end = Instant::now() + limit;
    let mut buf = vec![0u8; 65_535];
    while Instant::now() < end {
        match ua.recv(&mut buf) {
            Some(SipMessage::Response(r)) if r.code >= 200 => return Some(r),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    None
}

/// Registers `ua` (challenge, then credentials); returns the challenge for later REGISTERs.
fn register(ua: &mut Ua, gw: SocketAddr, password: &str) -> Option<String> {
    let call_id = format!("reg-{}-{:x}", ua.user, rand::random::<u32>());
    for _ in 0..50 {
        let msg = ua.register(gw, &call_id, None);
        ua.send(gw, &msg);
        let Some(ch) = final_response(ua, Duration::from_millis(500)) else {
            continue; // the Manager link may still be coming up
        };
        if ch.code != 401 {
            continue;
        }
        let challenge = ch.header("WWW-Authenticate")?.to_string();
        let auth = digest::respond(
            &challenge,
            "REGISTER",
            &format!("sip:{gw}"),
            ua.user,
            password,
            digest::new_cnonce,
            1,
        )
        .ok()?;
        let msg = ua.register(gw, &call_id, Some(&auth));
        ua.send(gw, &msg);
        if final_response(ua, Duration::from_secs(2)).map(|r| r.code) == Some(200) {
            return Some(challenge);
        }
    }
    None
}

fn sdp(addr: SocketAddr, port: u16) -> String {
    format!(
        "v=0\r\no=gen 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n",
        ip = addr.ip()
    )
}

struct Pending {
    started: Instant,
    invite: SipRequest,
    acked: bool,
    /// The last request sent (INVITE, then BYE) and when, for UDP retransmission (Timer A/E).
    last: Vec<u8>,
    sent_at: Instant,
    answered: bool,
}

fn run_calls(gw: SocketAddr, uac: &Ua, uas: &Ua, calls: usize) -> (usize, usize, Duration) {
    let mut buf = vec![0u8; 65_535];
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let (mut started, mut done, mut failed) = (0usize, 0usize, 0usize);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(120);
    while (done + failed) < calls && Instant::now() < deadline {
        while pending.len() < WINDOW && started < calls {
            started += 1;
            let call_id = format!("bench-{started}-{:x}", rand::random::<u32>());
            let body = sdp(uac.addr, 20000 + (started % 1000) as u16 * 2);
            let mut inv = SipRequest::new(Method::Invite, format!("sip:uas@{gw}"));
            let h = inv.headers_mut();
            h.add(
                "Via",
                format!(
                    "SIP/2.0/UDP {};branch=z9hG4bK{:x};rport",
                    uac.addr,
                    rand::random::<u64>()
                ),
            );
            h.add("Max-Forwards", "70");
            h.add("From", format!("<sip:uac@{}>;tag=c{started}", gw.ip()));
            h.add("To", format!("<sip:uas@{}>", gw.ip()));
            h.add("Call-ID", call_id.clone());
            h.add("CSeq", "1 INVITE");
            h.add("Contact", format!("<sip:uac@{}>", uac.addr));
            h.add("Content-Type", "application/sdp");
            inv.body = body.into_bytes();
            let bytes = inv.to_bytes();
            uac.send(gw, &bytes);
            pending.insert(
                call_id,
                Pending {
                    started: Instant::now(),
                    invite: inv,
                    acked: false,
                    last: bytes,
                    sent_at: Instant::now(),
                    answered: false,
                },
            );
        }
        let mut idle = true;
        // The callee: answer INVITEs at once, BYEs with 200.
        while let Some(msg) = uas.recv(&mut buf) {
            idle = false;
            if let SipMessage::Request(req) = msg {
                match req.method {
                    Method::Invite => {
                        let tag = format!("s{:x}", rand::random::<u32>());
                        let ringing = SipResponse::to(&req, 180, "Ringing", Some(&tag));
                        uas.send(gw, &ringing.to_bytes());
                        let mut ok = SipResponse::to(&req, 200, "OK", Some(&tag));
                        ok.headers_mut()
                            .add("Contact", format!("<sip:uas@{}>", uas.addr));
                        ok.headers_mut().add("Content-Type", "application/sdp");
                        ok.body = sdp(uas.addr, 30000).into_bytes();
                        uas.send(gw, &ok.to_bytes());
                    }
                    Method::Bye => {
                        let ok = SipResponse::to(&req, 200, "OK", None);
                        uas.send(gw, &ok.to_bytes());
                    }
                    _ => {}
                }
            }
        }
        // The caller: ACK the 200 and hang up at once; the BYE's 200 completes the call.
        while let Some(msg) = uac.recv(&mut buf) {
            idle = false;
            let SipMessage::Response(resp) = msg else {
                continue;
            };
            let Some(call_id) = resp.call_id().map(str::to_string) else {
                continue;
            };
            let Some((_, method)) = resp.cseq() else {
                continue;
            };
            if let Some(p) = pending.get_mut(&call_id) {
                if method == Method::Invite {
                    p.answered = true; // any response stops INVITE retransmissions
                }
            }
            match (method, resp.code) {
                (Method::Invite, 200) => {
                    let Some(p) = pending.get_mut(&call_id) else {
                        continue;
                    };
                    if p.acked {
                        continue;
                    }
                    p.acked = true;
                    let target = resp
                        .header("Contact")
                        .map(|c| c.trim_matches(|ch| ch == '<' || ch == '>').to_string())
                        .unwrap_or_else(|| format!("sip:{gw}"));
                    for (method, cseq) in [(Method::Ack, 1u32), (Method::Bye, 2)] {
                        let mut r = SipRequest::new(method.clone(), target.clone());
                        let h = r.headers_mut();
                        h.add(
                            "Via",
                            format!(
                                "SIP/2.0/UDP {};branch=z9hG4bK{:x};rport",
                                uac.addr,
                                rand::random::<u64>()
                            ),
                        );
                        h.add("Max-Forwards", "70");
                        h.add(
                            "From",
                            p.invite.header("From").unwrap_or_default().to_string(),
                        );
                        h.add("To", resp.header("To").unwrap_or_default().to_string());
                        h.add("Call-ID", call_id.clone());
                        h.add("CSeq", format!("{cseq} {}", method.as_str()));
                        let bytes = r.to_bytes();
                        uac.send(gw, &bytes);
                        if method == Method::Bye {
                            p.last = bytes;
                            p.sent_at = Instant::now();
                            p.answered = false;
                        }
                    }
                }
                (Method::Bye, 200) if pending.remove(&call_id).is_some() => done += 1,
                (Method::Invite, code) if code >= 300 && pending.remove(&call_id).is_some() => {
                    failed += 1
                }
                _ => {}
            }
        }
        let now = Instant::now();
        // Retransmit an unanswered INVITE or BYE every 500 ms, as a UA does on UDP.
        for p in pending.values_mut() {
            if !p.answered && now.duration_since(p.sent_at) >= Duration::from_millis(500) {
                uac.send(gw, &p.last);
                p.sent_at = now;
            }
        }
        pending.retain(|_, p| {
            let alive = now.duration_since(p.started) < Duration::from_secs(10);
            if !alive {
                failed += 1;
            }
            alive
        });
        if idle {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    (done, failed, t0.elapsed())
}

fn main() {
    let calls: usize = std::env::args()
        .skip_while(|a| a != "--calls")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let siptg = start_siptg();
    let pid = siptg.child.id() as i32;
    let gw = siptg.sip;
    let mut uac = Ua::new("uac");
    let mut uas = Ua::new("uas");
    std::thread::sleep(Duration::from_millis(500));
    let Some(challenge) = register(&mut uac, gw, "uac-password") else {
        eprintln!("sip bench: siptg did not accept the registration");
        std::process::exit(1);
    };
    if register(&mut uas, gw, "uas-password").is_none() {
        eprintln!("sip bench: siptg did not accept the registration");
        std::process::exit(1);
    }
    // Warm-up, then the measured calls.
    run_calls(gw, &uac, &uas, 200);
    let pids = family(pid);
    let cpu0 = family_cpu(&pids);
    let per0: Vec<f64> = pids.iter().map(|&p| cpu_us(p)).collect();
    let (done, failed, wall) = run_calls(gw, &uac, &uas, calls);
    let cpu = (family_cpu(&pids) - cpu0) / 1e6;
    let split: Vec<String> = pids
        .iter()
        .zip(&per0)
        .map(|(&p, c0)| format!("{:.2} s", (cpu_us(p) - c0) / 1e6))
        .collect();
    let cps_per_core = done as f64 / cpu.max(1e-6);
    let wall_cps = done as f64 / wall.as_secs_f64();

    // REGISTER refreshes with digest: one request each (the nonce stays valid, nc counts up).
    let n_reg = 5000u32;
    let call_id = format!("reg-bench-{:x}", rand::random::<u32>());
    let cpu0 = family_cpu(&pids);
    let t0 = Instant::now();
    let mut ok = 0u32;
    let mut buf = vec![0u8; 65_535];
    let mut sent = 0u32;
    let mut inflight = 0u32;
    while (sent < n_reg || inflight > 0) && t0.elapsed() < Duration::from_secs(60) {
        while sent < n_reg && inflight < WINDOW as u32 {
            sent += 1;
            inflight += 1;
            let auth = digest::respond(
                &challenge,
                "REGISTER",
                &format!("sip:{gw}"),
                "uac",
                "uac-password",
                digest::new_cnonce,
                sent,
            )
            .unwrap_or_default();
            let msg = uac.register(gw, &call_id, Some(&auth));
            uac.send(gw, &msg);
        }
        match uac.recv(&mut buf) {
            Some(SipMessage::Response(r)) if r.code >= 200 => {
                inflight = inflight.saturating_sub(1);
                if r.code == 200 {
                    ok += 1;
                }
            }
            Some(_) => {}
            None => std::thread::sleep(Duration::from_micros(100)),
        }
    }
    let reg_cpu = (family_cpu(&pids) - cpu0) / 1e6;
    let reg_per_s = ok as f64 / reg_cpu.max(1e-6);

    println!(
        "sip bench: siptg up (Worker + Manager + dataplane on core 1), {WINDOW} calls in flight"
    );
    println!("  calls completed      {done} of {calls} ({failed} failed) in {:.1} s wall = {wall_cps:.0} cps", wall.as_secs_f64());
    println!("  siptg CPU            {cpu:.2} s (control, dataplane: {}) -> {cps_per_core:.0} call setups per CPU-second", split.join(", "));
    println!("  REGISTERs with auth  {ok} of {n_reg} answered 200, {reg_cpu:.2} CPU-s -> {reg_per_s:.0} per CPU-second");
    println!(
        "RESULT sip cps_per_core={cps_per_core:.0} reg_per_s={reg_per_s:.0} calls={done} failed={failed} wall_cps={wall_cps:.0}"
    );
    drop(siptg);
}
