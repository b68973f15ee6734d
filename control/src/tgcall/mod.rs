//! Telegram 1:1 calls (tgcalls v2), sans-IO building blocks: the DH exchange and key checks
//! ([`dh`]), the four-emoji key visualisation ([`emoji`]), and signalling encryption
//! ([`crypto`]). Framing, the call state machine and media (str0m) build on these.

pub mod crypto;
pub mod dh;
pub mod emoji;
