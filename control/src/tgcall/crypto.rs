//! Encryption of Telegram call signalling (tgcalls `EncryptedConnection`, type Signaling): an
//! MTProto-2.0-style key derivation from the 256-byte call key with `x = 128` (caller sends) or
//! `136` (callee sends), AES-256-CTR, a 32-bit packet counter and a 64-entry anti-replay window.
//!
//! `seal`/`open` work on whole plaintexts whose first 4 bytes are the packet counter (8.0.0
//! framing puts its first message's sequence number there); `encrypt_raw`/`decrypt_raw` add and
//! strip the counter for 7.0.0 and 13.0.0, whose payload is one JSON (or gzip) blob.

use aes::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Smallest packet: 16-byte msg_key, 4-byte counter, at least 1 byte of payload.
const MIN_PACKET: usize = 21;
/// Largest packet accepted (tgcalls' limit).
pub const MAX_PACKET: usize = 128 * 1024;
/// Counters at or above this end the call (the protocol forbids reusing the key that long).
const MAX_COUNTER: u32 = 1 << 30;
/// Low bits of the 32-bit counter; 8.0.0 uses the top two as flags.
const COUNTER_MASK: u32 = (1 << 30) - 1;

/// Why a signalling packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalingCryptoError {
    #[error("signalling packet of {0} bytes is outside 21..=131072")]
    BadLength(usize),
    #[error("signalling packet failed authentication (msg_key mismatch)")]
    BadMsgKey,
    #[error("signalling packet {0} replayed or too old")]
    Replayed(u32),
    #[error("signalling counter exhausted; the call must end")]
    CounterExhausted,
}

/// One direction pair of a call's signalling encryption.
pub struct SignalingCrypto {
    key: [u8; 256],
    x_send: usize,
    x_recv: usize,
    sent: u32,
    /// Highest counter received and a bitmap of the 64 below it (bit i = highest - i seen).
    highest: u32,
    seen: u64,
}

impl std::fmt::Debug for SignalingCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalingCrypto")
            .field("sent", &self.sent)
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

/// msg_key and AES key/IV for `plain` (or for a received msg_key) under offset `x`.
fn kdf(key: &[u8; 256], x: usize, msg_key: &[u8]) -> ([u8; 32], [u8; 16]) {
    let a = Sha256::new()
        .chain_update(msg_key)
        .chain_update(&key[x..x + 36])
        .finalize();
    let b = Sha256::new()
        .chain_update(&key[40 + x..40 + x + 36])
        .chain_update(msg_key)
        .finalize();
    let mut aes_key = [0u8; 32];
    aes_key[..8].copy_from_slice(&a[..8]);
    aes_key[8..24].copy_from_slice(&b[8..24]);
    aes_key[24..].copy_from_slice(&a[24..32]);
    let mut iv = [0u8; 16];
    iv[..4].copy_from_slice(&b[..4]);
    iv[4..12].copy_from_slice(&a[8..16]);
    iv[12..].copy_from_slice(&b[24..28]);
    (aes_key, iv)
}

fn msg_key(key: &[u8; 256], x: usize, plain: &[u8]) -> [u8; 16] {
    let large = Sha256::new()
        .chain_update(&key[88 + x..88 + x + 32])
        .chain_update(plain)
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&large[8..24]);
    out
}

impl SignalingCrypto {
    /// Encryption for our side of a call with the 256-byte DH key.
    pub fn new(key: [u8; 256], is_caller: bool) -> Self {
        let (x_send, x_recv) = if is_caller { (128, 136) } else { (136, 128) };
        Self {
            key,
            x_send,
            x_recv,
            sent: 0,
            highest: 0,
            seen: 0,
        }
    }

    /// The next outgoing counter (1, 2, …); 8.0.0 framing puts it in its first message.
    pub fn next_counter(&mut self) -> Result<u32, SignalingCryptoError> {
        if self.sent + 1 >= MAX_COUNTER {
            return Err(SignalingCryptoError::CounterExhausted);
        }
        self.sent += 1;
        Ok(self.sent)
    }

    /// Encrypts a plaintext that already starts with its 4-byte counter.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mk = msg_key(&self.key, self.x_send, plain);
        let (k, iv) = kdf(&self.key, self.x_send, &mk);
        let mut out = Vec::with_capacity(16 + plain.len());
        out.extend_from_slice(&mk);
        out.extend_from_slice(plain);
        Aes256Ctr::new(&k.into(), &iv.into()).apply_keystream(&mut out[16..]);
        out
    }

    /// Decrypts and authenticates a packet, applies the anti-replay window to its counter, and
    /// returns the plaintext (counter included).
    pub fn open(&mut self, packet: &[u8]) -> Result<Vec<u8>, SignalingCryptoError> {
        if packet.len() < MIN_PACKET || packet.len() > MAX_PACKET {
            return Err(SignalingCryptoError::BadLength(packet.len()));
        }
        let (mk, body) = packet.split_at(16);
        let (k, iv) = kdf(&self.key, self.x_recv, mk);
        let mut plain = body.to_vec();
        Aes256Ctr::new(&k.into(), &iv.into()).apply_keystream(&mut plain);
        let expect = msg_key(&self.key, self.x_recv, &plain);
        if !bool::from(expect.ct_eq(mk)) {
            return Err(SignalingCryptoError::BadMsgKey);
        }
        let counter = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) & COUNTER_MASK;
        self.accept_counter(counter)?;
        Ok(plain)
    }

    /// Records a counter seen inside a packet (8.0.0: an additional message that needs no ack)
    /// in the same anti-replay window as packet counters, as tgcalls does.
    pub(crate) fn register_counter(&mut self, c: u32) -> Result<(), SignalingCryptoError> {
        self.accept_counter(c & COUNTER_MASK)
    }

    fn accept_counter(&mut self, c: u32) -> Result<(), SignalingCryptoError> {
        if c >= MAX_COUNTER - 1 {
            return Err(SignalingCryptoError::CounterExhausted);
        }
        if c > self.highest {
            let shift = c - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = c;
            return Ok(());
        }
        let back = self.highest - c;
        if back >= 64 || self.seen & (1 << back) != 0 {
            return Err(SignalingCryptoError::Replayed(c));
        }
        self.seen |= 1 << back;
        Ok(())
    }

    /// 7.0.0/13.0.0: prepends the next counter to `payload` and encrypts.
    pub fn encrypt_raw(&mut self, payload: &[u8]) -> Result<Vec<u8>, SignalingCryptoError> {
        let counter = self.next_counter()?;
        let mut plain = Vec::with_capacity(4 + payload.len());
        plain.extend_from_slice(&counter.to_be_bytes());
        plain.extend_from_slice(payload);
        Ok(self.seal(&plain))
    }

    /// 7.0.0/13.0.0: decrypts and returns the payload after the counter.
    pub fn decrypt_raw(&mut self, packet: &[u8]) -> Result<Vec<u8>, SignalingCryptoError> {
        let mut plain = self.open(packet)?;
        plain.drain(..4);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; 256] {
        let mut k = [0u8; 256];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        k
    }

    #[test]
    fn caller_and_callee_read_each_other() {
        let mut caller = SignalingCrypto::new(key(), true);
        let mut callee = SignalingCrypto::new(key(), false);
        let p = caller.encrypt_raw(br#"{"@type":"InitialSetup"}"#).unwrap();
        assert_eq!(
            callee.decrypt_raw(&p).unwrap(),
            br#"{"@type":"InitialSetup"}"#
        );
        let q = callee.encrypt_raw(b"answer").unwrap();
        assert_eq!(caller.decrypt_raw(&q).unwrap(), b"answer");
        // A side cannot read its own packets (different x), which catches role mix-ups.
        let mut caller2 = SignalingCrypto::new(key(), true);
        assert_eq!(
            caller2.decrypt_raw(&p),
            Err(SignalingCryptoError::BadMsgKey)
        );
    }

    #[test]
    fn kdf_follows_the_documented_byte_layout() {
        // msg_key = SHA256(key[88+x..+32] || plain)[8..24]; recomputed independently here.
        let k = key();
        let plain = [0, 0, 0, 1, b'h', b'i'];
        let large = Sha256::digest([&k[216..248], &plain[..]].concat());
        assert_eq!(msg_key(&k, 128, &plain)[..], large[8..24]);
        let (aes_key, iv) = kdf(&k, 128, &large[8..24]);
        let a = Sha256::digest([&large[8..24], &k[128..164]].concat());
        let b = Sha256::digest([&k[168..204], &large[8..24]].concat());
        assert_eq!(&aes_key[..8], &a[..8]);
        assert_eq!(&aes_key[8..24], &b[8..24]);
        assert_eq!(&aes_key[24..], &a[24..]);
        assert_eq!(&iv[..4], &b[..4]);
        assert_eq!(&iv[4..12], &a[8..16]);
        assert_eq!(&iv[12..], &b[24..28]);
    }

    #[test]
    fn replays_old_and_tampered_packets_are_refused() {
        let mut tx = SignalingCrypto::new(key(), true);
        let mut rx = SignalingCrypto::new(key(), false);
        let packets: Vec<Vec<u8>> = (0..70)
            .map(|i| tx.encrypt_raw(&[i as u8; 8]).unwrap())
            .collect();
        rx.decrypt_raw(&packets[69]).unwrap();
        // Reordered but inside the window: fine once.
        rx.decrypt_raw(&packets[60]).unwrap();
        assert_eq!(
            rx.decrypt_raw(&packets[60]),
            Err(SignalingCryptoError::Replayed(61))
        );
        // More than 64 behind the newest: too old.
        assert_eq!(
            rx.decrypt_raw(&packets[2]),
            Err(SignalingCryptoError::Replayed(3))
        );
        let mut bad = packets[68].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(rx.decrypt_raw(&bad), Err(SignalingCryptoError::BadMsgKey));
        for len in [0, 5, 20] {
            assert_eq!(
                rx.open(&vec![0; len]),
                Err(SignalingCryptoError::BadLength(len))
            );
        }
        assert!(rx.open(&vec![0; MAX_PACKET + 1]).is_err());
    }
}
