//! The control ↔ dataplane Unix socket against a real `siptg dataplane` process: sessions are
//! created, bridged, relayed through, measured and deleted; they outlive the control side.

mod common;

/// Runs a scenario once per dataplane driver: all must pass the same suite.
macro_rules! on_both_drivers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn glommio() {
                super::$name("glommio").await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn portable() {
                super::$name("portable").await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn uring() {
                super::$name("uring").await
            }
        }
    )*};
}

use common::{wait_for, PidGuard, Proc, TestNode};
use siptg_control::dataplane::{latching_leg, DataplaneClient};
use siptg_proto::{Codec, CommandError, LegInfo, SessionId};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(seq as u32 * 160).to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

/// A phone: a UDP socket that sends RTP to a leg and counts what comes back.
struct Phone {
    sock: UdpSocket,
}

impl Phone {
    fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Self { sock }
    }
    fn send(&self, to: SocketAddr, seq: u16) {
        self.sock.send_to(&rtp(seq), to).unwrap();
    }
    fn receive(&self, n: usize) -> usize {
        let mut buf = [0u8; 2048];
        let mut got = 0;
        while got < n {
            match self.sock.recv_from(&mut buf) {
                Ok((172, _)) => got += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        got
    }
}

async fn connect(socket: &std::path::Path) -> DataplaneClient {
    for _ in 0..100 {
        if let Ok(c) = DataplaneClient::connect(socket, "test control").await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dataplane never answered on {}", socket.display());
}

/// A `siptg dataplane` process and a client connected to it.
async fn start_dataplane(node: &TestNode, cfg: &std::path::Path) -> (Proc, DataplaneClient) {
    let dp = Proc::start(
        &["dataplane", "--config", cfg.to_str().unwrap()],
        &node.path("dp.log"),
    );
    let c = connect(&node.path("var/dp.sock")).await;
    (dp, c)
}

/// Creates a session with two latching PCMA legs bridged; returns it and the legs.
async fn bridged_call(c: &DataplaneClient, tag: &str) -> (SessionId, LegInfo, LegInfo) {
    let s = c.create_session(tag).await.unwrap();
    let a = c
        .add_leg(s, latching_leg(Codec::pcma(), None))
        .await
        .unwrap();
    let b = c
        .add_leg(s, latching_leg(Codec::pcma(), None))
        .await
        .unwrap();
    c.bridge(s, a.leg, b.leg).await.unwrap();
    (s, a, b)
}

/// Both phones latch, then 50 packets each way; returns (a received, b received).
fn talk(pa: &Phone, pb: &Phone, a: &LegInfo, b: &LegInfo) -> (usize, usize) {
    pa.send(a.local, 0);
    pb.send(b.local, 0);
    // The first packet of each side may be relayed before the other side latched.
    std::thread::sleep(Duration::from_millis(100));
    let _ = pa.receive(1);
    let _ = pb.receive(1);
    for seq in 1..=50 {
        pa.send(a.local, seq);
        pb.send(b.local, seq);
    }
    (pa.receive(50), pb.receive(50))
}

async fn create_bridge_relay_stats_delete_through_the_socket(driver: &'static str) {
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "");
    let (_dp, c) = start_dataplane(&node, &cfg).await;
    assert_eq!(c.welcome().driver, driver);

    let status = c.status().await.unwrap();
    let free_before: u32 = status.shards.iter().map(|s| s.ports_free).sum();
    assert!(status.shards.iter().all(|s| s.running));

    let (s, a, b) = bridged_call(&c, "call-1").await;
    assert_ne!(a.local.port(), b.local.port());
    let (pa, pb) = (Phone::new(), Phone::new());
    let (got_a, got_b) = tokio::task::spawn_blocking(move || talk(&pa, &pb, &a, &b))
        .await
        .unwrap();
    assert_eq!((got_a, got_b), (50, 50), "every packet relayed both ways");

    let stats = c.stats(s).await.unwrap();
    assert_eq!(stats.legs.len(), 2);
    for leg in &stats.legs {
        assert_eq!(leg.packets_in, 51, "{leg:?}");
        assert!(leg.packets_out >= 50, "{leg:?}");
        assert_eq!(leg.bytes_in, 51 * 172);
        assert_eq!(leg.lost, 0);
        assert!(leg.mos > 4.3, "clean G.711 scores like G.711: {}", leg.mos);
        assert!(leg.remote.is_some(), "latched");
        assert!(leg.peer.is_some());
    }

    let listed = c.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tag, "call-1");

    c.delete_session(s).await.unwrap();
    assert!(c.list().await.unwrap().is_empty());
    let free_after: u32 = c
        .status()
        .await
        .unwrap()
        .shards
        .iter()
        .map(|s| s.ports_free)
        .sum();
    assert_eq!(free_after, free_before, "ports return to the pool");
    match c.stats(s).await {
        Err(siptg_control::dataplane::DpError::Command(CommandError::UnknownSession(id))) => {
            assert_eq!(id, s)
        }
        other => panic!("stats of a deleted session: {other:?}"),
    }
}

async fn bad_commands_get_clear_errors(driver: &'static str) {
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "");
    let (_dp, c) = start_dataplane(&node, &cfg).await;
    let s = c.create_session("x").await.unwrap();
    let a = c
        .add_leg(s, latching_leg(Codec::pcma(), None))
        .await
        .unwrap();
    let err = c.bridge(s, a.leg, 99).await.unwrap_err().to_string();
    assert!(err.contains("has no leg 99"), "{err}");
    let err = c.bridge(s, a.leg, a.leg).await.unwrap_err().to_string();
    assert!(err.contains("itself"), "{err}");
    let mut bad = latching_leg(Codec::pcma(), None);
    bad.codec.clock_rate = 0;
    let err = c.add_leg(s, bad).await.unwrap_err().to_string();
    assert!(err.contains("clock rate 0"), "{err}");
    let err = c.delete_session(424242).await.unwrap_err().to_string();
    assert!(err.contains("no session 424242"), "{err}");
}

async fn sessions_survive_a_killed_control_side_which_reconciles_on_restart(driver: &'static str) {
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "[worker]\norphan_grace = \"10m\"\n");
    let cfg_s = cfg.to_str().unwrap().to_string();
    let socket = node.path("var/dp.sock");

    // The control side (`siptg up`) starts the dataplane as its child.
    let mut up = Proc::start(&["up", "--config", &cfg_s], &node.path("up1.log"));
    let dp_pid = wait_for("the dataplane child", Duration::from_secs(20), || {
        node.status()?["worker"]["dataplane"]["process"]["pid"].as_i64()
    });
    let _dp_guard = PidGuard(dp_pid as i32);

    let c = connect(&socket).await;
    let boot = c.welcome().boot_id;
    let (s, a, b) = bridged_call(&c, "call-survivor").await;
    wait_for(
        "up to adopt the test's session",
        Duration::from_secs(10),
        || {
            let st = node.status()?;
            (st["worker"]["dataplane"]["process"]["shards"]
                .as_array()?
                .iter()
                .map(|s| s["sessions"].as_u64().unwrap_or(0))
                .sum::<u64>()
                == 1)
                .then_some(())
        },
    );

    // Kill the control side hard; the dataplane (another process) must keep the session.
    up.kill_only();
    drop(c);
    let c = connect(&socket).await;
    assert_eq!(c.welcome().boot_id, boot, "same dataplane process");
    let listed = c.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session, s);
    assert_eq!(listed[0].tag, "call-survivor");
    // And it still relays.
    let (pa, pb) = (Phone::new(), Phone::new());
    let (got_a, got_b) = tokio::task::spawn_blocking(move || talk(&pa, &pb, &a, &b))
        .await
        .unwrap();
    assert_eq!((got_a, got_b), (50, 50));

    // A restarted control side adopts the running dataplane instead of starting another, and
    // reconciles: the session it did not create is tracked as an orphan awaiting its call.
    let up2 = Proc::start(&["up", "--config", &cfg_s], &node.path("up2.log"));
    let sup = wait_for("restarted up to reconcile", Duration::from_secs(20), || {
        let st = node.status()?;
        let sup = st["worker"]["dataplane"]["supervisor"].clone();
        (sup["connected"] == true && sup["tracked_sessions"] == 1).then_some(st)
    });
    assert_eq!(
        sup["worker"]["dataplane"]["process"]["pid"].as_i64(),
        Some(dp_pid)
    );
    assert_eq!(
        sup["worker"]["dataplane"]["supervisor"]["orphaned_sessions"],
        1
    );
    assert_eq!(sup["worker"]["dataplane"]["supervisor"]["restarts"], 0);
    assert!(up2.log().contains("adopted=1"), "{}", up2.log());
}

async fn a_dead_dataplane_is_restarted_by_its_supervisor(driver: &'static str) {
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "");
    let up = Proc::start(
        &["up", "--config", cfg.to_str().unwrap()],
        &node.path("up.log"),
    );
    let first = wait_for("the dataplane child", Duration::from_secs(20), || {
        node.status()?["worker"]["dataplane"]["process"]["pid"].as_i64()
    });
    // SAFETY: kills the dataplane child the test's `up` started.
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    let second = wait_for("a new dataplane", Duration::from_secs(20), || {
        let st = node.status()?;
        let pid = st["worker"]["dataplane"]["process"]["pid"].as_i64()?;
        (pid != first).then_some(st)
    });
    assert_eq!(second["worker"]["dataplane"]["supervisor"]["restarts"], 1);
    assert!(
        up.log().contains("dataplane process exited; restarting it"),
        "{}",
        up.log()
    );
}

async fn events_arrive_over_the_socket_dtmf_stats_and_rtp_timeout(driver: &'static str) {
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "");
    // Short timers so the test sees every event kind quickly.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "stats_interval = \"0s\"",
        "stats_interval = \"1s\"\nrtp_timeout = \"1s\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let (_dp, c) = start_dataplane(&node, &cfg).await;
    let mut events = c.events();
    let (s, a, _b) = bridged_call(&c, "dtmf-call").await;

    // RFC 4733 digit '7': start, then the end packet three times (same timestamp).
    let phone = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (seq, end) in [(1u16, false), (2, true), (3, true), (4, true)] {
        let mut p = vec![0x80, 101, 0, 0, 0, 0, 0x1f, 0x40, 0, 0, 0, 7];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[7, if end { 0x8a } else { 0x0a }, 0x03, 0x20]);
        phone.send_to(&p, a.local).unwrap();
    }

    let mut dtmf = Vec::new();
    let mut stats = false;
    let mut timeout_legs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (dtmf.is_empty() || !stats || timeout_legs.len() < 2)
        && tokio::time::Instant::now() < deadline
    {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(siptg_proto::Event::Dtmf {
                session,
                leg,
                digit,
                duration_ms,
            })) => {
                assert_eq!((session, leg), (s, a.leg));
                assert_eq!(duration_ms, 100);
                dtmf.push(digit);
            }
            Ok(Ok(siptg_proto::Event::StreamStats { session, stats: st })) => {
                assert_eq!(session, s);
                assert_eq!(st.packets_in, 4);
                stats = true;
            }
            Ok(Ok(siptg_proto::Event::RtpTimeout {
                session,
                leg,
                idle_ms,
            })) => {
                assert_eq!(session, s);
                assert!(idle_ms >= 1000);
                timeout_legs.push(leg);
            }
            Ok(Ok(other)) => panic!("unexpected event {other:?}"),
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(dtmf, vec!['7'], "one digit, reported once");
    assert!(stats, "a stream-stats event for the leg with traffic");
    timeout_legs.sort_unstable();
    assert_eq!(timeout_legs, vec![1, 2], "each silent leg times out once");
}

async fn srtp_leg_relays_both_ways_with_a_plain_leg(driver: &'static str) {
    use siptg_dataplane::srtp::SrtpContext;
    use siptg_proto::{SrtpKeys, SrtpSuite};
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "");
    let (_dp, c) = start_dataplane(&node, &cfg).await;
    let s = c.create_session("srtp-call").await.unwrap();
    let mut spec = latching_leg(Codec::pcma(), None);
    spec.srtp = Some(SrtpKeys {
        suite: SrtpSuite::AesCm128HmacSha1_80,
        local_key: vec![1; 16],
        local_salt: vec![1; 14],
        remote_key: vec![2; 16],
        remote_salt: vec![2; 14],
    });
    let a = c.add_leg(s, spec).await.unwrap();
    let b = c
        .add_leg(s, latching_leg(Codec::pcma(), None))
        .await
        .unwrap();
    c.bridge(s, a.leg, b.leg).await.unwrap();
    let (got_a, got_b) = tokio::task::spawn_blocking(move || {
        let suite = SrtpSuite::AesCm128HmacSha1_80;
        let mut tx = SrtpContext::new(suite, &[2; 16], &[2; 14]).unwrap();
        let mut rx = SrtpContext::new(suite, &[1; 16], &[1; 14]).unwrap();
        let (pa, pb) = (Phone::new(), Phone::new());
        let mut buf = [0u8; 2048];
        let (mut ok_a, mut ok_b) = (0, 0);
        // Latch the plain side first.
        pb.sock.send_to(&rtp(0), b.local).unwrap();
        for seq in 1..=20u16 {
            let plain = rtp(seq);
            buf[..plain.len()].copy_from_slice(&plain);
            let n = tx.protect_rtp(&mut buf, plain.len()).unwrap();
            pa.sock.send_to(&buf[..n], a.local).unwrap();
            if let Ok((n, _)) = pb.sock.recv_from(&mut buf) {
                ok_b += usize::from(buf[..n] == plain[..]);
            }
            pb.sock.send_to(&plain, b.local).unwrap();
            if let Ok((n, _)) = pa.sock.recv_from(&mut buf) {
                if let Ok(m) = rx.unprotect_rtp(&mut buf, n) {
                    ok_a += usize::from(buf[..m] == plain[..]);
                }
            }
        }
        (ok_a, ok_b)
    })
    .await
    .unwrap();
    assert_eq!(
        (got_a, got_b),
        (20, 20),
        "decrypted toward B, encrypted toward A"
    );
    let stats = c.stats(s).await.unwrap();
    assert_eq!(stats.legs[0].dropped_srtp, 0);
}

async fn a_garbage_flood_on_one_session_does_not_disturb_another(driver: &'static str) {
    let mut node = TestNode::new();
    node.driver = driver;
    let cfg = node.write_config("siptg.toml", "");
    let (_dp, c) = start_dataplane(&node, &cfg).await;
    let (victim, va, _vb) = bridged_call(&c, "flooded").await;
    let (_s, a, b) = bridged_call(&c, "quiet").await;
    let flood = std::thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut x: u32 = 12345;
        let mut junk = vec![0u8; 3000];
        for i in 0..20_000usize {
            // Garbage of every size, including oversized, truncated and RTP-looking headers.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = [1, 7, 11, 12, 40, 172, 2048, 2049, 2999][i % 9];
            for b in junk.iter_mut().take(len) {
                *b = (x >> 16) as u8;
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            }
            if i % 3 == 0 {
                junk[0] = 0x80;
            }
            let _ = sock.send_to(&junk[..len], va.local);
        }
    });
    let (pa, pb) = (Phone::new(), Phone::new());
    let (got_a, got_b) = tokio::task::spawn_blocking(move || talk(&pa, &pb, &a, &b))
        .await
        .unwrap();
    flood.join().unwrap();
    assert_eq!((got_a, got_b), (50, 50), "the quiet call is untouched");
    let st = c.stats(victim).await.unwrap();
    let junk_seen = st.legs[0].dropped_malformed + st.legs[0].packets_in;
    assert!(
        junk_seen > 1000,
        "the flood was received and dropped: {:?}",
        st.legs[0]
    );
    let status = c.status().await.unwrap();
    assert!(status.shards.iter().all(|s| s.running));
    let core_drops: u64 = status.shards.iter().map(|s| s.dropped_malformed).sum();
    assert!(
        core_drops > 1000,
        "core-wide drop counters: {:?}",
        status.shards
    );
}

on_both_drivers!(
    create_bridge_relay_stats_delete_through_the_socket,
    bad_commands_get_clear_errors,
    sessions_survive_a_killed_control_side_which_reconciles_on_restart,
    a_dead_dataplane_is_restarted_by_its_supervisor,
    events_arrive_over_the_socket_dtmf_stats_and_rtp_timeout,
    srtp_leg_relays_both_ways_with_a_plain_leg,
    a_garbage_flood_on_one_session_does_not_disturb_another,
);
