//! A fake PBX for the gateway tests: one UDP socket on 127.0.0.1, SIP as text in and out. Each
//! test file adds what only it needs (`impl Pbx` blocks there: a digest server's challenges,
//! MESSAGEs, BYEs); this is what they share.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// A fake PBX's socket.
pub struct Pbx {
    pub sock: UdpSocket,
    pub addr: SocketAddr,
}

/// One SIP message as received.
pub struct Msg {
    pub text: String,
    pub from: SocketAddr,
}

impl Msg {
    pub fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or_default()
    }

    /// The request's method (`SIP/2.0` for a response).
    pub fn method(&self) -> &str {
        self.first_line().split(' ').next().unwrap_or_default()
    }

    /// A header of the head (not the body), by name, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or_default();
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("")
    }

    /// `(code, reason)` of a response.
    pub fn status(&self) -> (u16, String) {
        let rest = self
            .first_line()
            .strip_prefix("SIP/2.0 ")
            .unwrap_or_default();
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        (code.parse().unwrap_or(0), reason.to_string())
    }

    /// The top Via's branch.
    pub fn branch(&self) -> Option<&str> {
        self.header("Via")?
            .split(';')
            .find_map(|p| p.strip_prefix("branch="))
    }
}

impl Pbx {
    pub async fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        Pbx { sock, addr }
    }

    /// The next message within `wait`.
    pub async fn recv(&self, wait: Duration) -> Option<Msg> {
        let mut buf = vec![0u8; 65536];
        let (n, from) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(Msg {
            text: String::from_utf8_lossy(&buf[..n]).to_string(),
            from,
        })
    }

    /// The next request with `method` within `wait`; REGISTERs (ours, when siptg registers to
    /// this PBX) are answered 200 on the way, anything else is skipped.
    pub async fn request(&self, method: &str, wait: Duration) -> Option<Msg> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv(left).await?;
            if m.method() == "REGISTER" && method != "REGISTER" {
                self.respond(&m, 200, "OK").await;
            }
            if m.method() == method {
                return Some(m);
            }
        }
    }

    /// Answers `req` with `code`; a 2xx to an INVITE carries our SDP (PCMA) and every answer
    /// to an INVITE our Contact.
    pub async fn respond(&self, req: &Msg, code: u16, reason: &str) {
        self.respond_with(req, code, reason, &[]).await
    }

    /// As [`Pbx::respond`], with `extra` headers.
    pub async fn respond_with(&self, req: &Msg, code: u16, reason: &str, extra: &[(&str, String)]) {
        let to = req.header("To").unwrap_or_default();
        let to = if to.contains(";tag=") || code == 100 {
            to.to_string()
        } else {
            format!("{to};tag=pbx{}", self.addr.port())
        };
        let invite = req.method() == "INVITE";
        let body = if code == 200 && invite {
            format!(
                "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n",
                self.addr.port() + 2
            )
        } else {
            String::new()
        };
        let mut headers = String::new();
        if invite {
            headers.push_str(&format!("Contact: <sip:100@{}>\r\n", self.addr));
        }
        for (n, v) in extra {
            headers.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            headers.push_str("Content-Type: application/sdp\r\n");
        }
        let msg = format!(
            "SIP/2.0 {code} {reason}\r\nVia: {}\r\nFrom: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
             {headers}Content-Length: {}\r\n\r\n{body}",
            req.header("Via").unwrap_or_default(),
            req.header("From").unwrap_or_default(),
            req.header("Call-ID").unwrap_or_default(),
            req.header("CSeq").unwrap_or_default(),
            body.len()
        );
        self.sock.send_to(msg.as_bytes(), req.from).await.unwrap();
    }

    /// Hangs up the call `invite` we answered: BYE in its dialog; siptg's status line.
    pub async fn bye(&self, invite: &Msg) -> Option<String> {
        let target = invite
            .header("Contact")
            .map(|c| c.trim_matches(|ch| ch == '<' || ch == '>').to_string())
            .unwrap_or_default();
        let msg = format!(
            "BYE {target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKbye{port};rport\r\nMax-Forwards: 70\r\n\
             From: {to};tag=pbx{port}\r\nTo: {from}\r\nCall-ID: {cid}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
            me = self.addr,
            port = self.addr.port(),
            to = invite.header("To").unwrap_or_default(),
            from = invite.header("From").unwrap_or_default(),
            cid = invite.header("Call-ID").unwrap_or_default(),
        );
        self.sock.send_to(msg.as_bytes(), invite.from).await.ok()?;
        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv(left).await?;
            if m.first_line().starts_with("SIP/2.0 ") && m.header("CSeq") == Some("1 BYE") {
                return Some(m.first_line().to_string());
            }
        }
    }
}
