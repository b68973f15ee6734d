//! AES_CM_128_HMAC_SHA1_80 / _32 (RFC 3711 §4.1.1, §4.2.1; RFC 4568 §6.2): AES-128 in counter
//! mode for confidentiality and a truncated HMAC-SHA1 for authentication.
//!
//! Every key is expanded once, when the context is made; a packet costs one keystream pass and
//! one HMAC over an already keyed state (cloned on the stack), with no allocation.

use aes::cipher::{InnerIvInit, KeyInit, StreamCipher};
use aes::Aes128Enc;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use super::kdf;
use super::SrtpError;

/// Length of the session salt for AES-CM (RFC 3711 §8.2: 112 bits).
pub(crate) const SALT_LEN: usize = 14;
/// Length of the session authentication key (RFC 3711 §8.2: 160 bits for HMAC-SHA1).
const AUTH_KEY_LEN: usize = 20;
/// SRTCP always carries the 80-bit tag, also for AES_CM_128_HMAC_SHA1_32 (RFC 4568 §6.2.2,
/// libsrtp's `srtp_crypto_policy_set_rtp_default` for RTCP, webrtc-srtp's
/// `rtcp_auth_tag_len`).
pub(crate) const RTCP_TAG_LEN: usize = 10;

type Ctr<'a> = ctr::Ctr128BE<&'a Aes128Enc>;

/// The three session keys of one direction of one protocol (SRTP or SRTCP).
#[derive(Clone)]
struct CmKeys {
    aes: Aes128Enc,
    salt: [u8; SALT_LEN],
    mac: Hmac<Sha1>,
}

impl CmKeys {
    fn derive(master: &Aes128Enc, master_salt: &[u8], labels: [u8; 3]) -> Self {
        let [enc_label, auth_label, salt_label] = labels;
        let mut key = [0u8; 16];
        kdf::derive(master, master_salt, enc_label, &mut key);
        let mut auth = [0u8; AUTH_KEY_LEN];
        kdf::derive(master, master_salt, auth_label, &mut auth);
        let mut salt = [0u8; SALT_LEN];
        kdf::derive(master, master_salt, salt_label, &mut salt);
        Self::from_session(&key, &salt, &auth)
    }

    fn from_session(key: &[u8; 16], salt: &[u8; SALT_LEN], auth: &[u8; AUTH_KEY_LEN]) -> Self {
        // HMAC pads a key shorter than the hash's block with zeros (RFC 2104 §2), so the
        // infallible block-sized constructor gives exactly HMAC-SHA1 keyed with `auth`.
        let mut block = [0u8; 64];
        block[..AUTH_KEY_LEN].copy_from_slice(auth);
        Self {
            aes: Aes128Enc::new(key.into()),
            salt: *salt,
            mac: <Hmac<Sha1> as KeyInit>::new(&block.into()),
        }
    }

    /// RFC 3711 §4.1.1: `IV = (k_s * 2^16) XOR (SSRC * 2^64) XOR (i * 2^16)`.
    fn iv(&self, ssrc: u32, index: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv[..SALT_LEN].copy_from_slice(&self.salt);
        for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
            *b ^= s;
        }
        // The low 48 bits of the index land in octets 8..14.
        for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..8]) {
            *b ^= s;
        }
        iv
    }

    fn apply_keystream(&self, ssrc: u32, index: u64, data: &mut [u8]) {
        let iv = self.iv(ssrc, index);
        let mut ctr = Ctr::from_core(ctr::CtrCore::inner_iv_init(&self.aes, &iv.into()));
        ctr.apply_keystream(data);
    }

    /// Full 20-octet HMAC-SHA1 of `first || second`.
    fn mac(&self, first: &[u8], second: &[u8]) -> [u8; 20] {
        let mut mac = self.mac.clone();
        mac.update(first);
        mac.update(second);
        mac.finalize().into_bytes().into()
    }
}

/// Session keys of both SRTP and SRTCP for an AES-CM suite.
#[derive(Clone)]
pub(crate) struct CmTransform {
    rtp: CmKeys,
    rtcp: CmKeys,
    rtp_tag_len: usize,
}

impl CmTransform {
    /// Derives every session key from the master key and salt (RFC 3711 §4.3).
    pub(crate) fn new(master: &Aes128Enc, master_salt: &[u8], rtp_tag_len: usize) -> Self {
        Self {
            rtp: CmKeys::derive(
                master,
                master_salt,
                [
                    kdf::LABEL_RTP_ENCRYPTION,
                    kdf::LABEL_RTP_AUTH,
                    kdf::LABEL_RTP_SALT,
                ],
            ),
            rtcp: CmKeys::derive(
                master,
                master_salt,
                [
                    kdf::LABEL_RTCP_ENCRYPTION,
                    kdf::LABEL_RTCP_AUTH,
                    kdf::LABEL_RTCP_SALT,
                ],
            ),
            rtp_tag_len,
        }
    }

    /// Tag length of SRTP packets (10 or 4).
    pub(crate) fn rtp_tag_len(&self) -> usize {
        self.rtp_tag_len
    }

    /// Encrypts the payload of `buf[..len]` and appends the tag; the caller has checked that
    /// `buf` has room for it. Returns the new length.
    pub(crate) fn protect_rtp(
        &self,
        buf: &mut [u8],
        header_len: usize,
        len: usize,
        ssrc: u32,
        roc: u32,
        index: u64,
    ) -> usize {
        let (packet, rest) = buf.split_at_mut(len);
        self.rtp
            .apply_keystream(ssrc, index, &mut packet[header_len..]);
        let tag = self.rtp.mac(packet, &roc.to_be_bytes());
        rest[..self.rtp_tag_len].copy_from_slice(&tag[..self.rtp_tag_len]);
        len + self.rtp_tag_len
    }

    /// Checks the tag of `buf[..len]`, then decrypts its payload in place. The caller has
    /// checked that `len >= header_len + tag`. On failure the buffer is untouched.
    pub(crate) fn unprotect_rtp(
        &self,
        buf: &mut [u8],
        header_len: usize,
        len: usize,
        ssrc: u32,
        roc: u32,
        index: u64,
    ) -> Result<usize, SrtpError> {
        let body = len - self.rtp_tag_len;
        let (packet, rest) = buf.split_at_mut(body);
        let expected = self.rtp.mac(packet, &roc.to_be_bytes());
        let got = &rest[..self.rtp_tag_len];
        if !bool::from(expected[..self.rtp_tag_len].ct_eq(got)) {
            return Err(SrtpError::AuthenticationFailed);
        }
        self.rtp
            .apply_keystream(ssrc, index, &mut packet[header_len..]);
        Ok(body)
    }

    /// Encrypts everything after the first 8 octets of `buf[..len]` (RFC 3711 §3.4), appends
    /// `E || SRTCP index` and the 80-bit tag. The caller has checked the room.
    pub(crate) fn protect_rtcp(&self, buf: &mut [u8], len: usize, ssrc: u32, index: u32) -> usize {
        self.rtcp
            .apply_keystream(ssrc, u64::from(index), &mut buf[8..len]);
        let word = (index | 0x8000_0000).to_be_bytes();
        buf[len..len + 4].copy_from_slice(&word);
        let (authed, rest) = buf.split_at_mut(len + 4);
        let tag = self.rtcp.mac(authed, &[]);
        rest[..RTCP_TAG_LEN].copy_from_slice(&tag[..RTCP_TAG_LEN]);
        len + 4 + RTCP_TAG_LEN
    }

    /// Checks the tag of an SRTCP packet `buf[..len]` whose `E || index` word ends at
    /// `len - RTCP_TAG_LEN`, then decrypts it if `E` is set. The caller has checked
    /// `len >= 8 + 4 + RTCP_TAG_LEN`. Returns the RTCP length.
    pub(crate) fn unprotect_rtcp(
        &self,
        buf: &mut [u8],
        len: usize,
        ssrc: u32,
        index: u32,
        encrypted: bool,
    ) -> Result<usize, SrtpError> {
        let authed_len = len - RTCP_TAG_LEN;
        let (authed, rest) = buf.split_at_mut(authed_len);
        let expected = self.rtcp.mac(authed, &[]);
        if !bool::from(expected[..RTCP_TAG_LEN].ct_eq(&rest[..RTCP_TAG_LEN])) {
            return Err(SrtpError::AuthenticationFailed);
        }
        let rtcp_len = authed_len - 4;
        if encrypted {
            self.rtcp
                .apply_keystream(ssrc, u64::from(index), &mut authed[8..rtcp_len]);
        }
        Ok(rtcp_len)
    }

    /// The SRTP keystream starting at `index` (RFC 3711 Appendix B.2 checks it).
    #[cfg(test)]
    pub(crate) fn rtp_keystream_for_test(
        key: &[u8; 16],
        salt: &[u8; SALT_LEN],
        ssrc: u32,
        index: u64,
        out: &mut [u8],
    ) {
        out.fill(0);
        CmKeys::from_session(key, salt, &[0; AUTH_KEY_LEN]).apply_keystream(ssrc, index, out);
    }

    /// The SRTP session keys in the order RFC 3711 B.3 lists them: cipher key, salt, and the
    /// first `auth.len()` octets of the authentication key.
    #[cfg(test)]
    pub(crate) fn session_keys_for_test(
        master_key: &[u8; 16],
        master_salt: &[u8],
        auth: &mut [u8],
    ) -> ([u8; 16], [u8; SALT_LEN]) {
        let master = Aes128Enc::new(master_key.into());
        let mut key = [0u8; 16];
        kdf::derive(&master, master_salt, kdf::LABEL_RTP_ENCRYPTION, &mut key);
        let mut salt = [0u8; SALT_LEN];
        kdf::derive(&master, master_salt, kdf::LABEL_RTP_SALT, &mut salt);
        kdf::derive(&master, master_salt, kdf::LABEL_RTP_AUTH, auth);
        (key, salt)
    }
}
