//! The gateway: SIP calls joined to Telegram calls. `tgcall` is one Telegram call's state
//! machine (sans-IO).

pub mod tgcall;
