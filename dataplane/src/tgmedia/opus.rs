//! Opus at 48 kHz mono, the codec of every Telegram call, and the PCM frames the gateway bridges
//! to SIP legs.
//!
//! Telegram peers send 20–60 ms frames with in-band FEC; we decode whatever duration arrives and
//! encode 20 ms frames (configurable up to 60 ms) with FEC on, so one lost packet is recovered
//! from the next.

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bandwidth, Bitrate, Channels, SampleRate};

/// The longest frame Opus produces (120 ms at 48 kHz), so a decode buffer this long always fits.
pub const MAX_FRAME_SAMPLES: usize = 120 * 48;
/// Room for one encoded packet; Opus never needs more than 1275 bytes per frame.
pub const MAX_PACKET: usize = 1500;

/// Why an Opus operation failed; carries libopus' own reason.
#[derive(Debug, thiserror::Error)]
pub enum OpusError {
    #[error("opus frame of {0} samples is not 10, 20, 40 or 60 ms at the PCM rate")]
    FrameSize(usize),
    #[error("PCM rate {0} Hz is not one Opus takes (8, 12, 16, 24 or 48 kHz)")]
    Rate(u32),
    #[error("libopus: {0}")]
    Codec(#[from] audiopus::Error),
}

/// Encoder settings. The defaults suit a call bridged to SIP: the PBX side is G.711 or G.722,
/// so PCM runs at 16 kHz and Opus is capped at wideband (SILK), which costs a fraction of
/// fullband CELT per frame for the same audible result on a phone call.
#[derive(Debug, Clone, Copy)]
pub struct OpusSettings {
    /// PCM sample rate in Hz on our side of the codec (the RTP clock stays 48 kHz).
    pub rate: u32,
    /// Widest audio band coded.
    pub max_bandwidth: Bandwidth,
    /// Frame duration in ms: 10, 20, 40 or 60.
    pub frame_ms: usize,
    /// Target bitrate in bit/s.
    pub bitrate: i32,
    /// 0..=10; lower trades a little quality for CPU (the gateway runs hundreds of legs a core).
    pub complexity: u8,
    /// In-band forward error correction.
    pub fec: bool,
    /// Expected loss in percent; FEC only engages above zero.
    pub expected_loss: u8,
}

impl Default for OpusSettings {
    fn default() -> Self {
        OpusSettings {
            rate: 16_000,
            max_bandwidth: Bandwidth::Wideband,
            frame_ms: 20,
            bitrate: 24_000,
            complexity: 1,
            fec: true,
            expected_loss: 5,
        }
    }
}

/// One direction of Opus: PCM (i16, 48 kHz mono) in, packets out.
pub struct OpusEncoder {
    enc: Encoder,
    frame_samples: usize,
}

impl OpusEncoder {
    /// Builds an encoder for VoIP with `settings`.
    pub fn new(settings: OpusSettings) -> Result<Self, OpusError> {
        let frame_samples = settings.frame_ms * settings.rate as usize / 1000;
        if ![10, 20, 40, 60].contains(&settings.frame_ms) {
            return Err(OpusError::FrameSize(frame_samples));
        }
        let mut enc = Encoder::new(
            sample_rate(settings.rate)?,
            Channels::Mono,
            Application::Voip,
        )?;
        enc.set_max_bandwidth(settings.max_bandwidth)?;
        enc.set_bitrate(Bitrate::BitsPerSecond(settings.bitrate))?;
        enc.set_complexity(settings.complexity)?;
        enc.set_inband_fec(settings.fec)?;
        enc.set_packet_loss_perc(settings.expected_loss)?;
        Ok(OpusEncoder { enc, frame_samples })
    }

    /// Samples one `encode` call takes.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Encodes exactly one frame into `out`, returning the packet length.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, OpusError> {
        if pcm.len() != self.frame_samples {
            return Err(OpusError::FrameSize(pcm.len()));
        }
        Ok(self.enc.encode(pcm, out)?)
    }
}

/// The other direction: packets in, PCM out, with loss concealment and FEC recovery.
pub struct OpusDecoder {
    dec: Decoder,
    last_samples: usize,
}

impl OpusDecoder {
    /// A mono decoder producing PCM at `rate` Hz; stereo packets are down-mixed by libopus.
    pub fn new(rate: u32) -> Result<Self, OpusError> {
        Ok(OpusDecoder {
            dec: Decoder::new(sample_rate(rate)?, Channels::Mono)?,
            last_samples: 20 * rate as usize / 1000,
        })
    }

    /// Decodes one packet into `out` (at least [`MAX_FRAME_SAMPLES`] long); returns samples.
    pub fn decode(&mut self, packet: &[u8], out: &mut [i16]) -> Result<usize, OpusError> {
        let n = self.dec.decode(Some(packet), &mut out[..], false)?;
        self.last_samples = n;
        Ok(n)
    }

    /// Fills a lost frame: from the FEC data in `next` when the following packet is at hand,
    /// else by concealment. Returns samples written.
    pub fn recover(&mut self, next: Option<&[u8]>, out: &mut [i16]) -> Result<usize, OpusError> {
        let want = self.last_samples.min(out.len());
        match next {
            Some(p) => Ok(self.dec.decode(Some(p), &mut out[..want], true)?),
            None => Ok(self.dec.decode(None::<&[u8]>, &mut out[..want], false)?),
        }
    }
}

fn sample_rate(rate: u32) -> Result<SampleRate, OpusError> {
    Ok(match rate {
        8_000 => SampleRate::Hz8000,
        12_000 => SampleRate::Hz12000,
        16_000 => SampleRate::Hz16000,
        24_000 => SampleRate::Hz24000,
        48_000 => SampleRate::Hz48000,
        r => return Err(OpusError::Rate(r)),
    })
}

/// Goertzel power of `freq` in `pcm` sampled at `rate`: how the tests and the interop suite check
/// that a tone crossed a call as that tone, not merely that frames arrived.
pub fn goertzel(pcm: &[i16], freq: f64, rate: u32) -> f64 {
    let c = 2.0 * (2.0 * std::f64::consts::PI * freq / rate as f64).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in pcm {
        let s0 = x as f64 + c * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - c * s1 * s2
}

/// Root mean square of `pcm`.
pub fn rms(pcm: &[i16]) -> f64 {
    if pcm.is_empty() {
        return 0.0;
    }
    (pcm.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / pcm.len() as f64).sqrt()
}

/// Whether `pcm` is clearly the tone `want`: loud enough, and 100× the power of `other` and of
/// a 2 kHz control (the same rule as ../shared/tools/ntgcalls_pair.py).
pub fn hears_tone(pcm: &[i16], rate: u32, want: f64, other: f64) -> bool {
    let p = goertzel(pcm, want, rate);
    rms(pcm) > 1000.0 && p > 100.0 * goertzel(pcm, other, rate).max(goertzel(pcm, 2000.0, rate))
}

/// A sine tone generator producing consecutive PCM frames, phase-continuous.
pub struct Tone {
    freq: f64,
    amplitude: f64,
    rate: f64,
    n: u64,
}

impl Tone {
    /// A tone of `freq` Hz at `amplitude` (of i16 full scale 32767), sampled at `rate` Hz.
    pub fn new(freq: f64, amplitude: f64, rate: u32) -> Self {
        Tone {
            freq,
            amplitude,
            rate: rate as f64,
            n: 0,
        }
    }

    /// Writes the next `out.len()` samples.
    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out.iter_mut() {
            let t = self.n as f64 / self.rate;
            *s = (self.amplitude * (2.0 * std::f64::consts::PI * self.freq * t).sin()) as i16;
            self.n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_survives_encode_and_decode_as_that_tone() {
        let mut enc = OpusEncoder::new(OpusSettings::default()).unwrap();
        let mut dec = OpusDecoder::new(16_000).unwrap();
        let mut tone = Tone::new(440.0, 8000.0, 16_000);
        let mut pcm = vec![0i16; enc.frame_samples()];
        let mut pkt = [0u8; MAX_PACKET];
        let mut out = vec![0i16; MAX_FRAME_SAMPLES];
        let mut heard = Vec::new();
        for _ in 0..50 {
            tone.fill(&mut pcm);
            let n = enc.encode(&pcm, &mut pkt).unwrap();
            let got = dec.decode(&pkt[..n], &mut out).unwrap();
            assert_eq!(got, 320);
            heard.extend_from_slice(&out[..got]);
        }
        let last = &heard[heard.len() - 8_000..];
        assert!(hears_tone(last, 16_000, 440.0, 1000.0), "rms {}", rms(last));
        assert!(!hears_tone(last, 16_000, 1000.0, 440.0));
    }

    #[test]
    fn loss_is_concealed_or_recovered_with_fec() {
        let mut enc = OpusEncoder::new(OpusSettings::default()).unwrap();
        let mut dec = OpusDecoder::new(16_000).unwrap();
        let mut tone = Tone::new(440.0, 8000.0, 16_000);
        let mut pcm = vec![0i16; 320];
        let mut out = vec![0i16; MAX_FRAME_SAMPLES];
        let mut packets = Vec::new();
        for _ in 0..10 {
            tone.fill(&mut pcm);
            let mut pkt = vec![0u8; MAX_PACKET];
            let n = enc.encode(&pcm, &mut pkt).unwrap();
            pkt.truncate(n);
            packets.push(pkt);
        }
        dec.decode(&packets[0], &mut out).unwrap();
        assert_eq!(dec.recover(Some(&packets[2]), &mut out).unwrap(), 320);
        assert_eq!(dec.recover(None, &mut out).unwrap(), 320);
    }

    #[test]
    fn bad_frames_and_garbage_are_errors_not_panics() {
        let mut enc = OpusEncoder::new(OpusSettings::default()).unwrap();
        let mut pkt = [0u8; MAX_PACKET];
        assert!(matches!(
            enc.encode(&[0; 100], &mut pkt),
            Err(OpusError::FrameSize(100))
        ));
        assert!(OpusEncoder::new(OpusSettings {
            frame_ms: 15,
            ..Default::default()
        })
        .is_err());
        assert!(matches!(
            OpusDecoder::new(44_100),
            Err(OpusError::Rate(44_100))
        ));
        let mut dec = OpusDecoder::new(48_000).unwrap();
        let mut out = vec![0i16; MAX_FRAME_SAMPLES];
        // Every TOC byte followed by junk: each either decodes or is a typed error.
        for toc in 0..=255u8 {
            let _ = dec.decode(&[toc, 0xff, 0xff, 0x01, 0x02], &mut out);
        }
        let _ = dec.decode(&[], &mut out);
    }
}
