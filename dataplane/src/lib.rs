//! siptg's media dataplane: a thread-per-core RTP relay.
//!
//! One glommio executor per configured core owns a [`shard::Shard`] (sessions, legs, ports) and
//! that shard's sockets outright; the control side talks to it over a Unix socket
//! ([`server`]) with the messages of `siptg-proto`. It runs as its own process (`siptg
//! dataplane`) so calls survive a restart of the control side.

pub mod driver;
pub mod ports;
pub mod rtp;
pub mod server;
pub mod shard;
pub mod srtp;
pub mod stats;
pub mod tgmedia;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use server::{Running, StartError};

/// Everything the dataplane process needs; built from the `[dataplane]` config section.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// CPU cores to run a shard on, one shard per core.
    pub cores: Vec<u16>,
    /// Pin each shard's thread to its core.
    pub pin_cores: bool,
    /// RTP port range, inclusive, split evenly between the shards.
    pub port_min: u16,
    pub port_max: u16,
    /// Address media sockets bind to.
    pub media_ip: IpAddr,
    /// Path of the control socket.
    pub socket: PathBuf,
    /// Silence before an RTP timeout event.
    pub rtp_timeout: Duration,
    /// Period of stream-stats events; `None` disables them.
    pub stats_interval: Option<Duration>,
    /// Which I/O loop runs the shards.
    pub driver: DriverChoice,
    /// Portable driver: wait this long after a wake-up with traffic (see `driver::portable`).
    pub poll_interval: Duration,
}

/// The configured driver; `Auto` takes the uring driver where io_uring works, else the portable
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    Auto,
    Uring,
    Glommio,
    Portable,
}

impl DriverChoice {
    /// The driver to run on this host.
    pub fn resolve(self) -> driver::DriverKind {
        match self {
            DriverChoice::Uring => driver::DriverKind::Uring,
            DriverChoice::Glommio => driver::DriverKind::Glommio,
            DriverChoice::Portable => driver::DriverKind::Portable,
            DriverChoice::Auto if driver::uring_driver_supported() => driver::DriverKind::Uring,
            DriverChoice::Auto => {
                tracing::warn!(
                    "io_uring (6.1+ features) is not available here; using the portable driver"
                );
                driver::DriverKind::Portable
            }
        }
    }
}

/// Starts the dataplane and serves its control socket until the process ends.
pub fn run(cfg: &DataplaneConfig) -> Result<(), StartError> {
    let running = Running::start(cfg)?;
    running.serve().map_err(|source| StartError::Listen {
        path: cfg.socket.display().to_string(),
        source,
    })
}
