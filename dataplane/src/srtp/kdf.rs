//! RFC 3711 §4.3 key derivation: the AES-CM PRF run once per context with a key derivation rate
//! of 0, so `index DIV kdr` is always zero and the session keys never change.
//!
//! RFC 7714 §11 uses the same PRF for AEAD_AES_128_GCM with a 12-octet master salt; like libsrtp
//! and webrtc-srtp, the salt is left-aligned in the 14-octet field and padded with zeros.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::BlockEncrypt;
use aes::Aes128Enc;

/// Label of the SRTP encryption key.
pub(crate) const LABEL_RTP_ENCRYPTION: u8 = 0x00;
/// Label of the SRTP authentication key.
pub(crate) const LABEL_RTP_AUTH: u8 = 0x01;
/// Label of the SRTP salting key.
pub(crate) const LABEL_RTP_SALT: u8 = 0x02;
/// Label of the SRTCP encryption key.
pub(crate) const LABEL_RTCP_ENCRYPTION: u8 = 0x03;
/// Label of the SRTCP authentication key.
pub(crate) const LABEL_RTCP_AUTH: u8 = 0x04;
/// Label of the SRTCP salting key.
pub(crate) const LABEL_RTCP_SALT: u8 = 0x05;

/// Fills `out` with the session key of `label`: the AES-CM keystream under the master key whose
/// first counter block is `(master_salt XOR (label << 48)) * 2^16`.
///
/// `master_salt` is at most 14 octets (the constructor checks the suite's length).
pub(crate) fn derive(master: &Aes128Enc, master_salt: &[u8], label: u8, out: &mut [u8]) {
    let mut x = [0u8; 16];
    let n = master_salt.len().min(14);
    x[..n].copy_from_slice(&master_salt[..n]);
    x[7] ^= label;
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = x;
        block[14..16].copy_from_slice(&(i as u16).to_be_bytes());
        master.encrypt_block(GenericArray::from_mut_slice(&mut block));
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}
