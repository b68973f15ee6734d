//! G.722 (ITU-T G.722, 64 kbit/s sub-band ADPCM, "mode 1"), the wideband codec many PBXs and
//! desk phones offer next to G.711, to and from 16-bit PCM at 16 kHz — the SIP side of a
//! transcoded Telegram call when the PBX speaks HD voice.
//!
//! Sans-IO and allocation-free like [`super::g711`]: an encoder or decoder is a plain struct of a
//! couple of hundred bytes (the gateway keeps one pair per call, hundreds of calls per core) and
//! each call of `encode`/`decode` works in place on the caller's buffers.
//!
//! The algorithm follows the blocks of the Recommendation, whose names the comments cite:
//! a 24-tap quadrature mirror filter (QMF) splits 16 kHz PCM into a lower and a higher 8 kHz
//! sub-band; the lower band is coded with 6-bit ADPCM (blocks 1L–6L), the higher with 2-bit ADPCM
//! (blocks 1H–6H); both bands share the adaptive predictor of block 4 (two poles, six zeros).
//! Arithmetic is the Recommendation's 16-bit fixed point; the tests check encoder and decoder
//! against spandsp (the G.722 FreeSWITCH uses) byte for byte at run time.
//!
//! Levels: as in spandsp, 16-bit PCM enters the ADPCM halved (it works on 15-bit sub-band
//! samples) and the decoder doubles it back, so a round trip keeps the level and full scale
//! fits without overflow. Implementations differ here (some feed 16-bit PCM in unhalved); with
//! such a peer the far end hears us 6 dB quieter or louder, it is not a decoding error.
//!
//! # RTP
//!
//! G.722 is static RTP payload type 9 ([`RTP_PAYLOAD_TYPE`]). RFC 3551 §4.5.2 registers it with
//! an RTP clock of **8000 Hz although the audio is sampled at 16 kHz** ([`RTP_CLOCK_RATE`] vs
//! [`SAMPLE_RATE`]): an erroneous value in RFC 1890 kept for backward compatibility. So an RTP
//! timestamp advances by 160 per 20 ms packet (one tick per byte of payload), while the packet
//! carries 320 PCM samples. SDP says `a=rtpmap:9 G722/8000` for the same reason.

/// Static RTP payload type of G.722 (RFC 3551, table 4).
pub const RTP_PAYLOAD_TYPE: u8 = 9;
/// The RTP timestamp clock of G.722: 8000 Hz, half the real sample rate (RFC 3551 §4.5.2 keeps
/// RFC 1890's mistake for compatibility) — one timestamp tick per payload byte.
pub const RTP_CLOCK_RATE: u32 = 8_000;
/// The PCM sample rate on our side of the codec: G.722 codes 50–7000 Hz audio sampled at 16 kHz.
pub const SAMPLE_RATE: u32 = 16_000;
/// PCM samples in one 20 ms packet, the usual SIP packetisation.
pub const SAMPLES_PER_20MS: usize = 320;
/// Bytes of one 20 ms packet at 64 kbit/s: every byte codes two PCM samples.
pub const BYTES_PER_20MS: usize = 160;
/// How far decoded PCM lags the encoded PCM, in samples (1.375 ms): the transmit and receive
/// QMFs' group delay. Matters only when comparing signals across the codec (tests, echo checks).
pub const CODEC_DELAY_SAMPLES: usize = 22;

// ---------------------------------------------------------------------------------------------
// Tables of the Recommendation (values as in ITU-T G.722; names after the Recommendation's).

/// QMF coefficients of the 24-tap transmit and receive filters: one polyphase branch's 12 taps
/// (the other branch has them reversed), scaled so each branch sums to 2^12.
const QMF_COEFFS: [i32; 12] = [3, -11, 12, 32, -210, 951, 3876, -805, 362, -156, 53, -11];
/// The same coefficients in reverse order, for the other polyphase branch.
const QMF_COEFFS_REVERSED: [i32; 12] = {
    let mut r = [0; 12];
    let mut i = 0;
    while i < 12 {
        r[i] = QMF_COEFFS[11 - i];
        i += 1;
    }
    r
};

/// QUANTL decision levels Q6 (lower band, 6-bit quantiser), relative to the scale factor
/// (× DETL / 2^12). Level 0 is never compared against; an error at or above the last level falls
/// in the 30th interval.
const QUANTL_LEVELS: [i32; 30] = [
    0, 35, 72, 110, 150, 190, 233, 276, 323, 370, 422, 473, 530, 587, 650, 714, 786, 858, 940,
    1023, 1121, 1219, 1339, 1458, 1612, 1765, 1980, 2195, 2557, 2919,
];
/// QUANTL output code IL for a non-negative difference falling in interval 1..=30 (index − 1).
const QUANTL_CODE_POSITIVE: [u8; 30] = [
    61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38,
    37, 36, 35, 34, 33, 32,
];
/// QUANTL output code IL for a negative difference falling in interval 1..=30 (index − 1).
const QUANTL_CODE_NEGATIVE: [u8; 30] = [
    63, 62, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10,
    9, 8, 7, 6, 5, 4,
];

/// INVQBL output levels QQ6 for the 6-bit lower-band code (× DETL / 2^15): what the decoder
/// outputs at 64 kbit/s.
const INVQBL_LEVELS_6BIT: [i32; 64] = [
    -136, -136, -136, -136, -24808, -21904, -19008, -16704, -14984, -13512, -12280, -11192, -10232,
    -9360, -8576, -7856, -7192, -6576, -6000, -5456, -4944, -4464, -4008, -3576, -3168, -2776,
    -2400, -2032, -1688, -1360, -1040, -728, 24808, 21904, 19008, 16704, 14984, 13512, 12280,
    11192, 10232, 9360, 8576, 7856, 7192, 6576, 6000, 5456, 4944, 4464, 4008, 3576, 3168, 2776,
    2400, 2032, 1688, 1360, 1040, 728, 432, 136, -432, -136,
];
/// INVQAL output levels QQ4 for the 4 most significant bits of the lower-band code (× DETL /
/// 2^15): the quantised difference that drives the predictor, identical in encoder and decoder
/// whatever the bit rate.
const INVQAL_LEVELS_4BIT: [i32; 16] = [
    0, -20456, -12896, -8968, -6288, -4240, -2584, -1200, 20456, 12896, 8968, 6288, 4240, 2584,
    1200, 0,
];
/// INVQAH output levels QQ2 for the 2-bit higher-band code (× DETH / 2^15).
const INVQAH_LEVELS_2BIT: [i32; 4] = [-7408, -1616, 7408, 1616];

/// LOGSCL: magnitude class (RIL, 0..=7) of each 4-bit lower-band code.
const LOGSCL_MAGNITUDE: [usize; 16] = [0, 7, 6, 5, 4, 3, 2, 1, 7, 6, 5, 4, 3, 2, 1, 0];
/// LOGSCL: log scale-factor multiplier WL per magnitude class.
const LOGSCL_MULTIPLIER: [i32; 8] = [-60, -30, 58, 172, 334, 538, 1198, 3042];
/// LOGSCH: magnitude class of each 2-bit higher-band code (indexes [`LOGSCH_MULTIPLIER`]).
const LOGSCH_MAGNITUDE: [usize; 4] = [2, 1, 2, 1];
/// LOGSCH: log scale-factor multiplier WH per magnitude class.
const LOGSCH_MULTIPLIER: [i32; 3] = [0, -214, 798];
/// SCALEL/SCALEH: the antilog table ILB (2^(i/32) scaled), indexed by bits 6–10 of NBL/NBH.
const SCALE_ANTILOG: [i32; 32] = [
    2048, 2093, 2139, 2186, 2233, 2282, 2332, 2383, 2435, 2489, 2543, 2599, 2656, 2714, 2774, 2834,
    2896, 2960, 3025, 3091, 3158, 3228, 3298, 3371, 3444, 3520, 3597, 3676, 3756, 3838, 3922, 4008,
];
/// QUANTH: decision level of the 2-bit quantiser (× DETH / 2^12).
const QUANTH_LEVEL: i32 = 564;
/// LOGSCL upper limit of NBL (the lower band's log scale factor).
const LOGSCL_MAX: i32 = 18432;
/// LOGSCH upper limit of NBH.
const LOGSCH_MAX: i32 = 22528;
/// Initial DETL (the lower band's minimum scale factor) after reset.
const LOW_SCALE_RESET: i16 = 32;
/// Initial DETH after reset.
const HIGH_SCALE_RESET: i16 = 8;

// ---------------------------------------------------------------------------------------------
// Fixed-point helpers: the Recommendation's 16-bit saturating arithmetic.

/// Limits to the 16-bit range, as the Recommendation's saturating operators do.
#[inline]
fn saturate16(x: i32) -> i16 {
    x.clamp(i16::MIN as i32, i16::MAX as i32) as i16
}

/// Block 6L/6H LIMIT: the reconstructed sub-band signal is held to 15 bits.
#[inline]
fn limit15(x: i32) -> i32 {
    x.clamp(-16384, 16383)
}

/// Whether two 16-bit values differ in sign (the sign bit is what the adaptation blocks compare).
#[inline]
fn signs_differ(a: i16, b: i16) -> bool {
    (a ^ b) < 0
}

// ---------------------------------------------------------------------------------------------
// The QMF delay line.

/// Taps of each polyphase branch of the 24-tap QMF.
const QMF_BRANCH_TAPS: usize = 12;

/// The two polyphase branches of the QMF's delay line, 12 values each. Every value is stored
/// twice (at `next` and `next + 12`) so the 12 most recent values are always one contiguous
/// window, oldest first, and the dot product needs no wrap-around.
#[derive(Clone)]
struct QmfDelayLine {
    first: [i16; 2 * QMF_BRANCH_TAPS],
    second: [i16; 2 * QMF_BRANCH_TAPS],
    next: usize,
}

impl QmfDelayLine {
    const fn new() -> Self {
        QmfDelayLine {
            first: [0; 2 * QMF_BRANCH_TAPS],
            second: [0; 2 * QMF_BRANCH_TAPS],
            next: 0,
        }
    }

    /// Shifts in one value per branch and returns (first branch · [`QMF_COEFFS`], second branch
    /// · [`QMF_COEFFS_REVERSED`]) over the 12 newest values.
    #[inline]
    fn push(&mut self, first: i16, second: i16) -> (i32, i32) {
        let n = self.next;
        self.first[n] = first;
        self.first[n + QMF_BRANCH_TAPS] = first;
        self.second[n] = second;
        self.second[n + QMF_BRANCH_TAPS] = second;
        let n = if n + 1 == QMF_BRANCH_TAPS { 0 } else { n + 1 };
        self.next = n;
        (
            dot(&self.first[n..n + QMF_BRANCH_TAPS], &QMF_COEFFS),
            dot(&self.second[n..n + QMF_BRANCH_TAPS], &QMF_COEFFS_REVERSED),
        )
    }
}

/// Σ window[i]·coeffs[i]; cannot overflow i32 (2^15 × Σ|coeffs| = 2^15 × 6482 < 2^28).
#[inline]
fn dot(window: &[i16], coeffs: &[i32; QMF_BRANCH_TAPS]) -> i32 {
    window.iter().zip(coeffs).map(|(&x, &c)| x as i32 * c).sum()
}

// ---------------------------------------------------------------------------------------------
// One sub-band's adaptive state: the scale factor (blocks 3L/3H) and the predictor (block 4).

/// The ADPCM state of one sub-band, shared in shape by encoder and decoder (which must evolve
/// identically): 21 16-bit words.
#[derive(Clone)]
struct SubBand {
    /// PREDIC: the signal estimate s(n) for the next sample (SL / SH).
    estimate: i16,
    /// FILTEZ: the zero section's contribution sz(n) (SZL / SZH).
    zero_estimate: i16,
    /// RECONS: the previous reconstructed signal r(n−1), for the pole filter.
    prev_reconstructed: i16,
    /// UPPOL1/UPPOL2: pole coefficients a1, a2.
    pole: [i16; 2],
    /// UPZERO: zero coefficients b1..b6.
    zero: [i16; 6],
    /// PARREC: partially reconstructed signal p(n−1), p(n−2).
    partial: [i16; 2],
    /// DELAYA: quantised differences d(n−1)..d(n−6).
    difference: [i16; 6],
    /// LOGSCL/LOGSCH: the log scale factor NBL / NBH.
    log_scale: i16,
    /// SCALEL/SCALEH: the scale factor DETL / DETH the quantisers are relative to.
    scale: i16,
}

impl SubBand {
    const fn new(scale: i16) -> Self {
        SubBand {
            estimate: 0,
            zero_estimate: 0,
            prev_reconstructed: 0,
            pole: [0; 2],
            zero: [0; 6],
            partial: [0; 2],
            difference: [0; 6],
            log_scale: 0,
            scale,
        }
    }

    /// Blocks 2L/2H (INVQAL/INVQAH): a quantiser output level relative to the scale factor.
    #[inline]
    fn dequantise(&self, level: i32) -> i32 {
        (self.scale as i32 * level) >> 15
    }

    /// Blocks 3L/3H: LOGSCL/LOGSCH (leak the log scale factor by 127/128, add the code's
    /// multiplier, limit to `0..=max`) then SCALEL/SCALEH (the antilog, with `shift_base` 8 in
    /// the lower band and 10 in the higher, setting its range).
    #[inline]
    fn adapt_scale(&mut self, multiplier: i32, max: i32, shift_base: i32) {
        let nb = (((self.log_scale as i32 * 127) >> 7) + multiplier).clamp(0, max);
        self.log_scale = nb as i16;
        let antilog = SCALE_ANTILOG[((nb >> 6) & 31) as usize];
        let shift = shift_base - (nb >> 11);
        let wd = if shift < 0 {
            antilog << -shift
        } else {
            antilog >> shift
        };
        // At most 4008 << 1 << 2 = 32064: fits.
        self.scale = (wd << 2) as i16;
    }

    /// Block 4: reconstruct, adapt the pole and zero predictor coefficients to the quantised
    /// difference `dq`, and compute the next signal estimate.
    fn adapt_predictor(&mut self, dq: i16) {
        // RECONS: reconstructed signal r(n) = s(n) + d(n).
        let reconstructed = saturate16(self.estimate as i32 + dq as i32);
        // PARREC: partially reconstructed p(n) = sz(n) + d(n).
        let partial = saturate16(self.zero_estimate as i32 + dq as i32);

        // UPPOL2: a2 leaks by 127/128, moves by 2^-7 with the sign of p(n)·p(n−2) and against
        // the sign of p(n)·p(n−1) weighted by f(a1) = 4·a1 (limited).
        let a1_term = saturate16((self.pole[0] as i32) << 2) as i32;
        let a1_term = if signs_differ(partial, self.partial[0]) {
            a1_term
        } else {
            (-a1_term).min(32767)
        };
        let step = if signs_differ(partial, self.partial[1]) {
            -128
        } else {
            128
        };
        let a2 =
            (step + (a1_term >> 7) + ((self.pole[1] as i32 * 32512) >> 15)).clamp(-12288, 12288);

        // UPPOL1: a1 leaks by 255/256 and moves with the sign of p(n)·p(n−1), limited so the
        // pole pair stays stable: |a1| <= 15360 − a2.
        let step = if signs_differ(partial, self.partial[0]) {
            -192
        } else {
            192
        };
        let a1 = saturate16(step + ((self.pole[0] as i32 * 32640) >> 15)) as i32;
        let a1_limit = saturate16(15360 - a2) as i32;
        let a1 = a1.clamp(-a1_limit, a1_limit);

        // FILTEP: the pole section's output from r(n) and r(n−1) with the new coefficients.
        let r_now = saturate16(2 * reconstructed as i32) as i32;
        let r_prev = saturate16(2 * self.prev_reconstructed as i32) as i32;
        let pole_estimate = saturate16(((a1 * r_now) >> 15) + ((a2 * r_prev) >> 15));
        self.prev_reconstructed = reconstructed;
        self.pole = [a1 as i16, a2 as i16];
        self.partial = [partial, self.partial[0]];

        // UPZERO: each b_i leaks by 255/256 and moves by ±128 with the sign of d(n)·d(n−i)
        // (not at all while d(n) is zero).
        let step = if dq == 0 { 0 } else { 128 };
        for (b, &d_past) in self.zero.iter_mut().zip(&self.difference) {
            let toward = if signs_differ(d_past, dq) {
                -step
            } else {
                step
            };
            *b = saturate16(toward + ((*b as i32 * 32640) >> 15));
        }
        // DELAYA: d(n) becomes d(n−1).
        self.difference.copy_within(0..5, 1);
        self.difference[0] = dq;
        // FILTEZ: the zero section's output for the next sample, Σ b_i · d(n+1−i).
        let zero_estimate: i32 = self
            .zero
            .iter()
            .zip(&self.difference)
            .map(|(&b, &d)| (b as i32 * saturate16(2 * d as i32) as i32) >> 15)
            .sum();
        self.zero_estimate = saturate16(zero_estimate);

        // PREDIC: the signal estimate s(n+1) = sp + sz.
        self.estimate = saturate16(pole_estimate as i32 + self.zero_estimate as i32);
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder.

/// The G.722 encoder of one call leg: 16 kHz PCM in, 64 kbit/s G.722 out.
///
/// Keep one per direction per call: the ADPCM state carries over from packet to packet, so a
/// fresh encoder mid-stream would make the far decoder's state disagree for a few ms.
#[derive(Clone)]
pub struct G722Encoder {
    qmf: QmfDelayLine,
    low: SubBand,
    high: SubBand,
}

impl Default for G722Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl G722Encoder {
    /// An encoder in the Recommendation's reset state (what the far decoder starts from too).
    pub const fn new() -> Self {
        G722Encoder {
            qmf: QmfDelayLine::new(),
            low: SubBand::new(LOW_SCALE_RESET),
            high: SubBand::new(HIGH_SCALE_RESET),
        }
    }

    /// Encodes `pcm` (16 kHz mono) into `out`, one byte per two samples: 320 samples (20 ms)
    /// make 160 bytes. Returns the bytes written, `min(pcm.len() / 2, out.len())`.
    ///
    /// G.722 codes sample pairs, so an odd trailing sample is ignored (not buffered); callers
    /// feed whole 20 ms frames. Input that `out` has no room for is ignored as well.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> usize {
        let mut written = 0;
        for (pair, byte) in pcm.chunks_exact(2).zip(out.iter_mut()) {
            *byte = self.encode_pair(pair[0], pair[1]);
            written += 1;
        }
        written
    }

    /// Codes one pair of consecutive samples (`earlier`, `later`) as one byte: the higher band's
    /// 2 bits above the lower band's 6.
    #[inline]
    fn encode_pair(&mut self, earlier: i16, later: i16) -> u8 {
        // Transmit QMF: the pair enters the two polyphase branches; their sum is the lower
        // sub-band sample, their difference the higher. The shift takes out the filters' DC
        // gain (2^12), the sum of two branches (2^1) and one more bit: the ADPCM works on
        // 15-bit samples (rL, rH are limited to 15 bits), so 16-bit PCM enters it halved. Hence
        // no overflow either: |sum| <= 2 · 6482 · 2^15, which >> 14 is 25929 at most.
        let (odd_sum, even_sum) = self.qmf.push(earlier, later);
        let low_input = ((even_sum + odd_sum) >> 14) as i16;
        let high_input = ((even_sum - odd_sum) >> 14) as i16;

        let low_code = self.encode_low(low_input);
        let high_code = self.encode_high(high_input);
        (high_code << 6) | low_code
    }

    /// Lower sub-band: blocks 1L to 4L. Returns the 6-bit code IL.
    #[inline]
    fn encode_low(&mut self, input: i16) -> u8 {
        let band = &mut self.low;
        // Block 1L SUBTRA: the prediction error.
        let error = saturate16(input as i32 - band.estimate as i32) as i32;
        // Block 1L QUANTL: find the interval of |error| among the levels × DETL (the one's
        // complement magnitude, as in the Recommendation), then code it with the sign.
        let magnitude = if error >= 0 { error } else { !error };
        let scale = band.scale as i32;
        let interval =
            QUANTL_LEVELS[1..].partition_point(|&level| magnitude >= (level * scale) >> 12);
        let code = if error < 0 {
            QUANTL_CODE_NEGATIVE[interval]
        } else {
            QUANTL_CODE_POSITIVE[interval]
        };
        // Block 2L INVQAL: the quantised difference from the 4 most significant bits.
        let code4 = (code >> 2) as usize;
        let dq = band.dequantise(INVQAL_LEVELS_4BIT[code4]) as i16;
        // Block 3L LOGSCL, SCALEL.
        band.adapt_scale(LOGSCL_MULTIPLIER[LOGSCL_MAGNITUDE[code4]], LOGSCL_MAX, 8);
        // Block 4L.
        band.adapt_predictor(dq);
        code
    }

    /// Higher sub-band: blocks 1H to 4H. Returns the 2-bit code IH.
    #[inline]
    fn encode_high(&mut self, input: i16) -> u8 {
        let band = &mut self.high;
        // Block 1H SUBTRA.
        let error = saturate16(input as i32 - band.estimate as i32) as i32;
        // Block 1H QUANTH: one decision level; codes 3/2 (positive, small/large) and
        // 1/0 (negative, small/large).
        let magnitude = if error >= 0 { error } else { !error };
        let large = magnitude >= (QUANTH_LEVEL * band.scale as i32) >> 12;
        let code: u8 = match (error < 0, large) {
            (false, false) => 3,
            (false, true) => 2,
            (true, false) => 1,
            (true, true) => 0,
        };
        // Block 2H INVQAH.
        let dq = band.dequantise(INVQAH_LEVELS_2BIT[code as usize]) as i16;
        // Block 3H LOGSCH, SCALEH.
        band.adapt_scale(
            LOGSCH_MULTIPLIER[LOGSCH_MAGNITUDE[code as usize]],
            LOGSCH_MAX,
            10,
        );
        // Block 4H.
        band.adapt_predictor(dq);
        code
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder.

/// The G.722 decoder of one call leg: 64 kbit/s G.722 in, 16 kHz PCM out.
///
/// Any byte sequence is valid G.722, so decoding never fails. There is no loss concealment:
/// after a lost packet just keep decoding — the adaptive state leaks toward the encoder's, and
/// the output is exactly the lossless one again within about 0.4 s (tested).
#[derive(Clone)]
pub struct G722Decoder {
    qmf: QmfDelayLine,
    low: SubBand,
    high: SubBand,
}

impl Default for G722Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl G722Decoder {
    /// A decoder in the Recommendation's reset state.
    pub const fn new() -> Self {
        G722Decoder {
            qmf: QmfDelayLine::new(),
            low: SubBand::new(LOW_SCALE_RESET),
            high: SubBand::new(HIGH_SCALE_RESET),
        }
    }

    /// Decodes `data` into `out` (16 kHz mono), two samples per byte: 160 bytes (20 ms) make
    /// 320 samples. Returns the samples written, `2 * min(data.len(), out.len() / 2)`; bytes
    /// `out` has no room for are ignored, and an odd last slot of `out` is left untouched.
    pub fn decode(&mut self, data: &[u8], out: &mut [i16]) -> usize {
        let mut written = 0;
        for (&byte, pair) in data.iter().zip(out.chunks_exact_mut(2)) {
            let (earlier, later) = self.decode_byte(byte);
            pair[0] = earlier;
            pair[1] = later;
            written += 2;
        }
        written
    }

    /// Decodes one byte into a pair of consecutive samples (earlier, later).
    #[inline]
    fn decode_byte(&mut self, byte: u8) -> (i16, i16) {
        let (earlier, later) = self.decode_byte_unclipped(byte);
        (saturate16(earlier), saturate16(later))
    }

    /// [`Self::decode_byte`] before the output is clipped to 16 bits (which arbitrary input
    /// bytes can exceed).
    #[inline]
    fn decode_byte_unclipped(&mut self, byte: u8) -> (i32, i32) {
        let low = self.decode_low(byte & 0x3f);
        let high = self.decode_high(byte >> 6);
        // Receive QMF: sum and difference of the sub-bands through the two polyphase branches
        // (both fit 16 bits, as each band is limited to 15). The shift takes out the filters'
        // DC gain (2^12) less the bit the encoder took to make 15-bit samples.
        let (odd_sum, even_sum) = self.qmf.push((low + high) as i16, (low - high) as i16);
        (even_sum >> 11, odd_sum >> 11)
    }

    /// Lower sub-band: blocks 5L, 6L (output) and 2L to 4L (adaptation). Returns rL.
    #[inline]
    fn decode_low(&mut self, code: u8) -> i32 {
        let band = &mut self.low;
        // Block 5L INVQBL and RECONS, block 6L LIMIT: the output uses all 6 bits.
        let output =
            limit15(band.estimate as i32 + band.dequantise(INVQBL_LEVELS_6BIT[code as usize]));
        // Blocks 2L to 4L: adaptation uses the 4 most significant bits only, as in the encoder.
        let code4 = (code >> 2) as usize;
        let dq = band.dequantise(INVQAL_LEVELS_4BIT[code4]) as i16;
        band.adapt_scale(LOGSCL_MULTIPLIER[LOGSCL_MAGNITUDE[code4]], LOGSCL_MAX, 8);
        band.adapt_predictor(dq);
        output
    }

    /// Higher sub-band: blocks 2H, 5H, 6H, 3H and 4H. Returns rH.
    #[inline]
    fn decode_high(&mut self, code: u8) -> i32 {
        let band = &mut self.high;
        // Block 2H INVQAH; block 5H RECONS; block 6H LIMIT.
        let dq = band.dequantise(INVQAH_LEVELS_2BIT[code as usize]);
        let output = limit15(dq + band.estimate as i32);
        // Blocks 3H and 4H.
        band.adapt_scale(
            LOGSCH_MULTIPLIER[LOGSCH_MAGNITUDE[code as usize]],
            LOGSCH_MAX,
            10,
        );
        band.adapt_predictor(dq as i16);
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tgmedia::opus::{hears_tone, Tone};
    use std::ffi::{c_int, c_void, CStr};

    /// SplitMix64: a fixed-seed generator, so every failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        fn sample(&mut self) -> i16 {
            (self.next_u64() >> 48) as u16 as i16
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }

    // --- spandsp, loaded at run time (test only: the product never links it) -----------------

    type InitFn = unsafe extern "C" fn(*mut c_void, c_int, c_int) -> *mut c_void;
    type EncodeFn = unsafe extern "C" fn(*mut c_void, *mut u8, *const i16, c_int) -> c_int;
    type DecodeFn = unsafe extern "C" fn(*mut c_void, *mut i16, *const u8, c_int) -> c_int;
    type FreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;

    /// The G.722 entry points of the system's libspandsp (spandsp/g722.h).
    struct Spandsp {
        encode_init: InitFn,
        encode: EncodeFn,
        encode_free: FreeFn,
        decode_init: InitFn,
        decode: DecodeFn,
        decode_free: FreeFn,
    }

    /// spandsp's `G722_PACKED` and `G722_SAMPLE_RATE_8000` both off: one byte per sample pair,
    /// 16 kHz PCM — what RTP carries.
    const SPANDSP_OPTIONS: c_int = 0;
    const SPANDSP_RATE: c_int = 64_000;

    fn last_dl_error() -> String {
        // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call
        // on this thread; it is copied out at once.
        unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        }
    }

    impl Spandsp {
        /// Loads libspandsp.so.2 or fails the test with how to install it: a cross-check that
        /// skips silently would prove nothing.
        fn load() -> Spandsp {
            // SAFETY: the name is a NUL-terminated literal; loading spandsp runs only its (and
            // libc's, libm's, libtiff's) initialisers. The handle is never closed, so the
            // function pointers below stay valid for the rest of the process.
            let lib = unsafe { libc::dlopen(c"libspandsp.so.2".as_ptr(), libc::RTLD_NOW) };
            assert!(
                !lib.is_null(),
                "cannot load libspandsp.so.2 ({}): the G.722 cross-check against spandsp needs \
                 it — install it with `apt-get install libspandsp2`",
                last_dl_error()
            );
            let symbol = |name: &CStr| {
                // SAFETY: `lib` is a live handle from dlopen and `name` is NUL-terminated.
                let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
                assert!(
                    !p.is_null(),
                    "libspandsp.so.2 has no {name:?} ({}); install libspandsp2 (0.0.6)",
                    last_dl_error()
                );
                p
            };
            // SAFETY: each symbol is the spandsp function of that name, whose C prototype in
            // spandsp/g722.h is exactly the matching fn type (pointers, int16_t/uint8_t
            // buffers, int lengths, int/pointer results, C ABI).
            unsafe {
                Spandsp {
                    encode_init: std::mem::transmute::<*mut c_void, InitFn>(symbol(
                        c"g722_encode_init",
                    )),
                    encode: std::mem::transmute::<*mut c_void, EncodeFn>(symbol(c"g722_encode")),
                    encode_free: std::mem::transmute::<*mut c_void, FreeFn>(symbol(
                        c"g722_encode_free",
                    )),
                    decode_init: std::mem::transmute::<*mut c_void, InitFn>(symbol(
                        c"g722_decode_init",
                    )),
                    decode: std::mem::transmute::<*mut c_void, DecodeFn>(symbol(c"g722_decode")),
                    decode_free: std::mem::transmute::<*mut c_void, FreeFn>(symbol(
                        c"g722_decode_free",
                    )),
                }
            }
        }

        /// Encodes a whole stream with a fresh spandsp encoder, 20 ms per call.
        fn encode(&self, pcm: &[i16]) -> Vec<u8> {
            assert!(pcm.len().is_multiple_of(2), "spandsp reads sample pairs");
            // SAFETY: NULL asks g722_encode_init to allocate the state, freed below.
            let state =
                unsafe { (self.encode_init)(std::ptr::null_mut(), SPANDSP_RATE, SPANDSP_OPTIONS) };
            assert!(!state.is_null());
            let mut out = vec![0u8; pcm.len() / 2];
            for (frame, bytes) in pcm
                .chunks(SAMPLES_PER_20MS)
                .zip(out.chunks_mut(BYTES_PER_20MS))
            {
                // SAFETY: `frame` holds an even number of samples, so spandsp reads
                // frame.len() samples and writes frame.len() / 2 bytes, which `bytes` holds.
                let n = unsafe {
                    (self.encode)(
                        state,
                        bytes.as_mut_ptr(),
                        frame.as_ptr(),
                        frame.len() as c_int,
                    )
                };
                assert_eq!(n as usize, bytes.len());
            }
            // SAFETY: `state` came from g722_encode_init and is freed once.
            unsafe { (self.encode_free)(state) };
            out
        }

        /// Decodes a whole stream with a fresh spandsp decoder, 160 bytes per call.
        fn decode(&self, data: &[u8]) -> Vec<i16> {
            // SAFETY: NULL asks g722_decode_init to allocate the state, freed below.
            let state =
                unsafe { (self.decode_init)(std::ptr::null_mut(), SPANDSP_RATE, SPANDSP_OPTIONS) };
            assert!(!state.is_null());
            let mut out = vec![0i16; data.len() * 2];
            for (bytes, pcm) in data
                .chunks(BYTES_PER_20MS)
                .zip(out.chunks_mut(SAMPLES_PER_20MS))
            {
                // SAFETY: spandsp reads bytes.len() bytes and writes two samples per byte,
                // which `pcm` (2 × bytes.len() long) holds.
                let n = unsafe {
                    (self.decode)(
                        state,
                        pcm.as_mut_ptr(),
                        bytes.as_ptr(),
                        bytes.len() as c_int,
                    )
                };
                assert_eq!(n as usize, pcm.len());
            }
            // SAFETY: `state` came from g722_decode_init and is freed once.
            unsafe { (self.decode_free)(state) };
            out
        }
    }

    // --- helpers -----------------------------------------------------------------------------

    /// Runs a stream through `encode` in chunks of varying size (odd byte counts, 1-byte
    /// calls, whole frames), so state carried across calls is exercised too.
    fn encode_stream(pcm: &[i16]) -> Vec<u8> {
        let mut enc = G722Encoder::new();
        let mut out = vec![0u8; pcm.len() / 2];
        let chunk_pairs = [160, 1, 7, 160, 33, 80, 2];
        let (mut at, mut k) = (0, 0);
        while at < out.len() {
            let n = chunk_pairs[k % chunk_pairs.len()].min(out.len() - at);
            let written = enc.encode(&pcm[2 * at..2 * (at + n)], &mut out[at..at + n]);
            assert_eq!(written, n);
            at += n;
            k += 1;
        }
        out
    }

    fn decode_stream(data: &[u8]) -> Vec<i16> {
        let mut dec = G722Decoder::new();
        let mut out = vec![0i16; data.len() * 2];
        let chunk_bytes = [160, 1, 5, 160, 77, 2];
        let (mut at, mut k) = (0, 0);
        while at < data.len() {
            let n = chunk_bytes[k % chunk_bytes.len()].min(data.len() - at);
            let written = dec.decode(&data[at..at + n], &mut out[2 * at..2 * (at + n)]);
            assert_eq!(written, 2 * n);
            at += n;
            k += 1;
        }
        out
    }

    fn tone(freq: f64, amplitude: f64, samples: usize) -> Vec<i16> {
        let mut pcm = vec![0i16; samples];
        Tone::new(freq, amplitude, SAMPLE_RATE).fill(&mut pcm);
        pcm
    }

    /// The PCM the encoders are compared on: (name, samples).
    fn test_signals() -> Vec<(String, Vec<i16>)> {
        let second = SAMPLE_RATE as usize;
        let mut v: Vec<(String, Vec<i16>)> = vec![("silence".into(), vec![0; second])];
        for freq in [
            50.0, 300.0, 1000.0, 2500.0, 3400.0, 4000.0, 5500.0, 7000.0, 7900.0,
        ] {
            for amplitude in [30.0, 1000.0, 8000.0, 20000.0, 32767.0] {
                v.push((
                    format!("tone {freq} Hz amplitude {amplitude}"),
                    tone(freq, amplitude, second / 2),
                ));
            }
        }
        // Sweep 20 Hz → 8 kHz over 2 s (phase accumulates the instantaneous frequency).
        for amplitude in [5000.0, 28000.0] {
            let n = 2 * second;
            let mut phase = 0.0f64;
            let sweep = (0..n)
                .map(|i| {
                    let f = 20.0 + (8000.0 - 20.0) * i as f64 / n as f64;
                    phase += 2.0 * std::f64::consts::PI * f / SAMPLE_RATE as f64;
                    (amplitude * phase.sin()) as i16
                })
                .collect();
            v.push((format!("sweep amplitude {amplitude}"), sweep));
        }
        let mut rng = Rng(0x6722);
        for level in [1i32, 100, 3000, 12000] {
            let noise = (0..second)
                .map(|_| (rng.sample() as i32 * level / 32768) as i16)
                .collect();
            v.push((format!("noise ±{level}"), noise));
        }
        v.push((
            "noise full range".into(),
            (0..second).map(|_| rng.sample()).collect(),
        ));
        // Full scale and clipping.
        v.push(("constant +32767".into(), vec![i16::MAX; second / 4]));
        v.push(("constant -32768".into(), vec![i16::MIN; second / 4]));
        v.push((
            "alternating +32767/-32768".into(),
            (0..second / 4)
                .map(|i| if i % 2 == 0 { i16::MAX } else { i16::MIN })
                .collect(),
        ));
        v.push((
            "random ±full scale".into(),
            (0..second / 2)
                .map(|_| {
                    if rng.next_u64() & 1 == 0 {
                        i16::MAX
                    } else {
                        i16::MIN
                    }
                })
                .collect(),
        ));
        for freq in [200.0, 1000.0, 3000.0] {
            let half_period = (SAMPLE_RATE as f64 / freq / 2.0) as usize;
            v.push((
                format!("square {freq} Hz full scale"),
                (0..second / 2)
                    .map(|i| {
                        if (i / half_period).is_multiple_of(2) {
                            i16::MAX
                        } else {
                            i16::MIN
                        }
                    })
                    .collect(),
            ));
            // A tone at three times full scale, clipped as an overdriven input is.
            v.push((
                format!("clipped tone {freq} Hz"),
                tone(freq, 32767.0, second / 2)
                    .iter()
                    .map(|&s| (s as i32 * 3).clamp(-32768, 32767) as i16)
                    .collect(),
            ));
        }
        // Silence → loud → silence: the scale factors' attack and decay.
        let mut burst = vec![0i16; second / 2];
        burst[2000..4000].copy_from_slice(&tone(700.0, 25000.0, 2000));
        v.push(("burst".into(), burst));
        v
    }

    /// Signal-to-noise ratio in dB of `decoded` against `reference` delayed by `delay` samples,
    /// from sample `skip` of the reference on.
    fn snr_db(reference: &[i16], decoded: &[i16], delay: usize, skip: usize) -> f64 {
        let (mut signal, mut noise) = (0.0f64, 0.0f64);
        for (i, &x) in reference.iter().enumerate().skip(skip) {
            let Some(&y) = decoded.get(i + delay) else {
                break;
            };
            signal += x as f64 * x as f64;
            noise += (y as f64 - x as f64).powi(2);
        }
        10.0 * (signal / noise.max(1e-9)).log10()
    }

    /// The delay (0..64 samples) at which `decoded` best matches `reference`.
    fn best_delay(reference: &[i16], decoded: &[i16]) -> usize {
        (0..64)
            .max_by(|&a, &b| {
                snr_db(reference, decoded, a, 1600).total_cmp(&snr_db(reference, decoded, b, 1600))
            })
            .unwrap()
    }

    fn assert_bands_bounded(low: &SubBand, high: &SubBand) {
        for (band, max_log) in [(low, LOGSCL_MAX), (high, LOGSCH_MAX)] {
            assert!((0..=max_log).contains(&(band.log_scale as i32)));
            assert!(band.scale > 0);
            let [a1, a2] = band.pole.map(|a| a as i32);
            assert!(a2.abs() <= 12288, "a2 {a2}");
            assert!(a1.abs() <= 15360 - a2, "a1 {a1} a2 {a2}");
        }
    }

    // --- tests -------------------------------------------------------------------------------

    #[test]
    fn encoder_matches_spandsp_byte_for_byte() {
        let spandsp = Spandsp::load();
        let (mut signals, mut bytes) = (0, 0);
        for (name, pcm) in test_signals() {
            let theirs = spandsp.encode(&pcm);
            let ours = encode_stream(&pcm);
            assert!(
                ours == theirs,
                "{name}: differs from spandsp from byte {:?} on",
                ours.iter().zip(&theirs).position(|(a, b)| a != b)
            );
            signals += 1;
            bytes += theirs.len();
        }
        println!("G.722 encoder: {signals} signals, {bytes} bytes identical to spandsp");
    }

    #[test]
    fn decoder_matches_spandsp_sample_for_sample() {
        let spandsp = Spandsp::load();
        let mut streams: Vec<(String, Vec<u8>)> = test_signals()
            .into_iter()
            .map(|(name, pcm)| (format!("encoded {name}"), spandsp.encode(&pcm)))
            .collect();
        let mut rng = Rng(0x722_0de);
        for i in 0..20 {
            let n = 1 + rng.below(4000);
            streams.push((format!("random bytes #{i}"), rng.bytes(n)));
        }
        for b in 0..=255u8 {
            streams.push((format!("constant {b:#04x}"), vec![b; 400]));
        }
        streams.push((
            "every byte in turn".into(),
            (0..8000).map(|i| i as u8).collect(),
        ));
        let (mut streams_compared, mut samples, mut wrapped) = (0, 0, 0);
        for (name, data) in &streams {
            let theirs = spandsp.decode(data);
            let ours = decode_stream(data);
            // spandsp 0.0.6 converts the receive QMF's output to int16_t unchecked, so a sum
            // beyond full scale wraps around (later spandsp saturates, as we do): there, and
            // only there, the samples differ, and spandsp's is our unclipped sum, wrapped.
            if ours != theirs {
                let mut dec = G722Decoder::new();
                let unclipped = data.iter().flat_map(|&b| {
                    let (e, l) = dec.decode_byte_unclipped(b);
                    [e, l]
                });
                let mut here = 0;
                for (i, ((&o, &t), u)) in ours.iter().zip(&theirs).zip(unclipped).enumerate() {
                    assert_eq!(o, saturate16(u), "{name}: sample {i}");
                    assert_eq!(t, u as i16, "{name}: sample {i} (spandsp)");
                    here += usize::from(o != t);
                }
                if name.starts_with("encoded") {
                    println!("{name}: {here} samples past full scale");
                }
                wrapped += here;
            }
            streams_compared += 1;
            samples += theirs.len();
        }
        println!("G.722 decoder: {streams_compared} streams, {samples} samples compared with spandsp, all identical but {wrapped} that spandsp wraps past full scale and we clip");
    }

    #[test]
    fn decoded_pcm_lags_by_the_codec_delay() {
        // Broadband noise has one best alignment (a tone has one per period).
        let mut rng = Rng(0xde1a);
        let pcm: Vec<i16> = (0..SAMPLE_RATE).map(|_| rng.sample() / 8).collect();
        let decoded = decode_stream(&encode_stream(&pcm));
        assert_eq!(best_delay(&pcm, &decoded), CODEC_DELAY_SAMPLES);
    }

    #[test]
    fn a_1khz_tone_keeps_its_frequency_and_snr() {
        let pcm = tone(1000.0, 10000.0, SAMPLE_RATE as usize);
        let mut enc = G722Encoder::new();
        let mut dec = G722Decoder::new();
        let mut decoded = Vec::with_capacity(pcm.len());
        let (mut packet, mut frame) = ([0u8; BYTES_PER_20MS], [0i16; SAMPLES_PER_20MS]);
        for chunk in pcm.chunks(SAMPLES_PER_20MS) {
            assert_eq!(enc.encode(chunk, &mut packet), BYTES_PER_20MS);
            assert_eq!(dec.decode(&packet, &mut frame), SAMPLES_PER_20MS);
            decoded.extend_from_slice(&frame);
        }
        // From 100 ms on, once the scale factors have adapted.
        let snr = snr_db(&pcm, &decoded, CODEC_DELAY_SAMPLES, 1600);
        println!("1 kHz at -10 dBFS through G.722: SNR {snr:.1} dB");
        assert!(snr > 25.0, "SNR {snr:.1} dB");
        let tail = &decoded[SAMPLE_RATE as usize / 2..];
        assert!(hears_tone(tail, SAMPLE_RATE, 1000.0, 3000.0));
        assert!(!hears_tone(tail, SAMPLE_RATE, 3000.0, 1000.0));
    }

    #[test]
    fn odd_and_mismatched_lengths_are_truncated_not_panics() {
        let mut enc = G722Encoder::new();
        let mut out = [0xa5u8; 200];
        assert_eq!(enc.encode(&[1000; 321], &mut out), 160);
        assert_eq!(out[160], 0xa5);
        assert_eq!(enc.encode(&[1000; 1], &mut out), 0);
        assert_eq!(enc.encode(&[], &mut out), 0);
        assert_eq!(enc.encode(&[1000; 320], &mut out[..10]), 10);
        assert_eq!(enc.encode(&[1000; 320], &mut []), 0);

        let mut dec = G722Decoder::new();
        let mut pcm = [0x55i16; 321];
        assert_eq!(dec.decode(&[0x80; 200], &mut pcm), 320);
        assert_eq!(pcm[320], 0x55);
        assert_eq!(dec.decode(&[0x80; 3], &mut pcm), 6);
        assert_eq!(dec.decode(&[], &mut pcm), 0);
        assert_eq!(dec.decode(&[0x80; 3], &mut pcm[..1]), 0);
        assert_eq!(dec.decode(&[0x80; 3], &mut []), 0);
    }

    #[test]
    fn random_input_never_panics_and_state_stays_bounded() {
        let mut rng = Rng(0xf022);
        let mut enc = G722Encoder::new();
        let mut dec = G722Decoder::new();
        let mut bytes = vec![0u8; 1200];
        let mut pcm = vec![0i16; 2400];
        for _ in 0..3000 {
            let len_in = rng.below(1000);
            let len_out = rng.below(1200);
            let data = rng.bytes(len_in);
            pcm.fill(0x7777);
            let n = dec.decode(&data, &mut pcm[..len_out]);
            assert_eq!(n, 2 * len_in.min(len_out / 2));
            assert!(pcm[n..].iter().all(|&s| s == 0x7777));
            assert_bands_bounded(&dec.low, &dec.high);

            let level = [1i32, 300, 32768][rng.below(3)];
            let len_in = rng.below(2000);
            let input: Vec<i16> = (0..len_in)
                .map(|_| match rng.below(8) {
                    0 => i16::MAX,
                    1 => i16::MIN,
                    _ => (rng.sample() as i32 * level / 32768) as i16,
                })
                .collect();
            let len_out = rng.below(1200);
            bytes.fill(0x33);
            let n = enc.encode(&input, &mut bytes[..len_out]);
            assert_eq!(n, (len_in / 2).min(len_out));
            assert!(bytes[n..].iter().all(|&b| b == 0x33));
            assert_bands_bounded(&enc.low, &enc.high);
        }
    }

    #[test]
    fn after_a_lost_packet_the_decoder_falls_back_in_step() {
        // Its adaptive state leaks toward the encoder's, so it decodes exactly what a decoder
        // that saw every packet decodes again after a while (~0.4 s here).
        let mut rng = Rng(9);
        for amplitude in [300.0, 3000.0, 20000.0] {
            let pcm: Vec<i16> = tone(440.0, amplitude, 2 * SAMPLE_RATE as usize)
                .iter()
                .map(|&s| s.saturating_add(rng.sample() / 64))
                .collect();
            let data = encode_stream(&pcm);
            let lossless = decode_stream(&data);
            let mut dec = G722Decoder::new();
            let mut lossy = vec![0i16; lossless.len()];
            let packets = data.chunks(BYTES_PER_20MS);
            for (k, (packet, out)) in packets.zip(lossy.chunks_mut(SAMPLES_PER_20MS)).enumerate() {
                if k != 10 {
                    dec.decode(packet, out);
                }
            }
            let last_difference = lossless
                .iter()
                .zip(&lossy)
                .rposition(|(a, b)| a != b)
                .unwrap();
            let ms_after_loss = (last_difference - 11 * SAMPLES_PER_20MS) / 16;
            assert!(
                ms_after_loss < 1000,
                "{amplitude}: still off {ms_after_loss} ms after"
            );
        }
    }

    #[test]
    fn state_is_small() {
        // Hundreds of calls per core each hold one encoder and one decoder.
        assert!(std::mem::size_of::<G722Encoder>() <= 256);
        assert!(std::mem::size_of::<G722Decoder>() <= 256);
    }
}
