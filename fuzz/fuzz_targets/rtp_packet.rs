//! Any datagram on a media port: parsed, counted, maybe relayed — never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_dataplane::shard::{Channel, Shard, ShardTimers};
use siptg_proto::{Codec, LegSpec};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let _ = siptg_dataplane::rtp::classify(data);
    let _ = siptg_dataplane::rtp::telephone_event(data);
    let now = Instant::now();
    let timers = ShardTimers { rtp_timeout: Duration::from_secs(1), stats_interval: Some(Duration::from_millis(1)) };
    let mut sh = Shard::new(0, (40_000, 40_010), timers, now);
    sh.create_session(1, "f".into(), now);
    for _ in 0..2 {
        let spec = LegSpec { remote: None, latch: true, local_ip: None, rtcp_mux: data.len() % 2 == 0, codec: Codec::pcma(), srtp: None, continuity: false, telegram: None, direction: Default::default() };
        let port = sh.begin_add_leg(1, &spec).unwrap();
        sh.complete_add_leg(1, spec, port, SocketAddr::from(([127, 0, 0, 1], port)), now).unwrap();
    }
    sh.bridge(1, 1, 2).unwrap();
    let src: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    for chunk in data.chunks(200) {
        sh.on_datagram(1, 1, Channel::Rtp, src, chunk, now);
        sh.on_datagram(1, 2, Channel::Rtcp, src, chunk, now);
    }
    sh.on_tick(now + Duration::from_secs(2));
    let mut ev = Vec::new();
    sh.drain_events(&mut ev);
    let _ = sh.stats(1, now);
});
