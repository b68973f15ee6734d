//! A small, forgiving SIP request reader and a response writer that copies the headers a
//! response must echo (RFC 3261 §8.2.6.2), with RFC 3581 `received`/`rport` on the top Via.
//!
//! It accepts what real UAs send and rsip 0.4 trips on (compact header names, folded lines,
//! bare-LF line ends); it never panics on input. The full transaction layer lands with the SIP
//! stack; this is what the Worker needs to answer requests on its own.

use std::net::SocketAddr;

/// Why a datagram is not a SIP request we can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not UTF-8 in the header section")]
    NotText,
    #[error("no end of headers")]
    Truncated,
    #[error("malformed request line {0:?}")]
    RequestLine(String),
    #[error("a SIP response, not a request")]
    IsResponse,
    #[error("malformed header line {0:?}")]
    Header(String),
    #[error("missing mandatory header {0}")]
    Missing(&'static str),
}

/// A parsed request: request line and headers with full names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub uri: String,
    headers: Vec<(String, String)>,
}

fn full_name(name: &str) -> &str {
    // RFC 3261 §7.3.3 compact forms.
    match name.to_ascii_lowercase().as_str() {
        "v" => "Via",
        "f" => "From",
        "t" => "To",
        "i" => "Call-ID",
        "m" => "Contact",
        "l" => "Content-Length",
        "c" => "Content-Type",
        "k" => "Supported",
        "s" => "Subject",
        "e" => "Content-Encoding",
        _ => name,
    }
}

impl Request {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The same request seen by this reader, built from the full message model without
    /// writing and re-reading it (the routing still speaks this type).
    pub fn from_msg(req: &super::msg::SipRequest) -> Self {
        Request {
            method: req.method.as_str().to_string(),
            uri: req.uri.clone(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Every header line as (name, value), in order.
    pub fn all(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Every value of a header, in order (lines and comma-joined values alike kept as written).
    pub fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the header section of a datagram as a request.
pub fn parse_request(data: &[u8]) -> Result<Request, ParseError> {
    let end = find(data, b"\r\n\r\n")
        .or_else(|| find(data, b"\n\n"))
        .ok_or(ParseError::Truncated)?;
    let head = std::str::from_utf8(&data[..end]).map_err(|_| ParseError::NotText)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines
        .by_ref()
        .find(|l| !l.is_empty())
        .ok_or(ParseError::Truncated)?;
    if first.starts_with("SIP/") {
        return Err(ParseError::IsResponse);
    }
    let mut parts = first.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::RequestLine(first.chars().take(80).collect()));
    };
    if !version.eq_ignore_ascii_case("SIP/2.0")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return Err(ParseError::RequestLine(first.chars().take(80).collect()));
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            // Folded continuation (RFC 3261 §7.3.1).
            let (_, v) = headers
                .last_mut()
                .ok_or_else(|| ParseError::Header(line.chars().take(80).collect()))?;
            v.push(' ');
            v.push_str(line.trim());
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ParseError::Header(line.chars().take(80).collect()))?;
        let name = name.trim();
        if name.is_empty() || name.contains(' ') {
            return Err(ParseError::Header(line.chars().take(80).collect()));
        }
        headers.push((full_name(name).to_string(), value.trim().to_string()));
    }
    let req = Request {
        method: method.to_string(),
        uri: uri.to_string(),
        headers,
    };
    for h in ["Via", "From", "To", "Call-ID", "CSeq"] {
        if req.header(h).is_none() {
            return Err(ParseError::Missing(h));
        }
    }
    Ok(req)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The user part of the SIP/SIPS/tel URI in a From/To/Request-URI value.
pub fn uri_user(value: &str) -> Option<String> {
    let uri = match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(';').next().unwrap_or(value),
    };
    let rest = uri
        .trim()
        .strip_prefix("sip:")
        .or_else(|| uri.trim().strip_prefix("sips:"))
        .or_else(|| uri.trim().strip_prefix("tel:"))?;
    // The last `@` separates the host: a PBX may send `@username` unescaped.
    let user = match rest.rsplit_once('@') {
        Some((u, _)) => u,
        None if uri.trim().starts_with("tel:") => rest,
        None => return None,
    };
    let user = user.split([';', ':']).next().unwrap_or(user);
    (!user.is_empty()).then(|| user.to_string())
}

/// The `host[:port]` of the SIP URI in a Contact/From/To value.
pub fn uri_host_port(value: &str) -> Option<String> {
    let uri = match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(';').next().unwrap_or(value),
    };
    let rest = uri
        .trim()
        .strip_prefix("sip:")
        .or_else(|| uri.trim().strip_prefix("sips:"))?;
    let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let host = host.split([';', '?']).next().unwrap_or(host);
    (!host.is_empty()).then(|| host.to_string())
}

/// Writes a final or provisional response to `req` received from `source`.
pub fn response(
    req: &Request,
    code: u16,
    reason: &str,
    source: SocketAddr,
    to_tag: &str,
    server: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for (i, via) in req.headers("Via").enumerate() {
        let via = if i == 0 {
            // Only the topmost element of a comma-joined line is ours to stamp.
            match split_first_element(via) {
                (first, Some(rest)) => format!("{}, {rest}", stamp_via(first, source)),
                (first, None) => stamp_via(first, source),
            }
        } else {
            via.to_string()
        };
        out.push_str(&format!("Via: {via}\r\n"));
    }
    if let Some(from) = req.header("From") {
        out.push_str(&format!("From: {from}\r\n"));
    }
    if let Some(to) = req.header("To") {
        let needs_tag = code > 100 && !to.to_ascii_lowercase().contains(";tag=");
        if needs_tag {
            out.push_str(&format!("To: {to};tag={to_tag}\r\n"));
        } else {
            out.push_str(&format!("To: {to}\r\n"));
        }
    }
    for h in ["Call-ID", "CSeq"] {
        if let Some(v) = req.header(h) {
            out.push_str(&format!("{h}: {v}\r\n"));
        }
    }
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Server: {server}\r\nContent-Length: 0\r\n\r\n"));
    out
}

/// Splits a header value at its first comma outside quotes and brackets.
fn split_first_element(value: &str) -> (&str, Option<&str>) {
    let (mut quoted, mut depth) = (false, 0i32);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' | '[' if !quoted => depth += 1,
            '>' | ']' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                return (value[..i].trim(), Some(value[i + 1..].trim()))
            }
            _ => {}
        }
    }
    (value.trim(), None)
}

/// Where a response to `req` goes (RFC 3261 §18.2.2, RFC 3581): the source address, and the
/// source port when the top Via asks for `rport`, else the Via's sent-by port (default 5060).
pub fn response_target(req: &Request, source: SocketAddr) -> SocketAddr {
    let Some(via) = req.header("Via") else {
        return source;
    };
    let (top, _) = split_first_element(via);
    let mut params = top.split(';');
    let sent_by = params
        .next()
        .and_then(|proto_host| proto_host.split_whitespace().nth(1))
        .unwrap_or("");
    let wants_rport = params.any(|p| {
        let p = p.trim().to_ascii_lowercase();
        p == "rport" || p.starts_with("rport=")
    });
    if wants_rport {
        return source;
    }
    // sent-by is host[:port]; IPv6 hosts are bracketed.
    let port = match sent_by.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            port.parse().unwrap_or(5060)
        }
        _ => 5060,
    };
    SocketAddr::new(source.ip(), port)
}

/// Sets `received` to the real source and fills an empty `rport` (RFC 3581) on one Via element.
fn stamp_via(via: &str, source: SocketAddr) -> String {
    let mut params: Vec<String> = via.split(';').map(str::to_string).collect();
    params.retain(|p| !p.trim().to_ascii_lowercase().starts_with("received="));
    for p in params.iter_mut().skip(1) {
        if p.trim().eq_ignore_ascii_case("rport") {
            *p = format!("rport={}", source.port());
        }
    }
    params.push(format!("received={}", source.ip()));
    params.join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: &str = "OPTIONS sip:gw@127.0.0.1 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK1;rport\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:pbx@10.0.0.1>;tag=abc\r\n\
        To: <sip:gw@127.0.0.1>\r\n\
        Call-ID: 1@10.0.0.1\r\n\
        CSeq: 1 OPTIONS\r\n\
        Content-Length: 0\r\n\r\n";

    #[test]
    fn answers_echo_dialog_headers_and_stamp_via() {
        let req = parse_request(OPTIONS.as_bytes()).unwrap();
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let resp = response(
            &req,
            503,
            "No response from Manager",
            src,
            "t1",
            "siptg",
            &[],
        );
        assert!(resp.starts_with("SIP/2.0 503 No response from Manager\r\n"));
        assert!(resp.contains(
            "Via: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK1;rport=40000;received=127.0.0.1\r\n"
        ));
        assert!(resp.contains("To: <sip:gw@127.0.0.1>;tag=t1\r\n"));
        assert!(resp.contains("CSeq: 1 OPTIONS\r\n"));
        assert!(resp.ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn only_the_top_via_element_is_stamped() {
        let msg = "OPTIONS sip:gw SIP/2.0\r\nVia: SIP/2.0/UDP a:5062;branch=z9hG4bK1;received=1.2.3.4, SIP/2.0/UDP b;branch=z9hG4bK2;rport\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:a@h>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let req = parse_request(msg.as_bytes()).unwrap();
        let src: SocketAddr = "127.0.0.9:7000".parse().unwrap();
        let resp = response(&req, 200, "OK", src, "t", "siptg", &[]);
        let want = "Via: SIP/2.0/UDP a:5062;branch=z9hG4bK1;received=127.0.0.9, SIP/2.0/UDP b;branch=z9hG4bK2;rport\r\n";
        assert!(resp.contains(want), "{resp}");
        // No rport on the top Via: answer to the sent-by port at the source address.
        assert_eq!(
            response_target(&req, src),
            "127.0.0.9:5062".parse().unwrap()
        );
    }

    #[test]
    fn rport_sends_the_response_to_the_source_port() {
        let req = parse_request(OPTIONS.as_bytes()).unwrap();
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(response_target(&req, src), src);
    }

    #[test]
    fn compact_and_folded_headers_parse() {
        let msg = "REGISTER sip:gw SIP/2.0\nv: SIP/2.0/UDP h;branch=z9hG4bKx\nf: <sip:a@h>;tag=1\nt: <sip:a@h>\ni: x\nCSeq: 2\n  REGISTER\n\n";
        let req = parse_request(msg.as_bytes()).unwrap();
        assert_eq!(req.method, "REGISTER");
        assert_eq!(req.header("call-id"), Some("x"));
        assert_eq!(req.header("CSeq"), Some("2 REGISTER"));
    }

    #[test]
    fn junk_is_an_error_never_a_panic() {
        for junk in [
            &b""[..],
            b"\xff\xfe\r\n\r\n",
            b"INVITE\r\n\r\n",
            b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\nno colon here\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\nVia: x\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\n",
        ] {
            assert!(parse_request(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn users_from_uris() {
        assert_eq!(
            uri_user("\"PBX\" <sip:100@pbx.local;transport=udp>;tag=1").as_deref(),
            Some("100")
        );
        assert_eq!(
            uri_user("sip:+15551234567@gw;user=phone").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            uri_user("<tel:+15551234567>").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(uri_user("sip:gw.example.com").as_deref(), None);
    }
}
