//! Gateway capacity: N concurrent SIP ⇄ Telegram calls through a real `siptg up`, transcoded
//! (G.711 on the SIP side, Opus over DTLS-SRTP on the Telegram side), measured in one run.
//!
//! Two siptg processes: the Telegram side (`siptg up` running the simulated cloud and a simulated
//! user who answers every call and echoes it, with its own dataplane on core 0) and the gateway
//! under test (`siptg up` with a gateway whose account was logged in by `siptg storage login`,
//! its dataplane on core 1). The load generator (this process) is a PBX on an IP trunk: it
//! places N calls to the echo user, sends 20 ms PCMA packets on every call and counts what comes
//! back. Over the steady window it measures the gateway's CPU time (the process and its
//! dataplane child) and resident memory against an idle baseline; the Telegram side is not
//! counted.
//!
//! Points: N = 50, 100, 200 by default (`--calls N --seconds S` for one). The highest N whose
//! loss stays under 0.1 % gives `transcoded_calls_per_core = N / (CPU-seconds per second)`.
//! Last line: `RESULT gateway transcoded_calls_per_core=… cpu_pct_per_call=… rss_kib_per_call=…`

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(5999)
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(6999)
}

fn stat_fields(pid: i32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().map(str::to_string).collect()
}

fn cpu_s(pid: i32) -> f64 {
    let f = stat_fields(pid);
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn rss_kib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// siptg and its children (the dataplane).
fn family(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if stat_fields(p).get(1).and_then(|v| v.parse::<i32>().ok()) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

struct Siptg {
    child: Child,
    sip: SocketAddr,
}

impl Drop for Siptg {
    fn drop(&mut self) {
        // SAFETY: signals a child we started; no memory is touched.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(8);
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

/// `SIPTG_BENCH_LOGS=DIR` keeps each siptg's log (`DIR/<config name>.log`) for diagnosis.
fn spawn(args: &[&str], config: &std::path::Path) -> Child {
    let log = std::env::var_os("SIPTG_BENCH_LOGS").and_then(|d| {
        let name = config.file_stem()?.to_string_lossy().to_string();
        std::fs::File::create(std::path::Path::new(&d).join(format!("{name}.log"))).ok()
    });
    Command::new(env!("CARGO_BIN_EXE_siptg"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log.map_or(Stdio::null(), Stdio::from))
        .spawn()
        .expect("start siptg")
}

/// The Telegram side, then the gateway; `dir` keeps their files.
fn start_siptg(dir: &tempfile::TempDir) -> (Siptg, Siptg) {
    let sip: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tg_sip = free_port();
    let (admin, tg_admin, sim) = (free_tcp(), free_tcp(), free_tcp());
    let d = dir.path().display();
    let level = std::env::var("SIPTG_BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    std::fs::write(
        dir.path().join("world.toml"),
        "[flood]\ncalls_per_minute = 1000000\nstranger_calls = 1000000\n\
         [[users]]\nid = 1\nphone = \"10000000001\"\nusername = \"gateway_tg\"\n\
         [[users]]\nid = 2\nphone = \"10000000002\"\nusername = \"echo_tg\"\n",
    )
    .expect("world");
    let tg_cfg = format!(
        "[node]\nstate_dir = \"{d}/tg\"\n[admin]\nlisten = \"127.0.0.1:{tg_admin}\"\n[log]\nlevel = \"{level}\"\n\
         [dataplane]\ncores = [0]\nsocket = \"{d}/tg/dp.sock\"\nrtp_port_min = 44000\nrtp_port_max = 45999\nmedia_ip = \"127.0.0.1\"\nrtp_timeout = \"60s\"\n\
         [sip]\nlisten = [\"udp:127.0.0.1:{tg_sip}\"]\n\
         [storage]\nkey_file = \"{d}/tg/storage.key\"\n[database]\npath = \"{d}/tg/db.redb\"\n\
         [telegram]\nbackend = \"sim\"\nsim_address = \"127.0.0.1:{sim}\"\nsim_world = \"{d}/world.toml\"\nsim_echo_users = [\"+10000000002\"]\n"
    );
    let gw_cfg = format!(
        "[node]\nstate_dir = \"{d}/gw\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[log]\nlevel = \"{level}\"\n\
         [dataplane]\ncores = [1]\nsocket = \"{d}/gw/dp.sock\"\nrtp_port_min = 42000\nrtp_port_max = 43999\nmedia_ip = \"127.0.0.1\"\nrtp_timeout = \"60s\"\n\
         [sip]\nlisten = [\"udp:{sip}\"]\n\
         [storage]\nkey_file = \"{d}/gw/storage.key\"\n[database]\npath = \"{d}/gw/db.redb\"\n\
         [telegram]\nbackend = \"sim\"\nsim_address = \"127.0.0.1:{sim}\"\nsim_embedded = false\n\
         [[connection]]\nname = \"trunk\"\ntype = \"ip\"\nserver = \"127.0.0.1:9\"\nkeepalive = \"0s\"\ntrusted_ips = [\"127.0.0.1\"]\ncodecs = [\"PCMA\"]\n\
         [[gateway]]\nname = \"gw\"\naccount = \"gateway\"\nconnections = [\"trunk\"]\nlines = 100000\n"
    );
    let tg_path = dir.path().join("tg.toml");
    let gw_path = dir.path().join("gw.toml");
    std::fs::write(&tg_path, tg_cfg).expect("config");
    std::fs::write(&gw_path, gw_cfg).expect("config");
    let tg = Siptg {
        child: spawn(&["up"], &tg_path),
        sip: SocketAddr::from(([127, 0, 0, 1], tg_sip)),
    };
    // Log the gateway's account in at the cloud (as an operator would), then start the gateway.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(env!("CARGO_BIN_EXE_siptg"))
            .args([
                "storage",
                "login",
                "gateway",
                "--phone",
                "+10000000001",
                "--code",
                "12345",
                "--config",
            ])
            .arg(&gw_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let gw = Siptg {
        child: spawn(&["up"], &gw_path),
        sip,
    };
    (tg, gw)
}

/// One call of the generator: its SIP socket and where the gateway wants its media.
struct Call {
    sip: UdpSocket,
    media: Option<SocketAddr>,
    call_id: String,
    to: String,
}

/// Places a call whose media comes to the generator's one RTP socket (`rtp_port`): one socket
/// for every call keeps the generator cheap (the gateway's legs latch to it all the same).
fn invite(gw: SocketAddr, rtp_port: u16) -> Option<Call> {
    let sip = UdpSocket::bind("127.0.0.1:0").ok()?;
    sip.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let me = sip.local_addr().ok()?;
    let n: u64 = rand::random();
    let call_id = format!("{n:x}@bench");
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {rtp_port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=ptime:20\r\n"
    );
    let msg = format!(
        "INVITE sip:+10000000002@{gw} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{n:x};rport\r\nMax-Forwards: 70\r\n\
         From: <sip:pbx@{me}>;tag=b{n:x}\r\nTo: <sip:+10000000002@{gw}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:pbx@{me}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    sip.send_to(msg.as_bytes(), gw).ok()?;
    let mut buf = [0u8; 8192];
    loop {
        let (len, _) = sip.recv_from(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        let code: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
        if code < 200 {
            continue;
        }
        let to = text
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("to:"))?
            .to_string();
        let ack = format!(
            "ACK sip:+10000000002@{gw} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{:x};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:pbx@{me}>;tag=b{n:x}\r\n{to}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            rand::random::<u64>()
        );
        let _ = sip.send_to(ack.as_bytes(), gw);
        if code != 200 {
            return None;
        }
        let port: u16 = text
            .lines()
            .find_map(|l| l.strip_prefix("m=audio "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|p| p.parse().ok())?;
        return Some(Call {
            sip,
            media: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            call_id,
            to,
        });
    }
}

fn bye(gw: SocketAddr, c: &Call) {
    let me = c.sip.local_addr().unwrap();
    let msg = format!(
        "BYE sip:+10000000002@{gw} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{:x};rport\r\nMax-Forwards: 70\r\n\
         From: <sip:pbx@{me}>;tag=b{}\r\n{}\r\nCall-ID: {}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        rand::random::<u64>(),
        c.call_id.split('@').next().unwrap_or(""),
        c.to,
        c.call_id
    );
    let _ = c.sip.send_to(msg.as_bytes(), gw);
}

struct Point {
    calls: usize,
    cpu_per_s: f64,
    rss_kib_per_call: f64,
    loss: f64,
}

fn run_point(calls: usize, seconds: f64) -> Option<Point> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_tg, gw) = start_siptg(&dir);
    let pid = gw.child.id() as i32;
    let rtp = UdpSocket::bind("127.0.0.1:0").ok()?;
    let rtp_port = rtp.local_addr().ok()?.port();
    rtp.set_nonblocking(true).ok()?;
    // Ready when a call goes through.
    let end = Instant::now() + Duration::from_secs(60);
    let mut first = None;
    while Instant::now() < end && first.is_none() {
        first = invite(gw.sip, rtp_port);
        if first.is_none() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let first = first?;
    bye(gw.sip, &first);
    std::thread::sleep(Duration::from_secs(2));
    let fam = family(pid);
    let rss0_each: Vec<f64> = fam.iter().map(|&p| rss_kib(p)).collect();
    let rss0: f64 = rss0_each.iter().sum();
    let mut active: Vec<Call> = Vec::new();
    for _ in 0..calls {
        if let Some(c) = invite(gw.sip, rtp_port) {
            active.push(c);
        }
    }
    if active.len() < calls {
        eprintln!(
            "gateway bench: only {} of {calls} calls answered",
            active.len()
        );
    }
    // Media: 20 ms PCMA on every call; warm up 3 s, then measure.
    let payload = [0xd5u8; 160];
    let mut pkt = vec![0u8; 172];
    pkt[0] = 0x80;
    pkt[1] = 8;
    pkt[12..].copy_from_slice(&payload);
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let warm = Duration::from_secs(3);
    let total = warm + Duration::from_secs_f64(seconds);
    let (mut cpu0, mut t0, mut sent, mut received) = (0.0, start, 0u64, 0u64);
    let mut measuring = false;
    let mut tick = 0u64;
    // Packets back per call (by the gateway's media address), to tell a few silent calls from
    // loss spread over all of them.
    let index: std::collections::HashMap<SocketAddr, usize> = active
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.media.map(|m| (m, i)))
        .collect();
    let mut per_call = vec![0u64; active.len()];
    while start.elapsed() < total {
        if !measuring && start.elapsed() >= warm {
            measuring = true;
            cpu0 = family(pid).iter().map(|&p| cpu_s(p)).sum();
            t0 = Instant::now();
            received = 0;
            sent = 0;
        }
        for (i, c) in active.iter().enumerate() {
            let seq = (tick as u16).wrapping_add(i as u16);
            pkt[2..4].copy_from_slice(&seq.to_be_bytes());
            pkt[4..8].copy_from_slice(&((tick as u32).wrapping_mul(160)).to_be_bytes());
            pkt[8..12].copy_from_slice(&(i as u32 + 1).to_be_bytes());
            if let Some(m) = c.media {
                let _ = rtp.send_to(&pkt, m);
            }
        }
        if measuring {
            sent += active.len() as u64;
        }
        tick += 1;
        let next = start + Duration::from_millis(20 * tick);
        while Instant::now() < next {
            while let Ok((n, from)) = rtp.recv_from(&mut buf) {
                if n > 12 && measuring {
                    received += 1;
                    if let Some(&i) = index.get(&from) {
                        per_call[i] += 1;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let expected = (wall * 50.0) as u64;
    let silent = per_call.iter().filter(|&&r| r < expected / 10).count();
    let short = per_call
        .iter()
        .filter(|&&r| r < expected * 99 / 100)
        .count();
    if short > 0 {
        eprintln!(
            "gateway bench: {} calls: {silent} silent, {short} below 99 % of the expected {expected} packets",
            active.len()
        );
    }
    let fam = family(pid);
    let cpu = fam.iter().map(|&p| cpu_s(p)).sum::<f64>() - cpu0;
    let rss1: f64 = fam.iter().map(|&p| rss_kib(p)).sum();
    // Where the memory went: the control process first, then its dataplane.
    let split: Vec<String> = fam
        .iter()
        .zip(rss0_each.iter().chain(std::iter::repeat(&0.0)))
        .map(|(&p, &r0)| format!("{:.1}", (rss_kib(p) - r0) / active.len().max(1) as f64))
        .collect();
    eprintln!(
        "gateway bench: {} calls, RSS KiB/call by process (control, dataplane): {}",
        active.len(),
        split.join(", ")
    );
    for c in &active {
        bye(gw.sip, c);
    }
    let n = active.len().max(1);
    // Echoed audio lags by the pipeline's delay; a lost packet shows as a missing one.
    let loss = (1.0 - received as f64 / sent.max(1) as f64).max(0.0);
    Some(Point {
        calls: active.len(),
        cpu_per_s: cpu / wall,
        rss_kib_per_call: ((rss1 - rss0) / n as f64).max(0.0),
        loss,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let seconds = arg("--seconds").unwrap_or(10.0);
    let points: Vec<usize> = match arg("--calls") {
        Some(n) => vec![n as usize],
        None => vec![50, 100, 200],
    };
    println!("gateway bench: the gateway (siptg up + its dataplane on 1 core) carrying N transcoded SIP ⇄ Telegram calls");
    println!(
        "{:>6} {:>10} {:>14} {:>16} {:>8}",
        "calls", "cpu/s", "cpu %/call", "RSS KiB/call", "loss %"
    );
    let mut best: Option<Point> = None;
    for n in points {
        let Some(p) = run_point(n, seconds) else {
            println!("{n:>6}  (no calls went through)");
            continue;
        };
        println!(
            "{:>6} {:>10.3} {:>14.3} {:>16.1} {:>8.3}",
            p.calls,
            p.cpu_per_s,
            100.0 * p.cpu_per_s / p.calls.max(1) as f64,
            p.rss_kib_per_call,
            100.0 * p.loss
        );
        if p.loss < 0.001 && best.as_ref().is_none_or(|b| p.calls > b.calls) {
            best = Some(p);
        }
    }
    match best {
        Some(p) => {
            let per_core = p.calls as f64 / p.cpu_per_s.max(1e-9);
            println!(
                "RESULT gateway transcoded_calls_per_core={:.0} cpu_pct_per_call={:.3} rss_kib_per_call={:.1} calls={} loss_pct={:.3}",
                per_core,
                100.0 * p.cpu_per_s / p.calls.max(1) as f64,
                p.rss_kib_per_call,
                p.calls,
                100.0 * p.loss
            );
        }
        None => println!("RESULT gateway transcoded_calls_per_core=0 cpu_pct_per_call=0 rss_kib_per_call=0 calls=0 loss_pct=100"),
    }
}
