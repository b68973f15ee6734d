//! The JSON signalling messages of tgcalls v2 (`InitialSetup`, `NegotiateChannels`,
//! `Candidates`, `MediaState`), as `serde` types. Unknown fields are ignored and numeric ids that
//! tgcalls writes as strings (`exchangeId`, `ssrc`) are kept as numbers here.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// One signalling message; the JSON `@type` field selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "@type")]
pub enum SignalingMessage {
    InitialSetup(InitialSetup),
    NegotiateChannels(NegotiateChannels),
    Candidates(Candidates),
    MediaState(MediaState),
}

/// ICE credentials and DTLS fingerprints; the first message each side sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitialSetup {
    pub ufrag: String,
    pub pwd: String,
    #[serde(default)]
    pub renomination: bool,
    #[serde(default)]
    pub fingerprints: Vec<DtlsFingerprint>,
}

/// A DTLS certificate fingerprint and the setup role offered with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DtlsFingerprint {
    /// Hash function name, e.g. `sha-256`.
    pub hash: String,
    /// `actpass`, `active` or `passive`.
    pub setup: String,
    /// Colon-separated hex, e.g. `AB:CD:…`.
    pub fingerprint: String,
}

/// The media channels a side offers or accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NegotiateChannels {
    #[serde(with = "u32_string")]
    pub exchange_id: u32,
    #[serde(default)]
    pub contents: Vec<MediaContent>,
}

/// One media channel (audio for the gateway).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaContent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "u32_string")]
    pub ssrc: u32,
    #[serde(default)]
    pub ssrc_groups: Vec<SsrcGroup>,
    #[serde(default)]
    pub payload_types: Vec<PayloadType>,
    #[serde(default)]
    pub rtp_extensions: Vec<RtpExtension>,
}

/// A group of SSRCs (e.g. `FID` for RTX).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SsrcGroup {
    pub semantics: String,
    #[serde(with = "u32_string_vec")]
    pub ssrcs: Vec<u32>,
}

/// A payload type with its codec parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PayloadType {
    pub id: u8,
    pub name: String,
    pub clockrate: u32,
    #[serde(default)]
    pub channels: u32,
    #[serde(default)]
    pub feedback_types: Vec<FeedbackType>,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// An RTCP feedback mechanism (e.g. `transport-cc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackType {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub subtype: String,
}

/// An RTP header extension id and URI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RtpExtension {
    pub id: u8,
    pub uri: String,
}

/// ICE candidates, each an SDP `candidate:` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
}

/// One ICE candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub sdp_string: String,
}

/// The sender's mute/battery/video state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaState {
    #[serde(default)]
    pub muted: bool,
    #[serde(default)]
    pub low_battery: bool,
    #[serde(default = "inactive")]
    pub video_state: String,
    #[serde(default)]
    pub video_rotation: i32,
    #[serde(default = "inactive")]
    pub screencast_state: String,
}

fn inactive() -> String {
    "inactive".into()
}

/// Why a signalling payload is not a message we understand.
#[derive(Debug, thiserror::Error)]
#[error("bad signalling message: {0}")]
pub struct MessageError(#[from] serde_json::Error);

impl SignalingMessage {
    /// Parses one JSON message.
    pub fn parse(json: &[u8]) -> Result<Self, MessageError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// Serialises to JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

mod u32_string {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            N(u32),
        }
        match N::deserialize(d)? {
            N::S(s) => s.parse().map_err(serde::de::Error::custom),
            N::N(n) => Ok(n),
        }
    }
}

mod u32_string_vec {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let strings: Vec<String> = v.iter().map(u32::to_string).collect();
        strings.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let strings = Vec::<String>::deserialize(d)?;
        strings
            .iter()
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_setup_round_trips_in_tgcalls_shape() {
        let json =
            br#"{"@type":"InitialSetup","ufrag":"abcd","pwd":"secretsecret","renomination":false,
            "fingerprints":[{"hash":"sha-256","setup":"actpass","fingerprint":"AB:CD"}]}"#;
        let m = SignalingMessage::parse(json).unwrap();
        let SignalingMessage::InitialSetup(s) = &m else {
            panic!("{m:?}")
        };
        assert_eq!(s.fingerprints[0].setup, "actpass");
        let again = SignalingMessage::parse(&m.to_json()).unwrap();
        assert_eq!(again, m);
        assert!(String::from_utf8(m.to_json())
            .unwrap()
            .starts_with(r#"{"@type":"InitialSetup""#));
    }

    #[test]
    fn negotiate_channels_keeps_string_ids_as_numbers() {
        let json = br#"{"@type":"NegotiateChannels","exchangeId":"42","contents":[{"type":"audio",
            "ssrc":"3735928559","ssrcGroups":[{"semantics":"FID","ssrcs":["1","2"]}],
            "payloadTypes":[{"id":111,"name":"opus","clockrate":48000,"channels":2,
              "feedbackTypes":[{"type":"transport-cc","subtype":""}],
              "parameters":{"minptime":"10","useinbandfec":"1"}}],
            "rtpExtensions":[{"id":2,"uri":"http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"}],
            "someFutureField":true}]}"#;
        let SignalingMessage::NegotiateChannels(n) = SignalingMessage::parse(json).unwrap() else {
            panic!()
        };
        assert_eq!(n.exchange_id, 42);
        assert_eq!(n.contents[0].ssrc, 3_735_928_559);
        assert_eq!(n.contents[0].ssrc_groups[0].ssrcs, vec![1, 2]);
        assert_eq!(
            n.contents[0].payload_types[0].parameters["useinbandfec"],
            "1"
        );
        let out = String::from_utf8(SignalingMessage::NegotiateChannels(n).to_json()).unwrap();
        assert!(out.contains(r#""exchangeId":"42""#), "{out}");
        assert!(out.contains(r#""ssrc":"3735928559""#), "{out}");
    }

    #[test]
    fn candidates_and_media_state_parse_with_defaults() {
        let c = SignalingMessage::parse(
            br#"{"@type":"Candidates","candidates":[{"sdpString":"candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host"}]}"#,
        )
        .unwrap();
        assert!(matches!(c, SignalingMessage::Candidates(ref c) if c.candidates.len() == 1));
        let m = SignalingMessage::parse(br#"{"@type":"MediaState","muted":true}"#).unwrap();
        assert!(
            matches!(m, SignalingMessage::MediaState(ref s) if s.muted && s.video_state == "inactive")
        );
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"{}",
            b"[]",
            br#"{"@type":"Nope"}"#,
            br#"{"@type":"NegotiateChannels","exchangeId":"x"}"#,
            b"\xff\xfe",
        ] {
            assert!(SignalingMessage::parse(bad).is_err(), "{bad:?}");
        }
    }
}
