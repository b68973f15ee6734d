//! siptg's control side (tokio): configuration, the Manager, Worker and Session Storage roles,
//! the links between them, the Worker's SIP edge, and the client of the dataplane's control
//! socket. Media never passes through this crate; it drives the dataplane.

pub mod admin;
pub mod config;
pub mod dataplane;
pub mod gateway;
pub mod link;
pub mod linkserver;
pub mod manager;
pub mod metrics;
pub mod node;
pub mod observability;
pub mod run;
pub mod sip;
pub mod storage;
pub mod store;
pub mod telegram;
pub mod tgcall;
pub mod tgsim;
pub mod tls;
pub mod worker;
