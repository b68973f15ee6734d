//! Text messages between Telegram and the PBX (RFC 3428 `MESSAGE`), sans-IO: which SIP
//! `MESSAGE` bodies a Telegram chat can carry, the `MESSAGE` request siptg sends a PBX for a
//! Telegram user's text, and which texts stay out of it (keypad digits during a call). The
//! runtime ([`super::runtime`]) and the SIP core move the bytes; the Manager picks the gateway
//! and the PBXs exactly as for calls.

use crate::link::HuntTarget;
use crate::sip::call::{branch, tag};
use crate::sip::msg::{Method, SipRequest};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The one body type siptg carries both ways.
pub const TEXT_PLAIN: &str = "text/plain;charset=UTF-8";

/// Telegram's longest text message, in characters.
pub const MAX_TEXT_CHARS: usize = 4096;

/// Why a PBX's `MESSAGE` body cannot become a Telegram text: the SIP answer it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A body that is not `text/plain` (or not in UTF-8): `415` with `Accept: text/plain`.
    #[error("415 Unsupported Media Type ({0})")]
    Unsupported(String),
    /// No text at all: Telegram refuses empty messages (`400`).
    #[error("400 Empty message body")]
    Empty,
    /// Bytes that are not UTF-8 although the type says so (`400`).
    #[error("400 Message body is not UTF-8")]
    NotUtf8,
    /// Longer than Telegram takes (`413`).
    #[error("413 Message longer than {MAX_TEXT_CHARS} characters")]
    TooLong,
}

impl BodyError {
    /// The status, reason and extra headers of the answer to the `MESSAGE`.
    pub fn response(&self) -> (u16, &'static str, Vec<(String, String)>) {
        match self {
            BodyError::Unsupported(_) => (
                415,
                "Unsupported Media Type",
                vec![("Accept".to_string(), "text/plain".to_string())],
            ),
            BodyError::Empty => (400, "Empty message body", Vec::new()),
            BodyError::NotUtf8 => (400, "Message body is not UTF-8", Vec::new()),
            BodyError::TooLong => (413, "Request Entity Too Large", Vec::new()),
        }
    }
}

/// The text of a PBX's `MESSAGE`: its `Content-Type` must be `text/plain` (a missing type
/// counts as plain text, as RFC 3261 §7.4.1 reads for a body without one), its charset UTF-8 or
/// US-ASCII (or absent), and its body non-empty UTF-8 within Telegram's length.
pub fn text_of(content_type: Option<&str>, body: &[u8]) -> Result<String, BodyError> {
    if let Some(ct) = content_type {
        let mut parts = ct.split(';');
        let media = parts.next().unwrap_or_default().trim();
        if !media.eq_ignore_ascii_case("text/plain") {
            return Err(BodyError::Unsupported(media.to_string()));
        }
        for p in parts {
            let Some((name, value)) = p.split_once('=') else {
                continue;
            };
            if name.trim().eq_ignore_ascii_case("charset") {
                let cs = value.trim().trim_matches('"');
                if !["utf-8", "utf8", "us-ascii"]
                    .iter()
                    .any(|ok| cs.eq_ignore_ascii_case(ok))
                {
                    return Err(BodyError::Unsupported(format!("charset {cs}")));
                }
            }
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    if text.trim().is_empty() {
        return Err(BodyError::Empty);
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(BodyError::TooLong);
    }
    Ok(text.to_string())
}

/// Is `text` what a Telegram user types on the keypad during a call (1–32 of `0-9*#A-D`)?
/// Such a text from a user in a call with the gateway is DTMF for that call, not a message.
pub fn is_keypad(text: &str) -> bool {
    let t = text.trim();
    !t.is_empty()
        && t.len() <= 32
        && t.chars()
            .all(|c| matches!(c.to_ascii_uppercase(), '0'..='9' | '*' | '#' | 'A'..='D'))
}

/// Who a Telegram user's text is from, as the PBX sees it (the gateway's Caller ID and Caller
/// Name templates, and the `X-TG-*` headers, as for calls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender<'a> {
    /// The From user (the rendered Caller ID), as the PBX matches callers by it.
    pub user: &'a str,
    /// The From display name (the rendered Caller Name), if any.
    pub name: Option<&'a str>,
    /// `X-TG-ID`, `X-TG-Username`, `X-TG-Phone`, `X-TG-Name`: who wrote, for PBX routing and
    /// CRM lookups, as on calls.
    pub headers: &'a [(String, String)],
}

/// The `MESSAGE` to PBX `target` carrying `text` from `sender`; `local` is our SIP address
/// (Via and From host). Every request is its own transaction with a fresh Call-ID (RFC 3428
/// §4: a `MESSAGE` outside a dialog).
pub fn request(
    target: &HuntTarget,
    sender: &Sender<'_>,
    text: &str,
    local: SocketAddr,
) -> SipRequest {
    // A From user keeps the characters a SIP user part may hold unescaped.
    let user: String = sender
        .user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "+-_.!~*'()&=$,;?/".contains(*c))
        .collect();
    let user = if user.is_empty() {
        "telegram".to_string()
    } else {
        user
    };
    let name = sender
        .name
        .map(|n| format!("\"{}\" ", n.replace(['"', '\\'], "")))
        .unwrap_or_default();
    let mut req = SipRequest::new(Method::Message, target.request_uri.clone());
    let h = req.headers_mut();
    h.add(
        "Via",
        format!("SIP/2.0/UDP {local};branch={};rport", branch()),
    );
    h.add("Max-Forwards", "70");
    h.add(
        "From",
        format!("{name}<sip:{user}@{}>;tag={}", local.ip(), tag()),
    );
    h.add("To", format!("<{}>", target.request_uri));
    h.add("Call-ID", format!("{:032x}@siptg", rand::random::<u128>()));
    h.add("CSeq", "1 MESSAGE");
    for (n, v) in sender.headers {
        h.add(n, v.clone());
    }
    h.add("Content-Type", TEXT_PLAIN);
    req.body = text.as_bytes().to_vec();
    req
}

/// The chat notice for a text the PBX did not take (`code`, `reason` of its final answer, or
/// ours when none came).
pub fn not_delivered(code: u16, reason: &str) -> String {
    format!("Message not delivered: {code} {reason}")
}

/// How often one Telegram user is told a text was not delivered.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(60);

/// At most one "not delivered" notice per account and Telegram user per [`NOTICE_INTERVAL`].
/// A user whose app answers every text (an autoreply, a bot, the demo's echo user) would
/// otherwise answer the notice, whose forwarding fails again, and so on while the PBX is
/// unreachable; the refusals are still logged.
#[derive(Debug, Default)]
pub struct NoticeGate {
    last: HashMap<(String, i64), Instant>,
}

impl NoticeGate {
    /// May `account` tell `user` now? Records the notice when it may.
    pub fn allow(&mut self, account: &str, user: i64, now: Instant) -> bool {
        self.last
            .retain(|_, t| now.saturating_duration_since(*t) < NOTICE_INTERVAL);
        let key = (account.to_string(), user);
        if self.last.contains_key(&key) {
            return false;
        }
        self.last.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_utf8_text_is_taken() {
        assert_eq!(
            text_of(Some("text/plain;charset=UTF-8"), "привет".as_bytes()).as_deref(),
            Ok("привет")
        );
        assert_eq!(text_of(None, b"hi").as_deref(), Ok("hi"));
        assert_eq!(
            text_of(Some("Text/Plain; charset=\"us-ascii\""), b"hi").as_deref(),
            Ok("hi")
        );
        assert_eq!(
            text_of(Some("application/im-iscomposing+xml"), b"<x/>"),
            Err(BodyError::Unsupported(
                "application/im-iscomposing+xml".into()
            ))
        );
        assert!(matches!(
            text_of(Some("text/plain;charset=ISO-8859-1"), b"hi"),
            Err(BodyError::Unsupported(_))
        ));
        assert_eq!(text_of(Some("text/plain"), b""), Err(BodyError::Empty));
        assert_eq!(text_of(Some("text/plain"), b" \r\n"), Err(BodyError::Empty));
        assert_eq!(
            text_of(Some("text/plain"), &[0xff, 0xfe]),
            Err(BodyError::NotUtf8)
        );
        let long = "я".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(text_of(None, long.as_bytes()), Err(BodyError::TooLong));
        let (code, _, headers) = BodyError::Unsupported("x".into()).response();
        assert_eq!(code, 415);
        assert_eq!(headers, vec![("Accept".into(), "text/plain".into())]);
    }

    #[test]
    fn one_notice_per_user_a_minute() {
        let mut g = NoticeGate::default();
        let t0 = Instant::now();
        assert!(g.allow("gw", 2, t0));
        assert!(!g.allow("gw", 2, t0 + Duration::from_secs(10)));
        assert!(g.allow("gw", 3, t0 + Duration::from_secs(10)));
        assert!(g.allow("other", 2, t0 + Duration::from_secs(10)));
        assert!(g.allow("gw", 2, t0 + NOTICE_INTERVAL));
    }

    #[test]
    fn keypad_digits_are_told_from_texts() {
        assert!(is_keypad("123#"));
        assert!(is_keypad(" *0d "));
        assert!(!is_keypad("hello"));
        assert!(!is_keypad(""));
        assert!(!is_keypad(&"1".repeat(33)));
    }

    #[test]
    fn the_request_carries_the_text_and_the_sender() {
        let target = HuntTarget {
            request_uri: "sip:100@127.0.0.1:5080".into(),
            address: "127.0.0.1:5080".parse().unwrap(),
            connection: "pbx".into(),
            codecs: Vec::new(),
        };
        let headers = vec![("X-TG-ID".to_string(), "7".to_string())];
        let req = request(
            &target,
            &Sender {
                user: "+7 999<>",
                name: Some("Al\"ice"),
                headers: &headers,
            },
            "hi there",
            "127.0.0.1:5060".parse().unwrap(),
        );
        assert_eq!(req.method, Method::Message);
        assert_eq!(req.uri, "sip:100@127.0.0.1:5080");
        let from = req.header("From").unwrap();
        assert!(
            from.starts_with("\"Alice\" <sip:+7999@127.0.0.1>;tag="),
            "{from}"
        );
        assert_eq!(req.header("To"), Some("<sip:100@127.0.0.1:5080>"));
        assert_eq!(req.header("CSeq"), Some("1 MESSAGE"));
        assert_eq!(req.header("X-TG-ID"), Some("7"));
        assert_eq!(req.header("Content-Type"), Some(TEXT_PLAIN));
        assert_eq!(req.body, b"hi there");
        assert!(req.header("Contact").is_none());
    }
}
