//! Per-packet SRTP cost on the relay's hot path: protecting and unprotecting a 172-octet RTP
//! packet (12-octet header + 20 ms of G.711) in place, for each suite siptg negotiates. Next to
//! the roughly 3 µs the kernel spends per relayed packet (see the reference measurements), this
//! says how much SRTP legs cut a core's capacity.
//!
//! Run: `cargo bench --bench srtp`. The last line is
//! `RESULT srtp protect_ns=… unprotect_ns=… gcm_protect_ns=… …` (AES_CM_128_HMAC_SHA1_80 unless
//! the name says GCM or SHA1_32).

use criterion::{black_box, criterion_group, BatchSize, Criterion};
use siptg_dataplane::srtp::{SrtpContext, MAX_OVERHEAD};
use siptg_proto::SrtpSuite;
use std::time::{Duration, Instant};

const SSRC: u32 = 0x1234_5678;
const LEN: usize = 172;

const SUITES: [(SrtpSuite, &str); 3] = [
    (SrtpSuite::AesCm128HmacSha1_80, "aes_cm_128_hmac_sha1_80"),
    (SrtpSuite::AesCm128HmacSha1_32, "aes_cm_128_hmac_sha1_32"),
    (SrtpSuite::AeadAes128Gcm, "aead_aes_128_gcm"),
];

fn context(suite: SrtpSuite) -> SrtpContext {
    let key = [0x5a; 16];
    let salt = vec![0xa5; SrtpContext::master_salt_len(suite)];
    SrtpContext::new(suite, &key, &salt).unwrap()
}

/// A receive buffer holding one RTP packet with sequence number `seq`, with room for the tag.
fn rtp(seq: u16) -> [u8; LEN + MAX_OVERHEAD] {
    let mut p = [0xd5; LEN + MAX_OVERHEAD];
    p[..12].copy_from_slice(&[0x80, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[8..12].copy_from_slice(&SSRC.to_be_bytes());
    p
}

/// Protects in place, each call with the next sequence number (the replay check refuses
/// repeats). Rewriting the sequence number is the only per-call work besides SRTP.
struct Sender {
    ctx: SrtpContext,
    buf: [u8; LEN + MAX_OVERHEAD],
    seq: u16,
}

impl Sender {
    fn new(suite: SrtpSuite) -> Self {
        Self {
            ctx: context(suite),
            buf: rtp(0),
            seq: 0,
        }
    }

    fn protect(&mut self) -> usize {
        self.seq = self.seq.wrapping_add(1);
        self.buf[2..4].copy_from_slice(&self.seq.to_be_bytes());
        self.ctx.protect_rtp(&mut self.buf, LEN).unwrap()
    }

    /// The next protected packet, as it would arrive.
    fn next_packet(&mut self) -> ([u8; LEN + MAX_OVERHEAD], usize) {
        let n = self.protect();
        (self.buf, n)
    }
}

fn benches(c: &mut Criterion) {
    for (suite, name) in SUITES {
        let mut tx = Sender::new(suite);
        c.bench_function(&format!("srtp_protect_{name}"), |b| {
            b.iter(|| black_box(tx.protect()))
        });
        let mut tx = Sender::new(suite);
        let mut rx = context(suite);
        c.bench_function(&format!("srtp_unprotect_{name}"), |b| {
            b.iter_batched_ref(
                || tx.next_packet(),
                |(buf, n)| black_box(rx.unprotect_rtp(buf, *n).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}

/// Median over 31 samples of the time per protect call, in ns.
fn protect_ns(suite: SrtpSuite) -> f64 {
    let mut tx = Sender::new(suite);
    median(|| {
        let t = Instant::now();
        for _ in 0..4096 {
            black_box(tx.protect());
        }
        t.elapsed().as_nanos() as f64 / 4096.0
    })
}

/// Median over 31 samples of the time per unprotect call, in ns: each sample unprotects 4096
/// freshly protected packets (continuing the sequence, so the ROC rolls over on the way).
fn unprotect_ns(suite: SrtpSuite) -> f64 {
    let mut tx = Sender::new(suite);
    let mut rx = context(suite);
    let mut batch = vec![([0u8; LEN + MAX_OVERHEAD], 0usize); 4096];
    median(|| {
        for slot in batch.iter_mut() {
            *slot = tx.next_packet();
        }
        let t = Instant::now();
        for (buf, n) in batch.iter_mut() {
            black_box(rx.unprotect_rtp(buf, *n).unwrap());
        }
        t.elapsed().as_nanos() as f64 / 4096.0
    })
}

fn median(mut sample: impl FnMut() -> f64) -> f64 {
    let mut samples: Vec<f64> = (0..31).map(|_| sample()).collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    group();
    Criterion::default().configure_from_args().final_summary();
    let cm80 = SrtpSuite::AesCm128HmacSha1_80;
    let cm32 = SrtpSuite::AesCm128HmacSha1_32;
    let gcm = SrtpSuite::AeadAes128Gcm;
    println!(
        "RESULT srtp protect_ns={:.0} unprotect_ns={:.0} gcm_protect_ns={:.0} gcm_unprotect_ns={:.0} sha1_32_protect_ns={:.0} sha1_32_unprotect_ns={:.0}",
        protect_ns(cm80),
        unprotect_ns(cm80),
        protect_ns(gcm),
        unprotect_ns(gcm),
        protect_ns(cm32),
        unprotect_ns(cm32),
    );
}
