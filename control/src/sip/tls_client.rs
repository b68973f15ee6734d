//! The client side of SIP over TLS (RFC 3261 §26), for registrations at a PBX
//! (`register_to_pbx` with `transport = "tls"`): which certificates the PBX's is checked
//! against. By default the system's trust store (the PEM bundle at `SSL_CERT_FILE` or the usual
//! distribution paths), or a configured CA file for a private PBX; `tls_verify = false` skips
//! the check for lab setups with self-signed certificates (the connection is then encrypted but
//! not authenticated, and the log says so).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why no TLS client could be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    /// The CA file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The CA file (or system bundle) holds no usable certificate.
    #[error("{path} holds no usable PEM certificate")]
    NoCertificates { path: String },
    /// No system trust store was found and no CA file is configured.
    #[error("no system CA bundle found (set tls_ca, or SSL_CERT_FILE)")]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where distributions keep their PEM trust bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn system_bundle() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

fn roots_from(path: &Path) -> Result<RootCertStore, TlsClientError> {
    let pem = std::fs::read(path).map_err(|source| TlsClientError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    let mut reader = pem.as_slice();
    let certs: Vec<_> = rustls_pemfile::certs(&mut reader)
        .filter_map(Result::ok)
        .collect();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsClientError::NoCertificates {
            path: path.display().to_string(),
        });
    }
    Ok(roots)
}

/// A TLS client configuration: server certificates checked against `ca` (a PEM file), or the
/// system's trust store when `None`; not checked at all when `verify` is false.
pub fn client_config(ca: Option<&Path>, verify: bool) -> Result<Arc<ClientConfig>, TlsClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if verify {
        let roots = match ca {
            Some(path) => roots_from(path)?,
            None => roots_from(&system_bundle().ok_or(TlsClientError::NoSystemRoots)?)?,
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Accepts any server certificate (`tls_verify = false`), still checking that the handshake is
/// signed by the key of the certificate presented.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
