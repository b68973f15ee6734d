//! SDP (RFC 8866, formerly RFC 4566) and the RFC 3264 offer/answer a carrier's B2BUA needs:
//! read what PBXs, SBCs and phones really send, answer with one audio codec from the
//! connection's ordered list, SDES-SRTP (RFC 4568) keys, rtcp-mux and the hold directions, and
//! hand the dataplane a `LegSpec`. Sans-IO: bytes in, descriptions and decisions out; the only
//! outside input is fresh randomness for SRTP keys.
//!
//! Our own small parser instead of a crate: `sdp-rs` 0.2 rejects an FQDN in `o=` (which the RFC
//! allows and Cisco gateways send) and `webrtc-sdp` drops `a=crypto` as an unknown attribute, so
//! SDES-SRTP could not be negotiated (see `shared/reference/crates.md`). The grammar a B2BUA
//! needs is small; this reader is tolerant (CRLF or bare LF, FQDNs, unknown lines and
//! attributes kept, missing `s=`/`t=`), never panics on input and reports typed errors.

#![deny(missing_docs)]

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use rand::RngCore;
use siptg_proto::{Codec, LegSpec, SrtpKeys, SrtpSuite};

/// Session name we write in `s=`: SIP.TG's `sdp_session_name`, which PBX logs show.
pub const SESSION_NAME: &str = "SIP.TG";

/// Payload type we offer for Opus (dynamic; the answer's number is used when it differs).
pub const OPUS_OFFER_PT: u8 = 111;

/// Payload type we offer for telephone-event/8000: the number most PBXs use.
pub const TELEPHONE_EVENT_OFFER_PT: u8 = 101;

/// `a=ptime` when neither the offer nor the connection says otherwise.
pub const DEFAULT_PTIME: u32 = 20;

/// Reason phrase of 488, the response to an offer we cannot accept (RFC 3261 §21.4.26).
pub const NOT_ACCEPTABLE_HERE: &str = "Not Acceptable Here";

/// Base64 for `inline:` keys: standard alphabet, padding written, and accepted with or without
/// it on input (some UAs strip the `=`).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why an SDP body could not be read, or why an offer or answer could not be negotiated.
/// `status` maps each to the SIP response a UAS sends for the offending offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// Nothing but blank lines: an INVITE announcing SDP without a body.
    #[error("empty SDP body")]
    Empty,
    /// The first line is not `v=0`: not SDP, or a version we do not know.
    #[error("SDP must start with v=0, found {0:?}")]
    Version(String),
    /// No `o=`, which every description must have.
    #[error("SDP has no o= line")]
    MissingOrigin,
    /// A line that cannot be read; `text` quotes it (at most 80 characters).
    #[error("SDP line {line}: malformed {what}: {text:?}")]
    Malformed {
        /// 1-based line number in the body.
        line: usize,
        /// Which part was wrong.
        what: &'static str,
        /// The offending line.
        text: String,
    },
    /// No RTP audio m-line with a port: nothing for a voice gateway to answer.
    #[error(
        "no usable audio stream (RTP/AVP or RTP/SAVP with a non-zero port) among m-lines: {0}"
    )]
    NoAudio(String),
    /// None of the connection's codecs is in the offer (or answer); both lists are named so the
    /// administrator sees what to change.
    #[error("no codec in common: offered {offered}; accepted here {accepted}")]
    NoCommonCodec {
        /// The other side's formats.
        offered: String,
        /// Ours.
        accepted: String,
    },
    /// RTP/SAVP without an `a=crypto` we can use.
    #[error(
        "SRTP required but no a=crypto with a supported suite (AES_CM_128_HMAC_SHA1_80, \
         AES_CM_128_HMAC_SHA1_32, AEAD_AES_128_GCM), a valid key and no unsupported session \
         parameter"
    )]
    NoUsableCrypto,
    /// An active audio stream with no `c=` anywhere: we would not know where to send.
    #[error("the audio stream has no connection address (c=) at media or session level")]
    NoConnection,
    /// An answer whose m-line count differs from our offer's.
    #[error("the answer has {answer} m-lines, the offer {offer} (RFC 3264 §6 requires as many)")]
    MediaCount {
        /// m-lines in our offer.
        offer: usize,
        /// m-lines in the answer.
        answer: usize,
    },
    /// The answer set our audio stream's port to 0.
    #[error("the answer rejected the audio stream (port 0)")]
    AudioRejected,
}

impl SdpError {
    /// The SIP status and reason phrase for a request whose offer failed this way: 400 for a body
    /// that is not SDP, `488 Not Acceptable Here` for one we cannot agree with.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            SdpError::Empty
            | SdpError::Version(_)
            | SdpError::MissingOrigin
            | SdpError::Malformed { .. } => (400, "Bad Request"),
            _ => (488, NOT_ACCEPTABLE_HERE),
        }
    }
}

/// A codec list that cannot be a connection's setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecListError {
    /// A name that is none of ours.
    #[error("unknown codec {0:?} (known: opus, alaw/PCMA, mulaw/PCMU, G722, telephone-event)")]
    Unknown(String),
    /// Only telephone-event, or nothing: no call could ever be answered.
    #[error("the codec list has no audio codec")]
    Empty,
}

// ---------------------------------------------------------------------------------------------
// The description model
// ---------------------------------------------------------------------------------------------

/// One `a=` line, split at the first colon. Unknown attributes are kept so that nothing is lost
/// when a description is passed through or written back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// Before the first colon (`rtpmap`, `crypto`, `sendrecv`, …).
    pub name: String,
    /// After the first colon; `None` for flags.
    pub value: Option<String>,
}

impl Attribute {
    /// A flag attribute such as `a=rtcp-mux` or `a=sendrecv`.
    pub fn flag(name: &str) -> Self {
        Self {
            name: name.into(),
            value: None,
        }
    }

    /// A `name:value` attribute.
    pub fn new(name: &str, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: Some(value.into()),
        }
    }
}

/// `o=`: kept as text because real UAs put FQDNs in the address and odd numbers in the ids;
/// only our own descriptions need numbers (see `LocalMedia`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `-` or a login; blanks inside (seen in the wild) are kept.
    pub username: String,
    /// Identifies the session for the origin's whole life.
    pub session_id: String,
    /// Grows when the origin changes its description (a re-INVITE with new media).
    pub session_version: String,
    /// `IN`.
    pub net_type: String,
    /// `IP4` or `IP6`.
    pub addr_type: String,
    /// An IP literal or an FQDN.
    pub address: String,
}

/// `c=`: where media goes. The address stays text (an FQDN or a multicast `addr/ttl` is legal);
/// `ip` gives the address when it is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// `IN`.
    pub net_type: String,
    /// `IP4` or `IP6`.
    pub addr_type: String,
    /// An IP literal (`0.0.0.0` for RFC 2543 hold), an FQDN, or a multicast `addr/ttl`.
    pub address: String,
}

impl Connection {
    /// `c=IN IP4 …` or `c=IN IP6 …` for one of our addresses.
    pub fn new(ip: IpAddr) -> Self {
        Self {
            net_type: "IN".into(),
            addr_type: addr_type(ip).into(),
            address: ip.to_string(),
        }
    }

    /// The IP address, if the address is a literal (a `/ttl` suffix and IPv6 brackets are
    /// ignored); `None` for an FQDN.
    pub fn ip(&self) -> Option<IpAddr> {
        let addr = self.address.split('/').next().unwrap_or_default();
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        addr.parse().ok()
    }

    /// RFC 2543 hold: `c=IN IP4 0.0.0.0` (and the IPv6 `::` some UAs send) means "do not send
    /// me media".
    pub fn is_hold(&self) -> bool {
        self.ip().is_some_and(|ip| ip.is_unspecified())
    }
}

/// One `m=` section with its own lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// `audio`, `video`, `image`, `application`, …
    pub media: String,
    /// 0 means the stream is rejected or disabled (RFC 3264 §6, §8.2).
    pub port: u16,
    /// The `/n` of `port/n`, rarely used.
    pub port_count: Option<u16>,
    /// `RTP/AVP`, `RTP/SAVP`, `UDP/TLS/RTP/SAVPF`, `udptl`, …
    pub proto: String,
    /// Payload type numbers for RTP, free-form otherwise.
    pub formats: Vec<String>,
    /// Media-level `c=`, overriding the session's.
    pub connection: Option<Connection>,
    /// `i=`, `b=`, `k=` and lines of unknown type, in RFC order, kept verbatim.
    pub other: Vec<(char, String)>,
    /// Media-level `a=` lines in their order.
    pub attributes: Vec<Attribute>,
}

impl MediaDescription {
    /// The value of the first attribute named `name` (case-insensitive; flags give `Some("")`).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        find_attribute(&self.attributes, name)
    }

    /// Whether an attribute named `name` is present (for flags like `rtcp-mux`).
    pub fn has_attribute(&self, name: &str) -> bool {
        self.attribute(name).is_some()
    }
}

/// A whole session description. `parse` reads it tolerantly, `Display` writes it back with CRLF
/// in RFC order; writing then reading gives the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// `o=`: who made it, and its version.
    pub origin: Origin,
    /// `s=`; `-` when the body had none.
    pub session_name: String,
    /// Session-level `c=`, the default for every m-line.
    pub connection: Option<Connection>,
    /// `i=`, `u=`, `e=`, `p=`, `b=`, `t=`, `r=`, `z=`, `k=` and lines of unknown type, in RFC
    /// order, kept verbatim (`t=0 0` is added when missing).
    pub other: Vec<(char, String)>,
    /// Session-level `a=` lines (a direction here applies to every m-line without its own).
    pub attributes: Vec<Attribute>,
    /// The m-lines in order: an answer has as many, in the same order (RFC 3264 §6).
    pub media: Vec<MediaDescription>,
}

fn find_attribute<'a>(attrs: &'a [Attribute], name: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|a| a.name.eq_ignore_ascii_case(name))
        .map(|a| a.value.as_deref().unwrap_or(""))
}

fn addr_type(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// At most this much of an offending line is quoted in an error.
const QUOTE_LEN: usize = 80;

fn quote(text: &str) -> String {
    text.chars().take(QUOTE_LEN).collect()
}

fn malformed(line: usize, what: &'static str, text: &str) -> SdpError {
    SdpError::Malformed {
        line,
        what,
        text: quote(text),
    }
}

/// RFC 8866 §5 order of session-level lines (`c=` sits between `p=` and `b=`); lines of unknown
/// type go last, before the attributes.
fn session_rank(kind: char) -> u8 {
    match kind {
        'i' => 0,
        'u' => 1,
        'e' => 2,
        'p' => 3,
        'b' => 4,
        't' | 'r' => 5,
        'z' => 6,
        'k' => 7,
        _ => 8,
    }
}

/// Lines ranked at most this come before the session-level `c=`.
const SESSION_BEFORE_C: u8 = 3;

/// RFC 8866 §5 order of media-level lines (`c=` after `i=`).
fn media_rank(kind: char) -> u8 {
    match kind {
        'i' => 0,
        'b' => 1,
        'k' => 2,
        _ => 3,
    }
}

impl SessionDescription {
    /// Reads an SDP body. Tolerant of CRLF or bare LF, surrounding blanks, blank lines, bytes
    /// that are not UTF-8 (replaced), a missing `s=` or `t=`, FQDNs, unknown line types and
    /// attributes; errors name the line and quote it.
    pub fn parse(body: &[u8]) -> Result<Self, SdpError> {
        let text = String::from_utf8_lossy(body);
        let mut lines = text
            .split('\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_matches([' ', '\t', '\r'])))
            .filter(|(_, l)| !l.is_empty());

        let (_, first) = lines.next().ok_or(SdpError::Empty)?;
        if first != "v=0" {
            return Err(SdpError::Version(quote(first)));
        }

        let mut origin = None;
        let mut session_name = None;
        let mut connection = None;
        let mut other = Vec::new();
        let mut attributes = Vec::new();
        let mut media: Vec<MediaDescription> = Vec::new();

        for (n, line) in lines {
            let bytes = line.as_bytes();
            if bytes.len() < 2 || !bytes[0].is_ascii_alphabetic() || bytes[1] != b'=' {
                return Err(malformed(n, "line (expected <letter>=<value>)", line));
            }
            let kind = char::from(bytes[0]);
            // The first two bytes are ASCII, so index 2 is a char boundary.
            let value = &line[2..];
            if kind == 'm' {
                media.push(parse_media(n, value)?);
                continue;
            }
            match media.last_mut() {
                Some(m) => match kind {
                    'c' if m.connection.is_none() => {
                        m.connection = Some(parse_connection(n, value)?)
                    }
                    'a' => m.attributes.push(parse_attribute(value)),
                    _ => m.other.push((kind, value.to_string())),
                },
                None => match kind {
                    'o' if origin.is_none() => origin = Some(parse_origin(n, value)?),
                    's' if session_name.is_none() => session_name = Some(value.to_string()),
                    'c' if connection.is_none() => connection = Some(parse_connection(n, value)?),
                    'a' => attributes.push(parse_attribute(value)),
                    _ => other.push((kind, value.to_string())),
                },
            }
        }

        let origin = origin.ok_or(SdpError::MissingOrigin)?;
        if !other.iter().any(|(k, _)| *k == 't') {
            other.push(('t', "0 0".to_string()));
        }
        other.sort_by_key(|(k, _)| session_rank(*k));
        for m in &mut media {
            m.other.sort_by_key(|(k, _)| media_rank(*k));
        }
        Ok(Self {
            origin,
            session_name: session_name.unwrap_or_else(|| "-".into()),
            connection,
            other,
            attributes,
            media,
        })
    }

    /// The value of the first session-level attribute named `name` (case-insensitive).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        find_attribute(&self.attributes, name)
    }
}

impl FromStr for SessionDescription {
    type Err = SdpError;

    fn from_str(s: &str) -> Result<Self, SdpError> {
        Self::parse(s.as_bytes())
    }
}

fn parse_origin(n: usize, value: &str) -> Result<Origin, SdpError> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    // A username with blanks (not allowed, but seen) keeps every field before the last five.
    if fields.len() < 6 {
        return Err(malformed(n, "o= (origin)", value));
    }
    let (user, rest) = fields.split_at(fields.len() - 5);
    Ok(Origin {
        username: user.join(" "),
        session_id: rest[0].into(),
        session_version: rest[1].into(),
        net_type: rest[2].into(),
        addr_type: rest[3].into(),
        address: rest[4].into(),
    })
}

fn parse_connection(n: usize, value: &str) -> Result<Connection, SdpError> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    match fields.as_slice() {
        [net, addr_type, address] => Ok(Connection {
            net_type: (*net).into(),
            addr_type: (*addr_type).into(),
            address: (*address).into(),
        }),
        _ => Err(malformed(n, "c= (connection)", value)),
    }
}

fn parse_media(n: usize, value: &str) -> Result<MediaDescription, SdpError> {
    let mut fields = value.split_whitespace();
    let (Some(media), Some(port), Some(proto)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed(n, "m= (media)", value));
    };
    let bad_port = || malformed(n, "m= port", value);
    let (port, port_count) = match port.split_once('/') {
        Some((p, c)) => (p, Some(c.parse::<u16>().map_err(|_| bad_port())?)),
        None => (port, None),
    };
    let port = port.parse::<u16>().map_err(|_| bad_port())?;
    Ok(MediaDescription {
        media: media.into(),
        port,
        port_count,
        proto: proto.into(),
        formats: fields.map(str::to_string).collect(),
        connection: None,
        other: Vec::new(),
        attributes: Vec::new(),
    })
}

fn parse_attribute(value: &str) -> Attribute {
    match value.split_once(':') {
        Some((name, v)) => Attribute {
            name: name.into(),
            value: Some(v.into()),
        },
        None => Attribute::flag(value),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

fn write_attribute(f: &mut fmt::Formatter<'_>, a: &Attribute) -> fmt::Result {
    match &a.value {
        Some(v) => write!(f, "a={}:{}\r\n", a.name, v),
        None => write!(f, "a={}\r\n", a.name),
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.net_type, self.addr_type, self.address)
    }
}

impl fmt::Display for SessionDescription {
    /// RFC 8866 order with CRLF line ends: what every PBX accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.origin;
        write!(f, "v=0\r\n")?;
        write!(
            f,
            "o={} {} {} {} {} {}\r\n",
            o.username, o.session_id, o.session_version, o.net_type, o.addr_type, o.address
        )?;
        write!(f, "s={}\r\n", self.session_name)?;
        let (before_c, after_c): (Vec<_>, Vec<_>) = self
            .other
            .iter()
            .partition(|(k, _)| session_rank(*k) <= SESSION_BEFORE_C);
        for (k, v) in before_c {
            write!(f, "{k}={v}\r\n")?;
        }
        if let Some(c) = &self.connection {
            write!(f, "c={c}\r\n")?;
        }
        for (k, v) in after_c {
            write!(f, "{k}={v}\r\n")?;
        }
        for a in &self.attributes {
            write_attribute(f, a)?;
        }
        for m in &self.media {
            write!(f, "m={} {}", m.media, m.port)?;
            if let Some(count) = m.port_count {
                write!(f, "/{count}")?;
            }
            write!(f, " {}", m.proto)?;
            for fmt_ in &m.formats {
                write!(f, " {fmt_}")?;
            }
            write!(f, "\r\n")?;
            let (info, rest): (Vec<_>, Vec<_>) = m.other.iter().partition(|(k, _)| *k == 'i');
            for (k, v) in info {
                write!(f, "{k}={v}\r\n")?;
            }
            if let Some(c) = &m.connection {
                write!(f, "c={c}\r\n")?;
            }
            for (k, v) in rest {
                write!(f, "{k}={v}\r\n")?;
            }
            for a in &m.attributes {
                write_attribute(f, a)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Codecs, directions, preferences
// ---------------------------------------------------------------------------------------------

/// The audio codecs a connection can list, in the forms RFC 3551/7587 give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AudioCodec {
    /// `opus/48000/2` (RFC 7587), dynamic payload type.
    Opus,
    /// G.711 A-law, `PCMA/8000`, payload type 8.
    Pcma,
    /// G.711 μ-law, `PCMU/8000`, payload type 0.
    Pcmu,
    /// G.722, `G722/8000` (16 kHz audio, 8 kHz RTP clock per RFC 3551), payload type 9.
    G722,
}

impl AudioCodec {
    /// Encoding name as written in `a=rtpmap` and `siptg_proto::Codec::name`.
    pub fn encoding_name(self) -> &'static str {
        match self {
            AudioCodec::Opus => "opus",
            AudioCodec::Pcma => "PCMA",
            AudioCodec::Pcmu => "PCMU",
            AudioCodec::G722 => "G722",
        }
    }

    /// RTP clock rate, which is what `a=rtpmap` states (8000 for G.722).
    pub fn clock_rate(self) -> u32 {
        match self {
            AudioCodec::Opus => 48_000,
            _ => 8_000,
        }
    }

    /// The RFC 3551 static payload type, usable without `a=rtpmap`.
    pub fn static_payload_type(self) -> Option<u8> {
        match self {
            AudioCodec::Opus => None,
            AudioCodec::Pcma => Some(8),
            AudioCodec::Pcmu => Some(0),
            AudioCodec::G722 => Some(9),
        }
    }

    /// Reads a connection's codec name: SIP.TG's `opus`, `alaw`, `mulaw` and the SDP names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "opus" => Some(AudioCodec::Opus),
            "alaw" | "pcma" | "g711a" => Some(AudioCodec::Pcma),
            "mulaw" | "ulaw" | "pcmu" | "g711u" => Some(AudioCodec::Pcmu),
            "g722" => Some(AudioCodec::G722),
            _ => None,
        }
    }

    fn offer_payload_type(self) -> u8 {
        self.static_payload_type().unwrap_or(OPUS_OFFER_PT)
    }

    fn rtpmap(self) -> String {
        match self {
            AudioCodec::Opus => "opus/48000/2".into(),
            c => format!("{}/{}", c.encoding_name(), c.clock_rate()),
        }
    }

    /// Our receive-side `a=fmtp` for this codec, if it has one.
    fn fmtp(self) -> Option<&'static str> {
        match self {
            AudioCodec::Opus => Some("useinbandfec=1"),
            _ => None,
        }
    }

    fn matches(self, f: &RtpFormat) -> bool {
        if !f.name.eq_ignore_ascii_case(self.encoding_name()) {
            return false;
        }
        match self {
            // RFC 7587 says opus/48000/2; a missing channel count is tolerated.
            AudioCodec::Opus => f.clock_rate == 48_000 && matches!(f.channels, None | Some(2)),
            // Some UAs write the audio rate for G.722.
            AudioCodec::G722 => matches!(f.clock_rate, 8_000 | 16_000),
            _ => f.clock_rate == self.clock_rate() && matches!(f.channels, None | Some(1)),
        }
    }

    fn codec(self, payload_type: u8, telephone_event: Option<u8>) -> Codec {
        Codec {
            payload_type,
            name: self.encoding_name().into(),
            clock_rate: self.clock_rate(),
            telephone_event,
        }
    }
}

/// A connection's ordered codec list (its "Audio codecs" setting), whether it carries RFC 4733
/// telephone-event, and the packetisation time it asks for when the offer does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecPrefs {
    codecs: Vec<AudioCodec>,
    telephone_event: bool,
    ptime: u32,
}

impl CodecPrefs {
    /// An ordered list, first choice first; duplicates are dropped and an empty list is refused
    /// (it could never answer anything).
    pub fn new(
        codecs: impl IntoIterator<Item = AudioCodec>,
        telephone_event: bool,
    ) -> Result<Self, CodecListError> {
        let mut list: Vec<AudioCodec> = Vec::new();
        for c in codecs {
            if !list.contains(&c) {
                list.push(c);
            }
        }
        if list.is_empty() {
            return Err(CodecListError::Empty);
        }
        Ok(Self {
            codecs: list,
            telephone_event,
            ptime: DEFAULT_PTIME,
        })
    }

    /// The same list with another default packetisation time (milliseconds, 10–120).
    pub fn with_ptime(mut self, ms: u32) -> Self {
        self.ptime = ms.clamp(10, 120);
        self
    }

    /// The audio codecs, first choice first.
    pub fn codecs(&self) -> &[AudioCodec] {
        &self.codecs
    }

    /// Whether telephone-event is offered and accepted.
    pub fn telephone_event(&self) -> bool {
        self.telephone_event
    }

    /// The default `a=ptime`.
    pub fn ptime(&self) -> u32 {
        self.ptime
    }
}

impl Default for CodecPrefs {
    /// PCMA, PCMU and telephone-event: G.711 is what every PBX has and what the dataplane's
    /// Telegram bridge transcodes; connections that want Opus or G.722 list them.
    fn default() -> Self {
        Self {
            codecs: vec![AudioCodec::Pcma, AudioCodec::Pcmu],
            telephone_event: true,
            ptime: DEFAULT_PTIME,
        }
    }
}

impl FromStr for CodecPrefs {
    type Err = CodecListError;

    /// A comma-separated list as administrators write it, e.g. `opus,alaw,mulaw,telephone-event`
    /// (`rfc2833` is accepted for telephone-event).
    fn from_str(s: &str) -> Result<Self, CodecListError> {
        let mut codecs = Vec::new();
        let mut telephone_event = false;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name.eq_ignore_ascii_case("telephone-event") || name.eq_ignore_ascii_case("rfc2833")
            {
                telephone_event = true;
            } else {
                codecs.push(
                    AudioCodec::from_name(name)
                        .ok_or_else(|| CodecListError::Unknown(name.into()))?,
                );
            }
        }
        Self::new(codecs, telephone_event)
    }
}

/// A stream's direction (RFC 3264 §5.1, §6.1), from the side that states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// Both ways: a normal call.
    #[default]
    SendRecv,
    /// This side only sends: it holds the other (music on hold).
    SendOnly,
    /// This side only receives: it is held.
    RecvOnly,
    /// Neither way: both hold, or a muted stream.
    Inactive,
}

impl Direction {
    /// The direction with these two abilities.
    pub fn from_flags(send: bool, recv: bool) -> Self {
        match (send, recv) {
            (true, true) => Direction::SendRecv,
            (true, false) => Direction::SendOnly,
            (false, true) => Direction::RecvOnly,
            (false, false) => Direction::Inactive,
        }
    }

    /// This side sends media.
    pub fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// This side receives media.
    pub fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }

    /// The same stream seen from the other side (sendonly ⇄ recvonly): RFC 3264 §6.1's answer.
    pub fn reversed(self) -> Self {
        Self::from_flags(self.receives(), self.sends())
    }

    /// What both allow: an answer never enables more than the offer did.
    pub fn and(self, other: Self) -> Self {
        Self::from_flags(
            self.sends() && other.sends(),
            self.receives() && other.receives(),
        )
    }

    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    fn from_attribute(name: &str) -> Option<Self> {
        [
            Direction::SendRecv,
            Direction::SendOnly,
            Direction::RecvOnly,
            Direction::Inactive,
        ]
        .into_iter()
        .find(|d| name.eq_ignore_ascii_case(d.as_str()))
    }
}

/// Our side of a leg: the address and port the dataplane gave it, our `o=` numbers, the
/// direction we want (sendonly when we put the call on hold), and keys already in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMedia {
    /// Media address advertised in `o=` and `c=`.
    pub addr: IpAddr,
    /// RTP port of the leg (RTCP on port + 1 unless rtcp-mux).
    pub port: u16,
    /// `o=` session id: fixed for the dialog.
    pub session_id: u64,
    /// `o=` version: the caller increments it whenever it sends a changed description.
    pub session_version: u64,
    /// What we want; answers are this intersected with the reverse of the offer.
    pub direction: Direction,
    /// SRTP keys negotiated earlier on this leg: a re-INVITE that keeps the suite keeps our key,
    /// so the peer does not have to rekey mid-call.
    pub srtp: Option<SrtpKeys>,
}

impl LocalMedia {
    /// A leg at `addr:port`, sendrecv, version 1, no earlier keys.
    pub fn new(addr: IpAddr, port: u16, session_id: u64) -> Self {
        Self {
            addr,
            port,
            session_id,
            session_version: 1,
            direction: Direction::SendRecv,
            srtp: None,
        }
    }

    fn origin(&self) -> Origin {
        Origin {
            username: "-".into(),
            session_id: self.session_id.to_string(),
            session_version: self.session_version.to_string(),
            net_type: "IN".into(),
            addr_type: addr_type(self.addr).into(),
            address: self.addr.to_string(),
        }
    }

    fn session(&self, media: Vec<MediaDescription>) -> SessionDescription {
        SessionDescription {
            origin: self.origin(),
            session_name: SESSION_NAME.into(),
            connection: Some(Connection::new(self.addr)),
            other: vec![('t', "0 0".into())],
            attributes: Vec::new(),
            media,
        }
    }
}

/// The outcome of offer/answer for the audio stream: what the dataplane leg needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedMedia {
    /// Where to send RTP; `None` while the peer holds with `c=0.0.0.0`, for a disabled stream
    /// or an address that is not an IP literal (latching then learns it).
    pub remote: Option<SocketAddr>,
    /// The codec with the payload type numbers on the wire and telephone-event's PT.
    pub codec: Codec,
    /// Packetisation time in milliseconds.
    pub ptime: u32,
    /// RTP and RTCP share the port (RFC 5761).
    pub rtcp_mux: bool,
    /// Our direction on this leg: `sends()` means we may send to the peer.
    pub direction: Direction,
    /// The peer does not want our media (sendonly, inactive or `c=0.0.0.0`): it holds the call.
    pub remote_hold: bool,
    /// SDES-SRTP keys for both directions; `None` for plain RTP.
    pub srtp: Option<SrtpKeys>,
}

impl NegotiatedMedia {
    /// The dataplane leg for this stream: continuity on, so re-INVITEs and source changes keep
    /// one continuous stream towards the peer; `local_ip` is left to the dataplane's default.
    pub fn to_leg_spec(&self, latch: bool) -> LegSpec {
        LegSpec {
            remote: self.remote,
            latch,
            local_ip: None,
            rtcp_mux: self.rtcp_mux,
            codec: self.codec.clone(),
            srtp: self.srtp.clone(),
            continuity: true,
            telegram: None,
            direction: Default::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading media sections for negotiation
// ---------------------------------------------------------------------------------------------

/// One payload format of an m-line, from `a=rtpmap` or the RFC 3551 static table.
#[derive(Debug, Clone)]
struct RtpFormat {
    pt: u8,
    name: String,
    clock_rate: u32,
    channels: Option<u8>,
}

impl RtpFormat {
    fn is_telephone_event(&self) -> bool {
        self.name.eq_ignore_ascii_case("telephone-event")
    }
}

fn static_format(pt: u8) -> Option<RtpFormat> {
    let (name, clock_rate) = match pt {
        0 => ("PCMU", 8_000),
        3 => ("GSM", 8_000),
        4 => ("G723", 8_000),
        8 => ("PCMA", 8_000),
        9 => ("G722", 8_000),
        18 => ("G729", 8_000),
        _ => return None,
    };
    Some(RtpFormat {
        pt,
        name: name.into(),
        clock_rate,
        channels: None,
    })
}

/// `a=rtpmap:<pt> <name>/<rate>[/<channels>]`.
fn parse_rtpmap(value: &str) -> Option<RtpFormat> {
    let (pt, rest) = value.trim().split_once(char::is_whitespace)?;
    let mut parts = rest.trim().split('/');
    let name = parts.next()?.trim();
    let clock_rate = parts.next()?.trim().parse().ok()?;
    let channels = match parts.next() {
        Some(c) => Some(c.trim().parse().ok()?),
        None => None,
    };
    Some(RtpFormat {
        pt: pt.parse().ok()?,
        name: name.into(),
        clock_rate,
        channels,
    })
}

/// The m-line's RTP formats in its order; formats without a known mapping are left out.
fn rtp_formats(m: &MediaDescription) -> Vec<RtpFormat> {
    let maps: Vec<RtpFormat> = m
        .attributes
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case("rtpmap"))
        .filter_map(|a| a.value.as_deref().and_then(parse_rtpmap))
        .collect();
    m.formats
        .iter()
        .filter_map(|f| f.parse::<u8>().ok())
        .filter(|pt| *pt < 128)
        .filter_map(|pt| {
            maps.iter()
                .find(|f| f.pt == pt)
                .cloned()
                .or_else(|| static_format(pt))
        })
        .collect()
}

fn describe_formats(m: &MediaDescription) -> String {
    let known = rtp_formats(m);
    let list: Vec<String> = m
        .formats
        .iter()
        .map(|f| match known.iter().find(|k| k.pt.to_string() == *f) {
            Some(k) => format!("{}/{} ({})", k.name, k.clock_rate, k.pt),
            None => f.clone(),
        })
        .collect();
    if list.is_empty() {
        "nothing".into()
    } else {
        list.join(", ")
    }
}

fn describe_prefs(prefs: &CodecPrefs) -> String {
    prefs
        .codecs
        .iter()
        .map(|c| c.rtpmap())
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmtp_of(m: &MediaDescription, pt: u8) -> Option<String> {
    m.attributes
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case("fmtp"))
        .filter_map(|a| a.value.as_deref())
        .find_map(|v| {
            let (p, params) = v.trim().split_once(char::is_whitespace)?;
            (p.parse::<u8>().ok()? == pt).then(|| params.trim().to_string())
        })
}

/// telephone-event at the codec's clock rate if offered (RFC 4733 §2.1), else at 8000.
fn pick_telephone_event(formats: &[RtpFormat], clock_rate: u32) -> Option<&RtpFormat> {
    let events = || formats.iter().filter(|f| f.is_telephone_event());
    events()
        .find(|f| f.clock_rate == clock_rate)
        .or_else(|| events().find(|f| f.clock_rate == 8_000))
}

fn ptime_of(sd: &SessionDescription, m: &MediaDescription) -> Option<u32> {
    let v = m.attribute("ptime").or_else(|| sd.attribute("ptime"))?;
    // "20", and the "20.0" some UAs write.
    let ms: u32 = v.trim().split('.').next()?.parse().ok()?;
    (1..=1000).contains(&ms).then_some(ms)
}

/// The stated direction: media level over session level, sendrecv by default.
fn stated_direction(sd: &SessionDescription, m: &MediaDescription) -> Direction {
    let find = |attrs: &[Attribute]| {
        attrs
            .iter()
            .find_map(|a| Direction::from_attribute(&a.name))
    };
    find(&m.attributes)
        .or_else(|| find(&sd.attributes))
        .unwrap_or_default()
}

fn is_rtp_audio(m: &MediaDescription) -> bool {
    let proto = m.proto.to_ascii_uppercase();
    m.media.eq_ignore_ascii_case("audio")
        && matches!(
            proto.as_str(),
            "RTP/AVP" | "RTP/SAVP" | "RTP/AVPF" | "RTP/SAVPF"
        )
}

fn is_savp(m: &MediaDescription) -> bool {
    m.proto.to_ascii_uppercase().starts_with("RTP/SAVP")
}

/// Where the peer wants media, and whether it is on RFC 2543 hold.
struct Remote {
    addr: Option<SocketAddr>,
    hold: bool,
}

fn remote_of(sd: &SessionDescription, m: &MediaDescription) -> Result<Remote, SdpError> {
    let conn = m
        .connection
        .as_ref()
        .or(sd.connection.as_ref())
        .ok_or(SdpError::NoConnection)?;
    let hold = conn.is_hold();
    let addr = match conn.ip() {
        Some(ip) if !hold && m.port != 0 => Some(SocketAddr::new(ip, m.port)),
        _ => None,
    };
    Ok(Remote { addr, hold })
}

// ---------------------------------------------------------------------------------------------
// SDES (RFC 4568)
// ---------------------------------------------------------------------------------------------

fn suite_name(suite: SrtpSuite) -> &'static str {
    match suite {
        SrtpSuite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
        SrtpSuite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        SrtpSuite::AeadAes128Gcm => "AEAD_AES_128_GCM",
    }
}

fn suite_from_name(name: &str) -> Option<SrtpSuite> {
    [
        SrtpSuite::AesCm128HmacSha1_80,
        SrtpSuite::AesCm128HmacSha1_32,
        SrtpSuite::AeadAes128Gcm,
    ]
    .into_iter()
    .find(|s| name.eq_ignore_ascii_case(suite_name(*s)))
}

/// Master key and salt lengths (RFC 4568 §6.2, RFC 7714 §12).
fn key_salt_len(suite: SrtpSuite) -> (usize, usize) {
    match suite {
        SrtpSuite::AeadAes128Gcm => (16, 12),
        _ => (16, 14),
    }
}

/// One usable `a=crypto` line.
#[derive(Debug, Clone)]
struct Crypto {
    tag: u32,
    suite: SrtpSuite,
    key: Vec<u8>,
    salt: Vec<u8>,
    /// The key carries an MKI; the dataplane does not send or strip MKIs, so lines without one
    /// are preferred.
    mki: bool,
}

/// Session parameters we can honour: the defaults (KDR=0, FEC_ORDER=FEC_SRTP), a window-size
/// hint, and anything marked optional with `-` (RFC 4568 §6.3).
fn session_param_ok(param: &str) -> bool {
    let upper = param.to_ascii_uppercase();
    upper.starts_with('-')
        || upper.starts_with("WSH=")
        || upper == "KDR=0"
        || upper == "FEC_ORDER=FEC_SRTP"
}

/// `a=crypto:<tag> <suite> inline:<base64 key||salt>[|lifetime][|MKI:len][;inline:…] [params]`.
/// `None` for lines we cannot use (unknown suite, wrong key length, unsupported parameter).
fn parse_crypto(value: &str) -> Option<Crypto> {
    let mut fields = value.split_whitespace();
    let tag = fields.next()?.parse().ok()?;
    let suite = suite_from_name(fields.next()?)?;
    let key_params = fields.next()?;
    if !fields.all(session_param_ok) {
        return None;
    }
    // With several master keys (`;`), the first one starts the stream.
    let first = key_params.split(';').next()?;
    let (method, info) = first.split_once(':')?;
    if !method.eq_ignore_ascii_case("inline") {
        return None;
    }
    let mut parts = info.split('|');
    let material = B64.decode(parts.next()?).ok()?;
    // Lifetime (`2^31`, `1048576`) is ignored; an MKI is `value:length`.
    let mki = parts.any(|p| p.contains(':'));
    let (key_len, salt_len) = key_salt_len(suite);
    if material.len() != key_len + salt_len {
        return None;
    }
    let (key, salt) = material.split_at(key_len);
    Some(Crypto {
        tag,
        suite,
        key: key.to_vec(),
        salt: salt.to_vec(),
        mki,
    })
}

fn cryptos(m: &MediaDescription) -> Vec<Crypto> {
    m.attributes
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case("crypto"))
        .filter_map(|a| a.value.as_deref().and_then(parse_crypto))
        .collect()
}

fn crypto_attribute(tag: u32, suite: SrtpSuite, key: &[u8], salt: &[u8]) -> Attribute {
    let mut material = Vec::with_capacity(key.len() + salt.len());
    material.extend_from_slice(key);
    material.extend_from_slice(salt);
    Attribute::new(
        "crypto",
        format!(
            "{tag} {} inline:{}",
            suite_name(suite),
            B64.encode(material)
        ),
    )
}

/// Our key and salt for `suite`: the earlier ones when the suite is unchanged, else fresh.
fn local_key(
    suite: SrtpSuite,
    earlier: Option<&SrtpKeys>,
    rng: &mut dyn RngCore,
) -> (Vec<u8>, Vec<u8>) {
    let (key_len, salt_len) = key_salt_len(suite);
    if let Some(k) = earlier {
        if k.suite == suite && k.local_key.len() == key_len && k.local_salt.len() == salt_len {
            return (k.local_key.clone(), k.local_salt.clone());
        }
    }
    let mut key = vec![0u8; key_len];
    let mut salt = vec![0u8; salt_len];
    rng.fill_bytes(&mut key);
    rng.fill_bytes(&mut salt);
    (key, salt)
}

// ---------------------------------------------------------------------------------------------
// Offer/answer
// ---------------------------------------------------------------------------------------------

/// Suites in the order we offer them: the 80-bit tag first because every SDES implementation
/// has it, GCM last because few PBXs do.
const OFFER_SUITES: [SrtpSuite; 3] = [
    SrtpSuite::AesCm128HmacSha1_80,
    SrtpSuite::AesCm128HmacSha1_32,
    SrtpSuite::AeadAes128Gcm,
];

fn audio_attributes(
    codec: AudioCodec,
    pt: u8,
    telephone_event: Option<(u8, u32, String)>,
    ptime: u32,
) -> Vec<Attribute> {
    let mut attrs = vec![Attribute::new("rtpmap", format!("{pt} {}", codec.rtpmap()))];
    if let Some(fmtp) = codec.fmtp() {
        attrs.push(Attribute::new("fmtp", format!("{pt} {fmtp}")));
    }
    if let Some((te, rate, events)) = telephone_event {
        attrs.push(Attribute::new(
            "rtpmap",
            format!("{te} telephone-event/{rate}"),
        ));
        attrs.push(Attribute::new("fmtp", format!("{te} {events}")));
    }
    attrs.push(Attribute::new("ptime", ptime.to_string()));
    attrs
}

/// The answer to an offer (RFC 3264 §6): the first audio m-line we can accept gets the first
/// codec of *our* order that the offer has (with the offer's payload type numbers),
/// telephone-event if both want it, the offer's ptime, rtcp-mux if offered, the reversed
/// direction, and for RTP/SAVP one of the offer's `a=crypto` suites with a fresh key of ours;
/// every other m-line is rejected with port 0. Nothing acceptable is an error whose `status()`
/// is `488 Not Acceptable Here`.
pub fn answer(
    offer: &SessionDescription,
    prefs: &CodecPrefs,
    local: &LocalMedia,
) -> Result<(SessionDescription, NegotiatedMedia), SdpError> {
    answer_with_rng(offer, prefs, local, &mut rand::rngs::OsRng)
}

/// `answer` with the randomness for SRTP keys passed in (tests, fuzzing).
pub fn answer_with_rng(
    offer: &SessionDescription,
    prefs: &CodecPrefs,
    local: &LocalMedia,
    rng: &mut dyn RngCore,
) -> Result<(SessionDescription, NegotiatedMedia), SdpError> {
    let mut chosen = None;
    let mut first_error = None;
    for (i, m) in offer.media.iter().enumerate() {
        if !is_rtp_audio(m) || m.port == 0 {
            continue;
        }
        match answer_audio(offer, m, prefs, local, rng) {
            Ok(done) => {
                chosen = Some((i, done));
                break;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let Some((index, (media, negotiated))) = chosen else {
        return Err(first_error.unwrap_or_else(|| {
            let lines: Vec<String> = offer
                .media
                .iter()
                .map(|m| format!("{} {} {}", m.media, m.port, m.proto))
                .collect();
            SdpError::NoAudio(if lines.is_empty() {
                "none".into()
            } else {
                lines.join("; ")
            })
        }));
    };
    let answered = offer
        .media
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i == index {
                media.clone()
            } else {
                rejected(m)
            }
        })
        .collect();
    Ok((local.session(answered), negotiated))
}

/// RFC 3264 §6: a declined stream is answered with port 0 and the offer's formats.
fn rejected(m: &MediaDescription) -> MediaDescription {
    MediaDescription {
        media: m.media.clone(),
        port: 0,
        port_count: None,
        proto: m.proto.clone(),
        formats: m.formats.clone(),
        connection: None,
        other: Vec::new(),
        attributes: Vec::new(),
    }
}

fn answer_audio(
    offer: &SessionDescription,
    m: &MediaDescription,
    prefs: &CodecPrefs,
    local: &LocalMedia,
    rng: &mut dyn RngCore,
) -> Result<(MediaDescription, NegotiatedMedia), SdpError> {
    let formats = rtp_formats(m);
    let (codec, pt) = prefs
        .codecs
        .iter()
        .find_map(|c| formats.iter().find(|f| c.matches(f)).map(|f| (*c, f.pt)))
        .ok_or_else(|| SdpError::NoCommonCodec {
            offered: describe_formats(m),
            accepted: describe_prefs(prefs),
        })?;
    let telephone_event = if prefs.telephone_event {
        pick_telephone_event(&formats, codec.clock_rate()).map(|te| {
            let events = fmtp_of(m, te.pt).unwrap_or_else(|| "0-16".into());
            (te.pt, te.clock_rate, events)
        })
    } else {
        None
    };

    let srtp = if is_savp(m) {
        let offered = cryptos(m);
        let pick = offered
            .iter()
            .find(|c| !c.mki)
            .or_else(|| offered.first())
            .ok_or(SdpError::NoUsableCrypto)?;
        let (local_key, local_salt) = local_key(pick.suite, local.srtp.as_ref(), rng);
        Some((
            pick.tag,
            SrtpKeys {
                suite: pick.suite,
                local_key,
                local_salt,
                remote_key: pick.key.clone(),
                remote_salt: pick.salt.clone(),
            },
        ))
    } else {
        None
    };

    let remote = remote_of(offer, m)?;
    let mut offered_direction = stated_direction(offer, m);
    if remote.hold {
        offered_direction = offered_direction.and(Direction::SendOnly);
    }
    let direction = offered_direction.reversed().and(local.direction);
    let ptime = ptime_of(offer, m).unwrap_or(prefs.ptime);
    let rtcp_mux = m.has_attribute("rtcp-mux");

    let mut formats_out = vec![pt.to_string()];
    if let Some((te, _, _)) = &telephone_event {
        formats_out.push(te.to_string());
    }
    let te_pt = telephone_event.as_ref().map(|(te, _, _)| *te);
    let mut attributes = audio_attributes(codec, pt, telephone_event, ptime);
    if rtcp_mux {
        attributes.push(Attribute::flag("rtcp-mux"));
    }
    if let Some((tag, keys)) = &srtp {
        attributes.push(crypto_attribute(
            *tag,
            keys.suite,
            &keys.local_key,
            &keys.local_salt,
        ));
    }
    attributes.push(Attribute::flag(direction.as_str()));

    let media = MediaDescription {
        media: m.media.clone(),
        port: local.port,
        port_count: None,
        proto: m.proto.clone(),
        formats: formats_out,
        connection: None,
        other: Vec::new(),
        attributes,
    };
    let negotiated = NegotiatedMedia {
        remote: remote.addr,
        codec: codec.codec(pt, te_pt),
        ptime,
        rtcp_mux,
        direction,
        remote_hold: !offered_direction.receives(),
        srtp: srtp.map(|(_, k)| k),
    };
    Ok((media, negotiated))
}

/// Our offer for a call we place (towards a PBX): one audio m-line with the connection's codecs
/// in order, telephone-event/8000, ptime, rtcp-mux, our direction, and with `srtp` RTP/SAVP and
/// one `a=crypto` per supported suite, each with its own key.
pub fn offer(prefs: &CodecPrefs, local: &LocalMedia, srtp: bool) -> SessionDescription {
    offer_with_rng(prefs, local, srtp, &mut rand::rngs::OsRng)
}

/// `offer` with the randomness for SRTP keys passed in (tests, fuzzing).
pub fn offer_with_rng(
    prefs: &CodecPrefs,
    local: &LocalMedia,
    srtp: bool,
    rng: &mut dyn RngCore,
) -> SessionDescription {
    let mut formats: Vec<String> = prefs
        .codecs
        .iter()
        .map(|c| c.offer_payload_type().to_string())
        .collect();
    let mut attributes = Vec::new();
    for c in &prefs.codecs {
        let pt = c.offer_payload_type();
        attributes.push(Attribute::new("rtpmap", format!("{pt} {}", c.rtpmap())));
        if let Some(fmtp) = c.fmtp() {
            attributes.push(Attribute::new("fmtp", format!("{pt} {fmtp}")));
        }
    }
    if prefs.telephone_event {
        let te = TELEPHONE_EVENT_OFFER_PT;
        formats.push(te.to_string());
        attributes.push(Attribute::new(
            "rtpmap",
            format!("{te} telephone-event/8000"),
        ));
        attributes.push(Attribute::new("fmtp", format!("{te} 0-16")));
    }
    attributes.push(Attribute::new("ptime", prefs.ptime.to_string()));
    attributes.push(Attribute::flag("rtcp-mux"));
    if srtp {
        for (tag, suite) in (1u32..).zip(OFFER_SUITES) {
            let (key, salt) = local_key(suite, local.srtp.as_ref(), rng);
            attributes.push(crypto_attribute(tag, suite, &key, &salt));
        }
    }
    attributes.push(Attribute::flag(local.direction.as_str()));
    local.session(vec![MediaDescription {
        media: "audio".into(),
        port: local.port,
        port_count: None,
        proto: if srtp { "RTP/SAVP" } else { "RTP/AVP" }.into(),
        formats,
        connection: None,
        other: Vec::new(),
        attributes,
    }])
}

/// Reads the answer to an offer we made (RFC 3264 §7): the first audio m-line the answer
/// accepted, the answerer's first codec among those we offered (its payload type), its
/// telephone-event, ptime (else ours), rtcp-mux if both said so, our direction, and for SRTP
/// our key of the tag it chose with its key.
pub fn apply_answer(
    our_offer: &SessionDescription,
    answer: &SessionDescription,
) -> Result<NegotiatedMedia, SdpError> {
    if our_offer.media.len() != answer.media.len() {
        return Err(SdpError::MediaCount {
            offer: our_offer.media.len(),
            answer: answer.media.len(),
        });
    }
    let mut rejected_audio = false;
    let mut first_error = None;
    for (o, a) in our_offer.media.iter().zip(&answer.media) {
        if !is_rtp_audio(o) || o.port == 0 {
            continue;
        }
        if a.port == 0 {
            rejected_audio = true;
            continue;
        }
        match apply_audio(our_offer, o, answer, a) {
            Ok(n) => return Ok(n),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(if rejected_audio {
        SdpError::AudioRejected
    } else {
        SdpError::NoAudio("no audio m-line in our offer".into())
    }))
}

fn apply_audio(
    offer_sd: &SessionDescription,
    o: &MediaDescription,
    answer_sd: &SessionDescription,
    a: &MediaDescription,
) -> Result<NegotiatedMedia, SdpError> {
    let ours = rtp_formats(o);
    let offered: Vec<AudioCodec> = [
        AudioCodec::Opus,
        AudioCodec::Pcma,
        AudioCodec::Pcmu,
        AudioCodec::G722,
    ]
    .into_iter()
    .filter(|c| ours.iter().any(|f| c.matches(f)))
    .collect();
    let theirs = rtp_formats(a);
    let (codec, pt) = theirs
        .iter()
        .find_map(|f| offered.iter().find(|c| c.matches(f)).map(|c| (*c, f.pt)))
        .ok_or_else(|| SdpError::NoCommonCodec {
            offered: describe_formats(o),
            accepted: describe_formats(a),
        })?;
    let telephone_event = if ours.iter().any(RtpFormat::is_telephone_event) {
        pick_telephone_event(&theirs, codec.clock_rate()).map(|f| f.pt)
    } else {
        None
    };

    let srtp = if is_savp(o) {
        let mine = cryptos(o);
        let keys = cryptos(a)
            .into_iter()
            .filter(|_| is_savp(a))
            .find_map(|theirs| {
                let mine = mine
                    .iter()
                    .find(|m| m.tag == theirs.tag && m.suite == theirs.suite)?;
                Some(SrtpKeys {
                    suite: theirs.suite,
                    local_key: mine.key.clone(),
                    local_salt: mine.salt.clone(),
                    remote_key: theirs.key,
                    remote_salt: theirs.salt,
                })
            })
            .ok_or(SdpError::NoUsableCrypto)?;
        Some(keys)
    } else {
        None
    };

    let remote = remote_of(answer_sd, a)?;
    let mut answered = stated_direction(answer_sd, a);
    if remote.hold {
        answered = answered.and(Direction::SendOnly);
    }
    let direction = answered.reversed().and(stated_direction(offer_sd, o));
    Ok(NegotiatedMedia {
        remote: remote.addr,
        codec: codec.codec(pt, telephone_event),
        ptime: ptime_of(answer_sd, a)
            .or_else(|| ptime_of(offer_sd, o))
            .unwrap_or(DEFAULT_PTIME),
        rtcp_mux: o.has_attribute("rtcp-mux") && a.has_attribute("rtcp-mux"),
        direction,
        remote_hold: !answered.receives(),
        srtp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn crlf(s: &str) -> String {
        s.replace('\n', "\r\n")
    }

    /// Asterisk 20, chan_pjsip, with Opus enabled (dynamic PT 107).
    const ASTERISK: &str = "v=0
o=- 1848357712 1848357712 IN IP4 203.0.113.10
s=Asterisk
c=IN IP4 203.0.113.10
t=0 0
m=audio 17552 RTP/AVP 0 8 9 107 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:9 G722/8000
a=rtpmap:107 opus/48000/2
a=fmtp:107 useinbandfec=1
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=maxptime:150
a=sendrecv
";

    /// FreePBX 14 (chan_sip): PCMA first, GSM, 30 ms packets.
    const FREEPBX: &str = "v=0
o=root 1545247359 1545247359 IN IP4 10.1.1.5
s=Asterisk PBX 13.22.0
c=IN IP4 10.1.1.5
t=0 0
m=audio 12826 RTP/AVP 8 0 3 101
a=rtpmap:8 PCMA/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:3 GSM/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:30
a=sendrecv
";

    /// 3CX V18: G.722 first, media-level c= repeating the session's.
    const THREECX: &str = "v=0
o=3cxPS 1672217472 1672217473 IN IP4 192.168.1.20
s=3cxPS Audio call
c=IN IP4 192.168.1.20
t=0 0
m=audio 9002 RTP/AVP 9 8 0 101
c=IN IP4 192.168.1.20
a=rtpmap:9 G722/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
";

    /// Kamailio with rtpengine (SDES on, ICE attributes, rtcp-mux): rtpengine lists every
    /// suite it has, the strongest first.
    const RTPENGINE: &str = "v=0
o=- 3862173619 3862173619 IN IP4 198.51.100.7
s=-
c=IN IP4 198.51.100.7
t=0 0
m=audio 30112 RTP/SAVP 96 8 0 100 101
a=mid:0
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1; minptime=10
a=rtpmap:8 PCMA/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:100 telephone-event/48000
a=fmtp:100 0-15
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=sendrecv
a=rtcp:30113
a=rtcp-mux
a=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:9mdo7EAVq+ambm0XB5z1SAsFpJtFobeSS3wHIr1dJIyIVRiRTF145bKb+81Xng==
a=crypto:2 AEAD_AES_128_GCM inline:B6NnYQYBYl2eETwTbbg9SlNKIgIUSIRF6cL56g==
a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy
a=crypto:4 AES_CM_128_HMAC_SHA1_32 inline:JRi8Fxi2c5dAZM5p5ggrcg/Q5DSAAVdHg5+n1XRu
a=crypto:5 F8_128_HMAC_SHA1_80 inline:P9CC0sfi28vFMBhduzmYPswDAXfx56UZ6JCKx4b4
a=ice-ufrag:Jk6hqvVg
a=ice-pwd:s9Hu9VwlcPsoUeu7gTx0bn7qSY
a=candidate:Ncj0CR3xfLG4cZF 1 UDP 2130706431 198.51.100.7 30112 typ host
a=end-of-candidates
a=ptime:20
";

    /// baresip 3.x, bare LF line ends, Opus stereo parameters, rtcp-mux.
    const BARESIP: &str = "v=0
o=- 1405983346 3409447618 IN IP4 192.168.0.14
s=-
c=IN IP4 192.168.0.14
t=0 0
m=audio 10470 RTP/AVP 96 0 8 101
b=AS:128
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=ssrc:3013347214 cname:7b4f4a52-b9a2-4c2a-bbe4-e6d3d2a1d3e8
a=rtcp-rsize
a=rtcp-mux
a=ptime:20
";

    /// Linphone 5 over IPv6 with SRTP and video: statics without rtpmap, three telephone-event
    /// rates, and a video m-line we must reject.
    const LINPHONE: &str = "v=0
o=alice 2519 3716 IN IP6 2001:db8::15
s=Talk
c=IN IP6 2001:db8::15
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=record:off
m=audio 7078 RTP/SAVP 96 97 98 0 8 101 99 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:0QbX5hy4wzW6XG8duLCpb16rycQWMNxMnP4Fqqmx
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:JxsgnQwZslAawcNLPv/aqzfSchuNUkt54Q4le7ux
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
m=video 9078 RTP/SAVP 96 97
a=rtpmap:96 VP8/90000
a=rtpmap:97 H264/90000
a=fmtp:97 profile-level-id=42801F
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:X4VZcmkB7bDJeKvqP3uqcKGcZnfHKOJ6RRYG2Hq6
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:96 nack pli
";

    /// A Cisco IOS gateway (CUBE): FQDN in o=, G.729 first, CN, lifetime and MKI on the key.
    const CISCO: &str = "v=0
o=CiscoSystemsSIP-GW-UserAgent 6405 2178 IN IP4 cube1.carrier.example.net
s=SIP Call
c=IN IP4 192.0.2.45
t=0 0
m=audio 16434 RTP/SAVP 18 0 8 101 19
c=IN IP4 192.0.2.45
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=rtpmap:19 CN/8000
a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy|2^31|1:1
a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:JRi8Fxi2c5dAZM5p5ggrcg/Q5DSAAVdHg5+n1XRu|2^31
a=ptime:20
";

    fn samples() -> Vec<(&'static str, String)> {
        vec![
            ("asterisk", crlf(ASTERISK)),
            ("freepbx", crlf(FREEPBX)),
            ("3cx", crlf(THREECX)),
            ("rtpengine", crlf(RTPENGINE)),
            ("baresip", BARESIP.to_string()),
            ("linphone", crlf(LINPHONE)),
            ("cisco", crlf(CISCO)),
        ]
    }

    fn parse(s: &str) -> SessionDescription {
        match SessionDescription::parse(s.as_bytes()) {
            Ok(sd) => sd,
            Err(e) => panic!("sample does not parse: {e}"),
        }
    }

    fn local() -> LocalMedia {
        LocalMedia::new("192.0.2.200".parse().unwrap(), 31000, 4242)
    }

    fn prefs(list: &str) -> CodecPrefs {
        list.parse().unwrap()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn answer_of(offer: &str, prefs: &CodecPrefs) -> (SessionDescription, NegotiatedMedia) {
        answer_with_rng(&parse(offer), prefs, &local(), &mut rng()).unwrap()
    }

    fn audio(sd: &SessionDescription) -> &MediaDescription {
        sd.media.iter().find(|m| m.port != 0).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn key_salt(keys: &SrtpKeys, local: bool) -> Vec<u8> {
        if local {
            [keys.local_key.clone(), keys.local_salt.clone()].concat()
        } else {
            [keys.remote_key.clone(), keys.remote_salt.clone()].concat()
        }
    }

    // ---- reading and writing ----

    #[test]
    fn every_real_world_sample_parses_and_survives_a_write_read_round_trip() {
        for (name, text) in samples() {
            let sd = parse(&text);
            let written = sd.to_string();
            assert!(
                written.ends_with("\r\n") && !written.contains("\r\r"),
                "{name}"
            );
            assert_eq!(parse(&written), sd, "{name}");
        }
    }

    #[test]
    fn crlf_and_bare_lf_read_the_same() {
        assert_eq!(parse(&crlf(BARESIP)), parse(BARESIP));
        assert_eq!(parse(ASTERISK), parse(&crlf(ASTERISK)));
    }

    #[test]
    fn fqdn_in_origin_is_accepted() {
        let sd = parse(&crlf(CISCO));
        assert_eq!(sd.origin.address, "cube1.carrier.example.net");
        assert_eq!(sd.origin.username, "CiscoSystemsSIP-GW-UserAgent");
        assert_eq!(sd.origin.session_version, "2178");
        assert_eq!(sd.session_name, "SIP Call");
    }

    #[test]
    fn unknown_attributes_and_lines_are_kept_in_order() {
        let sd = parse(&crlf(RTPENGINE));
        let names: Vec<&str> = sd.media[0]
            .attributes
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(&names[..2], ["mid", "rtpmap"]);
        assert!(names.contains(&"ice-ufrag") && names.contains(&"end-of-candidates"));
        assert_eq!(
            sd.media[0].attribute("candidate"),
            Some("Ncj0CR3xfLG4cZF 1 UDP 2130706431 198.51.100.7 30112 typ host")
        );
        let baresip = parse(BARESIP);
        assert_eq!(baresip.media[0].other, vec![('b', "AS:128".to_string())]);
        let written = baresip.to_string();
        assert!(written.contains("m=audio 10470 RTP/AVP 96 0 8 101\r\nb=AS:128\r\na=rtpmap:96"));
    }

    #[test]
    fn session_and_media_connections_and_ipv6() {
        let linphone = parse(&crlf(LINPHONE));
        let c = linphone.connection.as_ref().unwrap();
        assert_eq!(c.addr_type, "IP6");
        assert_eq!(c.ip(), Some("2001:db8::15".parse().unwrap()));
        assert!(linphone.media[0].connection.is_none());
        assert_eq!(linphone.attribute("record"), Some("off"));
        let cisco = parse(&crlf(CISCO));
        assert_eq!(
            cisco.media[0].connection.as_ref().unwrap().ip(),
            Some("192.0.2.45".parse().unwrap())
        );
    }

    #[test]
    fn tolerated_oddities_parse() {
        // No s=, no t=, blank lines, trailing blanks, a port count, an unknown line type, a
        // multicast address with TTL and a rejected m-line without formats.
        let sd = parse(
            "\r\nv=0\r\no=- 1 1 IN IP4 10.0.0.1 \r\n\r\nc=IN IP4 224.2.1.1/127\r\n\
             y=whatever\r\nm=audio 5004/2 RTP/AVP 0\r\nm=video 0 RTP/AVP\r\n",
        );
        assert_eq!(sd.session_name, "-");
        assert!(sd.other.contains(&('t', "0 0".into())));
        assert!(sd.other.contains(&('y', "whatever".into())));
        assert_eq!(sd.media[0].port_count, Some(2));
        assert!(sd.media[1].formats.is_empty());
        assert_eq!(
            sd.connection.as_ref().unwrap().ip(),
            Some("224.2.1.1".parse().unwrap())
        );
        assert_eq!(parse(&sd.to_string()), sd);
    }

    #[test]
    fn malformed_bodies_are_typed_errors_answered_with_400() {
        type Check = fn(&SdpError) -> bool;
        let cases: [(&str, Check); 7] = [
            ("", |e| *e == SdpError::Empty),
            ("\r\n\r\n", |e| *e == SdpError::Empty),
            ("o=- 1 1 IN IP4 1.2.3.4\r\n", |e| {
                matches!(e, SdpError::Version(_))
            }),
            ("v=0\r\ns=x\r\n", |e| *e == SdpError::MissingOrigin),
            ("v=0\r\no=- 1 IN IP4 1.2.3.4\r\n", |e| {
                matches!(e, SdpError::Malformed { line: 2, .. })
            }),
            (
                "v=0\r\no=- 1 1 IN IP4 h\r\nm=audio 70000 RTP/AVP 0\r\n",
                |e| {
                    matches!(
                        e,
                        SdpError::Malformed {
                            what: "m= port",
                            ..
                        }
                    )
                },
            ),
            ("v=0\r\no=- 1 1 IN IP4 h\r\nc=IN IP4\r\n", |e| {
                matches!(e, SdpError::Malformed { line: 3, .. })
            }),
        ];
        for (body, check) in cases {
            let e = SessionDescription::parse(body.as_bytes()).unwrap_err();
            assert!(check(&e), "{body:?} gave {e:?}");
            assert_eq!(e.status(), (400, "Bad Request"));
        }
        let e = SessionDescription::parse(b"v=0\r\no=- 1 1 IN IP4 h\r\nhello\r\n").unwrap_err();
        assert!(e.to_string().contains("line 3") && e.to_string().contains("hello"));
    }

    #[test]
    fn every_truncation_of_every_sample_is_an_error_or_parses_and_answers() {
        let prefs = CodecPrefs::default();
        for (_, text) in samples() {
            let bytes = text.as_bytes();
            for end in 0..bytes.len() {
                if let Ok(sd) = SessionDescription::parse(&bytes[..end]) {
                    assert_eq!(parse(&sd.to_string()), sd);
                    let _ = answer_with_rng(&sd, &prefs, &local(), &mut rng());
                }
            }
        }
    }

    #[test]
    fn binary_junk_is_an_error_not_a_panic() {
        let mut junk: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        junk.splice(0..0, b"v=0\n".iter().copied());
        assert!(SessionDescription::parse(&junk).is_err());
        assert!(SessionDescription::parse(&[0xff, 0xfe, 0x00]).is_err());
    }

    // ---- codecs ----

    #[test]
    fn our_preference_order_wins_over_the_offers() {
        // Asterisk lists PCMU first; we prefer PCMA.
        let (ans, neg) = answer_of(ASTERISK, &prefs("alaw,mulaw,telephone-event"));
        assert_eq!(neg.codec.name, "PCMA");
        assert_eq!(neg.codec.payload_type, 8);
        assert_eq!(audio(&ans).formats, ["8", "101"]);
        // 3CX lists G.722 first; a connection preferring PCMU gets PCMU.
        let (_, neg) = answer_of(&crlf(THREECX), &prefs("mulaw,g722"));
        assert_eq!(
            (neg.codec.name.as_str(), neg.codec.payload_type),
            ("PCMU", 0)
        );
        let (_, neg) = answer_of(&crlf(THREECX), &prefs("g722,alaw"));
        assert_eq!(
            (neg.codec.name.as_str(), neg.codec.clock_rate),
            ("G722", 8000)
        );
    }

    #[test]
    fn dynamic_opus_uses_the_offers_payload_type() {
        let (ans, neg) = answer_of(ASTERISK, &prefs("opus,alaw,telephone-event"));
        assert_eq!(neg.codec, AudioCodec::Opus.codec(107, Some(101)));
        let m = audio(&ans);
        assert_eq!(m.formats, ["107", "101"]);
        assert_eq!(m.attribute("rtpmap"), Some("107 opus/48000/2"));
        let (_, neg) = answer_of(BARESIP, &prefs("opus"));
        assert_eq!((neg.codec.payload_type, neg.codec.clock_rate), (96, 48000));
        assert_eq!(neg.codec.telephone_event, None);
    }

    #[test]
    fn static_payload_types_need_no_rtpmap() {
        let (_, neg) = answer_of(&crlf(LINPHONE), &prefs("alaw"));
        assert_eq!(
            (neg.codec.name.as_str(), neg.codec.payload_type),
            ("PCMA", 8)
        );
    }

    #[test]
    fn telephone_event_keeps_the_offers_pt_and_events() {
        let (ans, neg) = answer_of(&crlf(THREECX), &prefs("alaw,telephone-event"));
        assert_eq!(neg.codec.telephone_event, Some(101));
        let m = audio(&ans);
        let fmtps: Vec<_> = m
            .attributes
            .iter()
            .filter(|a| a.name == "fmtp")
            .map(|a| a.value.clone().unwrap())
            .collect();
        assert_eq!(fmtps, ["101 0-15"]);
        assert!(m
            .attributes
            .contains(&Attribute::new("rtpmap", "101 telephone-event/8000")));
    }

    #[test]
    fn telephone_event_follows_the_codec_clock_rate() {
        // Linphone offers telephone-event at 48000 (101), 16000 (99) and 8000 (100).
        let (_, neg) = answer_of(&crlf(LINPHONE), &prefs("alaw,telephone-event"));
        assert_eq!(neg.codec.telephone_event, Some(100));
        let (ans, neg) = answer_of(&crlf(LINPHONE), &prefs("opus,telephone-event"));
        assert_eq!(neg.codec.telephone_event, Some(101));
        assert!(audio(&ans)
            .attributes
            .contains(&Attribute::new("rtpmap", "101 telephone-event/48000")));
    }

    #[test]
    fn telephone_event_is_left_out_when_the_connection_does_not_want_it() {
        let (ans, neg) = answer_of(ASTERISK, &prefs("alaw"));
        assert_eq!(neg.codec.telephone_event, None);
        assert_eq!(audio(&ans).formats, ["8"]);
    }

    #[test]
    fn no_codec_in_common_is_488_with_both_lists() {
        let err = answer_with_rng(
            &parse(&crlf(FREEPBX)),
            &prefs("opus,g722"),
            &local(),
            &mut rng(),
        )
        .unwrap_err();
        assert!(matches!(err, SdpError::NoCommonCodec { .. }));
        assert_eq!(err.status(), (488, "Not Acceptable Here"));
        let text = err.to_string();
        assert!(
            text.contains("GSM/8000 (3)") && text.contains("opus/48000/2"),
            "{text}"
        );
    }

    #[test]
    fn ptime_answers_the_offer_or_defaults() {
        assert_eq!(
            answer_of(&crlf(FREEPBX), &CodecPrefs::default()).1.ptime,
            30
        );
        let (ans, neg) = answer_of(&crlf(THREECX), &CodecPrefs::default());
        assert_eq!(neg.ptime, 20);
        assert_eq!(audio(&ans).attribute("ptime"), Some("20"));
        let p = CodecPrefs::default().with_ptime(40);
        assert_eq!(answer_of(&crlf(THREECX), &p).1.ptime, 40);
    }

    #[test]
    fn rtcp_mux_is_answered_only_when_offered() {
        let (ans, neg) = answer_of(BARESIP, &CodecPrefs::default());
        assert!(neg.rtcp_mux && audio(&ans).has_attribute("rtcp-mux"));
        let (ans, neg) = answer_of(ASTERISK, &CodecPrefs::default());
        assert!(!neg.rtcp_mux && !audio(&ans).has_attribute("rtcp-mux"));
    }

    #[test]
    fn codec_lists_parse_as_administrators_write_them() {
        let p = prefs(" opus, alaw ,mulaw,alaw, rfc2833");
        assert_eq!(
            p.codecs(),
            [AudioCodec::Opus, AudioCodec::Pcma, AudioCodec::Pcmu]
        );
        assert!(p.telephone_event());
        assert_eq!(
            "alaw,g729".parse::<CodecPrefs>(),
            Err(CodecListError::Unknown("g729".into()))
        );
        assert_eq!(
            "telephone-event".parse::<CodecPrefs>(),
            Err(CodecListError::Empty)
        );
    }

    // ---- the answer's shape ----

    #[test]
    fn answer_has_our_address_and_session_name() {
        let (ans, neg) = answer_of(ASTERISK, &CodecPrefs::default());
        assert_eq!(ans.origin.address, "192.0.2.200");
        assert_eq!(ans.origin.session_id, "4242");
        assert_eq!(ans.session_name, SESSION_NAME);
        assert_eq!(
            ans.connection,
            Some(Connection::new("192.0.2.200".parse().unwrap()))
        );
        assert_eq!(audio(&ans).port, 31000);
        assert_eq!(audio(&ans).proto, "RTP/AVP");
        assert_eq!(neg.remote, Some("203.0.113.10:17552".parse().unwrap()));
        // What we write, we (and therefore a PBX) can read back.
        assert_eq!(parse(&ans.to_string()), ans);
    }

    #[test]
    fn video_is_rejected_with_port_zero_and_the_line_count_kept() {
        let (ans, neg) = answer_of(&crlf(LINPHONE), &CodecPrefs::default());
        assert_eq!(ans.media.len(), 2);
        assert_eq!(ans.media[0].media, "audio");
        assert_eq!(ans.media[0].port, 31000);
        let video = &ans.media[1];
        assert_eq!((video.media.as_str(), video.port), ("video", 0));
        assert_eq!(video.proto, "RTP/SAVP");
        assert_eq!(video.formats, ["96", "97"]);
        assert!(video.attributes.is_empty());
        assert_eq!(neg.remote, Some("[2001:db8::15]:7078".parse().unwrap()));
        assert!(ans.to_string().contains("\r\nm=video 0 RTP/SAVP 96 97\r\n"));
    }

    #[test]
    fn answer_over_ipv6_says_ip6() {
        let local = LocalMedia::new("2001:db8::1".parse().unwrap(), 32000, 1);
        let (ans, _) = answer(&parse(&crlf(LINPHONE)), &CodecPrefs::default(), &local).unwrap();
        let text = ans.to_string();
        assert!(text.contains("o=- 1 1 IN IP6 2001:db8::1\r\n"));
        assert!(text.contains("c=IN IP6 2001:db8::1\r\n"));
    }

    #[test]
    fn a_second_audio_line_is_used_when_the_first_has_no_common_codec() {
        let offer = crlf(
            "v=0
o=- 1 1 IN IP4 10.0.0.9
s=-
c=IN IP4 10.0.0.9
t=0 0
m=audio 4000 RTP/AVP 18
a=rtpmap:18 G729/8000
m=audio 4002 RTP/AVP 8
",
        );
        let (ans, neg) = answer_of(&offer, &CodecPrefs::default());
        assert_eq!((ans.media[0].port, ans.media[1].port), (0, 31000));
        assert_eq!(neg.remote, Some("10.0.0.9:4002".parse().unwrap()));
    }

    #[test]
    fn offers_without_audio_or_connection_are_not_acceptable() {
        let fax = parse("v=0\no=- 1 1 IN IP4 h\nc=IN IP4 10.0.0.1\nm=image 4000 udptl t38\n");
        let err = answer(&fax, &CodecPrefs::default(), &local()).unwrap_err();
        assert!(matches!(err, SdpError::NoAudio(ref s) if s.contains("image 4000 udptl")));
        assert_eq!(err.status().0, 488);
        let dtls =
            parse("v=0\no=- 1 1 IN IP4 h\nc=IN IP4 10.0.0.1\nm=audio 4000 UDP/TLS/RTP/SAVPF 8\n");
        assert!(matches!(
            answer(&dtls, &CodecPrefs::default(), &local()),
            Err(SdpError::NoAudio(_))
        ));
        let no_c = parse("v=0\no=- 1 1 IN IP4 h\nm=audio 4000 RTP/AVP 8\n");
        assert_eq!(
            answer(&no_c, &CodecPrefs::default(), &local()).unwrap_err(),
            SdpError::NoConnection
        );
    }

    // ---- SRTP ----

    #[test]
    fn srtp_answer_picks_the_first_supported_suite_with_a_fresh_key() {
        let offer = parse(&crlf(RTPENGINE));
        let (ans, neg) = answer(&offer, &CodecPrefs::default(), &local()).unwrap();
        let keys = neg.srtp.clone().unwrap();
        // Tag 1 (AES_256) is not ours; tag 2 (AEAD_AES_128_GCM) is.
        assert_eq!(keys.suite, SrtpSuite::AeadAes128Gcm);
        assert_eq!((keys.remote_key.len(), keys.remote_salt.len()), (16, 12));
        assert_eq!(
            b64(&key_salt(&keys, false)),
            "B6NnYQYBYl2eETwTbbg9SlNKIgIUSIRF6cL56g=="
        );
        let m = audio(&ans);
        assert_eq!(m.proto, "RTP/SAVP");
        let crypto: Vec<_> = m.attributes.iter().filter(|a| a.name == "crypto").collect();
        assert_eq!(crypto.len(), 1);
        assert_eq!(
            crypto[0].value.as_deref(),
            Some(format!("2 AEAD_AES_128_GCM inline:{}", b64(&key_salt(&keys, true))).as_str())
        );
        assert_ne!(keys.local_key, keys.remote_key);
        // Another answer gets another key.
        let (_, again) = answer(&offer, &CodecPrefs::default(), &local()).unwrap();
        assert_ne!(again.srtp.unwrap().local_key, keys.local_key);
    }

    #[test]
    fn srtp_keys_round_trip_through_base64_on_both_sides() {
        let offer = parse(&crlf(LINPHONE));
        let (ans, neg) = answer(&offer, &CodecPrefs::default(), &local()).unwrap();
        let keys = neg.srtp.unwrap();
        assert_eq!(keys.suite, SrtpSuite::AesCm128HmacSha1_80);
        assert_eq!(
            b64(&key_salt(&keys, false)),
            "0QbX5hy4wzW6XG8duLCpb16rycQWMNxMnP4Fqqmx"
        );
        // The offerer reading our answer (it is our own parser on the other side) sees our key.
        let read_back = cryptos(audio(&parse(&ans.to_string())));
        assert_eq!(read_back.len(), 1);
        assert_eq!(read_back[0].tag, 1);
        assert_eq!(read_back[0].key, keys.local_key);
        assert_eq!(read_back[0].salt, keys.local_salt);
    }

    #[test]
    fn lifetime_and_mki_parts_are_ignored_and_keys_without_mki_preferred() {
        let (_, neg) = answer_of(&crlf(CISCO), &CodecPrefs::default());
        let keys = neg.srtp.unwrap();
        // Tag 1 carries an MKI, tag 2 only a lifetime: tag 2 is chosen.
        assert_eq!(keys.suite, SrtpSuite::AesCm128HmacSha1_80);
        assert_eq!(
            b64(&key_salt(&keys, false)),
            "JRi8Fxi2c5dAZM5p5ggrcg/Q5DSAAVdHg5+n1XRu"
        );
        let only_mki = crlf(CISCO).replace("a=crypto:2", "a=ignored:2");
        let (_, neg) = answer_of(&only_mki, &CodecPrefs::default());
        assert_eq!(neg.srtp.unwrap().suite, SrtpSuite::AesCm128HmacSha1_32);
    }

    #[test]
    fn unusable_crypto_lines_are_skipped() {
        let parsed: Vec<bool> = [
            "1 AES_CM_128_HMAC_SHA1_80 inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy",
            // Without padding.
            "1 AEAD_AES_128_GCM inline:B6NnYQYBYl2eETwTbbg9SlNKIgIUSIRF6cL56g",
            "1 AES_CM_128_HMAC_SHA1_80 inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy KDR=0 WSH=64",
            // Too short for the suite.
            "1 AES_CM_128_HMAC_SHA1_80 inline:B6NnYQYBYl2eETwTbbg9SlNKIgIUSIRF6cL56g==",
            "1 AES_CM_128_HMAC_SHA1_80 inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy UNENCRYPTED_SRTP",
            "1 AES_CM_128_HMAC_SHA1_80 inline:not*base64",
            "x AES_CM_128_HMAC_SHA1_80 inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy",
            "1 AES_CM_128_HMAC_SHA1_80",
        ]
        .iter()
        .map(|v| parse_crypto(v).is_some())
        .collect();
        assert_eq!(
            parsed,
            [true, true, true, false, false, false, false, false]
        );
    }

    #[test]
    fn savp_without_usable_crypto_is_488() {
        let offer = crlf(LINPHONE).replace("AES_CM_128", "AES_256_CM");
        let err = answer(&parse(&offer), &CodecPrefs::default(), &local()).unwrap_err();
        assert_eq!(err, SdpError::NoUsableCrypto);
        assert_eq!(err.status(), (488, NOT_ACCEPTABLE_HERE));
    }

    #[test]
    fn plain_avp_is_answered_plain_even_with_crypto_lines() {
        let offer = crlf(LINPHONE).replace("RTP/SAVP", "RTP/AVP");
        let (ans, neg) = answer_of(&offer, &CodecPrefs::default());
        assert!(neg.srtp.is_none());
        assert_eq!(audio(&ans).proto, "RTP/AVP");
        assert!(!audio(&ans).has_attribute("crypto"));
    }

    #[test]
    fn a_reinvite_with_the_same_suite_keeps_our_key() {
        let offer = parse(&crlf(LINPHONE));
        let (_, first) = answer(&offer, &CodecPrefs::default(), &local()).unwrap();
        let mut again = local();
        again.srtp = first.srtp.clone();
        let (_, second) = answer(&offer, &CodecPrefs::default(), &again).unwrap();
        assert_eq!(second.srtp, first.srtp);
        // A different suite gets a fresh key of the right length.
        let (_, gcm) = answer(&parse(&crlf(RTPENGINE)), &CodecPrefs::default(), &again).unwrap();
        let gcm = gcm.srtp.unwrap();
        assert_eq!((gcm.local_key.len(), gcm.local_salt.len()), (16, 12));
    }

    // ---- hold ----

    fn with_direction(dir: &str) -> String {
        crlf(ASTERISK).replace("a=sendrecv", dir)
    }

    #[test]
    fn directions_are_answered_per_rfc3264() {
        let cases = [
            ("a=sendrecv", Direction::SendRecv, false),
            ("a=sendonly", Direction::RecvOnly, true),
            ("a=recvonly", Direction::SendOnly, false),
            ("a=inactive", Direction::Inactive, true),
            ("a=x-nothing", Direction::SendRecv, false),
        ];
        for (attr, expected, hold) in cases {
            let (ans, neg) = answer_of(&with_direction(attr), &CodecPrefs::default());
            assert_eq!(neg.direction, expected, "{attr}");
            assert_eq!(neg.remote_hold, hold, "{attr}");
            assert!(audio(&ans).has_attribute(expected.as_str()), "{attr}");
            assert!(neg.remote.is_some());
        }
    }

    #[test]
    fn session_level_direction_applies_unless_the_media_overrides_it() {
        let offer = crlf(FREEPBX)
            .replace("a=sendrecv\n", "")
            .replace("t=0 0\r\n", "t=0 0\r\na=sendonly\r\n")
            .replace("\r\na=sendrecv", "");
        let (_, neg) = answer_of(&offer, &CodecPrefs::default());
        assert_eq!(neg.direction, Direction::RecvOnly);
        let overridden = offer.replace("a=ptime:30", "a=ptime:30\r\na=inactive");
        let (_, neg) = answer_of(&overridden, &CodecPrefs::default());
        assert_eq!(neg.direction, Direction::Inactive);
    }

    #[test]
    fn rfc2543_hold_with_zero_address_is_detected() {
        let held = crlf(ASTERISK).replace("c=IN IP4 203.0.113.10", "c=IN IP4 0.0.0.0");
        let (ans, neg) = answer_of(&held, &CodecPrefs::default());
        assert!(neg.remote_hold);
        assert_eq!(neg.remote, None);
        assert_eq!(neg.direction, Direction::RecvOnly);
        assert!(audio(&ans).has_attribute("recvonly"));
        let spec = neg.to_leg_spec(false);
        assert_eq!(spec.remote, None);
    }

    #[test]
    fn unhold_restores_sendrecv_and_the_remote() {
        let (_, held) = answer_of(&with_direction("a=sendonly"), &CodecPrefs::default());
        let (_, resumed) = answer_of(ASTERISK, &CodecPrefs::default());
        assert!(held.remote_hold && !resumed.remote_hold);
        assert_eq!(resumed.direction, Direction::SendRecv);
        assert_eq!(resumed.remote, Some("203.0.113.10:17552".parse().unwrap()));
        assert_eq!(held.codec, resumed.codec);
    }

    #[test]
    fn our_own_hold_limits_the_answer() {
        let mut holding = local();
        holding.direction = Direction::SendOnly;
        let (_, neg) = answer_with_rng(
            &parse(ASTERISK),
            &CodecPrefs::default(),
            &holding,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(neg.direction, Direction::SendOnly);
        let (_, neg) = answer_with_rng(
            &parse(&with_direction("a=sendonly")),
            &CodecPrefs::default(),
            &holding,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(neg.direction, Direction::Inactive);
    }

    #[test]
    fn disabled_audio_is_not_acceptable() {
        let off = crlf(ASTERISK).replace("m=audio 17552", "m=audio 0");
        let err = answer(&parse(&off), &CodecPrefs::default(), &local()).unwrap_err();
        assert!(matches!(err, SdpError::NoAudio(_)));
    }

    // ---- our offers ----

    #[test]
    fn our_offer_lists_the_connection_codecs_in_order() {
        let p = prefs("opus,alaw,mulaw,g722,telephone-event");
        let sd = offer(&p, &local(), false);
        let m = &sd.media[0];
        assert_eq!(m.proto, "RTP/AVP");
        assert_eq!(m.formats, ["111", "8", "0", "9", "101"]);
        let text = sd.to_string();
        for line in [
            "a=rtpmap:111 opus/48000/2\r\n",
            "a=fmtp:111 useinbandfec=1\r\n",
            "a=rtpmap:9 G722/8000\r\n",
            "a=rtpmap:101 telephone-event/8000\r\n",
            "a=fmtp:101 0-16\r\n",
            "a=ptime:20\r\n",
            "a=rtcp-mux\r\n",
            "a=sendrecv\r\n",
            "s=SIP.TG\r\n",
            "t=0 0\r\n",
        ] {
            assert!(text.contains(line), "{line:?} missing in {text}");
        }
        assert!(!text.contains("crypto"));
    }

    #[test]
    fn srtp_offer_carries_one_key_per_suite() {
        let sd = offer(&CodecPrefs::default(), &local(), true);
        let m = &sd.media[0];
        assert_eq!(m.proto, "RTP/SAVP");
        let offered = cryptos(m);
        let suites: Vec<_> = offered.iter().map(|c| (c.tag, c.suite)).collect();
        assert_eq!(
            suites,
            [
                (1, SrtpSuite::AesCm128HmacSha1_80),
                (2, SrtpSuite::AesCm128HmacSha1_32),
                (3, SrtpSuite::AeadAes128Gcm)
            ]
        );
        assert_ne!(offered[0].key, offered[1].key);
        assert_eq!(offered[2].salt.len(), 12);
    }

    #[test]
    fn offer_answer_and_apply_agree_on_both_sides() {
        // We call a PBX; the PBX (here: our own answerer with other preferences) answers.
        let ours = LocalMedia::new("192.0.2.200".parse().unwrap(), 31000, 10);
        let pbx = LocalMedia::new("198.51.100.50".parse().unwrap(), 40000, 20);
        let our_offer = offer(&prefs("opus,alaw,mulaw,telephone-event"), &ours, true);
        let wire = parse(&our_offer.to_string());
        let (their_answer, theirs) =
            answer(&wire, &prefs("mulaw,alaw,telephone-event"), &pbx).unwrap();
        let mine = apply_answer(&our_offer, &parse(&their_answer.to_string())).unwrap();

        assert_eq!(mine.codec, AudioCodec::Pcmu.codec(0, Some(101)));
        assert_eq!(theirs.codec, mine.codec);
        assert_eq!(mine.remote, Some("198.51.100.50:40000".parse().unwrap()));
        assert_eq!(theirs.remote, Some("192.0.2.200:31000".parse().unwrap()));
        assert!(mine.rtcp_mux && theirs.rtcp_mux);
        assert_eq!(mine.direction, Direction::SendRecv);
        let (m, t) = (mine.srtp.unwrap(), theirs.srtp.unwrap());
        assert_eq!(m.suite, SrtpSuite::AesCm128HmacSha1_80);
        assert_eq!(m.suite, t.suite);
        assert_eq!(
            (&m.local_key, &m.local_salt),
            (&t.remote_key, &t.remote_salt)
        );
        assert_eq!(
            (&m.remote_key, &m.remote_salt),
            (&t.local_key, &t.local_salt)
        );
    }

    #[test]
    fn apply_answer_reads_a_real_pbx_answer() {
        let our_offer = offer(&prefs("alaw,mulaw,telephone-event"), &local(), false);
        let pbx_answer = crlf(
            "v=0
o=- 1848357712 1848357713 IN IP4 203.0.113.10
s=Asterisk
c=IN IP4 203.0.113.10
t=0 0
m=audio 17560 RTP/AVP 8 96
a=rtpmap:8 PCMA/8000
a=rtpmap:96 telephone-event/8000
a=fmtp:96 0-16
a=ptime:30
a=maxptime:150
a=recvonly
",
        );
        let neg = apply_answer(&our_offer, &parse(&pbx_answer)).unwrap();
        // The answer's numbers are what we send.
        assert_eq!(neg.codec, AudioCodec::Pcma.codec(8, Some(96)));
        assert_eq!(neg.ptime, 30);
        assert!(!neg.rtcp_mux);
        // recvonly: the PBX only listens (say, to a recording), so we only send, and it does
        // want our media.
        assert_eq!(neg.direction, Direction::SendOnly);
        assert!(!neg.remote_hold);
        assert_eq!(neg.remote, Some("203.0.113.10:17560".parse().unwrap()));
        let inactive = pbx_answer.replace("a=recvonly", "a=inactive");
        let neg = apply_answer(&our_offer, &parse(&inactive)).unwrap();
        assert_eq!(neg.direction, Direction::Inactive);
        assert!(neg.remote_hold);
    }

    #[test]
    fn apply_answer_rejections_are_typed() {
        let our_offer = offer(&CodecPrefs::default(), &local(), true);
        let base = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\nc=IN IP4 10.0.0.1\r\n";
        let rejected = parse(&format!("{base}m=audio 0 RTP/SAVP 8\r\n"));
        assert_eq!(
            apply_answer(&our_offer, &rejected),
            Err(SdpError::AudioRejected)
        );
        let two = parse(&format!(
            "{base}m=audio 4000 RTP/SAVP 8\r\nm=video 0 RTP/AVP 96\r\n"
        ));
        assert_eq!(
            apply_answer(&our_offer, &two),
            Err(SdpError::MediaCount {
                offer: 1,
                answer: 2
            })
        );
        let other_codec = parse(&format!("{base}m=audio 4000 RTP/SAVP 18\r\n"));
        assert!(matches!(
            apply_answer(&our_offer, &other_codec),
            Err(SdpError::NoCommonCodec { .. })
        ));
        // SRTP offered, plain answered: not acceptable.
        let plain = parse(&format!("{base}m=audio 4000 RTP/AVP 8\r\n"));
        assert_eq!(
            apply_answer(&our_offer, &plain),
            Err(SdpError::NoUsableCrypto)
        );
        // A crypto answer for a tag we never offered.
        let wrong_tag = parse(&format!(
            "{base}m=audio 4000 RTP/SAVP 8\r\na=crypto:9 AES_CM_128_HMAC_SHA1_80 \
             inline:VVsUovNtndZYFxp05sFyeO7Iee5cJYb0oA/15FKy\r\n"
        ));
        assert_eq!(
            apply_answer(&our_offer, &wrong_tag),
            Err(SdpError::NoUsableCrypto)
        );
    }

    // ---- the dataplane leg ----

    #[test]
    fn leg_spec_carries_what_the_dataplane_needs() {
        let (_, neg) = answer_of(&crlf(RTPENGINE), &prefs("opus,alaw,telephone-event"));
        let spec = neg.to_leg_spec(true);
        assert_eq!(spec.remote, Some("198.51.100.7:30112".parse().unwrap()));
        assert!(spec.latch && spec.rtcp_mux && spec.continuity);
        assert_eq!(spec.local_ip, None);
        assert!(spec.telegram.is_none());
        // Opus at 96 with telephone-event at its own clock rate (100).
        assert_eq!(spec.codec, AudioCodec::Opus.codec(96, Some(100)));
        assert_eq!(spec.srtp, neg.srtp);
        assert!(spec.srtp.is_some());
    }
}
