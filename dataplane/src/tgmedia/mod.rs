//! Telegram call media (tgcalls v2): a WebRTC leg ([`leg`]) and the Opus codec ([`opus`]).
//!
//! Signalling lives in control (`siptg_control::tgcall`); it drives a [`leg::TgMediaLeg`] with
//! the peer's ICE credentials, fingerprint, candidates and SSRC, and the leg turns datagrams into
//! Opus packets and back.

pub mod bridge;
pub mod dtmf;
pub mod endpoint;
pub mod g711;
pub mod g722;
pub mod jitter;
pub mod leg;
pub mod opus;
/// Sans-IO TURN client (RFC 8656 over UDP) for Telegram's relay servers and relay-only calls.
pub mod turn;
