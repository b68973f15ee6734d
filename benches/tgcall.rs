//! Telegram call media-path cost: how many Telegram call legs one core carries.
//!
//! Two [`TgMediaLeg`]s are connected in memory (ICE, DTLS-SRTP, as in a real call) and one leg's
//! 20 ms of work is timed end to end: Opus-encode 20 ms of PCM, SRTP-protect it as RTP (str0m),
//! then on the other leg SRTP-unprotect it and Opus-decode it. Every leg does exactly one of each
//! per 20 ms (it sends and receives), so `us_per_20ms` is one leg's media cost and
//! `legs_per_core = 20 000 / us_per_20ms`. Signalling encrypt/decrypt (per message) is printed
//! beside it. Last line:
//! `RESULT tgcall us_per_20ms=… legs_per_core=… encode_us=… decode_us=… srtp_us=… signal_us=…`
//!
//! `OPUS_SWEEP=1 cargo bench --bench tgcall` instead prints the encoder's cost per 20 ms by
//! complexity, FEC and frame length (how the default complexity was chosen).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use siptg_control::tgcall::crypto::SignalingCrypto;
use siptg_dataplane::tgmedia::leg::{TgMediaConfig, TgMediaEvent, TgMediaLeg, TgMediaOutput};
use siptg_dataplane::tgmedia::opus::{
    OpusDecoder, OpusEncoder, OpusSettings, Tone, MAX_FRAME_SAMPLES, MAX_PACKET,
};

type Wire = VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>;

fn leg(caller: bool, addr: SocketAddr, now: Instant) -> TgMediaLeg {
    let cfg = TgMediaConfig {
        caller,
        host_addrs: vec![addr],
        relay_addrs: vec![],
        relay_only: false,
        connect_timeout: Duration::from_secs(30),
    };
    TgMediaLeg::new(&cfg, now).expect("leg")
}

fn drain(l: &mut TgMediaLeg, wire: &mut Wire, events: &mut Vec<TgMediaEvent>) {
    loop {
        match l.poll().expect("poll") {
            TgMediaOutput::Transmit {
                source,
                destination,
                contents,
            } => wire.push_back((source, destination, contents)),
            TgMediaOutput::Event(e) => events.push(e),
            TgMediaOutput::Timeout(_) => return,
        }
    }
}

/// Two legs connected on simulated time.
fn connected_pair() -> (TgMediaLeg, TgMediaLeg, SocketAddr, SocketAddr, Instant) {
    let mut now = Instant::now();
    let (aa, ba): (SocketAddr, SocketAddr) = (
        "10.0.0.1:4000".parse().unwrap(),
        "10.0.0.2:5000".parse().unwrap(),
    );
    let (mut a, mut b) = (leg(true, aa, now), leg(false, ba, now));
    let (pa, pb) = (a.local_params(), b.local_params());
    b.set_remote_params(&pa.ufrag, &pa.pwd, &pa.hash, &pa.fingerprint)
        .unwrap();
    a.set_remote_params(&pb.ufrag, &pb.pwd, &pb.hash, &pb.fingerprint)
        .unwrap();
    for c in a.local_candidates().to_vec() {
        b.add_remote_candidate(&c).unwrap();
    }
    for c in b.local_candidates().to_vec() {
        a.add_remote_candidate(&c).unwrap();
    }
    a.set_remote_audio_ssrc(b.audio_ssrc());
    b.set_remote_audio_ssrc(a.audio_ssrc());
    let mut wire = Wire::new();
    let mut ev = Vec::new();
    for _ in 0..4000 {
        if a.is_connected() && b.is_connected() {
            break;
        }
        drain(&mut a, &mut wire, &mut ev);
        drain(&mut b, &mut wire, &mut ev);
        while let Some((s, d, bytes)) = wire.pop_front() {
            let to = if d == aa { &mut a } else { &mut b };
            to.receive(now, s, d, &bytes).unwrap();
            drain(&mut a, &mut wire, &mut ev);
            drain(&mut b, &mut wire, &mut ev);
        }
        now += Duration::from_millis(5);
        a.handle_timeout(now).unwrap();
        b.handle_timeout(now).unwrap();
    }
    assert!(a.is_connected() && b.is_connected(), "legs did not connect");
    (a, b, aa, ba, now)
}

fn main() {
    let frames: usize = std::env::args()
        .skip_while(|a| a != "--frames")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    if std::env::var("OPUS_SWEEP").is_ok() {
        for fec in [true, false] {
            for cx in [0u8, 1, 2, 3, 5, 8, 10] {
                for ms in [20usize, 60] {
                    let mut e = OpusEncoder::new(OpusSettings {
                        complexity: cx,
                        fec,
                        frame_ms: ms,
                        ..Default::default()
                    })
                    .unwrap();
                    let mut t = Tone::new(440.0, 8000.0, 16_000);
                    let mut p = vec![0i16; ms * 16];
                    let mut k = [0u8; MAX_PACKET];
                    let t0 = Instant::now();
                    for _ in 0..1000 {
                        t.fill(&mut p);
                        e.encode(&p, &mut k).unwrap();
                    }
                    println!(
                        "fec {fec} cx {cx} {ms}ms: {:.1} us per 20 ms",
                        t0.elapsed().as_secs_f64() * 1e6 / 1000.0 / (ms / 20) as f64
                    );
                }
            }
        }
        return;
    }
    let (mut a, mut b, _aa, ba, mut now) = connected_pair();
    let mut enc = OpusEncoder::new(OpusSettings::default()).unwrap();
    let mut dec = OpusDecoder::new(16_000).unwrap();
    let mut tone = Tone::new(440.0, 8000.0, 16_000);
    let mut pcm = [0i16; 320];
    let mut pkt = [0u8; MAX_PACKET];
    let mut out = vec![0i16; MAX_FRAME_SAMPLES];
    let mut wire = Wire::new();
    let mut events = Vec::new();
    let (mut t_enc, mut t_dec, mut t_total) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut ts = 0u32;
    let mut decoded = 0usize;
    for i in 0..frames + 200 {
        tone.fill(&mut pcm);
        now += Duration::from_millis(20);
        let t0 = Instant::now();
        let n = enc.encode(&pcm, &mut pkt).unwrap();
        let t1 = Instant::now();
        a.send_audio(now, ts, &pkt[..n]).unwrap();
        a.handle_timeout(now).unwrap();
        b.handle_timeout(now).unwrap();
        drain(&mut a, &mut wire, &mut events);
        drain(&mut b, &mut wire, &mut events);
        // Deliver everything (RTP one way; STUN consent and RTCP both ways, as in a call).
        while let Some((s, d, bytes)) = wire.pop_front() {
            let to = if d == ba { &mut b } else { &mut a };
            to.receive(now, s, d, &bytes).unwrap();
            drain(&mut a, &mut wire, &mut events);
            drain(&mut b, &mut wire, &mut events);
        }
        let t2 = Instant::now();
        for e in events.drain(..) {
            if let TgMediaEvent::Audio { payload, .. } = e {
                decoded += dec.decode(&payload, &mut out).unwrap();
            }
        }
        let t3 = Instant::now();
        ts = ts.wrapping_add(960);
        if i >= 200 {
            t_enc += t1 - t0;
            t_dec += t3 - t2;
            t_total += t3 - t0;
        }
    }
    assert!(decoded >= frames * 320, "only {decoded} samples arrived");
    let per = |d: Duration| d.as_secs_f64() * 1e6 / frames as f64;
    let (us, enc_us, dec_us) = (per(t_total), per(t_enc), per(t_dec));
    let srtp_us = us - enc_us - dec_us;

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

    println!("tgcall media path, {frames} frames of 20 ms (Opus 24 kbit/s wideband from 16 kHz PCM, complexity 1, FEC):");
    println!("  opus encode            {enc_us:8.1} us");
    println!("  opus decode            {dec_us:8.1} us");
    println!("  rtp + srtp both ways   {srtp_us:8.1} us  (str0m protect, unprotect, RTCP)");
    println!("  per leg per 20 ms      {us:8.1} us");
    println!("  signalling seal+open   {signal_us:8.1} us per message");
    println!(
        "RESULT tgcall us_per_20ms={us:.1} legs_per_core={:.0} encode_us={enc_us:.1} decode_us={dec_us:.1} srtp_us={srtp_us:.1} signal_us={signal_us:.1}",
        20_000.0 / us
    );
}
