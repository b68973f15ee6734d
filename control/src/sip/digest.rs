//! HTTP Digest authentication as SIP uses it (RFC 3261 §22, RFC 7616, RFC 8760): the
//! registrar's side (challenge and verify) and the client's side (answer a PBX's 401/407).
//!
//! Sans-IO: nothing here touches the network; the caller passes the clock.
//!
//! # Nonces
//! Nonces are stateless: `base64url(timestamp ‖ random ‖ HMAC-SHA256(secret, timestamp ‖ random
//! ‖ realm)[..16])`. Whether a nonce is ours and how old it is is read from the nonce itself, so
//! no table of issued nonces is kept, Workers sharing a secret accept each other's nonces, and a
//! flood of unauthenticated requests costs no memory. A nonce older than the TTL is *stale*.
//!
//! # Replay protection (nonce counts)
//! For `qop=auth` responses the server remembers, per nonce, which `nc` values it has accepted
//! (a 64-wide sliding window, as SRTP does, so requests reordered on UDP still pass) and rejects
//! a reused count with [`AuthError::Replay`]. Only nonces whose response was *correct* are
//! recorded, so the table cannot be filled without a password. The table is bounded
//! ([`DigestServer::with_nonce_capacity`]); when it is full the oldest nonce is forgotten, and
//! every nonce not newer than a forgotten one is from then on refused as a replay (the client is
//! re-challenged with `stale=true`), so forgetting never reopens a replay. Legacy RFC 2069
//! responses (no `qop`) carry no count: they are valid for the nonce's lifetime, as RFC 2069
//! intends.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256, Sha512_256};
use subtle::ConstantTimeEq;

/// Longest header value we parse; a real one is a few hundred bytes.
const MAX_HEADER: usize = 8192;
/// Most parameters in one challenge or credentials.
const MAX_PARAMS: usize = 32;
/// How far in the future a nonce's timestamp may be (Workers sharing a secret, skewed clocks).
const CLOCK_SKEW: u64 = 60;
/// Default bound of the nonce-count table.
const DEFAULT_NONCE_CAPACITY: usize = 16_384;
/// Nonce layout: timestamp (8) ‖ random (8) ‖ truncated HMAC (16).
const NONCE_LEN: usize = 32;
const NONCE_ID_LEN: usize = 16;
const MAC_DOMAIN: &[u8] = b"siptg digest nonce v1\0";

/// Why authentication failed or a digest header could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all: answer with a challenge.
    #[error("no credentials")]
    Missing,
    /// The header cannot be read; the reason says where.
    #[error("malformed digest header: {0}")]
    Malformed(String),
    /// Well-formed but asks for something we do not do (another scheme, `auth-int`,
    /// `userhash`, an unknown algorithm).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No such user: SIP.TG answers `404 Route not found`.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// The response does not match the user's password: `403 Wrong password`.
    #[error("wrong password for {0:?}")]
    WrongPassword(String),
    /// The response is right but the nonce expired (or is from another secret): re-challenge
    /// with `stale=true` so the client retries without treating its password as wrong.
    #[error("stale nonce")]
    StaleNonce,
    /// A nonce we did not issue, with a response that is also wrong.
    #[error("nonce not issued by this server")]
    BadNonce,
    /// Credentials for another realm than ours (the value is the realm they name).
    #[error("credentials for realm {0:?}")]
    RealmMismatch(String),
    /// A nonce count that was already used with this nonce: re-challenge with `stale=true`.
    #[error("nonce count reused")]
    Replay,
}

impl AuthError {
    /// Whether the right answer is a fresh challenge with `stale=true` (the client knows the
    /// password; only the nonce or count was unusable).
    pub fn rechallenge_stale(&self) -> bool {
        matches!(self, Self::StaleNonce | Self::Replay)
    }

    /// Whether this failure counts towards a brute-force ban (SIP.TG bans for wrong logins and
    /// passwords; a client with an old nonce or an odd header is not guessing passwords).
    pub fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            Self::UnknownUser(_) | Self::WrongPassword(_) | Self::BadNonce
        )
    }
}

fn malformed(reason: impl Into<String>) -> AuthError {
    AuthError::Malformed(reason.into())
}

/// A digest algorithm (RFC 7616 §3.2, RFC 8760). MD5 is what most PBXs and phones still speak;
/// SHA-256 is what RFC 8760 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `MD5` (the default when a header names none).
    Md5,
    /// `MD5-sess`.
    Md5Sess,
    /// `SHA-256`.
    Sha256,
    /// `SHA-256-sess`.
    Sha256Sess,
    /// `SHA-512-256`.
    Sha512_256,
    /// `SHA-512-256-sess`.
    Sha512_256Sess,
}

impl Algorithm {
    /// Every algorithm, strongest first.
    pub const ALL: [Algorithm; 6] = [
        Self::Sha512_256,
        Self::Sha512_256Sess,
        Self::Sha256,
        Self::Sha256Sess,
        Self::Md5,
        Self::Md5Sess,
    ];

    /// What a registrar offers by default: SHA-256 for RFC 8760 clients, MD5 for the rest.
    pub const DEFAULT_CHALLENGE: [Algorithm; 2] = [Self::Sha256, Self::Md5];

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::Md5 => "MD5",
            Self::Md5Sess => "MD5-sess",
            Self::Sha256 => "SHA-256",
            Self::Sha256Sess => "SHA-256-sess",
            Self::Sha512_256 => "SHA-512-256",
            Self::Sha512_256Sess => "SHA-512-256-sess",
        }
    }

    /// Reads a wire name, case-insensitively (clients write `md5`, `sha-256`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    /// Whether HA1 also covers the nonce and cnonce (`-sess`).
    pub fn is_sess(self) -> bool {
        matches!(
            self,
            Self::Md5Sess | Self::Sha256Sess | Self::Sha512_256Sess
        )
    }

    /// Preference order: stronger hash first, plain before `-sess`.
    fn rank(self) -> usize {
        Self::ALL
            .iter()
            .position(|&a| a == self)
            .unwrap_or(usize::MAX)
    }

    /// Hex digest of `parts` joined by `:`.
    fn hash(self, parts: &[&str]) -> String {
        fn run<D: Digest>(parts: &[&str]) -> String {
            let mut d = D::new();
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(p.as_bytes());
            }
            hex(&d.finalize())
        }
        match self {
            Self::Md5 | Self::Md5Sess => run::<Md5>(parts),
            Self::Sha256 | Self::Sha256Sess => run::<Sha256>(parts),
            Self::Sha512_256 | Self::Sha512_256Sess => run::<Sha512_256>(parts),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// `qop=auth` parts of a response.
struct QopAuth<'a> {
    nc: &'a str,
    cnonce: &'a str,
}

/// What the response digest covers, besides method and password.
struct DigestInput<'a> {
    algorithm: Algorithm,
    username: &'a str,
    realm: &'a str,
    nonce: &'a str,
    uri: &'a str,
    /// Needed by `-sess` algorithms even without `qop`.
    cnonce: Option<&'a str>,
    qop: Option<QopAuth<'a>>,
}

/// The `response` value (RFC 7616 §3.4.1, RFC 2069 when there is no qop). `None` when a
/// `-sess` algorithm has no cnonce to work with.
fn response_digest(input: &DigestInput<'_>, method: &str, password: &str) -> Option<String> {
    let alg = input.algorithm;
    let mut ha1 = alg.hash(&[input.username, input.realm, password]);
    if alg.is_sess() {
        ha1 = alg.hash(&[&ha1, input.nonce, input.cnonce?]);
    }
    let ha2 = alg.hash(&[method, input.uri]);
    Some(match &input.qop {
        Some(q) => alg.hash(&[&ha1, input.nonce, q.nc, q.cnonce, "auth", &ha2]),
        None => alg.hash(&[&ha1, input.nonce, &ha2]),
    })
}

// ---------------------------------------------------------------------------------------------
// Header parsing

/// One `scheme params…` item of a header value.
#[derive(Debug)]
struct Item {
    scheme: String,
    /// Names lower-cased, values unquoted.
    params: Vec<(String, String)>,
}

impl Item {
    fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// Parses the item starting at byte `pos` of `s`. Returns it and, when `allow_next` and
/// another scheme follows (`Digest …, Digest …` in one value), where that one starts.
///
/// Tolerant of what real UAs write: spaces around `=`, quoted or bare values, commas inside
/// quotes, backslash escapes, empty list elements, whitespace instead of commas between
/// parameters, any case in names. Splits only at ASCII bytes, so slicing never lands inside a
/// UTF-8 character.
fn parse_item(
    s: &str,
    mut pos: usize,
    allow_next: bool,
) -> Result<(Item, Option<usize>), AuthError> {
    let b = s.as_bytes();
    let len = b.len();
    let is_delim = |c: u8| is_ws(c) || matches!(c, b',' | b'=' | b'"');
    while pos < len && is_ws(b[pos]) {
        pos += 1;
    }
    let start = pos;
    while pos < len && !is_delim(b[pos]) {
        pos += 1;
    }
    let scheme = s.get(start..pos).unwrap_or_default();
    if scheme.is_empty() {
        return Err(malformed("no auth scheme"));
    }
    if pos < len && !is_ws(b[pos]) {
        return Err(malformed("no space after the auth scheme"));
    }
    let mut item = Item {
        scheme: scheme.to_string(),
        params: Vec::new(),
    };
    loop {
        // Parameters are separated by commas and/or whitespace; the scheme is followed by
        // whitespace (checked above), and a value by anything else is junk.
        let sep_start = pos;
        while pos < len && (is_ws(b[pos]) || b[pos] == b',') {
            pos += 1;
        }
        if pos >= len {
            return Ok((item, None));
        }
        if pos == sep_start {
            return Err(malformed("junk after a parameter value"));
        }
        let name_start = pos;
        while pos < len && !is_delim(b[pos]) {
            pos += 1;
        }
        let name = s.get(name_start..pos).unwrap_or_default();
        if name.is_empty() {
            return Err(malformed("expected a parameter name"));
        }
        while pos < len && is_ws(b[pos]) {
            pos += 1;
        }
        if pos >= len || b[pos] != b'=' {
            if allow_next && !item.params.is_empty() {
                return Ok((item, Some(name_start)));
            }
            return Err(malformed(format!("parameter {name:?} has no value")));
        }
        pos += 1;
        while pos < len && is_ws(b[pos]) {
            pos += 1;
        }
        let value = if pos < len && b[pos] == b'"' {
            pos += 1;
            let mut v = String::new();
            let mut seg = pos;
            loop {
                let Some(&c) = b.get(pos) else {
                    return Err(malformed("unterminated quoted string"));
                };
                match c {
                    b'"' => {
                        v.push_str(s.get(seg..pos).unwrap_or_default());
                        pos += 1;
                        break;
                    }
                    b'\\' => {
                        v.push_str(s.get(seg..pos).unwrap_or_default());
                        pos += 1;
                        let Some(ch) = s.get(pos..).and_then(|r| r.chars().next()) else {
                            return Err(malformed("unterminated quoted string"));
                        };
                        if ch.is_control() {
                            return Err(malformed("control character in a quoted string"));
                        }
                        v.push(ch);
                        pos += ch.len_utf8();
                        seg = pos;
                    }
                    c if (c < 0x20 && c != b'\t') || c == 0x7f => {
                        return Err(malformed("control character in a quoted string"));
                    }
                    _ => pos += 1,
                }
            }
            v
        } else {
            let vs = pos;
            while pos < len && !is_ws(b[pos]) && b[pos] != b',' {
                if b[pos] == b'"' {
                    return Err(malformed("quote inside a bare value"));
                }
                if b[pos] < 0x20 || b[pos] == 0x7f {
                    return Err(malformed("control character in a value"));
                }
                pos += 1;
            }
            s.get(vs..pos).unwrap_or_default().to_string()
        };
        let lname = name.to_ascii_lowercase();
        if item.params.iter().any(|(n, _)| *n == lname) {
            return Err(malformed(format!("duplicate parameter {lname:?}")));
        }
        if item.params.len() >= MAX_PARAMS {
            return Err(malformed("too many parameters"));
        }
        item.params.push((lname, value));
    }
}

fn check_length(value: &str) -> Result<&str, AuthError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    if value.len() > MAX_HEADER {
        return Err(malformed("header too long"));
    }
    Ok(value)
}

/// Decodes an RFC 8187 ext-value (`UTF-8''J%C3%A4s%C3%B8n`), as `username*` carries it.
fn decode_ext_value(v: &str) -> Result<String, AuthError> {
    let mut parts = v.splitn(3, '\'');
    let charset = parts.next().unwrap_or_default();
    let _lang = parts.next();
    let Some(encoded) = parts.next() else {
        return Err(malformed("username* is not charset'lang'value"));
    };
    if !charset.eq_ignore_ascii_case("UTF-8") {
        return Err(AuthError::Unsupported(format!(
            "username* charset {charset:?}"
        )));
    }
    let b = encoded.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).and_then(|&c| char::from(c).to_digit(16));
            let lo = b.get(i + 2).and_then(|&c| char::from(c).to_digit(16));
            match (hi, lo) {
                (Some(h), Some(l)) => out.push(u8::try_from(h * 16 + l).unwrap_or_default()),
                _ => return Err(malformed("bad %-escape in username*")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| malformed("username* is not UTF-8"))
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Parsed `Authorization` / `Proxy-Authorization` credentials.
#[derive(Debug)]
struct Credentials {
    username: String,
    realm: String,
    nonce: String,
    uri: String,
    response: String,
    algorithm: Algorithm,
    cnonce: Option<String>,
    /// `(nc as written, nc as a number)` when `qop=auth`.
    nc: Option<(String, u32)>,
}

fn parse_credentials(value: &str) -> Result<Credentials, AuthError> {
    let value = check_length(value)?;
    let (item, _) = parse_item(value, 0, false)?;
    if !item.scheme.eq_ignore_ascii_case("Digest") {
        return Err(AuthError::Unsupported(format!(
            "auth scheme {:?}",
            item.scheme
        )));
    }
    let required = |name: &str| -> Result<String, AuthError> {
        match item.get(name) {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(malformed(format!("missing {name}"))),
        }
    };
    if item
        .get("userhash")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return Err(AuthError::Unsupported("userhash".into()));
    }
    let username = match (item.get("username"), item.get("username*")) {
        (Some(_), Some(_)) => return Err(malformed("both username and username*")),
        (Some(""), None) | (None, None) => return Err(malformed("missing username")),
        (Some(u), None) => u.to_string(),
        (None, Some(ext)) => decode_ext_value(ext)?,
    };
    // The realm may legitimately be empty; it is compared with ours later.
    let realm = item
        .get("realm")
        .ok_or_else(|| malformed("missing realm"))?
        .to_string();
    let nonce = required("nonce")?;
    let uri = required("uri")?;
    let response = required("response")?;
    let algorithm = match item.get("algorithm") {
        None => Algorithm::Md5,
        Some(a) => Algorithm::from_name(a)
            .ok_or_else(|| AuthError::Unsupported(format!("algorithm {a:?}")))?,
    };
    let cnonce = item.get("cnonce").map(str::to_string);
    let nc = match item.get("qop") {
        None => None,
        Some(q) if q.eq_ignore_ascii_case("auth") => {
            let nc = required("nc")?;
            if nc.len() > 8 || !nc.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(malformed("nc is not 8 hex digits"));
            }
            let n = u32::from_str_radix(&nc, 16).map_err(|_| malformed("bad nc"))?;
            if cnonce.is_none() {
                return Err(malformed("qop without cnonce"));
            }
            Some((nc, n))
        }
        Some(q) => return Err(AuthError::Unsupported(format!("qop {q:?}"))),
    };
    if algorithm.is_sess() && cnonce.is_none() {
        return Err(malformed("-sess algorithm without cnonce"));
    }
    Ok(Credentials {
        username,
        realm,
        nonce,
        uri,
        response,
        algorithm,
        cnonce,
        nc,
    })
}

/// A quoted-string for a header we write. Control characters are dropped so that nothing
/// (a realm from config, a value from a peer's challenge) can break the header line.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Server

/// A successful authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedUser {
    /// The login that authenticated.
    pub username: String,
    /// The algorithm the client used.
    pub algorithm: Algorithm,
    /// The `uri` the digest covers; the caller may compare it with the Request-URI (not done
    /// here: proxies and phones disagree on what to put there).
    pub uri: String,
    /// Whether the response used `qop=auth` (false for legacy RFC 2069 clients).
    pub qop: bool,
}

/// Per-nonce accepted counts (see the module docs).
#[derive(Debug, Default)]
struct NonceCounts {
    capacity: usize,
    windows: HashMap<[u8; NONCE_ID_LEN], Window>,
    by_age: BTreeSet<(u64, [u8; NONCE_ID_LEN])>,
    /// Nonces issued at or before this second and not in `windows` were forgotten.
    forgotten_up_to: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    highest: u32,
    /// Bit i: `highest - i` was accepted.
    seen: u64,
}

impl NonceCounts {
    fn forget_oldest(&mut self) {
        if let Some((ts, id)) = self.by_age.pop_first() {
            self.windows.remove(&id);
            self.forgotten_up_to = Some(self.forgotten_up_to.map_or(ts, |f| f.max(ts)));
        }
    }

    /// Records `nc` for the nonce; false if it was used before (or may have been).
    fn accept(&mut self, id: [u8; NONCE_ID_LEN], ts: u64, nc: u32, now: u64, ttl: u64) -> bool {
        // Nonces past their lifetime cannot be accepted any more; drop their windows.
        while let Some(&(oldest, _)) = self.by_age.first() {
            if oldest.saturating_add(ttl) >= now {
                break;
            }
            self.forget_oldest();
        }
        if let Some(w) = self.windows.get_mut(&id) {
            if nc > w.highest {
                let shift = nc - w.highest;
                w.seen = if shift >= 64 { 0 } else { w.seen << shift };
                w.seen |= 1;
                w.highest = nc;
                return true;
            }
            let back = w.highest - nc;
            if back >= 64 || w.seen & (1 << back) != 0 {
                return false;
            }
            w.seen |= 1 << back;
            return true;
        }
        if self.forgotten_up_to.is_some_and(|f| ts <= f) {
            return false;
        }
        while self.windows.len() >= self.capacity.max(1) {
            self.forget_oldest();
        }
        self.windows.insert(
            id,
            Window {
                highest: nc,
                seen: 1,
            },
        );
        self.by_age.insert((ts, id));
        true
    }
}

/// What a nonce turned out to be.
enum NonceState {
    Fresh { id: [u8; NONCE_ID_LEN], ts: u64 },
    Stale,
    Foreign,
}

/// The registrar's side: issues challenges and checks credentials for one realm.
pub struct DigestServer {
    realm: String,
    secret: [u8; 32],
    nonce_ttl: Duration,
    opaque: Option<String>,
    counts: Mutex<NonceCounts>,
}

impl fmt::Debug for DigestServer {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestServer")
            .field("realm", &self.realm)
            .field("nonce_ttl", &self.nonce_ttl)
            .field("opaque", &self.opaque)
            .finish_non_exhaustive()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl DigestServer {
    /// A server for `realm`. `secret` keys the nonces: share it between Workers that should
    /// accept each other's nonces, and keep it across restarts to avoid re-challenging every
    /// client (a new secret makes old nonces stale, not failures). `nonce_ttl` is how long a
    /// nonce stays valid.
    pub fn new(realm: impl Into<String>, secret: [u8; 32], nonce_ttl: Duration) -> Self {
        Self {
            realm: realm.into(),
            secret,
            nonce_ttl,
            opaque: None,
            counts: Mutex::new(NonceCounts {
                capacity: DEFAULT_NONCE_CAPACITY,
                ..NonceCounts::default()
            }),
        }
    }

    /// A fresh random secret, for a server whose nonces need not outlive the process.
    pub fn random_secret() -> [u8; 32] {
        rand::random()
    }

    /// Adds an `opaque` to challenges, for clients that insist on one. It carries no security
    /// (the nonce authenticates itself), so responses are not checked for it.
    pub fn with_opaque(mut self, opaque: impl Into<String>) -> Self {
        self.opaque = Some(opaque.into());
        self
    }

    /// Bounds the nonce-count table (default 16384 nonces).
    pub fn with_nonce_capacity(self, capacity: usize) -> Self {
        let mut counts = self.counts.into_inner().unwrap_or_else(|e| e.into_inner());
        counts.capacity = capacity.max(1);
        Self {
            counts: Mutex::new(counts),
            ..self
        }
    }

    /// The realm challenges name.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    fn tag(&self, body: &[u8]) -> Option<Hmac<Sha256>> {
        // HMAC accepts keys of any length, so this cannot fail; if it did, every nonce would
        // simply be foreign.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).ok()?;
        mac.update(MAC_DOMAIN);
        mac.update(body);
        mac.update(self.realm.as_bytes());
        Some(mac)
    }

    fn make_nonce(&self, now: SystemTime, random: [u8; 8]) -> String {
        let mut raw = [0u8; NONCE_LEN];
        raw[..8].copy_from_slice(&unix_secs(now).to_be_bytes());
        raw[8..16].copy_from_slice(&random);
        let tag = self
            .tag(&raw[..NONCE_ID_LEN])
            .map(|m| m.finalize().into_bytes());
        if let Some(tag) = tag {
            raw[NONCE_ID_LEN..].copy_from_slice(&tag[..NONCE_LEN - NONCE_ID_LEN]);
        }
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn check_nonce(&self, nonce: &str, now: SystemTime) -> NonceState {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(nonce) else {
            return NonceState::Foreign;
        };
        if raw.len() != NONCE_LEN {
            return NonceState::Foreign;
        }
        let Some(mac) = self.tag(&raw[..NONCE_ID_LEN]) else {
            return NonceState::Foreign;
        };
        if mac.verify_truncated_left(&raw[NONCE_ID_LEN..]).is_err() {
            return NonceState::Foreign;
        }
        let mut id = [0u8; NONCE_ID_LEN];
        id.copy_from_slice(&raw[..NONCE_ID_LEN]);
        let mut ts_bytes = [0u8; 8];
        ts_bytes.copy_from_slice(&raw[..8]);
        let ts = u64::from_be_bytes(ts_bytes);
        let now = unix_secs(now);
        let fresh = if ts > now {
            ts - now <= CLOCK_SKEW
        } else {
            now - ts <= self.nonce_ttl.as_secs()
        };
        if fresh {
            NonceState::Fresh { id, ts }
        } else {
            NonceState::Stale
        }
    }

    /// `WWW-Authenticate` / `Proxy-Authenticate` values, one per algorithm, in the order of
    /// `algorithms`, which is the server's preference (RFC 8760 §2.4: clients use the first they
    /// support). Deployed clients decide the order in practice: baresip 1.0 (libre) answers only
    /// the first challenge and fails with ENOSYS when that one is SHA-256, so a registrar for
    /// existing PBXs lists MD5 first. All share one new nonce. An empty list means
    /// [`Algorithm::DEFAULT_CHALLENGE`]. `stale` tells a client whose nonce expired to retry
    /// with the same password.
    pub fn challenge(&self, now: SystemTime, stale: bool, algorithms: &[Algorithm]) -> Vec<String> {
        let mut algs: Vec<Algorithm> = if algorithms.is_empty() {
            Algorithm::DEFAULT_CHALLENGE.to_vec()
        } else {
            algorithms.to_vec()
        };
        let mut seen = Vec::new();
        algs.retain(|a| {
            let new = !seen.contains(a);
            seen.push(*a);
            new
        });
        let nonce = self.make_nonce(now, rand::random());
        algs.into_iter()
            .map(|alg| {
                let mut v = format!(
                    "Digest realm={}, nonce=\"{nonce}\", algorithm={alg}, qop=\"auth\"",
                    quote(&self.realm)
                );
                if let Some(o) = &self.opaque {
                    v.push_str(", opaque=");
                    v.push_str(&quote(o));
                }
                if stale {
                    v.push_str(", stale=true");
                }
                v
            })
            .collect()
    }

    /// Checks an `Authorization` / `Proxy-Authorization` value for a request with `method`.
    /// `password_for` looks the user up. The checks run so that a right password is never
    /// reported as wrong: an expired or foreign nonce with a correct response is
    /// [`AuthError::StaleNonce`], a foreign nonce with a wrong one [`AuthError::BadNonce`].
    pub fn verify(
        &self,
        method: &str,
        header_value: &str,
        password_for: impl Fn(&str) -> Option<String>,
        now: SystemTime,
    ) -> Result<VerifiedUser, AuthError> {
        let c = parse_credentials(header_value)?;
        if c.realm != self.realm {
            return Err(AuthError::RealmMismatch(c.realm));
        }
        let state = self.check_nonce(&c.nonce, now);
        let password =
            password_for(&c.username).ok_or_else(|| AuthError::UnknownUser(c.username.clone()))?;
        let input = DigestInput {
            algorithm: c.algorithm,
            username: &c.username,
            realm: &c.realm,
            nonce: &c.nonce,
            uri: &c.uri,
            cnonce: c.cnonce.as_deref(),
            qop: match (&c.nc, &c.cnonce) {
                (Some((nc, _)), Some(cnonce)) => Some(QopAuth { nc, cnonce }),
                _ => None,
            },
        };
        let expected = response_digest(&input, method, &password)
            .ok_or_else(|| malformed("-sess algorithm without cnonce"))?;
        let given = c.response.to_ascii_lowercase();
        let matches: bool = expected.as_bytes().ct_eq(given.as_bytes()).into();
        let (id, ts) = match (matches, state) {
            (false, NonceState::Foreign) => return Err(AuthError::BadNonce),
            (false, _) => return Err(AuthError::WrongPassword(c.username)),
            (true, NonceState::Foreign | NonceState::Stale) => return Err(AuthError::StaleNonce),
            (true, NonceState::Fresh { id, ts }) => (id, ts),
        };
        if let Some((_, nc)) = c.nc {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if !counts.accept(id, ts, nc, unix_secs(now), self.nonce_ttl.as_secs()) {
                return Err(AuthError::Replay);
            }
        }
        Ok(VerifiedUser {
            username: c.username,
            algorithm: c.algorithm,
            uri: c.uri,
            qop: c.nc.is_some(),
        })
    }

    #[cfg(test)]
    fn tracked_nonces(&self) -> usize {
        self.counts.lock().map(|c| c.windows.len()).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// A digest challenge from a `401`/`407`, as our outbound REGISTER/INVITE client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The realm to answer for.
    pub realm: String,
    /// The server's nonce.
    pub nonce: String,
    /// The algorithm it asks for.
    pub algorithm: Algorithm,
    /// Whether `qop=auth` is offered (otherwise the RFC 2069 form is used).
    pub qop_auth: bool,
    /// To be echoed back.
    pub opaque: Option<String>,
    /// The server says our last nonce expired, not our password: retrying is safe.
    pub stale: bool,
}

impl Challenge {
    /// Every usable Digest challenge in a header value, strongest algorithm first. A value may
    /// hold several challenges (`Digest …, Digest …`); other schemes, unknown algorithms and
    /// `auth-int`-only challenges are skipped. Fails when nothing usable is left.
    pub fn parse_all(value: &str) -> Result<Vec<Challenge>, AuthError> {
        let value = check_length(value)?;
        let mut out = Vec::new();
        let mut last_error = None;
        let mut pos = 0;
        loop {
            let (item, next) = match parse_item(value, pos, true) {
                Ok(parsed) => parsed,
                // Keep what was usable before a broken tail.
                Err(_) if !out.is_empty() => break,
                Err(e) => return Err(e),
            };
            match Self::from_item(&item) {
                Ok(Some(c)) => out.push(c),
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
            match next {
                Some(n) if n > pos => pos = n,
                _ => break,
            }
        }
        if out.is_empty() {
            return Err(last_error
                .unwrap_or_else(|| AuthError::Unsupported("no usable digest challenge".into())));
        }
        out.sort_by_key(|c| c.algorithm.rank());
        Ok(out)
    }

    fn from_item(item: &Item) -> Result<Option<Challenge>, AuthError> {
        if !item.scheme.eq_ignore_ascii_case("Digest") {
            return Ok(None);
        }
        let realm = item
            .get("realm")
            .ok_or_else(|| malformed("challenge without realm"))?;
        let nonce = item
            .get("nonce")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| malformed("challenge without nonce"))?;
        let algorithm = match item.get("algorithm") {
            None => Algorithm::Md5,
            Some(a) => match Algorithm::from_name(a) {
                Some(a) => a,
                None => return Err(AuthError::Unsupported(format!("algorithm {a:?}"))),
            },
        };
        let qop_auth = match item.get("qop") {
            None => false,
            Some(q) => {
                if q.split(',').any(|o| o.trim().eq_ignore_ascii_case("auth")) {
                    true
                } else {
                    return Err(AuthError::Unsupported(format!("qop {q:?}")));
                }
            }
        };
        Ok(Some(Challenge {
            realm: realm.to_string(),
            nonce: nonce.to_string(),
            algorithm,
            qop_auth,
            opaque: item.get("opaque").map(str::to_string),
            stale: item
                .get("stale")
                .is_some_and(|s| s.eq_ignore_ascii_case("true")),
        }))
    }

    /// The `Authorization` / `Proxy-Authorization` value answering this challenge. `nc`
    /// counts requests made with this nonce, from 1; `cnonce` is only sent with `qop` or a
    /// `-sess` algorithm. The response comes last in the value.
    pub fn respond(
        &self,
        method: &str,
        uri: &str,
        username: &str,
        password: &str,
        cnonce: &str,
        nc: u32,
    ) -> Result<String, AuthError> {
        if has_control(username) || has_control(uri) || has_control(cnonce) {
            return Err(malformed("control character in username, uri or cnonce"));
        }
        if has_control(method) || method.is_empty() {
            return Err(malformed("bad method"));
        }
        let nc_text = format!("{nc:08x}");
        let use_cnonce = self.qop_auth || self.algorithm.is_sess();
        let input = DigestInput {
            algorithm: self.algorithm,
            username,
            realm: &self.realm,
            nonce: &self.nonce,
            uri,
            cnonce: use_cnonce.then_some(cnonce),
            qop: self.qop_auth.then_some(QopAuth {
                nc: &nc_text,
                cnonce,
            }),
        };
        let response = response_digest(&input, method, password)
            .ok_or_else(|| malformed("-sess algorithm without cnonce"))?;
        let mut v = format!(
            "Digest username={}, realm={}, nonce={}, uri={}, algorithm={}",
            quote(username),
            quote(&self.realm),
            quote(&self.nonce),
            quote(uri),
            self.algorithm
        );
        if self.qop_auth {
            v.push_str(&format!(", qop=auth, nc={nc_text}"));
        }
        if use_cnonce {
            v.push_str(&format!(", cnonce={}", quote(cnonce)));
        }
        if let Some(o) = &self.opaque {
            v.push_str(&format!(", opaque={}", quote(o)));
        }
        v.push_str(&format!(", response=\"{response}\""));
        Ok(v)
    }
}

/// A random client nonce (16 bytes, base64url), for [`respond`].
pub fn new_cnonce() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// Answers the strongest usable challenge in `challenge_header` (one `WWW-Authenticate` or
/// `Proxy-Authenticate` value; join several with `", "`). `cnonce_source` is called once, when
/// a cnonce is needed (pass [`new_cnonce`]); `nc` is the count of requests with this nonce,
/// from 1.
pub fn respond(
    challenge_header: &str,
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
    cnonce_source: impl FnOnce() -> String,
    nc: u32,
) -> Result<String, AuthError> {
    let challenges = Challenge::parse_all(challenge_header)?;
    let best = challenges
        .first()
        .ok_or_else(|| AuthError::Unsupported("no usable digest challenge".into()))?;
    let cnonce = if best.qop_auth || best.algorithm.is_sess() {
        cnonce_source()
    } else {
        String::new()
    };
    best.respond(method, uri, username, password, &cnonce, nc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REALM: &str = "siptg";
    const TTL: Duration = Duration::from_secs(300);

    fn server() -> DigestServer {
        DigestServer::new(REALM, [7u8; 32], TTL)
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    fn users(name: &str) -> Option<String> {
        match name {
            "alice" => Some("s3cr3t pass".into()),
            "Mufasa" => Some("Circle Of Life".into()),
            "Jäsøn" => Some("pässwörd".into()),
            _ => None,
        }
    }

    fn param(header: &str, name: &str) -> String {
        let (item, _) = parse_item(header, 0, false).expect("parses");
        item.get(name).expect("has param").to_string()
    }

    #[test]
    fn rfc2617_worked_example() {
        let ch = r#"Digest
                 realm="testrealm@host.com",
                 qop="auth,auth-int",
                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                 opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let v = respond(
            ch,
            "GET",
            "/dir/index.html",
            "Mufasa",
            "Circle Of Life",
            || "0a4f113b".into(),
            1,
        )
        .expect("responds");
        assert_eq!(param(&v, "response"), "6629fae49393a05397450978507c4ef1");
        assert_eq!(param(&v, "nc"), "00000001");
        assert_eq!(param(&v, "qop"), "auth");
        assert_eq!(param(&v, "opaque"), "5ccc069c403ebaf9f0171e9517f40e41");

        // The RFC's own Authorization header, checked by our server: the digest is right but
        // the nonce is not ours, so it is stale (re-challenge), never a wrong password.
        let auth = r#"Digest username="Mufasa",
                 realm="testrealm@host.com",
                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                 uri="/dir/index.html",
                 qop=auth,
                 nc=00000001,
                 cnonce="0a4f113b",
                 response="6629fae49393a05397450978507c4ef1",
                 opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let s = DigestServer::new("testrealm@host.com", [1; 32], TTL);
        assert_eq!(
            s.verify("GET", auth, users, t0()),
            Err(AuthError::StaleNonce)
        );
        let wrong = |_: &str| Some("Circle of Life".to_string());
        assert_eq!(s.verify("GET", auth, wrong, t0()), Err(AuthError::BadNonce));
    }

    #[test]
    fn rfc7616_sha256_example() {
        // §3.9.1: the two challenges, as two header values joined into one.
        let sha = r#"Digest
       realm="http-auth@example.org",
       qop="auth, auth-int",
       algorithm=SHA-256,
       nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
       opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#;
        let md5 = sha.replace("SHA-256", "MD5");
        let both = format!("{md5}, {sha}");
        let cn = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        let go = |h: &str| {
            respond(
                h,
                "GET",
                "/dir/index.html",
                "Mufasa",
                "Circle of Life",
                || cn.into(),
                1,
            )
            .expect("responds")
        };
        let v = go(&both);
        assert_eq!(param(&v, "algorithm"), "SHA-256", "strongest chosen");
        assert_eq!(
            param(&v, "response"),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        assert_eq!(
            param(&go(&md5), "response"),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
        let all = Challenge::parse_all(&both).expect("parses");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].algorithm, Algorithm::Sha256);
        assert_eq!(all[1].algorithm, Algorithm::Md5);
    }

    /// Values computed independently with Python's hashlib.
    #[test]
    fn other_algorithms_and_legacy_match_an_independent_implementation() {
        let input = |algorithm, qop: bool| DigestInput {
            algorithm,
            username: "alice",
            realm: "siptg",
            nonce: "NONCEabc",
            uri: "sip:siptg.example;transport=udp",
            cnonce: Some("cn0nce"),
            qop: qop.then_some(QopAuth {
                nc: "0000002a",
                cnonce: "cn0nce",
            }),
        };
        let r = |a, q| response_digest(&input(a, q), "REGISTER", "s3cr3t pass").expect("digest");
        assert_eq!(r(Algorithm::Md5, false), "ade8078f76eb7dadde72f48ef04460ce");
        assert_eq!(
            r(Algorithm::Md5Sess, true),
            "a3db4edf1bc8ff5c49d517d884d200ba"
        );
        assert_eq!(
            r(Algorithm::Sha256Sess, true),
            "1e79944f9984cebc4753c9b5438d7e4983a72fcd07c3eba89653ba4a15d567bf"
        );
        assert_eq!(
            r(Algorithm::Sha512_256, true),
            "ae6c81259bfc830215cf4da113704e6bc378c446d914345dc6fa8ce111eb1bbf"
        );
        assert_eq!(
            r(Algorithm::Sha512_256Sess, true),
            "ad20a4d03eab45ea804639aa95b714827af671d6f3ab7d4d9403eec09a1dcb67"
        );
        // RFC 2069's example (with its erratum's corrected response).
        let legacy = DigestInput {
            algorithm: Algorithm::Md5,
            username: "Mufasa",
            realm: "testrealm@host.com",
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            uri: "/dir/index.html",
            cnonce: None,
            qop: None,
        };
        assert_eq!(
            response_digest(&legacy, "GET", "CircleOfLife").as_deref(),
            Some("1949323746fe6a43ef61f9606e7febea")
        );
    }

    #[test]
    fn challenges_keep_the_servers_order_without_duplicates() {
        let s = server().with_opaque("op\"aque");
        let ch = s.challenge(
            t0(),
            false,
            &[Algorithm::Md5, Algorithm::Sha256, Algorithm::Md5],
        );
        assert_eq!(ch.len(), 2);
        assert!(ch[0].contains("algorithm=MD5"), "{}", ch[0]);
        assert!(ch[1].contains("algorithm=SHA-256"), "{}", ch[1]);
        assert_eq!(param(&ch[0], "nonce"), param(&ch[1], "nonce"));
        assert_eq!(param(&ch[0], "opaque"), "op\"aque");
        assert_eq!(param(&ch[0], "qop"), "auth");
        assert!(!ch[0].contains("stale"));
        let stale = s.challenge(t0(), true, &[]);
        assert_eq!(stale.len(), 2);
        assert!(stale.iter().all(|c| c.ends_with(", stale=true")));
        let c = Challenge::parse_all(&stale[0]).expect("parses");
        assert!(c[0].stale);
        // Two challenges never share a nonce.
        let again = s.challenge(t0(), false, &[Algorithm::Md5]);
        assert_ne!(param(&again[0], "nonce"), param(&ch[0], "nonce"));
    }

    fn round_trip(alg: Algorithm) {
        let s = server();
        let ch = s.challenge(t0(), false, &[alg]);
        let auth = respond(
            &ch[0],
            "REGISTER",
            "sip:siptg",
            "alice",
            "s3cr3t pass",
            new_cnonce,
            1,
        )
        .expect("responds");
        assert_eq!(param(&auth, "algorithm"), alg.name());
        let now = t0() + Duration::from_secs(5);
        let user = s.verify("REGISTER", &auth, users, now).expect("verifies");
        assert_eq!(
            user,
            VerifiedUser {
                username: "alice".into(),
                algorithm: alg,
                uri: "sip:siptg".into(),
                qop: true,
            }
        );
        // The method is covered.
        assert_eq!(
            s.verify("INVITE", &auth, users, now),
            Err(AuthError::WrongPassword("alice".into()))
        );
    }

    #[test]
    fn round_trip_every_algorithm() {
        for alg in Algorithm::ALL {
            round_trip(alg);
        }
    }

    #[test]
    fn round_trip_legacy_without_qop() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Md5]);
        let legacy = ch[0].replace(", qop=\"auth\"", "");
        let auth = respond(
            &legacy,
            "REGISTER",
            "sip:siptg",
            "alice",
            "s3cr3t pass",
            || unreachable!("no cnonce without qop"),
            1,
        )
        .expect("responds");
        assert!(!auth.contains("qop") && !auth.contains("cnonce") && !auth.contains("nc="));
        let user = s.verify("REGISTER", &auth, users, t0()).expect("verifies");
        assert!(!user.qop);
        // RFC 2069 has no counts: the same response is valid until the nonce expires.
        assert!(s.verify("REGISTER", &auth, users, t0()).is_ok());
        let late = t0() + TTL + Duration::from_secs(1);
        assert_eq!(
            s.verify("REGISTER", &auth, users, late),
            Err(AuthError::StaleNonce)
        );
    }

    #[test]
    fn unicode_username_via_username_star() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Sha256]);
        let auth = respond(
            &ch[0],
            "REGISTER",
            "sip:siptg",
            "Jäsøn",
            "pässwörd",
            || "c".into(),
            1,
        )
        .expect("responds");
        assert_eq!(
            s.verify("REGISTER", &auth, users, t0()).map(|u| u.username),
            Ok("Jäsøn".into())
        );
        let star = auth.replace("username=\"Jäsøn\"", "username*=UTF-8''J%C3%A4s%C3%B8n");
        assert!(star.contains("username*"));
        let s2 = server();
        assert_eq!(
            s2.verify("REGISTER", &star, users, t0())
                .map(|u| u.username),
            Ok("Jäsøn".into())
        );
    }

    fn auth_for(s: &DigestServer, now: SystemTime, password: &str, nc: u32) -> String {
        let ch = s.challenge(now, false, &[Algorithm::Md5]);
        respond(
            &ch[0],
            "REGISTER",
            "sip:siptg",
            "alice",
            password,
            || "abc".into(),
            nc,
        )
        .expect("responds")
    }

    #[test]
    fn stale_nonce() {
        let s = server();
        let auth = auth_for(&s, t0(), "s3cr3t pass", 1);
        assert!(s.verify("REGISTER", &auth, users, t0() + TTL).is_ok());
        let late = t0() + TTL + Duration::from_secs(1);
        let err = s.verify("REGISTER", &auth, users, late).expect_err("stale");
        assert_eq!(err, AuthError::StaleNonce);
        assert!(err.rechallenge_stale() && !err.counts_as_failure());
        // A stale nonce with a wrong password is a wrong password.
        let bad = auth_for(&s, t0(), "guess", 1);
        assert_eq!(
            s.verify("REGISTER", &bad, users, late),
            Err(AuthError::WrongPassword("alice".into()))
        );
        // A nonce from the future beyond the allowed skew is not accepted either.
        let future = auth_for(&s, t0() + Duration::from_secs(3600), "s3cr3t pass", 1);
        assert_eq!(
            s.verify("REGISTER", &future, users, t0()),
            Err(AuthError::StaleNonce)
        );
    }

    #[test]
    fn forged_nonce() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Md5]);
        let nonce = param(&ch[0], "nonce");
        // Flip one character of the nonce (its timestamp part) and answer the forged challenge.
        let mut forged: Vec<char> = nonce.chars().collect();
        forged[3] = if forged[3] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        let forged_ch = ch[0].replace(&nonce, &forged);
        let wrong = respond(
            &forged_ch,
            "REGISTER",
            "sip:siptg",
            "alice",
            "guess",
            || "c".into(),
            1,
        )
        .expect("responds");
        let err = s
            .verify("REGISTER", &wrong, users, t0())
            .expect_err("forged");
        assert_eq!(err, AuthError::BadNonce);
        assert!(err.counts_as_failure());
        // With the right password it is only stale: the client knows the password.
        let right = respond(
            &forged_ch,
            "REGISTER",
            "sip:siptg",
            "alice",
            "s3cr3t pass",
            || "c".into(),
            1,
        )
        .expect("responds");
        assert_eq!(
            s.verify("REGISTER", &right, users, t0()),
            Err(AuthError::StaleNonce)
        );
        // A nonce from a server with another secret is foreign too.
        let other = DigestServer::new(REALM, [8u8; 32], TTL);
        let theirs = auth_for(&other, t0(), "guess", 1);
        assert_eq!(
            s.verify("REGISTER", &theirs, users, t0()),
            Err(AuthError::BadNonce)
        );
        // Same secret, other realm: the realm is part of the MAC.
        let realm2 = DigestServer::new("other", [7u8; 32], TTL);
        let ch2 = realm2.challenge(t0(), false, &[Algorithm::Md5]);
        let moved = ch2[0].replace("realm=\"other\"", "realm=\"siptg\"");
        let a = respond(
            &moved,
            "REGISTER",
            "sip:siptg",
            "alice",
            "guess",
            || "c".into(),
            1,
        )
        .expect("responds");
        assert_eq!(
            s.verify("REGISTER", &a, users, t0()),
            Err(AuthError::BadNonce)
        );
    }

    #[test]
    fn wrong_password_unknown_user_wrong_realm() {
        let s = server();
        let auth = auth_for(&s, t0(), "guess", 1);
        let err = s.verify("REGISTER", &auth, users, t0()).expect_err("wrong");
        assert_eq!(err, AuthError::WrongPassword("alice".into()));
        assert!(err.counts_as_failure());
        let nobody = |_: &str| None;
        let err = s
            .verify("REGISTER", &auth, nobody, t0())
            .expect_err("unknown");
        assert_eq!(err, AuthError::UnknownUser("alice".into()));
        assert!(err.counts_as_failure());
        let other = auth.replace("realm=\"siptg\"", "realm=\"elsewhere\"");
        assert_eq!(
            s.verify("REGISTER", &other, users, t0()),
            Err(AuthError::RealmMismatch("elsewhere".into()))
        );
    }

    #[test]
    fn nonce_counts_reject_reuse_and_allow_reordering() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Sha256]);
        let with = |nc| {
            respond(
                &ch[0],
                "REGISTER",
                "sip:siptg",
                "alice",
                "s3cr3t pass",
                || "x".into(),
                nc,
            )
            .expect("responds")
        };
        assert!(s.verify("REGISTER", &with(1), users, t0()).is_ok());
        let err = s
            .verify("REGISTER", &with(1), users, t0())
            .expect_err("replay");
        assert_eq!(err, AuthError::Replay);
        assert!(err.rechallenge_stale() && !err.counts_as_failure());
        assert!(s.verify("REGISTER", &with(3), users, t0()).is_ok());
        assert!(
            s.verify("REGISTER", &with(2), users, t0()).is_ok(),
            "reordered"
        );
        assert_eq!(
            s.verify("REGISTER", &with(2), users, t0()),
            Err(AuthError::Replay)
        );
        assert!(s.verify("REGISTER", &with(100), users, t0()).is_ok());
        assert_eq!(
            s.verify("REGISTER", &with(30), users, t0()),
            Err(AuthError::Replay),
            "too far behind the window"
        );
        assert!(s.verify("REGISTER", &with(99), users, t0()).is_ok());
        // A wrong password does not consume counts.
        let bad = respond(
            &ch[0],
            "REGISTER",
            "sip:siptg",
            "alice",
            "guess",
            || "x".into(),
            101,
        )
        .expect("responds");
        assert!(s.verify("REGISTER", &bad, users, t0()).is_err());
        assert!(s.verify("REGISTER", &with(101), users, t0()).is_ok());
    }

    #[test]
    fn nonce_count_table_is_bounded_and_never_reopens_a_replay() {
        let s = server().with_nonce_capacity(4);
        let mut auths = Vec::new();
        for i in 0..10u64 {
            let now = t0() + Duration::from_secs(i);
            let a = auth_for(&s, now, "s3cr3t pass", 1);
            assert!(s.verify("REGISTER", &a, users, now).is_ok());
            assert!(s.tracked_nonces() <= 4);
            auths.push(a);
        }
        let now = t0() + Duration::from_secs(10);
        // Forgotten nonces are refused rather than accepted again.
        for a in &auths {
            assert_eq!(s.verify("REGISTER", a, users, now), Err(AuthError::Replay));
        }
        // New nonces still work.
        let fresh = auth_for(&s, now, "s3cr3t pass", 1);
        assert!(s.verify("REGISTER", &fresh, users, now).is_ok());
        // Expired nonces leave the table on their own.
        let later = now + TTL + Duration::from_secs(2);
        let newest = auth_for(&s, later, "s3cr3t pass", 1);
        assert!(s.verify("REGISTER", &newest, users, later).is_ok());
        assert_eq!(s.tracked_nonces(), 1);
    }

    #[test]
    fn tolerant_parsing() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Md5]);
        let nonce = param(&ch[0], "nonce");
        let d = response_digest(
            &DigestInput {
                algorithm: Algorithm::Md5,
                username: "alice",
                realm: REALM,
                nonce: &nonce,
                uri: "sip:a@b;x=1,2",
                cnonce: Some("c,n"),
                qop: Some(QopAuth {
                    nc: "00000001",
                    cnonce: "c,n",
                }),
            },
            "REGISTER",
            "s3cr3t pass",
        )
        .expect("digest");
        let up = d.to_ascii_uppercase();
        for header in [
            // Odd spacing, unquoted values, case-insensitive names, quoted qop.
            format!(
                "digest USERNAME = alice ,Realm=\"siptg\",, nonce={nonce},uri=\"sip:a@b;x=1,2\",\
                 QOP=\"auth\", NC=00000001, cnonce=\"c,n\", algorithm=md5, response={up}"
            ),
            // Whitespace instead of commas, escapes inside quotes, tabs and folding.
            format!(
                "Digest\tusername=\"al\\ice\"\r\n realm=\"siptg\" nonce=\"{nonce}\" \
                 uri=\"sip:a@b;x=1,2\" qop=auth nc=00000001 cnonce=\"c\\,n\" response=\"{d}\""
            ),
        ] {
            // A server with the same secret accepts the nonce; each starts with no counts.
            let fresh = server();
            assert!(
                fresh.verify("REGISTER", &header, users, t0()).is_ok(),
                "{header}"
            );
        }
    }

    #[test]
    fn malformed_headers_are_errors_never_panics() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Sha256]);
        let auth = respond(
            &ch[0],
            "REGISTER",
            "sip:siptg",
            "Jäsøn",
            "pässwörd",
            || "c\"n".into(),
            1,
        )
        .expect("responds");
        for (end, _) in auth.char_indices() {
            let cut = &auth[..end];
            assert!(s.verify("REGISTER", cut, users, t0()).is_err(), "{cut:?}");
            let _ = Challenge::parse_all(cut);
            let _ = respond(cut, "REGISTER", "sip:x", "u", "p", || "c".into(), 1);
        }
        for (end, _) in ch[0].char_indices() {
            let _ = Challenge::parse_all(&ch[0][..end]);
            let _ = respond(
                &ch[0][..end],
                "REGISTER",
                "sip:x",
                "u",
                "p",
                || "c".into(),
                1,
            );
        }
        let long = format!("Digest username=\"{}\"", "a".repeat(10_000));
        let cases: Vec<(&str, AuthError)> = vec![
            ("", AuthError::Missing),
            ("   ", AuthError::Missing),
            ("Digest", malformed("missing username")),
            ("Digest ,,, ", malformed("missing username")),
            ("Digest=1", malformed("no space after the auth scheme")),
            (
                "Digest username",
                malformed("parameter \"username\" has no value"),
            ),
            ("Digest username=", malformed("missing username")),
            ("Digest =x", malformed("expected a parameter name")),
            ("Digest a=\"x", malformed("unterminated quoted string")),
            ("Digest a=\"x\\", malformed("unterminated quoted string")),
            (
                "Digest a=\"x\"y=1",
                malformed("junk after a parameter value"),
            ),
            ("Digest a=x\"y\"", malformed("quote inside a bare value")),
            ("Digest a=1, A=2", malformed("duplicate parameter \"a\"")),
            (
                "Digest a=\"x\ny\"",
                malformed("control character in a quoted string"),
            ),
            (
                "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
                AuthError::Unsupported("auth scheme \"Basic\"".into()),
            ),
            (&long, malformed("header too long")),
        ];
        for (h, e) in cases {
            assert_eq!(s.verify("REGISTER", h, users, t0()), Err(e), "{h:?}");
        }
        let base =
            r#"Digest username="alice", realm="siptg", nonce="n", uri="sip:x", response="00""#;
        for (extra, what) in [
            (", qop=auth-int, nc=00000001, cnonce=\"c\"", "auth-int"),
            (", qop=auth, cnonce=\"c\"", "missing nc"),
            (", qop=auth, nc=1234567890, cnonce=\"c\"", "long nc"),
            (", qop=auth, nc=zz, cnonce=\"c\"", "non-hex nc"),
            (", qop=auth, nc=00000001", "missing cnonce"),
            (", algorithm=MD5-sess", "sess without cnonce"),
            (", algorithm=AKAv1-MD5", "unknown algorithm"),
            (", userhash=true", "userhash"),
            (", username*=UTF-8''x", "both usernames"),
        ] {
            let h = format!("{base}{extra}");
            let r = s.verify("REGISTER", &h, users, t0());
            assert!(
                matches!(r, Err(AuthError::Malformed(_) | AuthError::Unsupported(_))),
                "{what}: {r:?}"
            );
        }
        // Junk bytes of every kind.
        let junk = [
            "\u{0}",
            "\"",
            "Digest \"",
            "Digest ,=,=",
            "Digest a==",
            "Digest a=\"\\\u{1}\"",
            "Digest username*=UTF-8''%",
            "Digest username*=UTF-8''%C3",
        ];
        for h in junk {
            assert!(s.verify("REGISTER", h, users, t0()).is_err(), "{h:?}");
            let _ = Challenge::parse_all(h);
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let s = server();
        let ch = s.challenge(t0(), false, &[Algorithm::Sha256]);
        let auth = respond(
            &ch[0],
            "REGISTER",
            "sip:siptg",
            "alice",
            "s3cr3t pass",
            || "c".into(),
            1,
        )
        .expect("responds");
        let alphabet = b"\"\\,= \t\r\nDigestaz09=%*'\x00\x7f";
        // A fixed xorshift so failures reproduce.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let base = if next() % 2 == 0 { &auth } else { &ch[0] };
            let mut bytes = base.as_bytes().to_vec();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % bytes.len().max(1);
                let c = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => bytes.insert(at, c),
                    1 if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    _ => {
                        if let Some(b) = bytes.get_mut(at) {
                            *b = c;
                        }
                    }
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = s.verify("REGISTER", &text, users, t0());
            let _ = Challenge::parse_all(&text);
            let _ = respond(&text, "INVITE", "sip:x", "u", "p", || "c".into(), 2);
        }
    }

    #[test]
    fn client_skips_what_it_cannot_answer() {
        let aka = r#"Digest realm="x", nonce="n", algorithm=AKAv1-MD5"#;
        assert!(matches!(
            Challenge::parse_all(aka),
            Err(AuthError::Unsupported(_))
        ));
        let int_only = r#"Digest realm="x", nonce="n", qop="auth-int""#;
        assert!(matches!(
            Challenge::parse_all(int_only),
            Err(AuthError::Unsupported(_))
        ));
        let mixed = format!(r#"Basic realm="x", {aka}, Digest realm="x", nonce="m""#);
        let all = Challenge::parse_all(&mixed).expect("one usable");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].nonce, "m");
        assert!(!all[0].qop_auth);
        assert!(matches!(
            Challenge::parse_all(r#"Digest realm="x""#),
            Err(AuthError::Malformed(_))
        ));
        // Header injection through our own output is refused.
        assert!(respond(
            r#"Digest realm="x", nonce="n""#,
            "REGISTER",
            "sip:x\r\nEvil: 1",
            "u",
            "p",
            || "c".into(),
            1
        )
        .is_err());
    }
}
