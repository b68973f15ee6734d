//! The registrar of PBX → gateway connections (SIP.TG's "PBX registers to the Worker"), sans-IO:
//! a REGISTER's login, source address and credentials in, SIP.TG's exact answer out, bindings
//! kept with their expiry.
//!
//! It runs on the Manager, which owns the connections and their passwords; Workers forward the
//! REGISTER's facts over the link, so a password never leaves the Manager. Order of checks, as
//! SIP.TG answers: unknown login → `404 Route not found`; source outside the connection's
//! trusted IPs → `403 Untrusted IP address` (no challenge is ever sent to such a source); no
//! credentials or a stale nonce → `401` with fresh challenges; a wrong password →
//! `403 Wrong password`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use super::cidr::Cidr;
use super::digest::{Algorithm, AuthError, DigestServer};
use super::reasons;
use crate::config::{ConnectionConfig, ConnectionKind};

/// Shortest and longest registration we grant, seconds (RFC 3261 §10.3 lets a registrar
/// shorten; 60 s is the usual floor, longer than an hour only delays noticing a dead PBX).
pub const MIN_EXPIRES: u32 = 60;
pub const MAX_EXPIRES: u32 = 3600;
/// Granted when the REGISTER names no expiry.
pub const DEFAULT_EXPIRES: u32 = 3600;

/// What a Worker tells the Manager about one REGISTER.
#[derive(Debug, Clone)]
pub struct RegisterRequest<'a> {
    /// The user part of the To URI (the address of record), which is the connection's login.
    pub login: Option<&'a str>,
    pub source: SocketAddr,
    pub authorization: Option<&'a str>,
    pub contact: Option<&'a str>,
    pub expires: Option<u32>,
    /// The Worker that holds the registration (calls to the PBX leave through it).
    pub worker: &'a str,
}

/// A registrar's answer: code, SIP.TG's reason phrase, and headers to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterReply {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    /// Whether this answer counts as a failed login attempt for brute-force protection.
    pub failure: bool,
}

impl RegisterReply {
    fn refuse(code: u16, reason: &str, failure: bool) -> Self {
        RegisterReply {
            code,
            reason: reason.to_string(),
            headers: Vec::new(),
            failure,
        }
    }
}

/// Where a registered PBX is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub contact: String,
    pub source: SocketAddr,
    pub worker: String,
    pub expires_at: SystemTime,
}

/// Registrations of every `pbx_registers` connection.
pub struct Registrar {
    digest: DigestServer,
    bindings: HashMap<String, Binding>,
}

impl Registrar {
    /// A registrar challenging in `realm`, with nonces valid for five minutes.
    pub fn new(realm: &str) -> Self {
        Registrar {
            digest: DigestServer::new(
                realm,
                DigestServer::random_secret(),
                Duration::from_secs(300),
            ),
            bindings: HashMap::new(),
        }
    }

    fn challenge(&self, conn: &ConnectionConfig, now: SystemTime, stale: bool) -> RegisterReply {
        // The connection's algorithms in its order (config validation refused unknown names).
        let algorithms: Vec<Algorithm> = conn
            .digest
            .iter()
            .filter_map(|a| Algorithm::from_name(a))
            .collect();
        RegisterReply {
            code: 401,
            reason: "Unauthorized".into(),
            headers: self
                .digest
                .challenge(now, stale, &algorithms)
                .into_iter()
                .map(|v| ("WWW-Authenticate".to_string(), v))
                .collect(),
            failure: false,
        }
    }

    /// Answers one REGISTER against `connections`.
    pub fn register(
        &mut self,
        connections: &[ConnectionConfig],
        req: &RegisterRequest<'_>,
        now: SystemTime,
    ) -> RegisterReply {
        let conn = req.login.and_then(|login| {
            connections.iter().find(|c| {
                c.kind == ConnectionKind::PbxRegisters && c.login.as_deref() == Some(login)
            })
        });
        let Some(conn) = conn else {
            return RegisterReply::refuse(404, reasons::ROUTE_NOT_FOUND, true);
        };
        if !trusted(conn, req.source) {
            return RegisterReply::refuse(403, reasons::UNTRUSTED_IP, true);
        }
        let Some(auth) = req.authorization else {
            return self.challenge(conn, now, false);
        };
        let password = |user: &str| {
            (Some(user) == conn.login.as_deref())
                .then(|| conn.password.clone())
                .flatten()
        };
        match self.digest.verify("REGISTER", auth, password, now) {
            Ok(_) => {}
            Err(AuthError::StaleNonce | AuthError::Replay) => {
                return self.challenge(conn, now, true)
            }
            Err(AuthError::WrongPassword(_)) | Err(AuthError::BadNonce) => {
                return RegisterReply::refuse(403, reasons::WRONG_PASSWORD, true)
            }
            Err(AuthError::UnknownUser(_)) => {
                // Authenticating as another login than the AOR's.
                return RegisterReply::refuse(403, reasons::WRONG_PASSWORD, true);
            }
            Err(AuthError::Missing) | Err(AuthError::RealmMismatch(_)) => {
                return self.challenge(conn, now, false)
            }
            Err(e @ (AuthError::Malformed(_) | AuthError::Unsupported(_))) => {
                tracing::info!(source = %req.source, error = %e, "REGISTER with unusable credentials");
                return RegisterReply::refuse(400, "Bad Request", false);
            }
        }
        let contact = req.contact.unwrap_or("").trim();
        let asked = contact_expires(contact).or(req.expires);
        if contact == "*" || asked == Some(0) {
            self.bindings.remove(&conn.name);
            return RegisterReply {
                code: 200,
                reason: "OK".into(),
                headers: Vec::new(),
                failure: false,
            };
        }
        if contact.is_empty() {
            // A query: list the current binding.
            let headers = self
                .binding(&conn.name, now)
                .map(|b| {
                    let left = b
                        .expires_at
                        .duration_since(now)
                        .unwrap_or_default()
                        .as_secs();
                    vec![(
                        "Contact".to_string(),
                        format!("{};expires={left}", b.contact),
                    )]
                })
                .unwrap_or_default();
            return RegisterReply {
                code: 200,
                reason: "OK".into(),
                headers,
                failure: false,
            };
        }
        let granted = asked
            .unwrap_or(DEFAULT_EXPIRES)
            .clamp(MIN_EXPIRES, MAX_EXPIRES);
        let uri = contact_uri(contact);
        self.bindings.insert(
            conn.name.clone(),
            Binding {
                contact: uri.clone(),
                source: req.source,
                worker: req.worker.to_string(),
                expires_at: now + Duration::from_secs(granted as u64),
            },
        );
        tracing::info!(connection = %conn.name, source = %req.source, contact = %uri, expires = granted, "PBX registered");
        RegisterReply {
            code: 200,
            reason: "OK".into(),
            headers: vec![("Contact".to_string(), format!("{uri};expires={granted}"))],
            failure: false,
        }
    }

    /// The live binding of a connection, if it is registered.
    pub fn binding(&self, connection: &str, now: SystemTime) -> Option<&Binding> {
        self.bindings.get(connection).filter(|b| b.expires_at > now)
    }

    /// Drops expired bindings (call now and then; lookups ignore them anyway).
    pub fn expire(&mut self, now: SystemTime) {
        self.bindings.retain(|_, b| b.expires_at > now);
    }
}

/// Whether `source` may use `conn` (an empty list trusts everyone).
pub fn trusted(conn: &ConnectionConfig, source: SocketAddr) -> bool {
    conn.trusted_ips.is_empty()
        || conn
            .trusted_ips
            .iter()
            .filter_map(|s| s.parse::<Cidr>().ok())
            .any(|c| c.contains(source.ip()))
}

/// `<sip:...>` of a Contact value (its first element), brackets kept.
fn contact_uri(contact: &str) -> String {
    let first = contact.split(',').next().unwrap_or(contact).trim();
    match (first.find('<'), first.find('>')) {
        (Some(a), Some(b)) if a < b => first[a..=b].to_string(),
        _ => format!("<{}>", first.split(';').next().unwrap_or(first).trim()),
    }
}

/// An `expires=` parameter on a Contact (after the URI).
fn contact_expires(contact: &str) -> Option<u32> {
    let first = contact.split(',').next()?;
    let params = match first.find('>') {
        Some(i) => &first[i + 1..],
        None => first,
    };
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("expires")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest;

    fn conn() -> ConnectionConfig {
        ConnectionConfig {
            name: "office".into(),
            kind: ConnectionKind::PbxRegisters,
            login: Some("office".into()),
            password: Some("s3cret-pass".into()),
            trusted_ips: vec!["127.0.0.0/8".into()],
            server: None,
            domain: None,
            proxy: None,
            expires: 3600,
            header: None,
            codecs: vec!["PCMA".into()],
            digest: vec!["MD5".into()],
            keepalive: std::time::Duration::from_secs(30),
            transport: Default::default(),
            tls_ca: None,
            tls_verify: true,
            dial_rules: Vec::new(),
            priority: 1,
            dtmf: vec!["rfc2833".into()],
            worker: None,
        }
    }

    fn req<'a>(auth: Option<&'a str>, source: &str) -> RegisterRequest<'a> {
        RegisterRequest {
            login: Some("office"),
            source: source.parse().unwrap(),
            authorization: auth,
            contact: Some("<sip:office@127.0.0.1:5070>;expires=120"),
            expires: None,
            worker: "worker-1",
        }
    }

    fn answer(reply: &RegisterReply, password: &str) -> String {
        let challenge = &reply
            .headers
            .iter()
            .find(|(n, v)| n == "WWW-Authenticate" && v.contains("MD5"))
            .unwrap()
            .1;
        digest::respond(
            challenge,
            "REGISTER",
            "sip:127.0.0.1",
            "office",
            password,
            digest::new_cnonce,
            1,
        )
        .unwrap()
    }

    #[test]
    fn register_challenges_then_binds_with_the_right_password() {
        let conns = [conn()];
        let mut r = Registrar::new("siptg");
        let now = SystemTime::now();
        let first = r.register(&conns, &req(None, "127.0.0.1:5070"), now);
        assert_eq!(first.code, 401);
        assert!(!first.failure);
        let auth = answer(&first, "s3cret-pass");
        let ok = r.register(&conns, &req(Some(&auth), "127.0.0.1:5070"), now);
        assert_eq!((ok.code, ok.reason.as_str()), (200, "OK"));
        assert_eq!(
            ok.headers,
            vec![(
                "Contact".to_string(),
                "<sip:office@127.0.0.1:5070>;expires=120".to_string()
            )]
        );
        let b = r.binding("office", now).unwrap();
        assert_eq!(b.contact, "<sip:office@127.0.0.1:5070>");
        assert!(r
            .binding("office", now + Duration::from_secs(121))
            .is_none());
    }

    #[test]
    fn a_connection_can_challenge_with_sha_256_first() {
        let mut c = conn();
        c.digest = vec!["SHA-256".into(), "MD5".into()];
        let conns = [c];
        let mut r = Registrar::new("siptg");
        let now = SystemTime::now();
        let first = r.register(&conns, &req(None, "127.0.0.1:5070"), now);
        assert_eq!(first.headers.len(), 2);
        assert!(first.headers[0].1.contains("algorithm=SHA-256"));
        let all: Vec<&str> = first.headers.iter().map(|(_, v)| v.as_str()).collect();
        let auth = digest::respond(
            &all.join(", "),
            "REGISTER",
            "sip:127.0.0.1",
            "office",
            "s3cret-pass",
            digest::new_cnonce,
            1,
        )
        .unwrap();
        assert!(auth.contains("SHA-256"));
        let ok = r.register(&conns, &req(Some(&auth), "127.0.0.1:5070"), now);
        assert_eq!(ok.code, 200);
    }

    #[test]
    fn siptg_product_answers_for_each_refusal() {
        let conns = [conn()];
        let mut r = Registrar::new("siptg");
        let now = SystemTime::now();
        let challenge = r.register(&conns, &req(None, "127.0.0.1:5070"), now);
        let wrong = answer(&challenge, "guess");
        let got = r.register(&conns, &req(Some(&wrong), "127.0.0.1:5070"), now);
        assert_eq!((got.code, got.reason.as_str()), (403, "Wrong password"));
        assert!(got.failure);
        let got = r.register(&conns, &req(None, "10.1.2.3:5070"), now);
        assert_eq!(
            (got.code, got.reason.as_str()),
            (403, "Untrusted IP address")
        );
        let mut unknown = req(None, "127.0.0.1:5070");
        unknown.login = Some("nobody");
        let got = r.register(&conns, &unknown, now);
        assert_eq!((got.code, got.reason.as_str()), (404, "Route not found"));
        assert!(r.binding("office", now).is_none());
    }

    #[test]
    fn expires_zero_and_star_unregister() {
        let conns = [conn()];
        let mut r = Registrar::new("siptg");
        let now = SystemTime::now();
        let c = r.register(&conns, &req(None, "127.0.0.1:5070"), now);
        let auth = answer(&c, "s3cret-pass");
        assert_eq!(
            r.register(&conns, &req(Some(&auth), "127.0.0.1:5070"), now)
                .code,
            200
        );
        let mut off = req(Some(&auth), "127.0.0.1:5070");
        off.contact = Some("*");
        off.expires = Some(0);
        // The same nonce count again is a replay: a stale re-challenge, then a fresh answer.
        let c = r.register(&conns, &off, now);
        let auth2 = if c.code == 401 {
            answer(&c, "s3cret-pass")
        } else {
            auth.clone()
        };
        off.authorization = Some(&auth2);
        assert_eq!(r.register(&conns, &off, now).code, 200);
        assert!(r.binding("office", now).is_none());
    }

    #[test]
    fn contact_parsing() {
        assert_eq!(
            contact_uri("<sip:a@h:5070;transport=udp>;expires=60"),
            "<sip:a@h:5070;transport=udp>"
        );
        assert_eq!(contact_uri("sip:a@h;expires=60"), "<sip:a@h>");
        assert_eq!(contact_expires("<sip:a@h>;q=0.5;expires=60"), Some(60));
        assert_eq!(contact_expires("<sip:a@h;expires=9>"), None);
        assert_eq!(contact_expires("*"), None);
    }
}
