//! The cloud's side of Telegram's 2FA check (SRP-2048 as in
//! https://core.telegram.org/api/srp): the client proves it knows the password without sending
//! it. The client side is grammers-crypto's `calculate_2fa`; this is the verifier.

use hmac::Hmac;
use num_bigint::BigUint;
use sha2::{Digest, Sha256, Sha512};

/// Password hashing as Telegram defines it (`PH2`).
pub fn ph2(password: &[u8], salt1: &[u8], salt2: &[u8]) -> [u8; 32] {
    let sh = |data: &[u8], salt: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(data);
        h.update(salt);
        h.finalize().into()
    };
    let ph1 = sh(&sh(password, salt1), salt2);
    let mut dk = [0u8; 64];
    // PBKDF2 only fails for an output length of zero.
    let _ = pbkdf2::pbkdf2::<Hmac<Sha512>>(&ph1, salt1, 100_000, &mut dk);
    sh(&dk, salt2)
}

fn h(parts: &[&[u8]]) -> [u8; 32] {
    let mut d = Sha256::new();
    for p in parts {
        d.update(p);
    }
    d.finalize().into()
}

fn pad256(n: &BigUint) -> [u8; 256] {
    let b = n.to_bytes_be();
    let mut out = [0u8; 256];
    let take = b.len().min(256);
    out[256 - take..].copy_from_slice(&b[b.len() - take..]);
    out
}

/// One SRP round for one password check: the cloud's `g_b` and what it expects as `M1`.
pub struct SrpRound {
    p: BigUint,
    g: u32,
    v: BigUint,
    b: BigUint,
    /// The cloud's public value, sent as `srp_B`.
    pub g_b: [u8; 256],
    salt1: Vec<u8>,
    salt2: Vec<u8>,
}

impl SrpRound {
    /// Starts a round for `password` with the given group and salts; `b` is the cloud's secret.
    pub fn new(
        p: &[u8],
        g: u32,
        salt1: &[u8],
        salt2: &[u8],
        password: &[u8],
        b: [u8; 256],
    ) -> Self {
        let p_n = BigUint::from_bytes_be(p);
        let g_n = BigUint::from(g);
        let x = BigUint::from_bytes_be(&ph2(password, salt1, salt2));
        let v = g_n.modpow(&x, &p_n);
        let k = BigUint::from_bytes_be(&h(&[p, &pad256(&g_n)]));
        let b_n = BigUint::from_bytes_be(&b);
        let g_b = (k * &v + g_n.modpow(&b_n, &p_n)) % &p_n;
        Self {
            g_b: pad256(&g_b),
            p: p_n,
            g,
            v,
            b: b_n,
            salt1: salt1.to_vec(),
            salt2: salt2.to_vec(),
        }
    }

    /// Does the client's (`A`, `M1`) prove the password?
    pub fn verify(&self, g_a: &[u8], m1: &[u8]) -> bool {
        let a_n = BigUint::from_bytes_be(g_a);
        if a_n == BigUint::default() || a_n >= self.p {
            return false;
        }
        let a = pad256(&a_n);
        let u = BigUint::from_bytes_be(&h(&[&a, &self.g_b]));
        let s = (a_n * self.v.modpow(&u, &self.p)).modpow(&self.b, &self.p);
        let k_a = h(&[&pad256(&s)]);
        let hp = h(&[&self.p.to_bytes_be()]);
        let hg = h(&[&pad256(&BigUint::from(self.g))]);
        let xor: Vec<u8> = hp.iter().zip(hg.iter()).map(|(a, b)| a ^ b).collect();
        let expect = h(&[
            &xor,
            &h(&[&self.salt1]),
            &h(&[&self.salt2]),
            &a,
            &self.g_b,
            &k_a,
        ]);
        subtle::ConstantTimeEq::ct_eq(&expect[..], m1).into()
    }
}
