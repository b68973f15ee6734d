//! Relay capacity benchmark: siptg's dataplane against rtpengine (userspace) and a minimal
//! epoll + recvmmsg/sendmmsg forwarder (the kernel floor), under the same load in the same run.
//!
//! Load: N bridged G.711 calls on loopback; each call has two legs and sends 50 packets/s each
//! way (172-byte RTP), evenly paced. One generator thread pinned to core 0 sends with `sendmmsg`
//! from two sockets and receives with `recvmmsg` and kernel timestamps (SO_TIMESTAMPNS), so it
//! stays cheap; the relay under test is pinned to core 1. Each relay's own CPU time
//! (utime + stime of its process) is measured over the steady-state window.
//!
//! `cargo bench --bench relay` runs N = 250, 1000, 2000, 2500; `-- --calls N --seconds S` runs one
//! point. Options: `--driver uring|portable|glommio`, `--relays floor,rtpengine,siptg`,
//! `--no-srtp` (skip the SRTP run behind `srtp_overhead`: siptg again with the A legs SDES-SRTP).
//! Each load prints one line per relay and then
//! `RESULT relay calls=N pps=… cpu_us_per_pkt=… vs_floor=… vs_rtpengine=… srtp_overhead=… loss=… p50_us=… p99_us=…`
//! where the figures are siptg's and the ratios are siptg's CPU per packet over the others'.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PKT: usize = 172;
const GEN_CORE: usize = 0;
const RELAY_CORE: u16 = 1;
const PTIME: Duration = Duration::from_millis(20);
const SLOT: Duration = Duration::from_micros(200);
const SLOTS: usize = 100;
const FLOOR_ENV: &str = "SIPTG_RELAY_FLOOR";

fn main() {
    if let Ok(spec) = std::env::var(FLOOR_ENV) {
        floor::run(&spec);
        return;
    }
    let args = Args::parse();
    let rtpengine = args.relays.contains(&"rtpengine") && rtpengine::ensure_installed();
    eprintln!(
        "relay bench: loads {:?}, {} s window, siptg driver {}, rtpengine {}",
        args.calls,
        args.seconds,
        args.driver,
        if rtpengine { "present" } else { "absent" }
    );
    for &n in &args.calls {
        let mut results: HashMap<&str, Measurement> = HashMap::new();
        for relay in &args.relays {
            if *relay == "rtpengine" && !rtpengine {
                continue;
            }
            let m = measure(relay, n, &args, false);
            println!(
                "relay={relay} calls={n} pps={:.0} cpu_us_per_pkt={:.2} loss={} p50_us={} p99_us={}",
                m.pps, m.cpu_us_per_pkt, m.lost, m.p50_us, m.p99_us
            );
            results.insert(relay, m);
        }
        let Some(s) = results.get("siptg") else {
            continue;
        };
        let ratio = |other: &str| {
            results.get(other).map_or("n/a".to_string(), |o| {
                format!("{:.2}", s.cpu_us_per_pkt / o.cpu_us_per_pkt)
            })
        };
        let srtp = if args.srtp {
            let m = measure("siptg", n, &args, true);
            println!(
                "relay=siptg-srtp calls={n} pps={:.0} cpu_us_per_pkt={:.2} loss={} p50_us={} p99_us={}",
                m.pps, m.cpu_us_per_pkt, m.lost, m.p50_us, m.p99_us
            );
            format!("{:.2}", m.cpu_us_per_pkt / s.cpu_us_per_pkt)
        } else {
            "n/a".to_string()
        };
        println!(
            "RESULT relay calls={n} pps={:.0} cpu_us_per_pkt={:.2} vs_floor={} vs_rtpengine={} srtp_overhead={srtp} loss={} p50_us={} p99_us={}",
            s.pps,
            s.cpu_us_per_pkt,
            ratio("floor"),
            ratio("rtpengine"),
            s.lost,
            s.p50_us,
            s.p99_us
        );
    }
}

struct Args {
    calls: Vec<usize>,
    seconds: u64,
    warmup: u64,
    driver: String,
    relays: Vec<&'static str>,
    srtp: bool,
}

impl Args {
    fn parse() -> Self {
        let mut a = Args {
            calls: vec![250, 1000, 2000, 2500],
            seconds: 8,
            warmup: 2,
            driver: "uring".into(),
            relays: vec!["floor", "rtpengine", "siptg"],
            srtp: true,
        };
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < argv.len() {
            let val = argv.get(i + 1).cloned().unwrap_or_default();
            match argv[i].as_str() {
                "--calls" => {
                    a.calls = val.split(',').filter_map(|v| v.parse().ok()).collect();
                    i += 1;
                }
                "--seconds" => {
                    a.seconds = val.parse().unwrap_or(a.seconds);
                    i += 1;
                }
                "--warmup" => {
                    a.warmup = val.parse().unwrap_or(a.warmup);
                    i += 1;
                }
                "--driver" => {
                    a.driver = val;
                    i += 1;
                }
                "--relays" => {
                    a.relays = ["floor", "rtpengine", "siptg"]
                        .into_iter()
                        .filter(|r| val.split(',').any(|v| v == *r))
                        .collect();
                    i += 1;
                }
                "--no-srtp" => a.srtp = false,
                _ => {} // cargo's own flags such as --bench
            }
            i += 1;
        }
        a
    }
}

fn pin(core: usize) {
    set_affinity(&[core]);
}

/// Restores the thread to every CPU (children inherit the mask, and relays pin themselves).
fn unpin() {
    let n = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    set_affinity(&(0..n).collect::<Vec<_>>());
}

fn set_affinity(cores: &[usize]) {
    // SAFETY: a zeroed cpu_set_t we own, bits set, passed with its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        for &c in cores {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A relay process under test and the ports the generator sends to: (A side, B side) per call.
struct Running {
    child: Child,
    pid: i32,
    calls: Vec<(u16, u16)>,
    /// The A legs are SDES-SRTP (siptg only).
    srtp: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: signals a child we started.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.child.wait();
        // An io_uring process's sockets close only when the kernel finishes tearing its ring
        // down, a little after exit: wait until the ports are free for the next relay.
        let end = Instant::now() + Duration::from_secs(10);
        let ports: Vec<u16> = self
            .calls
            .iter()
            .take(64)
            .flat_map(|&(a, b)| [a, b])
            .collect();
        while Instant::now() < end
            && ports
                .iter()
                .any(|&p| UdpSocket::bind(("127.0.0.1", p)).is_err())
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Generator sockets: every A leg's remote is `ga`, every B leg's is `gb`.
struct Gen {
    ga: UdpSocket,
    gb: UdpSocket,
}

impl Gen {
    fn new() -> Gen {
        let mk = || {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind generator socket");
            s.set_nonblocking(true).expect("nonblocking");
            let fd = s.as_raw_fd();
            let big: libc::c_int = 64 << 20;
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on our socket with live int arguments of the right size.
            unsafe {
                for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        opt,
                        (&big as *const libc::c_int).cast(),
                        4,
                    );
                }
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    4,
                );
            }
            s
        };
        Gen { ga: mk(), gb: mk() }
    }
}

struct Measurement {
    pps: f64,
    cpu_us_per_pkt: f64,
    lost: u64,
    p50_us: u64,
    p99_us: u64,
}

fn measure(relay: &str, n: usize, args: &Args, srtp: bool) -> Measurement {
    let gen = Gen::new();
    let ga = gen.ga.local_addr().unwrap();
    let gb = gen.gb.local_addr().unwrap();
    unpin();
    let running = match relay {
        "floor" => floor::start(n, ga, gb),
        "rtpengine" => rtpengine::start(n, ga, gb),
        _ => siptg::start(n, ga, gb, &args.driver, srtp),
    };
    pin(GEN_CORE);
    let m = drive(
        &gen,
        &running,
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.seconds),
    );
    drop(running);
    unpin();
    m
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Process CPU time (user + system) in microseconds, from /proc.
fn cpu_us(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

/// A batch sender over `sendmmsg` with one destination per message.
struct SendBatch {
    bufs: Vec<[u8; PKT + 16]>,
    /// When set, packets are SRTP-protected before sending (the A side of an SRTP run).
    srtp: Option<siptg_dataplane::srtp::SrtpContext>,
    dests: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

const SEND_BATCH: usize = 32;

impl SendBatch {
    fn new() -> Box<Self> {
        // SAFETY: plain C structs for which all-zero is valid.
        let mut b = Box::new(SendBatch {
            bufs: vec![[0u8; PKT + 16]; SEND_BATCH],
            srtp: None,
            dests: vec![unsafe { zeroed() }; SEND_BATCH],
            iovs: Vec::with_capacity(SEND_BATCH),
            hdrs: vec![unsafe { zeroed() }; SEND_BATCH],
            len: 0,
        });
        for i in 0..SEND_BATCH {
            let base = b.bufs[i].as_mut_ptr();
            b.iovs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: PKT,
            });
        }
        for i in 0..SEND_BATCH {
            let name = (&mut b.dests[i] as *mut libc::sockaddr_in).cast();
            let iov = &mut b.iovs[i] as *mut libc::iovec;
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = name;
            h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
        }
        b
    }

    fn push(&mut self, fd: i32, port: u16, ssrc: u32, seq: u16) {
        let i = self.len;
        let p = &mut self.bufs[i];
        p[0] = 0x80;
        p[1] = 8;
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&(seq as u32 * 160).to_be_bytes());
        p[8..12].copy_from_slice(&ssrc.to_be_bytes());
        p[12..20].copy_from_slice(&now_ns().to_be_bytes());
        p[20..PKT].fill(0xd5);
        let len = match &mut self.srtp {
            Some(ctx) => ctx.protect_rtp(p, PKT).unwrap_or(PKT),
            None => PKT,
        };
        self.iovs[i].iov_len = len;
        let d = &mut self.dests[i];
        d.sin_family = libc::AF_INET as libc::sa_family_t;
        d.sin_port = port.to_be();
        d.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        self.len += 1;
        if self.len == SEND_BATCH {
            self.flush(fd);
        }
    }

    fn flush(&mut self, fd: i32) {
        let mut off = 0;
        while off < self.len {
            // SAFETY: headers point into buffers owned by self (boxed, never resized).
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(off),
                    (self.len - off) as u32,
                    0,
                )
            };
            if r <= 0 {
                break;
            }
            off += r as usize;
        }
        self.len = 0;
    }
}

/// Receives with kernel timestamps; records latency and counts.
struct RecvBatch {
    bufs: Vec<[u8; 2048]>,
    ctrl: Vec<[u8; 64]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

const RECV_BATCH: usize = 64;

impl RecvBatch {
    fn new() -> Box<Self> {
        // SAFETY: plain C structs for which all-zero is valid.
        let mut b = Box::new(RecvBatch {
            bufs: vec![[0u8; 2048]; RECV_BATCH],
            ctrl: vec![[0u8; 64]; RECV_BATCH],
            iovs: Vec::with_capacity(RECV_BATCH),
            hdrs: vec![unsafe { zeroed() }; RECV_BATCH],
        });
        for i in 0..RECV_BATCH {
            let base = b.bufs[i].as_mut_ptr();
            b.iovs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: 2048,
            });
        }
        b
    }

    /// Drains `fd`; calls `f(latency_ns)` per packet; returns packets read.
    fn drain(&mut self, fd: i32, mut f: impl FnMut(Option<u64>)) -> usize {
        let mut total = 0;
        loop {
            for i in 0..RECV_BATCH {
                let ctrl = self.ctrl[i].as_mut_ptr();
                let iov = &mut self.iovs[i] as *mut libc::iovec;
                let h = &mut self.hdrs[i].msg_hdr;
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
                h.msg_iov = iov;
                h.msg_iovlen = 1;
                h.msg_control = ctrl.cast();
                h.msg_controllen = 64;
            }
            // SAFETY: headers point into buffers owned by self.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    RECV_BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                return total;
            }
            for i in 0..n as usize {
                let len = self.hdrs[i].msg_len as usize;
                // Only plain packets carry a readable send time (SRTP ones are encrypted).
                let sent = (len == PKT)
                    .then(|| u64::from_be_bytes(self.bufs[i][12..20].try_into().unwrap()));
                let rx = kernel_timestamp(&self.hdrs[i].msg_hdr);
                f(match (sent, rx) {
                    (Some(s), Some(r)) => Some(r.saturating_sub(s)),
                    _ => None,
                });
            }
            total += n as usize;
            if (n as usize) < RECV_BATCH {
                return total;
            }
        }
    }
}

fn kernel_timestamp(h: &libc::msghdr) -> Option<u64> {
    // SAFETY: walks the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Runs the load against `r` and measures it.
fn drive(gen: &Gen, r: &Running, warmup: Duration, window: Duration) -> Measurement {
    let streams = r.calls.len() * 2;
    // Stream s starts at phase s * 20 ms / streams: evenly spread over the packet time.
    let mut slots: Vec<Vec<usize>> = vec![Vec::new(); SLOTS];
    for s in 0..streams {
        let phase = s as u128 * PTIME.as_nanos() / streams as u128;
        slots[(phase / SLOT.as_nanos()) as usize % SLOTS].push(s);
    }
    let mut seq = vec![0u16; streams];
    let mut send_a = SendBatch::new();
    if r.srtp {
        // The relay's SRTP leg expects the keys it knows as "remote".
        send_a.srtp = Some(
            siptg_dataplane::srtp::SrtpContext::new(
                siptg_proto::SrtpSuite::AesCm128HmacSha1_80,
                &[3; 16],
                &[4; 14],
            )
            .unwrap(),
        );
    }
    let mut send_b = SendBatch::new();
    let mut recv = RecvBatch::new();
    let (fa, fb) = (gen.ga.as_raw_fd(), gen.gb.as_raw_fd());
    let mut hist = vec![0u64; 100_001];
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut win_rx, mut cpu0, mut in_window) = (0u64, 0.0, false);
    let start = Instant::now();
    let stop_at = start + warmup + window;
    let mut window_start = start;
    let cpu;
    let mut slot = 0u64;
    loop {
        let due = start + SLOT * slot as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if !in_window && Instant::now() >= start + warmup {
            in_window = true;
            window_start = Instant::now();
            cpu0 = cpu_us(r.pid);
        }
        if Instant::now() >= stop_at {
            cpu = cpu_us(r.pid) - cpu0;
            break;
        }
        for &s in &slots[slot as usize % SLOTS] {
            let (a, b) = r.calls[s / 2];
            if s % 2 == 0 {
                send_a.push(fa, a, s as u32, seq[s]);
            } else {
                send_b.push(fb, b, s as u32, seq[s]);
            }
            seq[s] = seq[s].wrapping_add(1);
            sent += 1;
        }
        send_a.flush(fa);
        send_b.flush(fb);
        for fd in [fa, fb] {
            let got = recv.drain(fd, |lat| {
                if let (true, Some(ns)) = (in_window, lat) {
                    hist[((ns / 1000) as usize).min(100_000)] += 1;
                }
            });
            received += got as u64;
            if in_window {
                win_rx += got as u64;
            }
        }
        slot += 1;
    }
    let elapsed = window_start.elapsed().as_secs_f64();
    // Let in-flight packets arrive before counting loss.
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        for fd in [fa, fb] {
            received += recv.drain(fd, |_| {}) as u64;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pct = |p: f64| {
        let total: u64 = hist.iter().sum();
        let target = (total as f64 * p).ceil() as u64;
        let mut acc = 0;
        for (us, c) in hist.iter().enumerate() {
            acc += c;
            if acc >= target.max(1) {
                return us as u64;
            }
        }
        0
    };
    Measurement {
        pps: win_rx as f64 / elapsed,
        cpu_us_per_pkt: cpu / win_rx.max(1) as f64,
        lost: sent.saturating_sub(received),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

mod siptg {
    use super::*;
    use siptg_control::dataplane::DataplaneClient;
    use siptg_proto::{Codec, LegSpec, SrtpKeys, SrtpSuite};

    pub fn start(n: usize, ga: SocketAddr, gb: SocketAddr, driver: &str, srtp: bool) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "[log]\nlevel = \"warn\"\n[dataplane]\ncores = [{RELAY_CORE}]\npin_cores = true\ndriver = \"{driver}\"\n\
                 rtp_port_min = 20000\nrtp_port_max = 30999\nmedia_ip = \"127.0.0.1\"\nsocket = \"dp.sock\"\n\
                 rtp_timeout = \"60s\"\nstats_interval = \"0s\"\n"
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_siptg"))
            .args(["dataplane", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .spawn()
            .expect("start siptg dataplane");
        let pid = child.id() as i32;
        let socket = dir.path().join("dp.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let calls = rt.block_on(async {
            let mut clients = Vec::new();
            for _ in 0..200 {
                if let Ok(c) = DataplaneClient::connect(&socket, "relay bench").await {
                    clients.push(c);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let first = clients.pop().expect("dataplane did not start");
            // Several connections in flight make setup fast on drivers that poll for commands.
            let mut conns = vec![first];
            for _ in 0..15 {
                conns.push(
                    DataplaneClient::connect(&socket, "relay bench")
                        .await
                        .unwrap(),
                );
            }
            let per = n.div_ceil(conns.len());
            let tasks: Vec<_> = conns
                .into_iter()
                .enumerate()
                .map(|(k, c)| {
                    let count = per.min(n.saturating_sub(k * per));
                    tokio::spawn(async move {
                        let mut out = Vec::with_capacity(count);
                        for i in 0..count {
                            let s = c.create_session(&format!("bench-{k}-{i}")).await.unwrap();
                            let a = c.add_leg(s, leg(ga, srtp)).await.unwrap();
                            let b = c.add_leg(s, leg(gb, false)).await.unwrap();
                            c.bridge(s, a.leg, b.leg).await.unwrap();
                            out.push((a.local.port(), b.local.port()));
                        }
                        out
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(n);
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        Running {
            child,
            pid,
            calls,
            srtp,
            _dir: Some(dir),
        }
    }

    fn leg(remote: SocketAddr, srtp: bool) -> LegSpec {
        LegSpec {
            remote: Some(remote),
            latch: false,
            local_ip: None,
            rtcp_mux: true,
            codec: Codec::pcma(),
            srtp: srtp.then(|| SrtpKeys {
                suite: SrtpSuite::AesCm128HmacSha1_80,
                local_key: vec![1; 16],
                local_salt: vec![2; 14],
                remote_key: vec![3; 16],
                remote_salt: vec![4; 14],
            }),
            continuity: false,
            telegram: None,
            direction: Default::default(),
        }
    }
}

mod rtpengine {
    use super::*;

    /// Installs rtpengine-daemon when missing (Debian package); false if it cannot be had.
    pub fn ensure_installed() -> bool {
        if which("rtpengine") {
            return true;
        }
        eprintln!("installing rtpengine-daemon (apt)…");
        let ok = Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rtpengine-daemon >/dev/null 2>&1",
            ])
            .status()
            .is_ok_and(|s| s.success());
        ok && which("rtpengine")
    }

    fn which(bin: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn start(n: usize, ga: SocketAddr, gb: SocketAddr) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let ng_port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("taskset")
            .args(["-c", &RELAY_CORE.to_string(), "rtpengine"])
            .args([
                "--config-file=none",
                "--table=-1",
                "--interface=127.0.0.1",
                &format!("--listen-ng=127.0.0.1:{ng_port}"),
                "--port-min=20000",
                "--port-max=30999",
                "--delete-delay=0",
                "--foreground",
                "--log-stderr",
                "--log-level=3",
            ])
            .arg(format!(
                "--pidfile={}",
                dir.path().join("rtpengine.pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rtpengine");
        let pid = child.id() as i32;
        let ctl = UdpSocket::bind("127.0.0.1:0").unwrap();
        ctl.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let ng_addr: SocketAddr = format!("127.0.0.1:{ng_port}").parse().unwrap();
        let mut up = false;
        for _ in 0..100 {
            if ng(&ctl, ng_addr, &[("command", B::S("ping".into()))]).is_some() {
                up = true;
                break;
            }
        }
        assert!(up, "rtpengine did not answer ping");
        let mut calls = Vec::with_capacity(n);
        for i in 0..n {
            let call_id = format!("bench-{i}");
            let base = |cmd: &str, sdp: String| {
                vec![
                    ("call-id", B::S(call_id.clone())),
                    ("command", B::S(cmd.into())),
                    ("from-tag", B::S("tagA".into())),
                    (
                        "replace",
                        B::L(vec![
                            B::S("origin".into()),
                            B::S("session-connection".into()),
                        ]),
                    ),
                    ("sdp", B::S(sdp)),
                ]
            };
            let offer = ng(&ctl, ng_addr, &base("offer", sdp(ga.port()))).expect("offer");
            let mut ans = base("answer", sdp(gb.port()));
            ans.push(("to-tag", B::S("tagB".into())));
            let answer = ng(&ctl, ng_addr, &ans).expect("answer");
            // The offer's SDP is for B (B sends there); the answer's is for A.
            calls.push((media_port(&answer), media_port(&offer)));
        }
        Running {
            child,
            pid,
            calls,
            srtp: false,
            _dir: Some(dir),
        }
    }

    fn sdp(port: u16) -> String {
        format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=sendrecv\r\n"
        )
    }

    fn media_port(reply: &str) -> u16 {
        reply
            .split("m=audio ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .expect("m=audio port in rtpengine's SDP")
    }

    /// Bencode values (NG protocol).
    pub enum B {
        S(String),
        L(Vec<B>),
    }

    fn enc(b: &B, out: &mut Vec<u8>) {
        match b {
            B::S(s) => {
                out.extend_from_slice(format!("{}:", s.len()).as_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            B::L(l) => {
                out.push(b'l');
                for x in l {
                    enc(x, out);
                }
                out.push(b'e');
            }
        }
    }

    /// Sends one NG command (keys must be sorted); returns the reply's SDP (or the raw reply).
    fn ng(ctl: &UdpSocket, to: SocketAddr, dict: &[(&str, B)]) -> Option<String> {
        let cookie = format!("{:08x}", rand_u32());
        let mut msg = format!("{cookie} d").into_bytes();
        for (k, v) in dict {
            enc(&B::S(k.to_string()), &mut msg);
            enc(v, &mut msg);
        }
        msg.push(b'e');
        ctl.send_to(&msg, to).ok()?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = ctl.recv_from(&mut buf).ok()?;
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        let body = reply.strip_prefix(&format!("{cookie} "))?;
        if !body.contains("6:result2:ok") && !body.contains("6:result4:pong") {
            eprintln!("rtpengine: {body}");
            return None;
        }
        Some(body.to_string())
    }

    fn rand_u32() -> u32 {
        (now_ns() as u32) ^ std::process::id()
    }
}

/// The kernel floor: a minimal forwarder, epoll + recvmmsg + sendmmsg, one socket per leg.
mod floor {
    use super::*;

    const BASE: u16 = 20000;

    pub fn start(n: usize, ga: SocketAddr, gb: SocketAddr) -> Running {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(FLOOR_ENV, format!("{n},{},{}", ga.port(), gb.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start floor forwarder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "floor forwarder failed to start");
        let pid = child.id() as i32;
        let calls = (0..n)
            .map(|i| (BASE + 2 * i as u16, BASE + 2 * i as u16 + 1))
            .collect();
        Running {
            child,
            pid,
            calls,
            srtp: false,
            _dir: None,
        }
    }

    pub fn run(spec: &str) {
        let v: Vec<u16> = spec.split(',').filter_map(|x| x.parse().ok()).collect();
        let (n, ga, gb) = (v[0] as usize, v[1], v[2]);
        pin(RELAY_CORE as usize);
        let socks: Vec<UdpSocket> = (0..2 * n)
            .map(|k| {
                let s = UdpSocket::bind(("127.0.0.1", BASE + k as u16)).expect("floor bind");
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        // SAFETY: epoll_create1 and epoll_ctl on descriptors we own, with live event structs.
        let ep = unsafe { libc::epoll_create1(0) };
        for (k, s) in socks.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: k as u64,
            };
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
        }
        let dest = |port: u16| {
            // SAFETY: all-zero sockaddr_in is valid; fields set below.
            let mut d: libc::sockaddr_in = unsafe { zeroed() };
            d.sin_family = libc::AF_INET as libc::sa_family_t;
            d.sin_port = port.to_be();
            d.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            d
        };
        let mut to_a = dest(ga);
        let mut to_b = dest(gb);
        println!("ready");
        let _ = std::io::stdout().flush();
        const B: usize = 16;
        let mut bufs = vec![[0u8; 2048]; B];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 2048,
            })
            .collect();
        // SAFETY: all-zero mmsghdr/epoll_event are valid.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; B];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        loop {
            // SAFETY: live buffers of the stated sizes.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 512, -1) };
            for ev in &events[..n.max(0) as usize] {
                let k = ev.u64 as usize;
                for i in 0..B {
                    iovs[i].iov_len = 2048;
                    let h = &mut hdrs[i].msg_hdr;
                    h.msg_name = std::ptr::null_mut();
                    h.msg_namelen = 0;
                    h.msg_iov = &mut iovs[i];
                    h.msg_iovlen = 1;
                }
                // SAFETY: headers point into live buffers.
                let got = unsafe {
                    libc::recvmmsg(
                        socks[k].as_raw_fd(),
                        hdrs.as_mut_ptr(),
                        B as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if got <= 0 {
                    continue;
                }
                let (out, to) = if k.is_multiple_of(2) {
                    (k + 1, &mut to_b)
                } else {
                    (k - 1, &mut to_a)
                };
                for i in 0..got as usize {
                    iovs[i].iov_len = hdrs[i].msg_len as usize;
                    let h = &mut hdrs[i].msg_hdr;
                    h.msg_name = (to as *mut libc::sockaddr_in).cast();
                    h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
                }
                // SAFETY: as above.
                unsafe { libc::sendmmsg(socks[out].as_raw_fd(), hdrs.as_mut_ptr(), got as u32, 0) };
            }
        }
    }
}
