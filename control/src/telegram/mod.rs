//! The Session Storage's Telegram side: accounts, their MTProto sessions (encrypted at rest),
//! the allow-listed API the Manager and Workers may use, peer resolution and flood control.
//!
//! Everything above `transport` speaks TL (grammers-tl-types) and does not know whether it
//! talks to Telegram through grammers (`mtproto`) or to the simulated cloud (`simclient`).

pub mod error;
pub mod flood;
pub mod sealed;
pub mod simwire;

pub use error::TgError;
/// The TL types (grammers-tl-types) the Telegram API is spoken in.
pub use grammers_tl_types as tl;
pub mod account;
pub mod accounts;
pub mod mtproto;
pub mod resolve;
pub mod simclient;
pub mod transport;
