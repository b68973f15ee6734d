//! The Worker's SIP edge: listeners, request parsing, and the reason phrases SIP.TG uses.

pub mod ban;
pub mod call;
pub mod cidr;
pub mod core;
pub mod digest;
pub mod edge;
pub mod keepalive;
pub mod message;
pub mod msg;
pub mod outbound;
pub mod reasons;
pub mod registrar;
pub mod sdp;
pub mod tls_client;
pub mod transaction;
