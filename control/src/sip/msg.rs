//! The SIP message model of the B2BUA: requests and responses with their headers and bodies,
//! read from datagrams (UDP) or byte streams (TCP/TLS, Content-Length framing) and written back
//! as bytes. Sans-IO and panic-free on any input.
//!
//! The reader is forgiving where real UAs differ from the grammar (RFC 3261 §7.3.3 compact
//! names, folded lines, bare-LF line ends, odd whitespace as in RFC 4475 §3.1.1) and strict
//! where a wrong guess would corrupt state: a Content-Length that disagrees with the data, a
//! CSeq that is not a number plus the request's method, NUL bytes, more than
//! [`MAX_HEADER_BYTES`] of headers. Every rejection is a typed [`ParseError`].
//!
//! [`message`](super::message) stays the Worker edge's small request reader; this module is
//! the model the transaction layer ([`transaction`](super::transaction)) and dialogs use.

#![deny(missing_docs)]

use std::fmt;
use std::net::SocketAddr;

/// Largest header section (start line plus headers) we read: bigger is an attack or a bug,
/// and a stream reader must not buffer without bound while waiting for the blank line.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Largest body a stream message may announce; SIP bodies are SDP and small XML, and a
/// stream reader must not buffer gigabytes because a Content-Length says so.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why bytes are not a SIP message. On a stream every error means the framing is lost and the
/// connection should be closed; on a datagram the datagram is dropped (or answered 400 when the
/// edge can still address a response).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing but line ends: a keep-alive (RFC 5626 §4.4.1), not a message.
    #[error("no message, only line ends")]
    Empty,
    /// The blank line ending the headers is missing, or the body is shorter than its
    /// Content-Length: the datagram was cut.
    #[error("message truncated")]
    Truncated,
    /// The header section exceeds [`MAX_HEADER_BYTES`].
    #[error("header section larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// A stream message announces a body larger than [`MAX_BODY_BYTES`].
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// The header section is not UTF-8.
    #[error("header section is not UTF-8")]
    NotText,
    /// A NUL or other control character in the header section.
    #[error("control character in the header section")]
    ControlChar,
    /// The first line is neither a request line nor a status line; quotes it (80 chars max).
    #[error("malformed start line {0:?}")]
    StartLine(String),
    /// A SIP version other than 2.0: a UAS answers `505 Version Not Supported`.
    #[error("unsupported SIP version {0:?}")]
    Version(String),
    /// A header line without a name or colon; quotes it (80 chars max).
    #[error("malformed header line {0:?}")]
    Header(String),
    /// One of the headers every message must carry is absent (RFC 3261 §8.1.1).
    #[error("missing mandatory header {0}")]
    Missing(&'static str),
    /// Content-Length is not a number, or two Content-Length headers disagree.
    #[error("bad Content-Length {0:?}")]
    ContentLength(String),
    /// CSeq is not `number method` with a number below 2^31 (RFC 3261 §8.1.1.5).
    #[error("bad CSeq {0:?}")]
    CSeq(String),
    /// The CSeq method differs from the request's method (RFC 4475 §3.1.2.16).
    #[error("CSeq method does not match the request method")]
    CSeqMethod,
}

/// A SIP method. Methods are case-sensitive (RFC 3261 §7.1); unknown ones are kept as written
/// so a UAS can answer `405`/`501` with them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// Starts a session (RFC 3261).
    Invite,
    /// Confirms a final response to an INVITE (RFC 3261).
    Ack,
    /// Ends a session (RFC 3261).
    Bye,
    /// Cancels a pending INVITE (RFC 3261 §9).
    Cancel,
    /// Capabilities and keep-alive (RFC 3261).
    Options,
    /// Binds a contact (RFC 3261 §10).
    Register,
    /// Acknowledges a reliable provisional response (RFC 3262).
    Prack,
    /// Changes session parameters before answer (RFC 3311).
    Update,
    /// Mid-dialog information such as DTMF (RFC 6086).
    Info,
    /// Instant message (RFC 3428).
    Message,
    /// Event subscription (RFC 6665).
    Subscribe,
    /// Event notification (RFC 6665).
    Notify,
    /// Call transfer (RFC 3515).
    Refer,
    /// Event state publication (RFC 3903).
    Publish,
    /// Any other token, as written.
    Other(String),
}

impl Method {
    /// The method from its token (case-sensitive, as RFC 3261 §7.1 requires).
    pub fn from_token(s: &str) -> Method {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            "PRACK" => Method::Prack,
            "UPDATE" => Method::Update,
            "INFO" => Method::Info,
            "MESSAGE" => Method::Message,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other.to_string()),
        }
    }

    /// The token as written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Prack => "PRACK",
            Method::Update => "UPDATE",
            Method::Info => "INFO",
            Method::Message => "MESSAGE",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Publish => "PUBLISH",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The full name of a compact header name (RFC 3261 §7.3.3 and later RFCs), or `None`.
fn expand_compact(name: &str) -> Option<&'static str> {
    if name.len() != 1 {
        return None;
    }
    Some(match name.as_bytes()[0].to_ascii_lowercase() {
        b'v' => "Via",
        b'f' => "From",
        b't' => "To",
        b'i' => "Call-ID",
        b'm' => "Contact",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'k' => "Supported",
        b's' => "Subject",
        b'e' => "Content-Encoding",
        b'o' => "Event",
        b'u' => "Allow-Events",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'x' => "Session-Expires",
        b'a' => "Accept-Contact",
        b'j' => "Reject-Contact",
        b'd' => "Request-Disposition",
        b'y' => "Identity",
        _ => return None,
    })
}

/// RFC 3261 `token` characters (method names, header names).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Header lines in order, names with their full spelling (compact forms expanded), values with
/// folding joined and outer whitespace trimmed. Lookups ignore the case of names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    list: Vec<(String, String)>,
}

impl Headers {
    /// No headers: the start of a message being built.
    pub fn new() -> Self {
        Self::default()
    }

    /// First value of a header, as written (a comma-joined line is one value).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every line of a header, in order, as written.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.list
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every element of a list header (Via, Route, Record-Route, Contact, …) in order, lines
    /// split at commas outside quotes and `<>`/`[]`. Only for headers whose grammar is a
    /// comma list: an `Authorization` value would be cut into pieces.
    pub fn split<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.get_all(name).flat_map(ListElements::new)
    }

    /// Whether the header is present at all.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Replaces every line of a header by one (where the first was), or appends it.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self
            .list
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(i) => {
                self.list[i].1 = value;
                let mut j = 0;
                self.list.retain(|(n, _)| {
                    let keep = j <= i || !n.eq_ignore_ascii_case(name);
                    j += 1;
                    keep
                });
            }
            None => self.list.push((name.to_string(), value)),
        }
    }

    /// Appends a line (after any existing lines of any header).
    pub fn add(&mut self, name: &str, value: impl Into<String>) {
        self.list.push((name.to_string(), value.into()));
    }

    /// Inserts a line before the first line of the same header (or first of all): how a Via or
    /// Record-Route is pushed on top.
    pub fn prepend(&mut self, name: &str, value: impl Into<String>) {
        let at = self
            .list
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
            .unwrap_or(0);
        self.list.insert(at, (name.to_string(), value.into()));
    }

    /// Removes every line of a header; returns how many there were.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.list.len();
        self.list.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        before - self.list.len()
    }

    /// All lines as (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.list.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no lines.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Replaces the topmost Via element (the first element of the first Via line, leaving
    /// any comma-joined elements after it), or adds a Via line when there is none.
    pub fn replace_top_via(&mut self, element: impl Into<String>) {
        let element = element.into();
        let Some(i) = self
            .list
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case("Via"))
        else {
            self.list.insert(0, ("Via".to_string(), element));
            return;
        };
        let value = &self.list[i].1;
        let new = match split_first_element(value) {
            (_, Some(rest)) => format!("{element}, {}", rest.trim()),
            (_, None) => element,
        };
        self.list[i].1 = new;
    }

    /// The topmost Via element: the hop that sent this message (requests) or us (responses).
    pub fn top_via(&self) -> Option<Via> {
        self.split("Via").next().and_then(Via::parse)
    }

    /// The raw text of the topmost Via element.
    pub fn top_via_str(&self) -> Option<&str> {
        self.split("Via").next()
    }

    /// The `branch` parameter of the topmost Via: the transaction id (RFC 3261 §17.2.3).
    pub fn top_via_branch(&self) -> Option<String> {
        self.top_via().and_then(|v| v.branch().map(str::to_string))
    }

    /// CSeq as (number, method), if present and well formed.
    pub fn cseq(&self) -> Option<(u32, Method)> {
        parse_cseq(self.get("CSeq")?).ok()
    }

    /// The Call-ID value.
    pub fn call_id(&self) -> Option<&str> {
        self.get("Call-ID")
    }

    /// The `tag` parameter of From: the caller's half of the dialog id.
    pub fn from_tag(&self) -> Option<&str> {
        addr_param(self.get("From")?, "tag")
    }

    /// The `tag` parameter of To: the callee's half of the dialog id (absent on out-of-dialog
    /// requests).
    pub fn to_tag(&self) -> Option<&str> {
        addr_param(self.get("To")?, "tag")
    }
}

/// Iterator over the comma-separated elements of one header value.
struct ListElements<'a> {
    rest: Option<&'a str>,
}

impl<'a> ListElements<'a> {
    fn new(value: &'a str) -> Self {
        Self { rest: Some(value) }
    }
}

impl<'a> Iterator for ListElements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            let value = self.rest.take()?;
            let (first, rest) = split_first_element(value);
            self.rest = rest;
            if !first.is_empty() {
                return Some(first);
            }
            // Empty elements (",," in a list) are skipped.
        }
    }
}

/// Splits a header value at its first comma outside quotes and brackets.
fn split_first_element(value: &str) -> (&str, Option<&str>) {
    let (mut quoted, mut escaped, mut depth) = (false, false, 0i32);
    for (i, b) in value.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'<' | b'[' if !quoted => depth += 1,
            b'>' | b']' if !quoted => depth -= 1,
            b',' if !quoted && depth <= 0 => {
                return (value[..i].trim(), Some(&value[i + 1..]));
            }
            _ => {}
        }
    }
    (value.trim(), None)
}

/// The header parameters of a name-addr/addr-spec value (From, To, Contact): what follows the
/// URI, skipping a quoted display name and anything inside `<>`.
fn addr_params(value: &str) -> &str {
    let (mut quoted, mut escaped) = (false, false);
    let mut open = None;
    for (i, b) in value.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'<' if !quoted => {
                open = Some(i);
                break;
            }
            _ => {}
        }
    }
    match open {
        Some(i) => match value[i..].find('>') {
            Some(j) => &value[i + j + 1..],
            None => "",
        },
        // addr-spec: URI parameters cannot appear without <>, so the first ';' starts the
        // header parameters.
        None => value.find(';').map(|i| &value[i..]).unwrap_or(""),
    }
}

/// A header parameter of a name-addr value (e.g. `tag`), whitespace around `=` tolerated.
fn addr_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    addr_params(value).split(';').find_map(|p| {
        let (n, v) = p.split_once('=')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim())
            .filter(|v| !v.is_empty())
    })
}

/// Reads a CSeq value: a number below 2^31 and a method token.
fn parse_cseq(value: &str) -> Result<(u32, Method), ParseError> {
    let bad = || ParseError::CSeq(value.chars().take(80).collect());
    let mut parts = value.split_ascii_whitespace();
    let (Some(num), Some(method), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if !num.bytes().all(|b| b.is_ascii_digit()) || !method.bytes().all(is_token_byte) {
        return Err(bad());
    }
    let num: u32 = num.parse().map_err(|_| bad())?;
    if num >= 1 << 31 {
        return Err(bad());
    }
    Ok((num, Method::from_token(method)))
}

/// One Via element (RFC 3261 §20.42): transport, sent-by and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport token, upper-cased (`UDP`, `TCP`, `TLS`, `WS`, …).
    pub transport: String,
    /// Host of sent-by: a name, an IPv4 address or a bracketed IPv6 reference.
    pub host: String,
    /// Port of sent-by, when written.
    pub port: Option<u16>,
    /// Parameters in order; names as written, values without surrounding whitespace.
    pub params: Vec<(String, Option<String>)>,
}

impl Via {
    /// Reads one element (not a comma-joined line); `None` when it is not `SIP/2.0/T host`.
    pub fn parse(s: &str) -> Option<Via> {
        let mut parts = s.split(';');
        let head = parts.next()?;
        let mut proto = head.splitn(3, '/');
        let (name, version, rest) = (proto.next()?, proto.next()?, proto.next()?);
        if !name.trim().eq_ignore_ascii_case("SIP") || version.trim() != "2.0" {
            return None;
        }
        let rest = rest.trim_start();
        let end = rest
            .find(|c: char| c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        let transport = &rest[..end];
        let sent_by = rest[end..].trim();
        if transport.is_empty() || sent_by.is_empty() || !transport.bytes().all(is_token_byte) {
            return None;
        }
        let (host, port) = if let Some(stripped) = sent_by.strip_prefix('[') {
            let close = stripped.find(']')?;
            let host = &sent_by[..close + 2];
            match sent_by[close + 2..].trim() {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':')?.trim().parse().ok()?)),
            }
        } else {
            match sent_by.split_once(':') {
                Some((h, p)) if !p.contains(':') => (h.trim(), Some(p.trim().parse().ok()?)),
                // Unbracketed IPv6 is invalid but seen: the whole thing is the host.
                Some(_) => (sent_by, None),
                None => (sent_by, None),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return None;
        }
        let params = parts
            .filter_map(|p| {
                let p = p.trim();
                if p.is_empty() {
                    return None;
                }
                Some(match p.split_once('=') {
                    Some((n, v)) => (n.trim().to_string(), Some(v.trim().to_string())),
                    None => (p.to_string(), None),
                })
            })
            .collect();
        Some(Via {
            transport: transport.to_ascii_uppercase(),
            host: host.to_string(),
            port,
            params,
        })
    }

    /// A parameter: `None` if absent, `Some(None)` if present without a value (`;rport`).
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// The transaction id; RFC 3261 branches start with the magic cookie `z9hG4bK`.
    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten().filter(|b| !b.is_empty())
    }

    /// sent-by normalised for matching (`host:port`, host lower-cased, port as written or
    /// empty), so retransmissions from the same client compare equal.
    pub fn sent_by(&self) -> String {
        let mut s = self.host.to_ascii_lowercase();
        if let Some(p) = self.port {
            s.push(':');
            s.push_str(&p.to_string());
        }
        s
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        for (n, v) in &self.params {
            match v {
                Some(v) => write!(f, ";{n}={v}")?,
                None => write!(f, ";{n}")?,
            }
        }
        Ok(())
    }
}

/// A SIP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipRequest {
    /// The method of the request line.
    pub method: Method,
    /// The Request-URI as written.
    pub uri: String,
    /// Header lines.
    pub headers: Headers,
    /// The body (empty when none).
    pub body: Vec<u8>,
}

/// A SIP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipResponse {
    /// Status code, 100–699.
    pub code: u16,
    /// Reason phrase as written (may be empty).
    pub reason: String,
    /// Header lines.
    pub headers: Headers,
    /// The body (empty when none).
    pub body: Vec<u8>,
}

/// Either kind of SIP message, as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SipMessage {
    /// A request.
    Request(SipRequest),
    /// A response.
    Response(SipResponse),
}

/// Header helpers shared by requests, responses and messages, so callers need not reach into
/// `headers` for the common dialog and transaction identifiers.
macro_rules! header_helpers {
    () => {
        /// First value of a header (case-insensitive name).
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers().get(name)
        }
        /// Replaces every line of a header by one.
        pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
            self.headers_mut().set(name, value)
        }
        /// Appends a header line.
        pub fn add_header(&mut self, name: &str, value: impl Into<String>) {
            self.headers_mut().add(name, value)
        }
        /// Removes every line of a header; returns how many there were.
        pub fn remove_header(&mut self, name: &str) -> usize {
            self.headers_mut().remove(name)
        }
        /// `branch` of the topmost Via: the transaction id.
        pub fn top_via_branch(&self) -> Option<String> {
            self.headers().top_via_branch()
        }
        /// CSeq as (number, method).
        pub fn cseq(&self) -> Option<(u32, Method)> {
            self.headers().cseq()
        }
        /// The Call-ID value.
        pub fn call_id(&self) -> Option<&str> {
            self.headers().call_id()
        }
        /// The From tag.
        pub fn from_tag(&self) -> Option<&str> {
            self.headers().from_tag()
        }
        /// The To tag.
        pub fn to_tag(&self) -> Option<&str> {
            self.headers().to_tag()
        }
    };
}

impl SipRequest {
    /// A request with no headers or body, to be filled by the caller.
    pub fn new(method: Method, uri: impl Into<String>) -> Self {
        Self {
            method,
            uri: uri.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// The header lines.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The header lines, to change.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    header_helpers!();

    /// Writes the request: start line, headers, a computed Content-Length, the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + self.body.len());
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.uri.as_bytes());
        out.extend_from_slice(b" SIP/2.0\r\n");
        write_tail(&mut out, &self.headers, &self.body);
        out
    }

    /// Stamps the topmost Via as a server transport must on receipt (RFC 3261 §18.2.1,
    /// RFC 3581): `received` with the source address, and `rport` filled with the source port
    /// when the client asked for it, so responses find their way back through NATs.
    pub fn stamp_received(&mut self, source: SocketAddr) {
        if let Some(top) = self.headers.top_via_str() {
            let stamped = stamp_via(top, source);
            self.headers.replace_top_via(stamped);
        }
    }

    /// The ACK a client transaction sends for a non-2xx final response to this INVITE
    /// (RFC 3261 §17.1.1.3): same Request-URI, Call-ID, From, CSeq number and top Via as the
    /// INVITE, To from the response (with its tag), the INVITE's Route set.
    pub fn ack_for(&self, resp: &SipResponse) -> SipRequest {
        let mut ack = SipRequest::new(Method::Ack, self.uri.clone());
        if let Some(via) = self.headers.top_via_str() {
            ack.headers.add("Via", via);
        }
        ack.headers.add("Max-Forwards", "70");
        self.copy_to(&mut ack, "From");
        match resp.headers.get("To") {
            Some(to) => ack.headers.add("To", to),
            None => self.copy_to(&mut ack, "To"),
        }
        self.copy_to(&mut ack, "Call-ID");
        let num = self.headers.cseq().map(|(n, _)| n).unwrap_or(0);
        ack.headers.add("CSeq", format!("{num} ACK"));
        for route in self.headers.get_all("Route") {
            ack.headers.add("Route", route);
        }
        ack
    }

    /// The CANCEL of this request (RFC 3261 §9.1): same Request-URI, Call-ID, From, To, CSeq
    /// number and top Via (so it reaches the same server transaction), the same Route set.
    pub fn cancel(&self) -> SipRequest {
        let mut cancel = SipRequest::new(Method::Cancel, self.uri.clone());
        if let Some(via) = self.headers.top_via_str() {
            cancel.headers.add("Via", via);
        }
        cancel.headers.add("Max-Forwards", "70");
        self.copy_to(&mut cancel, "From");
        self.copy_to(&mut cancel, "To");
        self.copy_to(&mut cancel, "Call-ID");
        let num = self.headers.cseq().map(|(n, _)| n).unwrap_or(0);
        cancel.headers.add("CSeq", format!("{num} CANCEL"));
        for route in self.headers.get_all("Route") {
            cancel.headers.add("Route", route);
        }
        cancel
    }

    fn copy_to(&self, other: &mut SipRequest, name: &str) {
        if let Some(v) = self.headers.get(name) {
            other.headers.add(name, v);
        }
    }
}

/// Sets `received` to the real source and fills an empty `rport` (RFC 3581) on one Via element.
fn stamp_via(via: &str, source: SocketAddr) -> String {
    let mut out = String::with_capacity(via.len() + 40);
    for (i, p) in via.split(';').enumerate() {
        let t = p.trim();
        if i > 0 {
            let lower = t.to_ascii_lowercase();
            if lower.starts_with("received") && lower[8..].trim_start().starts_with('=') {
                continue;
            }
            out.push(';');
            if lower == "rport" {
                out.push_str("rport=");
                out.push_str(&source.port().to_string());
                continue;
            }
            out.push_str(t);
        } else {
            out.push_str(p.trim_end());
        }
    }
    out.push_str(";received=");
    out.push_str(&source.ip().to_string());
    out
}

impl SipResponse {
    /// A response with no headers or body, to be filled by the caller.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// A response to `req` (RFC 3261 §8.2.6): every Via line in order, From, To (with `to_tag`
    /// added unless the code is 100 or To already has a tag), Call-ID, CSeq, and for 100 the
    /// Timestamp (§8.2.6.1). Contact, Record-Route and the body are the TU's to add.
    pub fn to(req: &SipRequest, code: u16, reason: &str, to_tag: Option<&str>) -> SipResponse {
        let mut resp = SipResponse::new(code, reason);
        for via in req.headers.get_all("Via") {
            resp.headers.add("Via", via);
        }
        if let Some(from) = req.headers.get("From") {
            resp.headers.add("From", from);
        }
        if let Some(to) = req.headers.get("To") {
            match to_tag {
                Some(tag) if code > 100 && req.headers.to_tag().is_none() => {
                    resp.headers.add("To", format!("{to};tag={tag}"))
                }
                _ => resp.headers.add("To", to),
            }
        }
        for h in ["Call-ID", "CSeq"] {
            if let Some(v) = req.headers.get(h) {
                resp.headers.add(h, v);
            }
        }
        if code == 100 {
            if let Some(ts) = req.headers.get("Timestamp") {
                resp.headers.add("Timestamp", ts);
            }
        }
        resp
    }

    /// The header lines.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The header lines, to change.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    header_helpers!();

    /// Whether this is a provisional (1xx) response.
    pub fn is_provisional(&self) -> bool {
        self.code < 200
    }

    /// Writes the response: status line, headers, a computed Content-Length, the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + self.body.len());
        out.extend_from_slice(b"SIP/2.0 ");
        out.extend_from_slice(self.code.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        write_tail(&mut out, &self.headers, &self.body);
        out
    }
}

impl SipMessage {
    /// The header lines.
    pub fn headers(&self) -> &Headers {
        match self {
            SipMessage::Request(r) => &r.headers,
            SipMessage::Response(r) => &r.headers,
        }
    }

    /// The header lines, to change.
    pub fn headers_mut(&mut self) -> &mut Headers {
        match self {
            SipMessage::Request(r) => &mut r.headers,
            SipMessage::Response(r) => &mut r.headers,
        }
    }

    header_helpers!();

    /// The body.
    pub fn body(&self) -> &[u8] {
        match self {
            SipMessage::Request(r) => &r.body,
            SipMessage::Response(r) => &r.body,
        }
    }

    /// Writes the message as bytes (CRLF line ends, computed Content-Length).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            SipMessage::Request(r) => r.to_bytes(),
            SipMessage::Response(r) => r.to_bytes(),
        }
    }
}

impl From<SipRequest> for SipMessage {
    fn from(r: SipRequest) -> Self {
        SipMessage::Request(r)
    }
}

impl From<SipResponse> for SipMessage {
    fn from(r: SipResponse) -> Self {
        SipMessage::Response(r)
    }
}

fn write_tail(out: &mut Vec<u8>, headers: &Headers, body: &[u8]) {
    // Content-Length is always computed; written where the first one was, else last.
    let mut length_written = false;
    for (name, value) in &headers.list {
        if name.eq_ignore_ascii_case("Content-Length") {
            if !length_written {
                write_length(out, name, body.len());
                length_written = true;
            }
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !length_written {
        write_length(out, "Content-Length", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

fn write_length(out: &mut Vec<u8>, name: &str, len: usize) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Skips leading CR/LF (keep-alives and stray line ends before a message).
fn skip_line_ends(data: &[u8]) -> usize {
    data.iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(data.len())
}

/// Finds the blank line ending the header section: returns (end of headers, start of body).
/// Accepts CRLF CRLF, LF LF and mixtures.
fn find_header_end(data: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < data.len() {
        let nl = i + data[i..].iter().position(|&b| b == b'\n')?;
        match data.get(nl + 1) {
            Some(b'\n') => return Some((nl, nl + 2)),
            Some(b'\r') if data.get(nl + 2) == Some(&b'\n') => return Some((nl, nl + 3)),
            _ => i = nl + 1,
        }
    }
    None
}

/// Reads a header section (start line and headers, no blank line) into a message without body,
/// and returns the declared Content-Length if any.
fn parse_head(head: &[u8]) -> Result<(SipMessage, Option<usize>), ParseError> {
    if head.len() > MAX_HEADER_BYTES {
        return Err(ParseError::HeadersTooLarge);
    }
    for (i, &b) in head.iter().enumerate() {
        let bad = match b {
            b'\t' | b'\n' => false,
            // A CR that does not end a line could be read as a line end by the next hop.
            b'\r' => head.get(i + 1).is_some_and(|&n| n != b'\n'),
            0x00..=0x1f | 0x7f => true,
            _ => false,
        };
        if bad {
            return Err(ParseError::ControlChar);
        }
    }
    let head = std::str::from_utf8(head).map_err(|_| ParseError::NotText)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or("");
    let quote = |l: &str| l.chars().take(80).collect::<String>();

    let mut msg = parse_start_line(first.trim_end())?;
    let headers = msg.headers_mut();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            // Folded continuation (RFC 3261 §7.3.1): joined with one space.
            let Some((_, v)) = headers.list.last_mut() else {
                return Err(ParseError::Header(quote(line)));
            };
            let more = line.trim();
            if !more.is_empty() {
                if !v.is_empty() {
                    v.push(' ');
                }
                v.push_str(more);
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ParseError::Header(quote(line)))?;
        let name = name.trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(ParseError::Header(quote(line)));
        }
        let name = expand_compact(name).unwrap_or(name);
        headers
            .list
            .push((name.to_string(), value.trim().to_string()));
    }

    for h in ["Via", "From", "To", "Call-ID", "CSeq"] {
        if !headers.contains(h) {
            return Err(ParseError::Missing(h));
        }
    }
    let cseq = headers.get("CSeq").unwrap_or("");
    let (_, cseq_method) = parse_cseq(cseq)?;
    let mut length: Option<usize> = None;
    for v in headers.get_all("Content-Length") {
        let bad = || ParseError::ContentLength(v.chars().take(40).collect());
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: usize = v.parse().map_err(|_| bad())?;
        if length.is_some_and(|l| l != n) {
            return Err(bad());
        }
        length = Some(n);
    }
    if let SipMessage::Request(req) = &msg {
        if req.method != cseq_method {
            return Err(ParseError::CSeqMethod);
        }
    }
    Ok((msg, length))
}

/// Whether text starts with `SIP/` in any case (byte-wise: the text may not be ASCII).
fn starts_with_sip(s: &str) -> bool {
    s.as_bytes()
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
}

fn parse_start_line(line: &str) -> Result<SipMessage, ParseError> {
    let bad = || ParseError::StartLine(line.chars().take(80).collect());
    if starts_with_sip(line) {
        let (version, rest) = line.split_once(' ').ok_or_else(bad)?;
        if !version.eq_ignore_ascii_case("SIP/2.0") {
            return Err(ParseError::Version(version.chars().take(20).collect()));
        }
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let code: u16 = code.parse().map_err(|_| bad())?;
        if !(100..=699).contains(&code) {
            return Err(bad());
        }
        return Ok(SipMessage::Response(SipResponse::new(code, reason.trim())));
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(bad());
    }
    // A Request-URI has a scheme and no angle brackets or whitespace (RFC 4475 §3.1.2.8).
    let scheme_ok = uri.split_once(':').is_some_and(|(s, _)| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if !scheme_ok || uri.contains(['<', '>', '\t']) {
        return Err(bad());
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        if starts_with_sip(version) {
            return Err(ParseError::Version(version.chars().take(20).collect()));
        }
        return Err(bad());
    }
    Ok(SipMessage::Request(SipRequest::new(
        Method::from_token(method),
        uri,
    )))
}

fn set_body(msg: &mut SipMessage, body: &[u8]) {
    let b = match msg {
        SipMessage::Request(r) => &mut r.body,
        SipMessage::Response(r) => &mut r.body,
    };
    b.clear();
    b.extend_from_slice(body);
}

/// Reads one datagram (UDP). The body is what follows the headers; a Content-Length larger
/// than that is [`ParseError::Truncated`], a smaller one cuts the body to it (RFC 3261 §18.3).
/// Leading line ends are skipped; a datagram of only line ends is [`ParseError::Empty`].
pub fn parse_datagram(data: &[u8]) -> Result<SipMessage, ParseError> {
    let start = skip_line_ends(data);
    let data = &data[start..];
    if data.is_empty() {
        return Err(ParseError::Empty);
    }
    let Some((head_end, body_start)) = find_header_end(data) else {
        return Err(if data.len() > MAX_HEADER_BYTES {
            ParseError::HeadersTooLarge
        } else {
            ParseError::Truncated
        });
    };
    let (mut msg, length) = parse_head(&data[..head_end])?;
    let rest = &data[body_start..];
    let body = match length {
        Some(n) if n > rest.len() => return Err(ParseError::Truncated),
        Some(n) => &rest[..n],
        None => rest,
    };
    set_body(&mut msg, body);
    Ok(msg)
}

/// What a stream (TCP/TLS) carries: messages and keep-alives (RFC 5626 §3.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrame {
    /// A whole message.
    Message(SipMessage),
    /// A double CRLF ping, which the receiver answers with a single CRLF pong.
    Ping,
    /// A single CRLF (a pong, or a stray line end), answered with nothing.
    Pong,
}

/// Reads the next frame of a stream buffer: `Ok(None)` when more data is needed, otherwise the
/// frame and how many bytes it consumed. Messages are framed by Content-Length (absent = 0);
/// every error means the framing is lost and the connection should be closed.
pub fn parse_stream_frame(buf: &[u8]) -> Result<Option<(StreamFrame, usize)>, ParseError> {
    if buf.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
        if buf.starts_with(b"\r\n\r\n") {
            return Ok(Some((StreamFrame::Ping, 4)));
        }
        if buf.starts_with(b"\r\n") {
            // A lone CRLF, unless it may still become a ping.
            return match buf.get(2) {
                None => Ok(None),
                Some(b'\r') if buf.len() < 4 => Ok(None),
                _ => Ok(Some((StreamFrame::Pong, 2))),
            };
        }
        if buf == b"\r" {
            return Ok(None);
        }
        // A bare LF: skip it as a line end.
        return Ok(Some((StreamFrame::Pong, 1)));
    }
    let Some((head_end, body_start)) = find_header_end(buf) else {
        if buf.len() > MAX_HEADER_BYTES {
            return Err(ParseError::HeadersTooLarge);
        }
        return Ok(None);
    };
    let (mut msg, length) = parse_head(&buf[..head_end])?;
    let length = length.unwrap_or(0);
    if length > MAX_BODY_BYTES {
        return Err(ParseError::BodyTooLarge);
    }
    let Some(body) = buf.get(body_start..body_start + length) else {
        return Ok(None);
    };
    set_body(&mut msg, body);
    Ok(Some((StreamFrame::Message(msg), body_start + length)))
}

/// Reads the next message of a stream buffer, skipping keep-alive line ends: `Ok(None)` when
/// more data is needed, else the message and the bytes consumed (keep-alives before it
/// included). Use [`parse_stream_frame`] to drain and answer keep-alives while idle.
pub fn parse_stream(buf: &[u8]) -> Result<Option<(SipMessage, usize)>, ParseError> {
    let mut at = 0;
    loop {
        match parse_stream_frame(&buf[at..])? {
            None => return Ok(None),
            Some((StreamFrame::Message(m), n)) => return Ok(Some((m, at + n))),
            Some((_, n)) => at += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(data: &str) -> SipRequest {
        match parse_datagram(data.as_bytes()) {
            Ok(SipMessage::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    /// RFC 4475 §3.1.1.1 (wsinv) in spirit: compact and odd-cased names, whitespace before the
    /// colon, folding everywhere, escaped display-name quotes, unknown headers with odd values,
    /// two Via elements in one compact line with whitespace inside.
    const WSINV: &str = "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n\
TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n\
from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
MaX-fOrWaRdS: 0068\r\n\
Call-ID: wsinv.ndaksdj@192.0.2.1\r\n\
Content-Length   : 150\r\n\
cseq: 0009\r\n  INVITE\r\n\
Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\n\
s :\r\n\
NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n\
UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n\
Content-Type: application/sdp\r\n\
Route:\r\n <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n\
v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n \
SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\n\
m:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n  \
secondparam ; q = 0.33\r\n\r\n\
v=0\r\no=mhandley 29739 7272939 IN IP4 192.0.2.3\r\ns=-\r\nc=IN IP4 192.0.2.4\r\n\
t=0 0\r\nm=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n";

    #[test]
    fn tortuous_invite_parses() {
        let r = req(WSINV);
        assert_eq!(r.method, Method::Invite);
        assert_eq!(r.uri, "sip:vivekg@chair-dnrc.example.com;unknownparam");
        assert_eq!(r.to_tag(), Some("1918181833n"));
        assert_eq!(r.from_tag(), Some("98asjd8"));
        assert_eq!(r.cseq(), Some((9, Method::Invite)));
        assert_eq!(r.call_id(), Some("wsinv.ndaksdj@192.0.2.1"));
        assert_eq!(r.header("max-forwards"), Some("0068"));
        assert_eq!(r.header("Subject"), Some(""));
        assert_eq!(
            r.header("NewFangledHeader"),
            Some("newfangled value continued newfangled value")
        );
        assert_eq!(r.header("UnknownHeaderWithUnusualValue"), Some(";;,,;;,;"));
        let vias: Vec<Via> = r.headers.split("Via").filter_map(Via::parse).collect();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[0].transport, "UDP");
        assert_eq!(vias[0].host, "192.0.2.2");
        assert_eq!(vias[0].branch(), Some("390skdjuw"));
        assert_eq!(vias[1].transport, "TCP");
        assert_eq!(vias[1].host, "spindle.example.com");
        assert_eq!(vias[1].branch(), Some("z9hG4bK9ikj8"));
        assert_eq!(vias[2].host, "192.168.255.111");
        assert_eq!(vias[2].branch(), Some("z9hG4bK30239"));
        assert_eq!(r.top_via_branch().as_deref(), Some("390skdjuw"));
        assert_eq!(r.body.len(), 150);
        assert!(r.body.ends_with(b"a=rtpmap:31 LPC\r\n"));
        let contact = r.header("Contact").unwrap();
        assert!(contact.starts_with("\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com>"));
        assert_eq!(r.headers.split("Contact").count(), 1);
    }

    #[test]
    fn serialised_messages_read_back_identically() {
        let r = req(WSINV);
        let bytes = r.to_bytes();
        let back = match parse_datagram(&bytes).unwrap() {
            SipMessage::Request(b) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(back, r);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n")
        );
        assert!(text.contains("\r\nContent-Length: 150\r\ncseq: 0009 INVITE\r\n"));
        assert!(text.contains("secondparam ; q = 0.33\r\n\r\nv=0\r\n"));
        assert_eq!(text.matches("Content-Length").count(), 1);
    }

    #[test]
    fn unusual_method_and_uri_parse() {
        // RFC 4475 §3.1.1.2 (intmeth).
        let m = "!interesting-Method0123456789_*+`.%indeed'~";
        let text = format!(
            "{m} sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~\r\n\
To: \"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7F\" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>\r\n\
From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%=\"\u{440}\u{430}\u{431}\u{43e}\u{442}\u{430}\u{44e}\u{449}\u{438}\u{439}\";tag=_token~1'+`*%!-.\r\n\
Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}}{{\r\n\
CSeq: 139122385 {m}\r\nMax-Forwards: 255\r\nextensionHeader-!.%*+_`'~: \u{feff}\u{5927}\u{505c}\u{96fb}\r\nContent-Length: 0\r\n\r\n"
        );
        // The quoted control characters of the original are escaped in a quoted string; we
        // refuse raw controls, so that variant is checked as an error below.
        assert_eq!(
            parse_datagram(text.as_bytes()),
            Err(ParseError::ControlChar)
        );
        let clean = text.replace("BEL:\\\x07 NUL:\\\x00 DEL:\\\x7F", "BEL NUL DEL");
        let r = req(&clean);
        assert_eq!(r.method, Method::Other(m.to_string()));
        assert_eq!(r.cseq(), Some((139122385, Method::Other(m.to_string()))));
        assert_eq!(r.from_tag(), Some("_token~1'+`*%!-."));
        assert_eq!(r.top_via_branch().as_deref(), Some("z9hG4bK-.!%66*_+`'~"));
    }

    #[test]
    fn escaped_uris_ipv6_via_and_short_forms() {
        let r = req("INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0\r\n\
v: SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas3-111;rport, SIP/2.0/TCP [2001:db8::9:255];branch=z9hG4bKx\r\n\
f: <sip:a@[2001:db8::1]>;tag=f1\r\nt: sip:null-%00-null@example.com\r\ni: esc01@x\r\n\
CSeq: 1 INVITE\r\nl: 0\r\nc: application/sdp\r\nk: 100rel\r\nm: <sip:a@[2001:db8::1]:5070>\r\n\r\n");
        assert_eq!(r.uri, "sip:sips%3Auser%40example.com@example.net");
        let via = r.headers.top_via().unwrap();
        assert_eq!(via.host, "[2001:db8::9:1]");
        assert_eq!(via.port, Some(5070));
        assert_eq!(via.sent_by(), "[2001:db8::9:1]:5070");
        assert_eq!(via.param("rport"), Some(None));
        let second = r.headers.split("Via").nth(1).and_then(Via::parse).unwrap();
        assert_eq!(
            (second.host.as_str(), second.port),
            ("[2001:db8::9:255]", None)
        );
        assert_eq!(r.from_tag(), Some("f1"));
        assert_eq!(r.to_tag(), None);
        assert_eq!(r.header("Supported"), Some("100rel"));
        assert_eq!(r.header("Content-Type"), Some("application/sdp"));
        assert_eq!(r.header("Contact"), Some("<sip:a@[2001:db8::1]:5070>"));
    }

    #[test]
    fn responses_parse_with_odd_reasons() {
        for (text, code, reason) in [
            ("SIP/2.0 100 \r\n", 100, ""),
            ("SIP/2.0 200\r\n", 200, ""),
            ("SIP/2.0 420 Bad Extension\r\n", 420, "Bad Extension"),
            (
                "SIP/2.0 200 = 2**3 * 5**2 \u{43d}\u{43e}\r\n",
                200,
                "= 2**3 * 5**2 \u{43d}\u{43e}",
            ),
        ] {
            let msg = format!("{text}Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\nCall-ID: c\r\nCSeq: 5 OPTIONS\r\n\r\n");
            match parse_datagram(msg.as_bytes()) {
                Ok(SipMessage::Response(r)) => {
                    assert_eq!((r.code, r.reason.as_str()), (code, reason));
                    assert_eq!(r.to_tag(), Some("2"));
                    assert_eq!(r.cseq(), Some((5, Method::Options)));
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    const OPTS: &str = "OPTIONS sip:gw SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n";

    #[test]
    fn content_length_rules_for_datagrams() {
        let with = |cl: &str, body: &str| format!("{OPTS}{cl}\r\n{body}");
        // Larger than the data: truncated.
        assert_eq!(
            parse_datagram(with("Content-Length: 10\r\n", "abc").as_bytes()),
            Err(ParseError::Truncated)
        );
        // Smaller: cut.
        let r = req(&with("Content-Length: 2\r\n", "abcdef"));
        assert_eq!(r.body, b"ab");
        // Absent: the rest of the datagram.
        let r = req(&with("", "abcdef"));
        assert_eq!(r.body, b"abcdef");
        for bad in [
            "Content-Length: x\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Content-Length: 1\r\nl: 2\r\n",
        ] {
            assert!(
                matches!(
                    parse_datagram(with(bad, "ab").as_bytes()),
                    Err(ParseError::ContentLength(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        type Check = fn(&ParseError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (b"".to_vec(), |e| *e == ParseError::Empty),
            (b"\r\n\r\n".to_vec(), |e| *e == ParseError::Empty),
            (OPTS.as_bytes().to_vec(), |e| *e == ParseError::Truncated),
            (
                b"OPTIONS sip:gw SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n".to_vec(),
                |e| *e == ParseError::Truncated,
            ),
            (
                format!("OPTIONS  sip:gw SIP/2.0\r\n{}\r\n", &OPTS[24..]).into_bytes(),
                |e| matches!(e, ParseError::StartLine(_)),
            ),
            (
                format!("OPTIONS sip:gw SIP/7.0\r\n{}\r\n", &OPTS[24..]).into_bytes(),
                |e| matches!(e, ParseError::Version(_)),
            ),
            (
                format!("OPTIONS <sip:gw> SIP/2.0\r\n{}\r\n", &OPTS[24..]).into_bytes(),
                |e| matches!(e, ParseError::StartLine(_)),
            ),
            (
                format!("OPTIONS sip:gw SIP/2.0 x\r\n{}\r\n", &OPTS[24..]).into_bytes(),
                |e| matches!(e, ParseError::StartLine(_)),
            ),
            (
                format!("OPTIONS gw SIP/2.0\r\n{}\r\n", &OPTS[24..]).into_bytes(),
                |e| matches!(e, ParseError::StartLine(_)),
            ),
            (b"SIP/2.0 4294967301 Big\r\nVia: x\r\n\r\n".to_vec(), |e| {
                matches!(e, ParseError::StartLine(_))
            }),
            (b"SIP/2.0 99 Small\r\nVia: x\r\n\r\n".to_vec(), |e| {
                matches!(e, ParseError::StartLine(_))
            }),
            (format!("{OPTS}Bad Header: x\r\n\r\n").into_bytes(), |e| {
                matches!(e, ParseError::Header(_))
            }),
            (format!("{OPTS}NoColon\r\n\r\n").into_bytes(), |e| {
                matches!(e, ParseError::Header(_))
            }),
            (format!(" folded-first\r\n{OPTS}\r\n").into_bytes(), |e| {
                matches!(e, ParseError::StartLine(_))
            }),
            (
                OPTS.replace("Call-ID: c\r\n", "")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| *e == ParseError::Missing("Call-ID"),
            ),
            (
                OPTS.replace("1 OPTIONS", "1 INVITE")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| *e == ParseError::CSeqMethod,
            ),
            (
                OPTS.replace("1 OPTIONS", "36893488147419103232 OPTIONS")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| matches!(e, ParseError::CSeq(_)),
            ),
            (
                OPTS.replace("1 OPTIONS", "2147483648 OPTIONS")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| matches!(e, ParseError::CSeq(_)),
            ),
            (
                OPTS.replace("1 OPTIONS", "OPTIONS")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| matches!(e, ParseError::CSeq(_)),
            ),
            (
                OPTS.replace("Call-ID: c", "Call-ID: c\0d")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| *e == ParseError::ControlChar,
            ),
            (
                OPTS.replace("Call-ID: c", "Call-ID: c\rd")
                    .into_bytes()
                    .into_iter()
                    .chain(*b"\r\n")
                    .collect(),
                |e| *e == ParseError::ControlChar,
            ),
            (
                {
                    let mut v = OPTS.as_bytes().to_vec();
                    v[30] = 0xff;
                    v.extend_from_slice(b"\r\n");
                    v
                },
                |e| *e == ParseError::NotText,
            ),
            (b"\xde\xad\xbe\xef\x00\x01\x02\r\n\r\n".to_vec(), |e| {
                *e == ParseError::ControlChar
            }),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
                |e| *e == ParseError::Truncated,
            ),
            // Multi-byte characters where "SIP/" would be: no slicing inside a character.
            ("SIP\u{e9}2.0 200 OK\r\n\r\n".as_bytes().to_vec(), |e| {
                matches!(e, ParseError::StartLine(_))
            }),
            (
                "OPTIONS sip:gw SIP\u{e9}\r\nVia: x\r\n\r\n"
                    .as_bytes()
                    .to_vec(),
                |e| matches!(e, ParseError::StartLine(_)),
            ),
        ];
        for (i, (data, ok)) in cases.iter().enumerate() {
            match parse_datagram(data) {
                Err(e) => assert!(ok(&e), "case {i}: {e:?}"),
                Ok(m) => panic!("case {i} parsed: {m:?}"),
            }
        }
    }

    #[test]
    fn huge_headers_are_refused() {
        let mut big = OPTS.to_string();
        while big.len() <= MAX_HEADER_BYTES {
            big.push_str("X-Padding: 0123456789012345678901234567890123456789012345678901234567890123456789\r\n");
        }
        big.push_str("\r\n");
        assert_eq!(
            parse_datagram(big.as_bytes()),
            Err(ParseError::HeadersTooLarge)
        );
        // Without the blank line, both readers refuse rather than wait.
        let open = &big.as_bytes()[..big.len() - 2];
        assert_eq!(parse_datagram(open), Err(ParseError::HeadersTooLarge));
        assert_eq!(parse_stream(open), Err(ParseError::HeadersTooLarge));
        // One enormous line, too.
        let line = format!("{OPTS}X: {}\r\n\r\n", "a".repeat(70_000));
        assert_eq!(
            parse_datagram(line.as_bytes()),
            Err(ParseError::HeadersTooLarge)
        );
    }

    #[test]
    fn stream_framing() {
        let one = format!("{OPTS}Content-Length: 4\r\n\r\nbody");
        let two = format!("{OPTS}l: 0\r\n\r\n");
        let stream = format!("\r\n\r\n\r\n{one}{two}");
        let bytes = stream.as_bytes();
        // Every prefix short of the first message needs more data (keep-alives aside).
        let first_end = 6 + one.len();
        for cut in 6..first_end {
            assert_eq!(parse_stream(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let (m, used) = parse_stream(bytes).unwrap().unwrap();
        assert_eq!(used, first_end);
        assert_eq!(m.body(), b"body");
        let (m2, used2) = parse_stream(&bytes[used..]).unwrap().unwrap();
        assert_eq!(used2, two.len());
        assert!(m2.body().is_empty());
        assert_eq!(parse_stream(&bytes[used + used2..]), Ok(None));

        // Keep-alive frames, one by one.
        assert_eq!(
            parse_stream_frame(b"\r\n\r\nX"),
            Ok(Some((StreamFrame::Ping, 4)))
        );
        assert_eq!(
            parse_stream_frame(b"\r\nOPT"),
            Ok(Some((StreamFrame::Pong, 2)))
        );
        assert_eq!(parse_stream_frame(b"\r\n"), Ok(None));
        assert_eq!(parse_stream_frame(b"\r\n\r"), Ok(None));
        assert_eq!(parse_stream_frame(b""), Ok(None));

        // A body bigger than allowed is refused before it is buffered.
        let huge = format!("{OPTS}Content-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert_eq!(parse_stream(huge.as_bytes()), Err(ParseError::BodyTooLarge));
        // Garbage on a stream is an error, not a wait.
        assert!(parse_stream(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
    }

    #[test]
    fn random_junk_never_panics() {
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = WSINV.as_bytes();
        for _ in 0..3000 {
            let mut data = seed.to_vec();
            for _ in 0..(next() % 8) {
                let i = (next() as usize) % data.len();
                match next() % 3 {
                    0 => data[i] = next() as u8,
                    1 => {
                        data.truncate(i.max(1));
                    }
                    _ => data.insert(i, b"\r\n:;,<>\"[] \0"[(next() % 12) as usize]),
                }
            }
            for msg in [
                parse_datagram(&data).ok(),
                parse_stream(&data).ok().flatten().map(|(m, _)| m),
            ]
            .into_iter()
            .flatten()
            {
                // Whatever parses is written back as something that parses to the same bytes.
                let bytes = msg.to_bytes();
                let back = parse_datagram(&bytes).unwrap();
                assert_eq!(back.to_bytes(), bytes);
            }
        }
    }

    #[test]
    fn responses_echo_the_request() {
        let mut r = req(&format!(
            "{}Via: SIP/2.0/UDP proxy;branch=z9hG4bK2\r\nTimestamp: 54\r\nRoute: <sip:p;lr>\r\n\r\n",
            OPTS.replace("OPTIONS sip:gw", "INVITE sip:gw").replace("1 OPTIONS", "7 INVITE")
        ));
        r.stamp_received("192.0.2.9:6000".parse().unwrap());
        assert_eq!(
            r.headers.top_via_str(),
            Some("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;received=192.0.2.9")
        );
        let trying = SipResponse::to(&r, 100, "Trying", Some("x"));
        assert_eq!(trying.header("To"), Some("<sip:b@h>"));
        assert_eq!(trying.header("Timestamp"), Some("54"));
        let busy = SipResponse::to(&r, 486, "Busy Here", Some("t9"));
        assert_eq!(busy.to_tag(), Some("t9"));
        assert_eq!(busy.headers.get_all("Via").count(), 2);
        assert_eq!(busy.header("Timestamp"), None);
        assert_eq!(busy.cseq(), Some((7, Method::Invite)));
        let text = String::from_utf8(busy.to_bytes()).unwrap();
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;received=192.0.2.9\r\nVia: SIP/2.0/UDP proxy;branch=z9hG4bK2\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=t9\r\n"), "{text}");

        let ack = r.ack_for(&busy);
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, "sip:gw");
        assert_eq!(ack.headers.get_all("Via").count(), 1);
        assert_eq!(ack.top_via_branch().as_deref(), Some("z9hG4bK1"));
        assert_eq!(ack.to_tag(), Some("t9"));
        assert_eq!(ack.cseq(), Some((7, Method::Ack)));
        assert_eq!(ack.header("Route"), Some("<sip:p;lr>"));

        let cancel = r.cancel();
        assert_eq!(cancel.cseq(), Some((7, Method::Cancel)));
        assert_eq!(cancel.top_via_branch().as_deref(), Some("z9hG4bK1"));
        assert_eq!(cancel.to_tag(), None);
        assert_eq!(cancel.call_id(), Some("c"));
        // Both read back as valid requests.
        for m in [ack, cancel] {
            assert!(parse_datagram(&m.to_bytes()).is_ok());
        }
    }

    #[test]
    fn rport_and_received_stamping() {
        let mut r = req(&format!(
            "{}\r\n",
            OPTS.replace(
                "branch=z9hG4bK1",
                "rport;branch=z9hG4bK1;received=1.1.1.1, SIP/2.0/UDP b;rport"
            )
        ));
        r.stamp_received("[2001:db8::5]:7000".parse().unwrap());
        assert_eq!(
            r.header("Via"),
            Some("SIP/2.0/UDP 10.0.0.1;rport=7000;branch=z9hG4bK1;received=2001:db8::5, SIP/2.0/UDP b;rport")
        );
    }

    #[test]
    fn header_editing() {
        let mut h = Headers::new();
        h.add("Via", "a");
        h.add("From", "f");
        h.add("via", "b, c");
        h.prepend("Via", "top");
        assert_eq!(h.split("Via").collect::<Vec<_>>(), ["top", "a", "b", "c"]);
        h.set("VIA", "only");
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [("Via", "only"), ("From", "f")]
        );
        assert_eq!(h.remove("via"), 1);
        assert_eq!(h.len(), 1);
        h.add("Contact", "\"a, b\" <sip:x@y;p=1,2>, <sip:z@w>");
        assert_eq!(
            h.split("Contact").collect::<Vec<_>>(),
            ["\"a, b\" <sip:x@y;p=1,2>", "<sip:z@w>"]
        );
    }

    #[test]
    fn tags_are_header_params_not_uri_params() {
        let mut h = Headers::new();
        h.add("From", "\"x;tag=no\" <sip:a@h;tag=no>;tag=yes");
        h.add("To", "sip:b@h;tag=t");
        assert_eq!(h.from_tag(), Some("yes"));
        assert_eq!(h.to_tag(), Some("t"));
    }
}
