//! The Diffie–Hellman exchange of a Telegram 1:1 call (`messages.getDhConfig`, `g_a_hash`,
//! `g_a`/`g_b`, the shared key and its fingerprint), with every check the official clients make:
//! a 2048-bit safe prime, the generator's quadratic-residue condition, and public values within
//! `[2^1984, p − 2^1984]`.
//!
//! Sans-IO: values in, values out; randomness is passed in by the caller.

use num_bigint::BigUint;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The prime Telegram serves (core.telegram.org/mtproto/security_guidelines); a byte-exact match
/// is known to be a safe prime, so the Miller–Rabin rounds are skipped for it.
pub const KNOWN_PRIME_HEX: &str =
    "c71caeb9c6b1c9048e6c522f70f13f73980d40238e3e21c14934d037563d930f\
48198a0aa7c14058229493d22530f4dbfa336f6e0ac925139543aed44cce7c3720fd51f69458705ac68cd4fe6b6b13ab\
dc9746512969328454f18faf8c595f642477fe96bb2a941d5bcd1d4ac8cc49880708fa9b378e3c4f3a9060bee67cf9a4\
a4a695811051907e162753b56b0f6b410dba74d8a84b2a14b3144e0ef1284754fd17ed950d5965b4b9dd46582db1178d\
169c6bc465b0d6ff9ca3928fef5b9ae4e418fc15e83ebea0f87fa9ff5eed70050ded2849f47bf959d956850ce929851f\
0d8115f635b105ee2e4e15d04b2454bf6f4fadf034b10403119cd8e3b92fcc5b";

/// Miller–Rabin rounds for a prime we have not seen before (error ≤ 4^-ROUNDS per number).
pub const MR_ROUNDS: usize = 24;

/// Why a DH value was refused; each names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhError {
    #[error("DH prime is {bits} bits, not 2048")]
    PrimeSize { bits: u64 },
    #[error("DH prime p or (p-1)/2 is not prime")]
    NotSafePrime,
    #[error("DH generator g={0} is not in 2..=7")]
    BadGenerator(i32),
    #[error("DH generator g={0} does not generate the subgroup of quadratic residues mod p")]
    GeneratorCondition(i32),
    #[error("{what} is not 256 bytes (got {len})")]
    BadLength { what: &'static str, len: usize },
    #[error("{0} is outside [2^1984, p - 2^1984]")]
    OutOfRange(&'static str),
    #[error("g_a does not match the g_a_hash received earlier")]
    HashMismatch,
    #[error("key fingerprint {got:#x} does not match ours {want:#x}")]
    FingerprintMismatch { got: i64, want: i64 },
}

/// Checked parameters from `messages.getDhConfig`.
#[derive(Debug, Clone)]
pub struct DhParams {
    p: BigUint,
    g: BigUint,
    g_small: i32,
}

/// Our secret exponent and public value for one call.
#[derive(Clone)]
pub struct DhSecret {
    a: BigUint,
    /// `g^a mod p` as 256 bytes, big-endian.
    pub public: [u8; 256],
}

impl std::fmt::Debug for DhSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DhSecret(..)")
    }
}

fn be256(n: &BigUint) -> [u8; 256] {
    let bytes = n.to_bytes_be();
    let mut out = [0u8; 256];
    let len = bytes.len().min(256);
    out[256 - len..].copy_from_slice(&bytes[bytes.len() - len..]);
    out
}

/// A public value as received: 256 bytes big-endian, tolerating a 257th leading zero byte (some
/// clients send one) and fewer bytes (leading zeros stripped).
fn parse_public(what: &'static str, bytes: &[u8]) -> Result<BigUint, DhError> {
    let trimmed = match bytes {
        [0, rest @ ..] if bytes.len() == 257 => rest,
        _ => bytes,
    };
    if trimmed.len() > 256 {
        return Err(DhError::BadLength {
            what,
            len: bytes.len(),
        });
    }
    Ok(BigUint::from_bytes_be(trimmed))
}

/// Miller–Rabin with random bases from `rng`.
pub fn is_probable_prime(n: &BigUint, rounds: usize, rng: &mut impl rand::RngCore) -> bool {
    let one = BigUint::from(1u32);
    let two = BigUint::from(2u32);
    if *n < two {
        return false;
    }
    for small in [2u32, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] {
        let s = BigUint::from(small);
        if *n == s {
            return true;
        }
        if (n % &s) == BigUint::from(0u32) {
            return false;
        }
    }
    let n_minus_1 = n - &one;
    let mut d = n_minus_1.clone();
    let mut r = 0u32;
    while (&d % &two) == BigUint::from(0u32) {
        d >>= 1;
        r += 1;
    }
    let bytes = (n.bits() as usize).div_ceil(8);
    'witness: for _ in 0..rounds {
        let mut buf = vec![0u8; bytes];
        rng.fill_bytes(&mut buf);
        let a = BigUint::from_bytes_be(&buf) % (n - 3u32) + &two;
        let mut x = a.modpow(&d, n);
        if x == one || x == n_minus_1 {
            continue;
        }
        for _ in 1..r {
            x = x.modpow(&two, n);
            if x == n_minus_1 {
                continue 'witness;
            }
        }
        return false;
    }
    true
}

impl DhParams {
    /// Checks `messages.getDhConfig`'s `g` and `p` (tdlib `DhHandshake::check_config`).
    pub fn check(g: i32, p_bytes: &[u8], rng: &mut impl rand::RngCore) -> Result<Self, DhError> {
        let p = BigUint::from_bytes_be(p_bytes);
        if p.bits() != 2048 {
            return Err(DhError::PrimeSize { bits: p.bits() });
        }
        if !(2..=7).contains(&g) {
            return Err(DhError::BadGenerator(g));
        }
        let m = |k: u32| (&p % k).to_u32_digits().first().copied().unwrap_or(0);
        let ok = match g {
            2 => m(8) == 7,
            3 => m(3) == 2,
            4 => true,
            5 => matches!(m(5), 1 | 4),
            6 => matches!(m(24), 19 | 23),
            _ => matches!(m(7), 3 | 5 | 6),
        };
        if !ok {
            return Err(DhError::GeneratorCondition(g));
        }
        let known = p.to_str_radix(16) == KNOWN_PRIME_HEX;
        if !known {
            let q = (&p - 1u32) >> 1;
            if !is_probable_prime(&p, MR_ROUNDS, rng) || !is_probable_prime(&q, MR_ROUNDS, rng) {
                return Err(DhError::NotSafePrime);
            }
        }
        Ok(DhParams {
            p,
            g: BigUint::from(g as u32),
            g_small: g,
        })
    }

    /// The generator.
    pub fn g(&self) -> i32 {
        self.g_small
    }

    fn check_range(&self, what: &'static str, x: &BigUint) -> Result<(), DhError> {
        let low = BigUint::from(1u32) << (2048 - 64);
        if *x < low || *x > &self.p - &low {
            return Err(DhError::OutOfRange(what));
        }
        Ok(())
    }

    /// Draws the secret exponent from 256 random bytes mixed (XOR) with the server's `random`,
    /// as the official clients do; retries with `more` until the public value is in range.
    pub fn secret(
        &self,
        server_random: &[u8],
        mut more: impl FnMut() -> [u8; 256],
    ) -> Result<DhSecret, DhError> {
        for _ in 0..32 {
            let mut bytes = more();
            for (b, r) in bytes.iter_mut().zip(server_random) {
                *b ^= r;
            }
            let a = BigUint::from_bytes_be(&bytes);
            if a <= BigUint::from(1u32) || a >= &self.p - 1u32 {
                continue;
            }
            let public = self.g.modpow(&a, &self.p);
            if self.check_range("g_a", &public).is_ok() {
                return Ok(DhSecret {
                    a,
                    public: be256(&public),
                });
            }
        }
        Err(DhError::OutOfRange("g_a"))
    }

    /// The shared key from the peer's public value, after checking it.
    pub fn shared_key(&self, ours: &DhSecret, theirs: &[u8]) -> Result<[u8; 256], DhError> {
        let x = parse_public("peer public value", theirs)?;
        self.check_range("peer public value", &x)?;
        Ok(be256(&x.modpow(&ours.a, &self.p)))
    }
}

/// `SHA-256(g_a)`, which the caller commits to in `phone.requestCall`.
pub fn g_a_hash(g_a: &[u8]) -> [u8; 32] {
    Sha256::digest(g_a).into()
}

/// Checks the callee's view: the `g_a` finally sent must match the earlier commitment.
pub fn verify_g_a(g_a: &[u8], committed: &[u8]) -> Result<(), DhError> {
    if committed.len() != 32 || g_a_hash(g_a)[..] != committed[..] {
        return Err(DhError::HashMismatch);
    }
    Ok(())
}

/// The 64-bit key fingerprint both sides compare: the last 8 bytes of SHA-1(key), little-endian.
pub fn key_fingerprint(key: &[u8; 256]) -> i64 {
    let d = Sha1::digest(key);
    let mut w = [0u8; 8];
    w.copy_from_slice(&d[12..20]);
    i64::from_le_bytes(w)
}

/// Compares a received fingerprint with ours.
pub fn verify_fingerprint(key: &[u8; 256], got: i64) -> Result<(), DhError> {
    let want = key_fingerprint(key);
    if got != want {
        return Err(DhError::FingerprintMismatch { got, want });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn known_p() -> Vec<u8> {
        BigUint::parse_bytes(KNOWN_PRIME_HEX.as_bytes(), 16)
            .unwrap()
            .to_bytes_be()
    }

    fn random256() -> [u8; 256] {
        let mut b = [0u8; 256];
        rand::thread_rng().fill_bytes(&mut b);
        b
    }

    #[test]
    fn both_sides_derive_the_same_key_and_fingerprint() {
        let mut rng = rand::thread_rng();
        let params = DhParams::check(3, &known_p(), &mut rng).unwrap();
        let server_random = random256();
        let a = params.secret(&server_random, random256).unwrap();
        let b = params.secret(&server_random, random256).unwrap();
        let commitment = g_a_hash(&a.public);
        let key_b = params.shared_key(&b, &a.public).unwrap();
        let key_a = params.shared_key(&a, &b.public).unwrap();
        assert_eq!(key_a, key_b);
        verify_g_a(&a.public, &commitment).unwrap();
        verify_fingerprint(&key_b, key_fingerprint(&key_a)).unwrap();
        assert_eq!(
            crate::tgcall::emoji::emoji_fingerprint(&key_a, &a.public),
            crate::tgcall::emoji::emoji_fingerprint(&key_b, &a.public)
        );
    }

    #[test]
    fn fingerprint_is_little_endian_of_the_sha1_tail() {
        let key = [7u8; 256];
        let d = Sha1::digest(key);
        let want = i64::from_le_bytes(d[12..20].try_into().unwrap());
        assert_eq!(key_fingerprint(&key), want);
        assert!(matches!(
            verify_fingerprint(&key, want ^ 1),
            Err(DhError::FingerprintMismatch { .. })
        ));
    }

    #[test]
    fn bad_configs_are_refused_with_the_check_that_failed() {
        let mut rng = rand::thread_rng();
        let p = known_p();
        // The known prime is 2 mod 3 but 7 mod 8? Only g values whose condition holds pass.
        assert_eq!(
            DhParams::check(9, &p, &mut rng).unwrap_err(),
            DhError::BadGenerator(9)
        );
        assert!(matches!(
            DhParams::check(3, &p[1..], &mut rng),
            Err(DhError::PrimeSize { .. })
        ));
        // A 2048-bit odd composite that meets g=4's (empty) condition is caught by Miller–Rabin.
        let mut composite = p.clone();
        composite[255] = composite[255].wrapping_add(2);
        assert_eq!(
            DhParams::check(4, &composite, &mut rng).unwrap_err(),
            DhError::NotSafePrime
        );
    }

    #[test]
    fn public_values_outside_the_safe_range_are_refused() {
        let mut rng = rand::thread_rng();
        let params = DhParams::check(3, &known_p(), &mut rng).unwrap();
        let ours = params.secret(&[0; 256], random256).unwrap();
        for bad in [
            vec![0u8; 256],
            {
                let mut one = vec![0u8; 256];
                one[255] = 1;
                one
            },
            known_p(),
        ] {
            assert_eq!(
                params.shared_key(&ours, &bad).unwrap_err(),
                DhError::OutOfRange("peer public value")
            );
        }
        assert!(matches!(
            params.shared_key(&ours, &[1u8; 300]),
            Err(DhError::BadLength { .. })
        ));
        let mut padded = vec![0u8];
        padded.extend_from_slice(&ours.public);
        params.shared_key(&ours, &padded).unwrap();
    }

    #[test]
    fn miller_rabin_knows_small_cases() {
        let mut rng = rand::thread_rng();
        for (n, prime) in [
            (2u32, true),
            (97, true),
            (561, false),
            (7919, true),
            (7917, false),
        ] {
            assert_eq!(
                is_probable_prime(&BigUint::from(n), 8, &mut rng),
                prime,
                "{n}"
            );
        }
    }

    #[test]
    fn g_a_commitment_mismatch_is_refused() {
        assert_eq!(verify_g_a(&[1; 256], &[0; 32]), Err(DhError::HashMismatch));
        assert_eq!(verify_g_a(&[1; 256], &[0; 5]), Err(DhError::HashMismatch));
    }
}
