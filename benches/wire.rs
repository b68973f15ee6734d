//! Control-path costs that every call pays: encoding/decoding a control-socket frame (against
//! JSON, the obvious alternative, measured in the same run) and the shard's per-packet relay
//! decision (sans-IO, no socket), which bounds what the dataplane can forward per core.
//!
//! Run: `cargo bench --bench wire`. The last line is `RESULT wire …` with the ratios.

use criterion::{black_box, criterion_group, Criterion};
use siptg_dataplane::shard::{Channel, Shard, ShardTimers};
use siptg_proto::{encode_frame, Codec, Command, FrameDecoder, LegSpec, Message};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn add_leg() -> Message {
    Message::Request {
        id: 42,
        command: Command::AddLeg {
            session: 7,
            spec: LegSpec {
                remote: Some("192.0.2.10:40000".parse().unwrap()),
                latch: true,
                local_ip: None,
                rtcp_mux: true,
                codec: Codec::pcma(),
                srtp: None,
                continuity: false,
                telegram: None,
                direction: Default::default(),
            },
        },
    }
}

fn postcard_round_trip(msg: &Message, buf: &mut Vec<u8>) -> Message {
    buf.clear();
    encode_frame(msg, buf).unwrap();
    let mut dec = FrameDecoder::new();
    dec.push(buf);
    dec.next_frame::<Message>().unwrap().unwrap()
}

fn json_round_trip(msg: &Message) -> Message {
    let bytes = serde_json::to_vec(msg).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A receive buffer holding one 172-byte G.711 RTP packet.
fn packet_buf() -> Vec<u8> {
    let mut p = vec![0xd5; siptg_dataplane::shard::PACKET_BUF];
    p[..12].copy_from_slice(&[0x80, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
    p
}

/// A shard with one bridged call; returns it and the caller's source address.
fn bridged_shard() -> (Shard, SocketAddr) {
    let now = Instant::now();
    let timers = ShardTimers {
        rtp_timeout: Duration::from_secs(10),
        stats_interval: None,
    };
    let mut sh = Shard::new(0, (30_000, 30_999), timers, now);
    sh.create_session(1, "bench".into(), now);
    for remote in ["127.0.0.1:5000", "127.0.0.1:6000"] {
        let spec = LegSpec {
            remote: Some(remote.parse().unwrap()),
            latch: false,
            local_ip: None,
            rtcp_mux: true,
            codec: Codec::pcma(),
            srtp: None,
            continuity: false,
            telegram: None,
            direction: Default::default(),
        };
        let port = sh.begin_add_leg(1, &spec).unwrap();
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        sh.complete_add_leg(1, spec, port, local, now).unwrap();
    }
    sh.bridge(1, 1, 2).unwrap();
    (sh, "127.0.0.1:5000".parse().unwrap())
}

fn benches(c: &mut Criterion) {
    let msg = add_leg();
    let mut buf = Vec::new();
    c.bench_function("frame_postcard_round_trip", |b| {
        b.iter(|| postcard_round_trip(black_box(&msg), &mut buf))
    });
    c.bench_function("frame_json_round_trip", |b| {
        b.iter(|| json_round_trip(black_box(&msg)))
    });
    let (mut sh, src) = bridged_shard();
    let mut pkt = packet_buf();
    let now = Instant::now();
    c.bench_function("shard_relay_decision", |b| {
        b.iter(|| sh.on_packet(1, 1, Channel::Rtp, src, black_box(&mut pkt), 172, now))
    });
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}

/// Median of `n` timed batches of `iters` calls, in ns per call (for the RESULT line).
fn ns_per_call(iters: u32, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    group();
    Criterion::default().configure_from_args().final_summary();
    let msg = add_leg();
    let mut buf = Vec::new();
    let postcard = ns_per_call(20_000, || {
        black_box(postcard_round_trip(black_box(&msg), &mut buf));
    });
    let json = ns_per_call(20_000, || {
        black_box(json_round_trip(black_box(&msg)));
    });
    let (mut sh, src) = bridged_shard();
    let mut pkt = packet_buf();
    let now = Instant::now();
    let relay = ns_per_call(200_000, || {
        black_box(sh.on_packet(1, 1, Channel::Rtp, src, black_box(&mut pkt), 172, now));
    });
    println!(
        "RESULT wire frame_ns={postcard:.0} json_frame_ns={json:.0} vs_json={:.2} relay_decision_ns={relay:.0}",
        postcard / json
    );
}
