//! Encryption at rest for MTProto sessions: whoever copies the database gets no auth keys.
//! AES-256-GCM with a random 96-bit nonce per write; the account name is the associated data,
//! so a sealed session cannot be moved to another account's row unnoticed.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use std::path::Path;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// Why sealing or opening failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("storage key: {0}")]
    Key(String),
    #[error("sealed session for {account} does not open: wrong storage key or damaged data")]
    Open { account: String },
    #[error("sealed session for {account} is truncated or of unknown version")]
    Format { account: String },
}

/// The storage key. Debug output hides it.
#[derive(Clone)]
pub struct StorageKey(Aes256Gcm);

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKey(…)")
    }
}

impl StorageKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        Aes256Gcm::new_from_slice(bytes)
            .map(Self)
            .map_err(|_| SealError::Key(format!("must be 32 bytes, got {}", bytes.len())))
    }

    /// A key written as 64 hex digits (or 32 raw bytes) in a file or an environment variable.
    pub fn from_text(text: &[u8]) -> Result<Self, SealError> {
        let trimmed = text.trim_ascii();
        if trimmed.len() == 64 && trimmed.iter().all(u8::is_ascii_hexdigit) {
            let mut key = [0u8; 32];
            for (i, pair) in trimmed.chunks(2).enumerate() {
                let s = std::str::from_utf8(pair).map_err(|_| SealError::Key("not hex".into()))?;
                key[i] = u8::from_str_radix(s, 16).map_err(|_| SealError::Key("not hex".into()))?;
            }
            return Self::from_bytes(&key);
        }
        if text.len() == 32 {
            return Self::from_bytes(text);
        }
        Err(SealError::Key(
            "expected 64 hex digits (e.g. `openssl rand -hex 32`)".into(),
        ))
    }

    /// Loads the key from the environment variable `env` if set, else from `file`; creates the
    /// file (mode 0600, random key) when `create` and it does not exist.
    pub fn load(env: &str, file: &Path, create: bool) -> Result<Self, SealError> {
        if let Ok(v) = std::env::var(env) {
            return Self::from_text(v.as_bytes())
                .map_err(|e| SealError::Key(format!("${env}: {e}")));
        }
        match std::fs::read(file) {
            Ok(bytes) => Self::from_text(&bytes)
                .map_err(|e| SealError::Key(format!("{}: {e}", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| SealError::Key(format!("{}: {e}", dir.display())))?;
                }
                write_private(file, hex.as_bytes())
                    .map_err(|e| SealError::Key(format!("{}: {e}", file.display())))?;
                tracing::info!(file = %file.display(), "created a new storage key");
                Self::from_bytes(&key)
            }
            Err(e) => Err(SealError::Key(format!(
                "{}: {e} (set ${env} or create the file)",
                file.display()
            ))),
        }
    }

    /// Encrypts `plain` for `account`.
    pub fn seal(&self, account: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plain,
            aad: account.as_bytes(),
        };
        // AES-GCM encryption fails only for inputs beyond 64 GiB.
        let ct = self
            .0
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts what [`seal`](Self::seal) wrote for `account`.
    pub fn open(&self, account: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return Err(SealError::Format {
                account: account.into(),
            });
        }
        let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
        self.0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: account.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open {
                account: account.into(),
            })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let key = StorageKey::from_bytes(&[7u8; 32]).unwrap();
        let secret = b"auth key bytes .........";
        let sealed = key.seal("alice", secret);
        assert!(!sealed.windows(secret.len()).any(|w| w == secret));
        assert_eq!(key.open("alice", &sealed).unwrap(), secret);
        // Another account's row, another key, a flipped bit: all refused.
        assert!(matches!(
            key.open("bob", &sealed),
            Err(SealError::Open { .. })
        ));
        let other = StorageKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(other.open("alice", &sealed).is_err());
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(key.open("alice", &bad).is_err());
        assert!(matches!(
            key.open("alice", &[1, 2]),
            Err(SealError::Format { .. })
        ));
    }

    #[test]
    fn keys_from_text_and_files() {
        let hex = "00".repeat(31) + "ff";
        assert!(StorageKey::from_text(hex.as_bytes()).is_ok());
        assert!(StorageKey::from_text(b"short").is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k/storage.key");
        let a = StorageKey::load("SIPTG_TEST_NO_SUCH_VAR", &file, true).unwrap();
        let b = StorageKey::load("SIPTG_TEST_NO_SUCH_VAR", &file, false).unwrap();
        let sealed = a.seal("x", b"hello");
        assert_eq!(b.open("x", &sealed).unwrap(), b"hello");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            StorageKey::load("SIPTG_TEST_NO_SUCH_VAR", &dir.path().join("none"), false).is_err()
        );
        assert!(!format!("{a:?}").contains("00"));
    }
}
