//! The control side's end of the dataplane Unix socket: a client and the supervisor that keeps
//! it connected (and the dataplane process alive).

pub mod client;
pub mod supervisor;

pub use client::{latching_leg, telegram_leg, DataplaneClient, DpError};
pub use supervisor::{SpawnSpec, Supervisor, SupervisorStatus};
