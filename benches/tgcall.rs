//! Telegram call media-path cost: how many Telegram call legs one core carries.
//!
//! Two [`TelegramBridge`]s — the Telegram side of a gateway call exactly as a dataplane shard runs
//! it — are connected in memory (ICE, DTLS-SRTP, as in a real call). One leg's 20 ms of work is
//! timed end to end: on bridge A, 20 ms of G.711 from the SIP side is decoded, Opus-encoded and
//! SRTP-protected as RTP (str0m); on bridge B the packet is SRTP-unprotected, Opus-decoded and
//! cut into a G.711 RTP packet for its SIP side. Every leg does exactly one of each per 20 ms (it
//! sends and receives), so `us_per_20ms` is one leg's media cost and
//! `legs_per_core = 20 000 / us_per_20ms`. The parts are timed separately too (Opus encode and
//! decode alone on the same settings), and signalling seal+open per message. Last line:
//! `RESULT tgcall us_per_20ms=… legs_per_core=… encode_us=… decode_us=… rest_us=… signal_us=…`
//!
//! `OPUS_SWEEP=1 cargo bench --bench tgcall` instead prints the encoder's cost per 20 ms by
//! complexity and FEC (how the default complexity was chosen).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use siptg_control::tgcall::crypto::SignalingCrypto;
use siptg_dataplane::tgmedia::bridge::{BridgeOutput, TelegramBridge};
use siptg_dataplane::tgmedia::g711::Law;
use siptg_dataplane::tgmedia::opus::{
    OpusDecoder, OpusEncoder, OpusSettings, Tone, MAX_FRAME_SAMPLES, MAX_PACKET,
};
use siptg_proto::{TelegramEvent, TelegramLegSpec, TelegramOp};

type Wire = VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>;

fn spec(caller: bool) -> TelegramLegSpec {
    TelegramLegSpec {
        caller,
        relay_only: false,
        turn: vec![],
        connect_timeout_ms: 30_000,
    }
}

/// Queues what a step produced: datagrams on the wire (from `me`), SIP packets counted.
fn take(me: SocketAddr, out: &mut BridgeOutput, wire: &mut Wire, sip: &mut usize, up: &mut bool) {
    for (dest, data) in out.telegram.drain(..) {
        wire.push_back((me, dest, data));
    }
    *sip += out.sip.drain(..).count();
    for e in out.events.drain(..) {
        if e == TelegramEvent::Connected {
            *up = true;
        }
    }
}

struct Pair {
    a: TelegramBridge,
    b: TelegramBridge,
    aa: SocketAddr,
    ba: SocketAddr,
    now: Instant,
}

impl Pair {
    /// Two bridges that exchanged their setup (as the signalling would) and connected.
    fn connected() -> Pair {
        let mut now = Instant::now();
        let aa: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let ba: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let mut a = TelegramBridge::new(&spec(true), aa, now).unwrap();
        let mut b = TelegramBridge::new(&spec(false), ba, now).unwrap();
        let (la, lb) = (a.local(), b.local());
        let mut out = BridgeOutput::default();
        let ops = |l: &siptg_proto::TelegramLocal, other_ssrc: u32| {
            let mut v = vec![TelegramOp::RemoteParams {
                ufrag: l.ufrag.clone(),
                pwd: l.pwd.clone(),
                hash: l.hash.clone(),
                fingerprint: l.fingerprint.clone(),
            }];
            v.extend(
                l.candidates
                    .iter()
                    .cloned()
                    .map(TelegramOp::RemoteCandidate),
            );
            v.push(TelegramOp::RemoteAudio {
                ssrc: other_ssrc,
                payload_type: 111,
            });
            v.push(TelegramOp::SendAudio { payload_type: 111 });
            v
        };
        let mut wire = Wire::new();
        let (mut sip, mut up_a, mut up_b) = (0, false, false);
        for op in ops(&lb, lb.ssrc) {
            a.apply(op, now, &mut out).unwrap();
        }
        take(aa, &mut out, &mut wire, &mut sip, &mut up_a);
        for op in ops(&la, la.ssrc) {
            b.apply(op, now, &mut out).unwrap();
        }
        take(ba, &mut out, &mut wire, &mut sip, &mut up_b);
        for _ in 0..4000 {
            if up_a && up_b {
                break;
            }
            while let Some((src, dst, bytes)) = wire.pop_front() {
                if dst == aa {
                    a.on_datagram(now, src, &bytes, &mut out).unwrap();
                    take(aa, &mut out, &mut wire, &mut sip, &mut up_a);
                } else {
                    b.on_datagram(now, src, &bytes, &mut out).unwrap();
                    take(ba, &mut out, &mut wire, &mut sip, &mut up_b);
                }
            }
            now += Duration::from_millis(5);
            a.handle_timeout(now, &mut out).unwrap();
            take(aa, &mut out, &mut wire, &mut sip, &mut up_a);
            b.handle_timeout(now, &mut out).unwrap();
            take(ba, &mut out, &mut wire, &mut sip, &mut up_b);
        }
        assert!(up_a && up_b, "bridges did not connect");
        Pair { a, b, aa, ba, now }
    }
}

fn sweep() {
    for fec in [true, false] {
        for cx in [0u8, 1, 2, 3, 5, 8, 10] {
            let mut e = OpusEncoder::new(OpusSettings {
                complexity: cx,
                fec,
                rate: 8_000,
                ..Default::default()
            })
            .unwrap();
            let mut t = Tone::new(440.0, 8000.0, 8_000);
            let mut p = [0i16; 160];
            let mut k = [0u8; MAX_PACKET];
            let t0 = Instant::now();
            for _ in 0..2000 {
                t.fill(&mut p);
                e.encode(&p, &mut k).unwrap();
            }
            println!(
                "fec {fec} complexity {cx}: {:.1} us per 20 ms",
                t0.elapsed().as_secs_f64() * 1e6 / 2000.0
            );
        }
    }
}

fn main() {
    if std::env::var("OPUS_SWEEP").is_ok() {
        sweep();
        return;
    }
    let frames: usize = std::env::args()
        .skip_while(|a| a != "--frames")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let Pair {
        mut a,
        mut b,
        aa,
        ba,
        mut now,
    } = Pair::connected();
    let mut tone = Tone::new(440.0, 8000.0, 8_000);
    let mut pcm = [0i16; 160];
    let mut g711 = [0u8; 160];
    let mut out = BridgeOutput::default();
    let mut wire = Wire::new();
    let (mut sip_out, mut up) = (0usize, true);
    let mut total = Duration::ZERO;
    for i in 0..frames + 200 {
        tone.fill(&mut pcm);
        Law::A.encode(&pcm, &mut g711);
        now += Duration::from_millis(20);
        let t0 = Instant::now();
        // A: SIP G.711 in → Opus → SRTP out; B: SRTP in → Opus decode → G.711 RTP out.
        a.from_sip(now, 8, i as u32 * 160, &g711, &mut out).unwrap();
        a.handle_timeout(now, &mut out).unwrap();
        take(aa, &mut out, &mut wire, &mut sip_out, &mut up);
        b.handle_timeout(now, &mut out).unwrap();
        take(ba, &mut out, &mut wire, &mut sip_out, &mut up);
        // Deliver everything (RTP one way; STUN consent and RTCP both ways, as in a call).
        while let Some((src, dst, bytes)) = wire.pop_front() {
            if dst == ba {
                b.on_datagram(now, src, &bytes, &mut out).unwrap();
                take(ba, &mut out, &mut wire, &mut sip_out, &mut up);
            } else {
                a.on_datagram(now, src, &bytes, &mut out).unwrap();
                take(aa, &mut out, &mut wire, &mut sip_out, &mut up);
            }
        }
        if i >= 200 {
            total += t0.elapsed();
        }
    }
    assert!(
        sip_out >= frames,
        "only {sip_out} G.711 packets came out of {frames}"
    );

    // The codec parts alone, on the bridge's settings.
    let mut enc = OpusEncoder::new(OpusSettings {
        rate: 8_000,
        ..Default::default()
    })
    .unwrap();
    let mut dec = OpusDecoder::new(8_000).unwrap();
    let mut pkt = [0u8; MAX_PACKET];
    let mut back = vec![0i16; MAX_FRAME_SAMPLES];
    let (mut t_enc, mut t_dec) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..frames {
        tone.fill(&mut pcm);
        let t0 = Instant::now();
        let n = enc.encode(&pcm, &mut pkt).unwrap();
        let t1 = Instant::now();
        dec.decode(&pkt[..n], &mut back).unwrap();
        t_dec += t1.elapsed();
        t_enc += t1 - t0;
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / frames as f64;
    let (us, enc_us, dec_us) = (per(total), per(t_enc), per(t_dec));
    let rest_us = (us - enc_us - dec_us).max(0.0);

    // Signalling: one ~300-byte JSON message sealed by one side and opened by the other.
    let key = [7u8; 256];
    let mut tx = SignalingCrypto::new(key, true);
    let mut rx = SignalingCrypto::new(key, false);
    let msg = vec![b'x'; 300];
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        let p = tx.encrypt_raw(&msg).unwrap();
        rx.decrypt_raw(&p).unwrap();
    }
    let signal_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    println!("Telegram leg media path, {frames} frames of 20 ms (G.711 <-> Opus 24 kbit/s from 8 kHz PCM, complexity 1, FEC; str0m DTLS-SRTP):");
    println!("  opus encode            {enc_us:8.1} us");
    println!("  opus decode            {dec_us:8.1} us");
    println!("  g711 + rtp + srtp      {rest_us:8.1} us  (both directions, RTCP and ICE consent included)");
    println!("  per leg per 20 ms      {us:8.1} us");
    println!("  signalling seal+open   {signal_us:8.1} us per message");
    println!(
        "RESULT tgcall us_per_20ms={us:.1} legs_per_core={:.0} encode_us={enc_us:.1} decode_us={dec_us:.1} rest_us={rest_us:.1} signal_us={signal_us:.1}",
        20_000.0 / us
    );
}
