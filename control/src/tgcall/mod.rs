//! Telegram 1:1 calls (tgcalls v2), sans-IO building blocks: the DH exchange and key checks
//! ([`dh`]), the four-emoji key visualisation ([`emoji`]), signalling encryption
//! ([`crypto`]), the JSON signalling messages ([`messages`]), and the signalling framing of
//! library versions 7.0.0, 8.0.0/9.0.0 and 12.0.0/13.0.0 ([`framing`], with the minimal SCTP
//! association of the last in [`sctp`]). The signalling session ([`session`]) and media build on
//! these.

pub mod crypto;
pub mod dh;
pub mod emoji;
pub mod framing;
pub mod messages;
pub mod sctp;
pub mod session;
