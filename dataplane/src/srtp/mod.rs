//! Sans-IO SDES-SRTP: RFC 3711 SRTP and SRTCP with AES_CM_128_HMAC_SHA1_80 and
//! AES_CM_128_HMAC_SHA1_32, and RFC 7714 AEAD_AES_128_GCM, for the relay's per-packet path.
//!
//! A [`SrtpContext`] holds one master key's session keys (derived once, key derivation rate 0)
//! and the per-SSRC state: rollover counter, highest sequence number and replay window for
//! SRTP, and the SRTCP index (sent) and replay window (received). A leg uses two contexts:
//! one made from our `a=crypto` key to protect what we send, and one from the peer's key to
//! unprotect what we receive. Every operation works in place on the caller's buffer and
//! allocates nothing; garbage, truncated and oversized input is an [`SrtpError`], never a
//! panic.
//!
//! Wire behaviour follows libsrtp where the RFCs leave room, so that we interoperate with PBXs
//! built on it: SRTCP always carries the 80-bit tag (also with `_32`), the first SRTCP index
//! sent is 1, and protecting a packet whose index was already used (or is older than the
//! window) is refused, as libsrtp does unless `allow_repeat_tx` is set, because it would reuse
//! keystream.
//!
//! Not supported: MKI, key lifetimes, a non-zero key derivation rate, AES-256, AES-F8, NULL
//! cipher or authentication, and encrypted header extensions (RFC 6904).

mod cm;
mod gcm;
mod kdf;
mod replay;
#[cfg(test)]
mod tests;

use aes::cipher::KeyInit;
use aes::Aes128Enc;
use siptg_proto::SrtpSuite;

use cm::CmTransform;
use gcm::GcmTransform;
use replay::{RtpStream, StreamTable};

pub use replay::MAX_SSRCS;

/// The most octets protecting adds to any packet under any supported suite (SRTCP with
/// AEAD_AES_128_GCM: 16-octet tag + 4-octet index), so a receive buffer this much larger than
/// the biggest datagram can always be protected in place.
pub const MAX_OVERHEAD: usize = 20;

/// Length of the SRTP master key of every supported suite (AES-128).
pub const MASTER_KEY_LEN: usize = 16;

/// Why a packet could not be protected or unprotected, or a context could not be made.
///
/// Every variant is an expected outcome on the network path (count it, drop the packet); none
/// of them leaves the context in a worse state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    /// The master key has the wrong length for the suite (from signalling: reject the offer).
    #[error("SRTP master key is {got} octets; {suite:?} needs {expected}")]
    BadKeyLength {
        suite: SrtpSuite,
        expected: usize,
        got: usize,
    },
    /// The master salt has the wrong length for the suite (from signalling: reject the offer).
    #[error("SRTP master salt is {got} octets; {suite:?} needs {expected}")]
    BadSaltLength {
        suite: SrtpSuite,
        expected: usize,
        got: usize,
    },
    /// `len` is larger than the buffer passed with it (a caller bug, reported rather than
    /// panicking).
    #[error("packet length {len} exceeds the {cap}-octet buffer")]
    LengthOutOfBounds { len: usize, cap: usize },
    /// The packet is shorter than its headers (and, when unprotecting, its tag) need.
    #[error("packet of {len} octets is too short: needs at least {need}")]
    TooShort { len: usize, need: usize },
    /// The packet is too long for the cipher (AES-GCM limit; no datagram reaches it).
    #[error("packet of {len} octets is too long to protect")]
    TooLong { len: usize },
    /// The first octet does not say RTP/RTCP version 2.
    #[error("not an RTP/RTCP version 2 packet (version {version})")]
    BadVersion { version: u8 },
    /// The buffer has no room after the packet for the tag (and SRTCP index).
    #[error("no room to protect: needs a {need}-octet buffer, has {cap}")]
    NoRoom { need: usize, cap: usize },
    /// The tag does not match: wrong key, tampered packet, or a wrong ROC guess.
    #[error("SRTP/SRTCP authentication failed")]
    AuthenticationFailed,
    /// This packet index was already accepted (received) or used (sent) for this SSRC.
    #[error("replayed packet: SSRC {ssrc:#010x}, index {index}")]
    Replayed { ssrc: u32, index: u64 },
    /// The packet index is behind the 64-packet replay window, so it cannot be told from a
    /// replay.
    #[error("packet too old for the replay window: SSRC {ssrc:#010x}, index {index}")]
    TooOld { ssrc: u32, index: u64 },
    /// 2^48 SRTP or 2^31 SRTCP packets were protected with this key (RFC 3711 §9.2): re-key.
    #[error("SRTP key exhausted for SSRC {ssrc:#010x}: re-key")]
    KeyExhausted { ssrc: u32 },
}

/// The session keys, by suite family.
#[allow(
    clippy::large_enum_variant,
    reason = "both variants are expanded AES keys of similar size (about 1.7 and 1.5 KiB), made \
              once per context; boxing would only add a pointer chase per packet"
)]
#[derive(Clone)]
enum Transform {
    Cm(CmTransform),
    Gcm(GcmTransform),
}

/// One direction of SRTP/SRTCP under one master key: the session keys and the state of each
/// SSRC seen (at most [`MAX_SSRCS`], least recently used forgotten first).
///
/// Use one context to protect (our key) and another to unprotect (the peer's key): the
/// per-SSRC state is shared by both operations, so running both through one context on the
/// same SSRC would make each look like a replay of the other.
///
/// Forgetting an SSRC (a 17th one came along) loses its ROC and replay window. A receiver only
/// forgets SSRCs for authenticated packets, so forgeries cannot push real streams out. A stream
/// that comes back after being forgotten starts again from ROC 0 (or [`Self::set_roc`]); its
/// SRTCP indices stay unique. A sender that is fed more than [`MAX_SSRCS`] SSRCs by turns could
/// therefore reuse an SRTP index for a returning SSRC, so the relay should not pass through an
/// unbounded set of SSRCs into one protecting context (a leg normally carries one or two).
pub struct SrtpContext {
    suite: SrtpSuite,
    transform: Transform,
    streams: StreamTable,
}

impl std::fmt::Debug for SrtpContext {
    // Keys never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpContext")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// What the SRTP layer needs from an RTP header.
struct RtpHeader {
    header_len: usize,
    seq: u16,
    ssrc: u32,
}

/// Reads the fixed header, CSRCs and header extension (RFC 3550 §5.1, §5.3.1) of `packet`.
fn parse_rtp(packet: &[u8]) -> Result<RtpHeader, SrtpError> {
    let len = packet.len();
    let &[b0, _, s0, s1, _, _, _, _, i0, i1, i2, i3, ..] = packet else {
        return Err(SrtpError::TooShort { len, need: 12 });
    };
    check_version(b0)?;
    let mut header_len = 12 + 4 * usize::from(b0 & 0x0f);
    if b0 & 0x10 != 0 {
        let Some(ext) = packet.get(header_len..header_len + 4) else {
            return Err(SrtpError::TooShort {
                len,
                need: header_len + 4,
            });
        };
        header_len += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    if len < header_len {
        return Err(SrtpError::TooShort {
            len,
            need: header_len,
        });
    }
    Ok(RtpHeader {
        header_len,
        seq: u16::from_be_bytes([s0, s1]),
        ssrc: u32::from_be_bytes([i0, i1, i2, i3]),
    })
}

/// Reads the sender SSRC of the first packet of a compound RTCP packet (RFC 3550 §6.4).
fn parse_rtcp(packet: &[u8], need: usize) -> Result<u32, SrtpError> {
    let len = packet.len();
    match *packet {
        [b0, _, _, _, s0, s1, s2, s3, ..] if len >= need => {
            check_version(b0)?;
            Ok(u32::from_be_bytes([s0, s1, s2, s3]))
        }
        _ => Err(SrtpError::TooShort { len, need }),
    }
}

fn check_version(b0: u8) -> Result<(), SrtpError> {
    match b0 >> 6 {
        2 => Ok(()),
        version => Err(SrtpError::BadVersion { version }),
    }
}

/// `buf[..len]`, or an error if `len` overruns `buf`.
fn packet(buf: &[u8], len: usize) -> Result<&[u8], SrtpError> {
    buf.get(..len).ok_or(SrtpError::LengthOutOfBounds {
        len,
        cap: buf.len(),
    })
}

impl SrtpContext {
    /// Derives the session keys of `suite` from the master key and salt of an `a=crypto` line
    /// (RFC 4568). Keys are 16 octets; salts 14 (AES-CM) or 12 (AEAD_AES_128_GCM).
    pub fn new(suite: SrtpSuite, master_key: &[u8], master_salt: &[u8]) -> Result<Self, SrtpError> {
        let key: &[u8; MASTER_KEY_LEN] =
            master_key.try_into().map_err(|_| SrtpError::BadKeyLength {
                suite,
                expected: MASTER_KEY_LEN,
                got: master_key.len(),
            })?;
        let expected_salt = Self::master_salt_len(suite);
        if master_salt.len() != expected_salt {
            return Err(SrtpError::BadSaltLength {
                suite,
                expected: expected_salt,
                got: master_salt.len(),
            });
        }
        let master = Aes128Enc::new(key.into());
        let transform = match suite {
            SrtpSuite::AesCm128HmacSha1_80 => {
                Transform::Cm(CmTransform::new(&master, master_salt, 10))
            }
            SrtpSuite::AesCm128HmacSha1_32 => {
                Transform::Cm(CmTransform::new(&master, master_salt, 4))
            }
            SrtpSuite::AeadAes128Gcm => Transform::Gcm(GcmTransform::new(&master, master_salt)),
        };
        Ok(Self {
            suite,
            transform,
            streams: StreamTable::default(),
        })
    }

    /// Master salt length of `suite`, for validating keys from SDP before making a context.
    pub fn master_salt_len(suite: SrtpSuite) -> usize {
        match suite {
            SrtpSuite::AesCm128HmacSha1_80 | SrtpSuite::AesCm128HmacSha1_32 => cm::SALT_LEN,
            SrtpSuite::AeadAes128Gcm => gcm::SALT_LEN,
        }
    }

    /// The suite this context was made for.
    pub fn suite(&self) -> SrtpSuite {
        self.suite
    }

    /// Length of the SRTP authentication tag (10, 4 or 16 octets), which is all that
    /// protecting adds to an RTP packet.
    pub fn tag_len(&self) -> usize {
        match &self.transform {
            Transform::Cm(t) => t.rtp_tag_len(),
            Transform::Gcm(_) => gcm::TAG_LEN,
        }
    }

    /// Octets protecting adds to an RTP packet (the tag), so callers can size buffers and
    /// account bandwidth.
    pub fn rtp_overhead(&self) -> usize {
        self.tag_len()
    }

    /// Octets protecting adds to an RTCP packet: the 4-octet `E || SRTCP index` plus the tag
    /// (10 octets for both AES-CM suites, 16 for GCM).
    pub fn rtcp_overhead(&self) -> usize {
        4 + match &self.transform {
            Transform::Cm(_) => cm::RTCP_TAG_LEN,
            Transform::Gcm(_) => gcm::TAG_LEN,
        }
    }

    /// Sets the rollover counter the next packet of `ssrc` is assumed to carry, and forgets that
    /// SSRC's replay window: for a receiver that joins a stream after its sequence number has
    /// wrapped (the ROC learned out of band), or a sender continuing a stream under new keys.
    pub fn set_roc(&mut self, ssrc: u32, roc: u32) {
        self.streams.get_or_insert(ssrc).rtp = RtpStream::with_roc(roc);
    }

    /// The rollover counter of the newest packet of `ssrc` (or the one [`Self::set_roc`] gave
    /// it), if the SSRC is tracked: what a late joiner would need to be told.
    pub fn roc(&self, ssrc: u32) -> Option<u32> {
        self.streams.peek(ssrc).map(|s| s.rtp.roc())
    }

    /// Protects the RTP packet `buf[..len]` in place: encrypts its payload and appends the tag.
    /// `buf` must have [`Self::rtp_overhead`] octets of room after `len`. Returns the SRTP
    /// length.
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let rtp = parse_rtp(packet(buf, len)?)?;
        let need = len + self.rtp_overhead();
        if buf.len() < need {
            return Err(SrtpError::NoRoom {
                need,
                cap: buf.len(),
            });
        }
        let stream = self.streams.get_or_insert(rtp.ssrc);
        let estimate = stream.rtp.estimate(rtp.ssrc, rtp.seq)?;
        let out = match &self.transform {
            Transform::Cm(t) => t.protect_rtp(
                buf,
                rtp.header_len,
                len,
                rtp.ssrc,
                estimate.roc,
                estimate.slot.index,
            ),
            Transform::Gcm(t) => {
                t.protect_rtp(buf, rtp.header_len, len, rtp.ssrc, estimate.roc, rtp.seq)?
            }
        };
        stream.rtp.commit(estimate);
        Ok(out)
    }

    /// Unprotects the SRTP packet `buf[..len]` in place: checks the replay window and the tag,
    /// then decrypts. Returns the RTP length. A packet that fails changes neither the buffer
    /// nor the context.
    pub fn unprotect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let rtp = parse_rtp(packet(buf, len)?)?;
        let need = rtp.header_len + self.tag_len();
        if len < need {
            return Err(SrtpError::TooShort { len, need });
        }
        // Work on a copy: an SSRC or index only enters the table once the packet is genuine, so
        // forged packets can neither evict real streams nor move their windows.
        let mut stream = match self.streams.peek(rtp.ssrc) {
            Some(s) => *s,
            None => self.streams.fresh(rtp.ssrc),
        };
        let estimate = stream.rtp.estimate(rtp.ssrc, rtp.seq)?;
        let out = match &self.transform {
            Transform::Cm(t) => t.unprotect_rtp(
                buf,
                rtp.header_len,
                len,
                rtp.ssrc,
                estimate.roc,
                estimate.slot.index,
            ),
            Transform::Gcm(t) => {
                t.unprotect_rtp(buf, rtp.header_len, len, rtp.ssrc, estimate.roc, rtp.seq)
            }
        }?;
        stream.rtp.commit(estimate);
        self.streams.store(stream);
        Ok(out)
    }

    /// Protects the (compound) RTCP packet `buf[..len]` in place: encrypts everything after
    /// the first 8 octets, appends `E || SRTCP index` and the tag. `buf` must have
    /// [`Self::rtcp_overhead`] octets of room after `len`. Returns the SRTCP length.
    pub fn protect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let ssrc = parse_rtcp(packet(buf, len)?, 8)?;
        let need = len + self.rtcp_overhead();
        if buf.len() < need {
            return Err(SrtpError::NoRoom {
                need,
                cap: buf.len(),
            });
        }
        let index = self.streams.get_or_insert(ssrc).rtcp.next_index(ssrc)?;
        match &self.transform {
            Transform::Cm(t) => Ok(t.protect_rtcp(buf, len, ssrc, index)),
            Transform::Gcm(t) => t.protect_rtcp(buf, len, ssrc, index),
        }
    }

    /// Unprotects the SRTCP packet `buf[..len]` in place: checks the SRTCP index against the
    /// replay window and the tag, then decrypts if the `E` flag is set (an authenticated but
    /// unencrypted packet is accepted). Returns the RTCP length. A packet that fails changes
    /// neither the buffer nor the context.
    pub fn unprotect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let overhead = self.rtcp_overhead();
        let ssrc = parse_rtcp(packet(buf, len)?, 8 + overhead)?;
        let word_at = match &self.transform {
            Transform::Cm(_) => len - cm::RTCP_TAG_LEN - 4,
            Transform::Gcm(_) => len - 4,
        };
        let word = u32::from_be_bytes([
            buf[word_at],
            buf[word_at + 1],
            buf[word_at + 2],
            buf[word_at + 3],
        ]);
        let encrypted = word & 0x8000_0000 != 0;
        let index = word & 0x7fff_ffff;
        let mut stream = match self.streams.peek(ssrc) {
            Some(s) => *s,
            None => self.streams.fresh(ssrc),
        };
        let slot = stream.rtcp.check(ssrc, index)?;
        let out = match &self.transform {
            Transform::Cm(t) => t.unprotect_rtcp(buf, len, ssrc, index, encrypted),
            Transform::Gcm(t) => t.unprotect_rtcp(buf, len, ssrc, index, encrypted),
        }?;
        stream.rtcp.commit(slot);
        self.streams.store(stream);
        Ok(out)
    }
}
