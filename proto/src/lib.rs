//! Wire types and sans-IO framing for the control ↔ dataplane Unix socket.
//!
//! The control side (tokio) and the dataplane (glommio) are separate processes so that media keeps
//! flowing while the control side restarts. This crate is the only thing they share: the message
//! types, the length-prefixed frame codec and the versioned handshake. It does no I/O.
//!
//! Architecture invariant: nothing here reads a clock, opens a socket or spawns a task.

pub mod codec;
pub mod handshake;
pub mod messages;

pub use codec::{encode_frame, FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use handshake::{Hello, Welcome, MAGIC, PROTOCOL_VERSION};
pub use messages::*;
