//! AEAD_AES_128_GCM for SRTP and SRTCP (RFC 7714): one pass gives confidentiality and a 16-octet
//! tag; the RTP header (or the first 8 RTCP octets and the `E || index` word) is associated data.

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, KeyInit};

use super::kdf;
use super::SrtpError;
use aes::Aes128Enc;

/// Length of the session salt (RFC 7714 §12: 96 bits).
pub(crate) const SALT_LEN: usize = 12;
/// Length of the authentication tag (RFC 7714 §12: AEAD_AES_128_GCM uses 16 octets).
pub(crate) const TAG_LEN: usize = 16;

/// The cipher and salt of one protocol (SRTP or SRTCP).
#[derive(Clone)]
struct GcmKeys {
    aead: Aes128Gcm,
    salt: [u8; SALT_LEN],
}

impl GcmKeys {
    fn derive(master: &Aes128Enc, master_salt: &[u8], enc_label: u8, salt_label: u8) -> Self {
        let mut key = [0u8; 16];
        kdf::derive(master, master_salt, enc_label, &mut key);
        let mut salt = [0u8; SALT_LEN];
        kdf::derive(master, master_salt, salt_label, &mut salt);
        Self::from_session(&key, &salt)
    }

    fn from_session(key: &[u8; 16], salt: &[u8; SALT_LEN]) -> Self {
        Self {
            aead: Aes128Gcm::new(key.into()),
            salt: *salt,
        }
    }

    /// RFC 7714 §8.1: `IV = (00 00 || SSRC || ROC || SEQ) XOR salt`.
    fn rtp_iv(&self, ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
        iv[6..10].copy_from_slice(&roc.to_be_bytes());
        iv[10..12].copy_from_slice(&seq.to_be_bytes());
        self.xor_salt(iv)
    }

    /// RFC 7714 §9.1: `IV = (00 00 || SSRC || 00 00 || 0 || SRTCP index) XOR salt`.
    fn rtcp_iv(&self, ssrc: u32, index: u32) -> [u8; 12] {
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
        iv[8..12].copy_from_slice(&(index & 0x7fff_ffff).to_be_bytes());
        self.xor_salt(iv)
    }

    fn xor_salt(&self, mut iv: [u8; 12]) -> [u8; 12] {
        for (b, s) in iv.iter_mut().zip(self.salt) {
            *b ^= s;
        }
        iv
    }
}

/// Session keys of both SRTP and SRTCP for AEAD_AES_128_GCM.
#[derive(Clone)]
pub(crate) struct GcmTransform {
    rtp: GcmKeys,
    rtcp: GcmKeys,
}

impl GcmTransform {
    /// Derives the session keys and salts (RFC 7714 §11: labels 0/2 and 3/5; no auth key).
    pub(crate) fn new(master: &Aes128Enc, master_salt: &[u8]) -> Self {
        Self {
            rtp: GcmKeys::derive(
                master,
                master_salt,
                kdf::LABEL_RTP_ENCRYPTION,
                kdf::LABEL_RTP_SALT,
            ),
            rtcp: GcmKeys::derive(
                master,
                master_salt,
                kdf::LABEL_RTCP_ENCRYPTION,
                kdf::LABEL_RTCP_SALT,
            ),
        }
    }

    /// Uses one session key and salt for both SRTP and SRTCP, as RFC 7714's §16–17 vectors do.
    #[cfg(test)]
    pub(crate) fn from_session_for_test(key: &[u8; 16], salt: &[u8; SALT_LEN]) -> Self {
        Self {
            rtp: GcmKeys::from_session(key, salt),
            rtcp: GcmKeys::from_session(key, salt),
        }
    }

    /// Encrypts the payload of `buf[..len]` and appends the tag; the caller has checked the
    /// room. Returns the new length.
    pub(crate) fn protect_rtp(
        &self,
        buf: &mut [u8],
        header_len: usize,
        len: usize,
        ssrc: u32,
        roc: u32,
        seq: u16,
    ) -> Result<usize, SrtpError> {
        let iv = self.rtp.rtp_iv(ssrc, roc, seq);
        let (packet, rest) = buf.split_at_mut(len);
        let (header, payload) = packet.split_at_mut(header_len);
        let tag = self
            .rtp
            .aead
            .encrypt_in_place_detached(GenericArray::from_slice(&iv), header, payload)
            .map_err(|_| SrtpError::TooLong { len })?;
        rest[..TAG_LEN].copy_from_slice(&tag);
        Ok(len + TAG_LEN)
    }

    /// Checks and decrypts `buf[..len]` in place; the caller has checked
    /// `len >= header_len + TAG_LEN`. On failure the buffer is untouched.
    pub(crate) fn unprotect_rtp(
        &self,
        buf: &mut [u8],
        header_len: usize,
        len: usize,
        ssrc: u32,
        roc: u32,
        seq: u16,
    ) -> Result<usize, SrtpError> {
        let iv = self.rtp.rtp_iv(ssrc, roc, seq);
        let body = len - TAG_LEN;
        let (packet, rest) = buf.split_at_mut(body);
        let tag = GenericArray::clone_from_slice(&rest[..TAG_LEN]);
        let (header, payload) = packet.split_at_mut(header_len);
        self.rtp
            .aead
            .decrypt_in_place_detached(GenericArray::from_slice(&iv), header, payload, &tag)
            .map_err(|_| SrtpError::AuthenticationFailed)?;
        Ok(body)
    }

    /// Encrypts everything after the first 8 octets of `buf[..len]`, then appends the tag and
    /// `E || SRTCP index` (RFC 7714 §9). The caller has checked the room.
    pub(crate) fn protect_rtcp(
        &self,
        buf: &mut [u8],
        len: usize,
        ssrc: u32,
        index: u32,
    ) -> Result<usize, SrtpError> {
        let iv = self.rtcp.rtcp_iv(ssrc, index);
        let word = (index | 0x8000_0000).to_be_bytes();
        let (packet, rest) = buf.split_at_mut(len);
        let mut aad = [0u8; 12];
        aad[..8].copy_from_slice(&packet[..8]);
        aad[8..].copy_from_slice(&word);
        let tag = self
            .rtcp
            .aead
            .encrypt_in_place_detached(GenericArray::from_slice(&iv), &aad, &mut packet[8..])
            .map_err(|_| SrtpError::TooLong { len })?;
        rest[..TAG_LEN].copy_from_slice(&tag);
        rest[TAG_LEN..TAG_LEN + 4].copy_from_slice(&word);
        Ok(len + TAG_LEN + 4)
    }

    /// Checks (and, if `E` is set, decrypts) an SRTCP packet `buf[..len]` that ends with
    /// `tag || E || index`. The caller has checked `len >= 8 + TAG_LEN + 4`. Returns the RTCP
    /// length. On failure the buffer is as it was.
    pub(crate) fn unprotect_rtcp(
        &self,
        buf: &mut [u8],
        len: usize,
        ssrc: u32,
        index: u32,
        encrypted: bool,
    ) -> Result<usize, SrtpError> {
        let iv = self.rtcp.rtcp_iv(ssrc, index);
        let rtcp_len = len - TAG_LEN - 4;
        let mut word = [0u8; 4];
        word.copy_from_slice(&buf[len - 4..len]);
        let tag = GenericArray::clone_from_slice(&buf[rtcp_len..rtcp_len + TAG_LEN]);
        if encrypted {
            let mut aad = [0u8; 12];
            aad[..8].copy_from_slice(&buf[..8]);
            aad[8..].copy_from_slice(&word);
            self.rtcp
                .aead
                .decrypt_in_place_detached(
                    GenericArray::from_slice(&iv),
                    &aad,
                    &mut buf[8..rtcp_len],
                    &tag,
                )
                .map_err(|_| SrtpError::AuthenticationFailed)?;
        } else {
            // RFC 7714 §9.3: with E clear the whole packet and the word are associated data and
            // the plaintext is empty. Put the word right after the packet (over the tag, which
            // is saved above) so that the associated data is one contiguous slice.
            buf[rtcp_len..rtcp_len + 4].copy_from_slice(&word);
            let checked = self.rtcp.aead.decrypt_in_place_detached(
                GenericArray::from_slice(&iv),
                &buf[..rtcp_len + 4],
                &mut [],
                &tag,
            );
            if checked.is_err() {
                buf[rtcp_len..rtcp_len + TAG_LEN].copy_from_slice(&tag);
                return Err(SrtpError::AuthenticationFailed);
            }
        }
        Ok(rtcp_len)
    }
}
