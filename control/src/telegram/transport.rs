//! How requests reach Telegram. A transport moves serialized TL functions and results; the two
//! kinds are grammers over MTProto (`mtproto`) and the simulated cloud (`simclient`). Flood
//! control, timeouts and the allow-list live above it, in `account`, so both behave the same.

use super::error::TgError;
use grammers_tl_types as tl;
use std::future::Future;
use std::pin::Pin;

/// A boxed future, as transports are used behind `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connection to Telegram for one account.
pub trait Transport: Send + Sync + 'static {
    /// Sends a serialized TL function and returns the serialized result, or Telegram's error.
    fn invoke_raw(&self, body: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TgError>>;
    /// What must be stored to come back logged in after a restart (auth keys: seal it).
    fn session_blob(&self) -> Result<Vec<u8>, TgError>;
    /// Closes the connection.
    fn close(&self);
}

/// One update and the users its container named (the caller of a call, the sender of a
/// message: with their access hashes, which the Storage remembers).
#[derive(Debug, Clone)]
pub struct Incoming {
    pub update: tl::enums::Update,
    pub users: Vec<tl::enums::User>,
}

/// Updates as they arrive from Telegram, unpacked from their `Updates` containers.
pub type UpdateRx = tokio::sync::mpsc::UnboundedReceiver<Incoming>;

/// Unpacks an `Updates` container into single updates (the sim sends `updateShort` and
/// `updates`; Telegram sends all kinds).
pub fn unpack(updates: tl::enums::Updates) -> Vec<Incoming> {
    let (list, users) = match updates {
        tl::enums::Updates::UpdateShort(u) => (vec![u.update], Vec::new()),
        tl::enums::Updates::Updates(u) => (u.updates, u.users),
        tl::enums::Updates::Combined(u) => (u.updates, u.users),
        _ => (Vec::new(), Vec::new()),
    };
    list.into_iter()
        .map(|update| Incoming {
            update,
            users: users.clone(),
        })
        .collect()
}
