//! The first frame each way on a new control-socket connection.
//!
//! Architecture invariant: `Hello` and `Welcome` keep their field order forever (new fields go at
//! the end), so that any two versions can at least tell each other what they speak.

use serde::{Deserialize, Serialize};

/// Identifies a siptg control-socket peer; anything else on the socket is refused.
pub const MAGIC: [u8; 8] = *b"SIPTG-DP";

/// Version of the command/event set in [`crate::messages`]. Bump on any incompatible change.
/// 3: `LegSpec::direction` (hold).
pub const PROTOCOL_VERSION: u16 = 3;

/// Sent by the control side as the first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    /// Highest protocol version the client speaks.
    pub version: u16,
    /// Free-form client name for logs (e.g. `worker wrk-1 pid 4242`).
    pub client: String,
}

impl Hello {
    /// A hello for this build's protocol version.
    pub fn new(client: impl Into<String>) -> Self {
        Self {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            client: client.into(),
        }
    }
}

/// The dataplane's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub magic: [u8; 8],
    /// Version the dataplane will speak on this connection.
    pub version: u16,
    /// `None` when accepted; otherwise why the connection is refused (it is then closed).
    pub refused: Option<String>,
    /// Random per dataplane process: a changed value after reconnecting means the dataplane
    /// restarted and every session it had is gone.
    pub boot_id: u64,
    /// CPU cores the dataplane runs a shard on.
    pub cores: Vec<u16>,
    /// Which I/O driver the shards use (e.g. `glommio`).
    pub driver: String,
}
