//! G.711 μ-law (PCMU) and A-law (PCMA), the codecs every PBX speaks, to and from 16-bit PCM at
//! 8 kHz — the SIP side of a transcoded Telegram call.
//!
//! The segment arithmetic of ITU-T G.711 (as in the reference `g711.c` formulas), written out so
//! the hot path has no tables to warm and no allocation.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// One linear sample to μ-law.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    let exponent = (31 - (s as u32).leading_zeros() as i32 - 7).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) | mantissa) as u8
}

/// One μ-law byte to a linear sample.
pub fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u as i32;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = u & 0x0f;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// One linear sample to A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s >= 0 {
        0x80
    } else {
        s = -s - 1;
        0
    };
    let s = s.min(0x7fff) >> 3; // 13-bit magnitude
    let (exponent, mantissa) = if s < 32 {
        (0, s >> 1)
    } else {
        let e = 31 - (s as u32).leading_zeros() as i32 - 4;
        (e, (s >> e) & 0x0f)
    };
    ((sign | (exponent << 4) | mantissa) ^ 0x55) as u8
}

/// One A-law byte to a linear sample.
pub fn alaw_to_linear(a: u8) -> i16 {
    let a = (a ^ 0x55) as i32;
    let sign = a & 0x80;
    let exponent = (a >> 4) & 0x07;
    let mantissa = a & 0x0f;
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    (if sign != 0 { magnitude } else { -magnitude }) as i16
}

/// Which G.711 law a SIP leg uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    /// PCMU, RTP payload type 0.
    Mu,
    /// PCMA, RTP payload type 8.
    A,
}

impl Law {
    /// The law of a static RTP payload type (0 or 8).
    pub fn from_payload_type(pt: u8) -> Option<Law> {
        match pt {
            0 => Some(Law::Mu),
            8 => Some(Law::A),
            _ => None,
        }
    }

    /// Decodes `bytes` into `out` (same length).
    pub fn decode(self, bytes: &[u8], out: &mut [i16]) {
        for (o, &b) in out.iter_mut().zip(bytes) {
            *o = match self {
                Law::Mu => ulaw_to_linear(b),
                Law::A => alaw_to_linear(b),
            };
        }
    }

    /// Encodes `pcm` into `out` (same length).
    pub fn encode(self, pcm: &[i16], out: &mut [u8]) {
        for (o, &s) in out.iter_mut().zip(pcm) {
            *o = match self {
                Law::Mu => linear_to_ulaw(s),
                Law::A => linear_to_alaw(s),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_code_points() {
        // Silence and full scale, as in every G.711 table.
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(alaw_to_linear(0xd5), 8);
        assert_eq!(alaw_to_linear(0xaa), 32256);
        assert_eq!(alaw_to_linear(0x2a), -32256);
    }

    #[test]
    fn every_code_decodes_and_re_encodes_to_itself() {
        for b in 0..=255u8 {
            assert_eq!(linear_to_alaw(alaw_to_linear(b)), b, "A-law {b:#x}");
            let u = linear_to_ulaw(ulaw_to_linear(b));
            // μ-law has two zeros (0x7f and 0xff); both decode to 0 and 0 encodes to 0xff.
            assert!(u == b || (b == 0x7f && u == 0xff), "μ-law {b:#x} -> {u:#x}");
        }
    }

    #[test]
    fn quantisation_error_stays_within_the_segment_step() {
        for s in (i16::MIN..=i16::MAX).step_by(7) {
            let mu = ulaw_to_linear(linear_to_ulaw(s)) as i32;
            let a = alaw_to_linear(linear_to_alaw(s)) as i32;
            let tol = (s as i32).abs() / 16 + 16;
            assert!((mu - s as i32).abs() <= tol.max(140), "μ-law {s} -> {mu}");
            assert!((a - s as i32).abs() <= tol.max(140), "A-law {s} -> {a}");
        }
    }
}
