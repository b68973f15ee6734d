//! Peer resolution with a persistent cache: who is `+79991234567`, `@alice` or user 12345, as
//! the (user id, access hash) pair Telegram needs to call or message them. Telegram limits
//! resolution (phone lookups especially), so every answer is kept in the database under each of
//! the user's keys, per account (access hashes are per account).

use super::account::Account;
use super::error::TgError;
use crate::store::{Store, Table};
use grammers_tl_types as tl;

/// What to resolve.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerQuery {
    /// International number, digits only.
    Phone(String),
    /// Without the `@`, lower case.
    Username(String),
    UserId(i64),
}

impl PeerQuery {
    /// `+79991234567` or digits → phone; `@name` or `tg#name` → username; `id:12345` → user id.
    pub fn parse(text: &str) -> Result<Self, TgError> {
        let t = text.trim();
        let invalid = |why: &str| TgError::Invalid {
            what: "peer".into(),
            why: format!("{t:?}: {why}"),
        };
        if let Some(name) = t.strip_prefix('@').or_else(|| t.strip_prefix("tg#")) {
            let ok = (4..=32).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            return if ok {
                Ok(PeerQuery::Username(name.to_ascii_lowercase()))
            } else {
                Err(invalid("a username has 4 to 32 letters, digits or _"))
            };
        }
        if let Some(id) = t.strip_prefix("id:").or_else(|| {
            // `id12345` (a SIP user part cannot hold `:` unescaped).
            t.strip_prefix("id")
                .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        }) {
            return id
                .parse()
                .map(PeerQuery::UserId)
                .map_err(|_| invalid("not a numeric user id"));
        }
        let digits = t.strip_prefix('+').unwrap_or(t);
        if !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(PeerQuery::Phone(digits.to_string()));
        }
        Err(invalid("expected +phone, @username, tg#username or id:N"))
    }

    fn cache_key(&self, account: &str) -> String {
        match self {
            PeerQuery::Phone(p) => format!("{account}/phone:{p}"),
            PeerQuery::Username(u) => format!("{account}/username:{u}"),
            PeerQuery::UserId(id) => format!("{account}/id:{id}"),
        }
    }
}

/// A user the account can call or message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub user_id: i64,
    pub access_hash: i64,
    pub username: Option<String>,
    pub phone: Option<String>,
    pub first_name: String,
    pub last_name: String,
}

impl Peer {
    /// From a TL user, if it carries an access hash.
    pub fn from_user(u: &tl::enums::User) -> Option<Self> {
        let tl::enums::User::User(u) = u else {
            return None;
        };
        Some(Peer {
            user_id: u.id,
            access_hash: u.access_hash?,
            username: u.username.clone(),
            phone: u.phone.clone(),
            first_name: u.first_name.clone().unwrap_or_default(),
            last_name: u.last_name.clone().unwrap_or_default(),
        })
    }

    /// The `InputUser` Telegram wants.
    pub fn input_user(&self) -> tl::enums::InputUser {
        tl::enums::InputUser::User(tl::types::InputUser {
            user_id: self.user_id,
            access_hash: self.access_hash,
        })
    }
}

/// Where a resolution came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Source {
    Cache,
    Telegram,
}

/// Remembers `peer` under all its keys for `account`.
pub async fn remember(store: &Store, account: &str, peer: &Peer) -> Result<(), TgError> {
    let value = serde_json::to_vec(peer).map_err(|e| TgError::store(e.to_string()))?;
    let mut keys = vec![PeerQuery::UserId(peer.user_id)];
    if let Some(p) = &peer.phone {
        keys.push(PeerQuery::Phone(p.clone()));
    }
    if let Some(u) = &peer.username {
        keys.push(PeerQuery::Username(u.to_ascii_lowercase()));
    }
    for k in keys {
        store
            .put(Table::Peers, &k.cache_key(account), &value)
            .await
            .map_err(|e| TgError::store(e.to_string()))?;
    }
    Ok(())
}

/// Resolves `query` for `account`, from the cache or from Telegram.
pub async fn resolve(
    account: &Account,
    store: &Store,
    query: &PeerQuery,
) -> Result<(Peer, Source), TgError> {
    let key = query.cache_key(account.name());
    if let Some(bytes) = store
        .get(Table::Peers, &key)
        .await
        .map_err(|e| TgError::store(e.to_string()))?
    {
        if let Ok(peer) = serde_json::from_slice::<Peer>(&bytes) {
            return Ok((peer, Source::Cache));
        }
    }
    let users = match query {
        PeerQuery::Username(name) => {
            let tl::enums::contacts::ResolvedPeer::Peer(r) = account
                .invoke(&tl::functions::contacts::ResolveUsername {
                    username: name.clone(),
                    referer: None,
                })
                .await?;
            r.users
        }
        PeerQuery::Phone(phone) => {
            match account
                .invoke(&tl::functions::contacts::ResolvePhone {
                    phone: phone.clone(),
                })
                .await
            {
                Ok(tl::enums::contacts::ResolvedPeer::Peer(r)) => r.users,
                // Some numbers resolve only as contacts: import, as tg2sip did.
                Err(e) if e.is("PHONE_NOT_OCCUPIED") || e.is("PHONE_NUMBER_INVALID") => {
                    let tl::enums::contacts::ImportedContacts::Contacts(r) = account
                        .invoke(&tl::functions::contacts::ImportContacts {
                            contacts: vec![tl::enums::InputContact::InputPhoneContact(
                                tl::types::InputPhoneContact {
                                    client_id: 1,
                                    phone: phone.clone(),
                                    first_name: format!("+{phone}"),
                                    last_name: String::new(),
                                    note: None,
                                },
                            )],
                        })
                        .await?;
                    if r.users.is_empty() {
                        return Err(e);
                    }
                    r.users
                }
                Err(e) => return Err(e),
            }
        }
        PeerQuery::UserId(id) => return Err(TgError::UnknownUser { user_id: *id }),
    };
    let peer = match users.iter().find_map(Peer::from_user) {
        Some(p) => p,
        // Telegram showed the user without an access hash: it cannot be called by us.
        None if !users.is_empty() => {
            return Err(TgError::Rpc {
                code: 400,
                name: "ANONYMOUS_USER".into(),
                value: None,
            })
        }
        None => {
            return Err(TgError::Rpc {
                code: 400,
                name: "PEER_ID_INVALID".into(),
                value: None,
            })
        }
    };
    remember(store, account.name(), &peer).await?;
    Ok((peer, Source::Telegram))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse() {
        assert_eq!(PeerQuery::parse("+7 999").ok(), None);
        assert_eq!(
            PeerQuery::parse("+79991234567").unwrap(),
            PeerQuery::Phone("79991234567".into())
        );
        assert_eq!(
            PeerQuery::parse("@Alice_1").unwrap(),
            PeerQuery::Username("alice_1".into())
        );
        assert_eq!(
            PeerQuery::parse("tg#bobby").unwrap(),
            PeerQuery::Username("bobby".into())
        );
        assert_eq!(PeerQuery::parse("id:42").unwrap(), PeerQuery::UserId(42));
        assert_eq!(PeerQuery::parse("id42").unwrap(), PeerQuery::UserId(42));
        for bad in [
            "",
            "@ab",
            "id:x",
            "hello",
            "@with space",
            "+1234567890123456",
        ] {
            assert!(PeerQuery::parse(bad).is_err(), "{bad}");
        }
    }
}
