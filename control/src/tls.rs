//! Mutual TLS between Manager, Workers and Storages: a private CA (`siptg certs init`), per-node
//! certificates (`siptg certs issue NAME`), and rustls configs that accept only peers whose
//! certificate chains to that CA.
//!
//! A node's name is its certificate's CN and DNS SAN; the Manager dials a Worker by address but
//! verifies it under its configured name, so an address can move without reissuing.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::{Duration as TimeDuration, OffsetDateTime};

/// Certificates are valid this long (SIP.TG uses 365 days too).
pub const NODE_CERT_DAYS: i64 = 365;
const CA_DAYS: i64 = 3650;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: String },
    #[error("{path} holds no {what}")]
    Missing { path: String, what: &'static str },
    #[error("{0:?} is not a valid node name (letters, digits, '-' and '.', at most 63)")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Node names are DNS-label-like so they fit a certificate's DNS SAN.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// Files of a CA directory.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// `ca.pem` and `ca.key` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
        }
    }
}

fn write_file(path: &Path, contents: &str, secret: bool, force: bool) -> Result<(), TlsError> {
    let shown = path.display().to_string();
    if path.exists() && !force {
        return Err(TlsError::Exists { path: shown });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: shown.clone(),
            source,
        })?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|source| TlsError::Write {
        path: shown.clone(),
        source,
    })?;
    f.write_all(contents.as_bytes())
        .map_err(|source| TlsError::Write {
            path: shown,
            source,
        })
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Creates a new CA (key and self-signed certificate) in `dir`.
pub fn init_ca(dir: &Path, common_name: &str, force: bool) -> Result<CaFiles, TlsError> {
    let files = CaFiles::in_dir(dir);
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "siptg");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::minutes(5);
    params.not_after = now + TimeDuration::days(CA_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&files.key, &key.serialize_pem(), true, force)?;
    write_file(&files.cert, &cert.pem(), false, force)?;
    Ok(files)
}

/// Issues a certificate for node `name`, signed by the CA in `ca`, valid for `days`.
pub fn issue(
    ca: &CaFiles,
    name: &str,
    cert_out: &Path,
    key_out: &Path,
    days: i64,
    force: bool,
) -> Result<(), TlsError> {
    if !valid_node_name(name) {
        return Err(TlsError::BadName(name.to_string()));
    }
    let ca_key = KeyPair::from_pem(&read(&ca.key)?)?;
    let ca_params = CertificateParams::from_ca_cert_pem(&read(&ca.cert)?)?;
    // Re-signing the CA's own parameters with its key yields an issuer with the same name and
    // key identifier, which is all a leaf signature needs.
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "siptg");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::minutes(5);
    params.not_after = now + TimeDuration::days(days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    write_file(key_out, &key.serialize_pem(), true, force)?;
    // The chain file carries the leaf only; peers hold the CA.
    write_file(cert_out, &cert.pem(), false, force)?;
    Ok(())
}

/// Paths of one node's TLS material.
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.display().to_string(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or(TlsError::Missing {
            path: path.display().to_string(),
            what: "PEM private key",
        })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of a link (Worker, Storage): requires a client certificate from our CA.
pub fn server_config(tls: &NodeTls) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&tls.ca)?), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    Ok(Arc::new(cfg))
}

/// Client side of a link (Manager): trusts only our CA and presents our certificate.
pub fn client_config(tls: &NodeTls) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&tls.ca)?)
        .with_client_auth_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    Ok(Arc::new(cfg))
}

/// The TLS server name a node is verified under.
pub fn server_name(node: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(node.to_string()).map_err(|_| TlsError::BadName(node.to_string()))
}

/// The CN of a peer's leaf certificate (the node name it was issued for).
pub fn peer_common_name(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(valid_node_name("worker-1"));
        assert!(valid_node_name("wrk.eu-1"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("-x"));
        assert!(!valid_node_name("a b"));
    }

    #[test]
    fn issued_certificate_names_the_node_and_builds_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path(), "test CA", false).unwrap();
        assert!(matches!(
            init_ca(dir.path(), "again", false),
            Err(TlsError::Exists { .. })
        ));
        let cert = dir.path().join("w.pem");
        let key = dir.path().join("w.key");
        issue(&ca, "worker-1", &cert, &key, 30, false).unwrap();
        let der = load_certs(&cert).unwrap();
        assert_eq!(peer_common_name(Some(&der)).as_deref(), Some("worker-1"));
        let tls = NodeTls {
            ca: ca.cert.clone(),
            cert,
            key: key.clone(),
        };
        server_config(&tls).unwrap();
        client_config(&tls).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "private keys are not world-readable");
    }
}
