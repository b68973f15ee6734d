//! Typed Telegram failures. RPC errors keep Telegram's own names (`USERNAME_NOT_OCCUPIED`,
//! `USER_PRIVACY_RESTRICTED`, …) so the gateway can map each to the SIP text SIP.TG uses.

use std::time::Duration;

/// Why a Telegram request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TgError {
    /// Telegram answered with an RPC error; `name` has any numeric suffix removed
    /// (`FLOOD_WAIT_30` → `FLOOD_WAIT`, value 30).
    #[error("{name} (code {code}{})", value.map(|v| format!(", value {v}")).unwrap_or_default())]
    Rpc {
        code: i32,
        name: String,
        value: Option<u32>,
    },
    /// A flood wait is running for this account: the request was not sent.
    #[error("Too Many Requests: retry after {seconds}")]
    FloodWait { seconds: u32 },
    /// Telegram said PEER_FLOOD (too many calls or messages to strangers): outgoing calls and
    /// messages are held back for `seconds`.
    #[error("PEER_FLOOD (held back {seconds} s)")]
    PeerFlood { seconds: u32 },
    /// No answer within the RPC timeout.
    #[error("Timeout of waiting RPC result")]
    Timeout,
    /// The request is not on the Session Storage's allow-list.
    #[error("request {method} is not allowed by the Session Storage")]
    NotAllowed { method: String },
    /// The account has no authorized session (log in first).
    #[error("account {account} is not logged in")]
    NotAuthorized { account: String },
    /// No such account in this Storage.
    #[error("no Telegram account named {account}")]
    UnknownAccount { account: String },
    /// A numeric user id without a known access hash (Telegram only lets you call users you
    /// have met: a message, a call, a contact).
    #[error("user {user_id} is not known to this account (no access hash): Chat not found")]
    UnknownUser { user_id: i64 },
    /// Bad input from the caller of the API (phone, username, parameters).
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    /// The connection to Telegram (or the simulated cloud) failed.
    #[error("telegram transport: {message}")]
    Transport { message: String },
    /// Telegram's answer did not decode as the expected TL type.
    #[error("cannot decode Telegram's answer to {request}: {why}")]
    Decode { request: String, why: String },
    /// The Storage's database failed.
    #[error("session store: {message}")]
    Store { message: String },
}

impl TgError {
    /// A transport failure.
    pub fn transport(message: impl Into<String>) -> Self {
        TgError::Transport {
            message: message.into(),
        }
    }

    /// A database failure.
    pub fn store(message: impl Into<String>) -> Self {
        TgError::Store {
            message: message.into(),
        }
    }

    /// An RPC error from Telegram's `error_message`: trailing `_N` numbers become `value`.
    pub fn from_rpc(code: i32, message: &str) -> Self {
        if let Some(n) = message.strip_prefix("Too Many Requests: retry after ") {
            return TgError::Rpc {
                code,
                name: "FLOOD_WAIT".into(),
                value: n.trim().parse().ok(),
            };
        }
        let (name, value) = match message.rsplit_once('_') {
            Some((head, tail)) if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) => {
                (head.to_string(), tail.parse().ok())
            }
            _ => (message.to_string(), None),
        };
        // FLOOD_PREMIUM_WAIT_N and SLOWMODE_WAIT_N behave as flood waits.
        let name = match name.as_str() {
            "FLOOD_PREMIUM_WAIT" => "FLOOD_WAIT".to_string(),
            _ => name,
        };
        TgError::Rpc { code, name, value }
    }

    /// The RPC error name, if this is one (`USERNAME_NOT_OCCUPIED`, …).
    pub fn rpc_name(&self) -> Option<&str> {
        match self {
            TgError::Rpc { name, .. } => Some(name),
            TgError::PeerFlood { .. } => Some("PEER_FLOOD"),
            TgError::FloodWait { .. } => Some("FLOOD_WAIT"),
            _ => None,
        }
    }

    /// Is this RPC error `name`?
    pub fn is(&self, name: &str) -> bool {
        self.rpc_name() == Some(name)
    }

    /// How long a flood error asks us to wait, if it is one.
    pub fn flood_wait(&self) -> Option<Duration> {
        match self {
            TgError::Rpc {
                name,
                value: Some(v),
                ..
            } if name == "FLOOD_WAIT" || name == "SLOWMODE_WAIT" => {
                Some(Duration::from_secs(u64::from(*v)))
            }
            TgError::FloodWait { seconds } | TgError::PeerFlood { seconds } => {
                Some(Duration::from_secs(u64::from(*seconds)))
            }
            _ => None,
        }
    }

    /// The DC a `*_MIGRATE_N` error points to.
    pub fn migrate_to(&self) -> Option<i32> {
        match self {
            TgError::Rpc {
                code: 303,
                name,
                value: Some(dc),
            } if name.ends_with("_MIGRATE") => i32::try_from(*dc).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_lose_their_numbers() {
        let e = TgError::from_rpc(420, "FLOOD_WAIT_30");
        assert!(e.is("FLOOD_WAIT"));
        assert_eq!(e.flood_wait(), Some(Duration::from_secs(30)));
        let e = TgError::from_rpc(400, "USERNAME_NOT_OCCUPIED");
        assert!(e.is("USERNAME_NOT_OCCUPIED"));
        assert_eq!(e.flood_wait(), None);
        let e = TgError::from_rpc(303, "PHONE_MIGRATE_4");
        assert_eq!(e.migrate_to(), Some(4));
        let e = TgError::from_rpc(429, "Too Many Requests: retry after 12");
        assert_eq!(e.flood_wait(), Some(Duration::from_secs(12)));
        let e = TgError::from_rpc(400, "PEER_FLOOD");
        assert!(e.is("PEER_FLOOD"));
    }

    #[test]
    fn texts_match_the_sip_reasons() {
        assert_eq!(
            TgError::FloodWait { seconds: 7 }.to_string(),
            "Too Many Requests: retry after 7"
        );
        assert_eq!(
            TgError::Timeout.to_string(),
            "Timeout of waiting RPC result"
        );
    }
}
