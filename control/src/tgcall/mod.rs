//! Telegram 1:1 calls (tgcalls v2), sans-IO building blocks: the DH exchange and key checks
//! ([`dh`]), the four-emoji key visualisation ([`emoji`]), signalling encryption
//! ([`crypto`]), and the JSON signalling messages ([`messages`]). Framing, the call state machine
//! and media (str0m) build on these.

pub mod crypto;
pub mod dh;
pub mod emoji;
pub mod messages;
pub mod session;
