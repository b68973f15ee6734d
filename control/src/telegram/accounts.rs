//! The Session Storage's accounts: which exist (records in the database), their sealed
//! sessions, the live connection of each, and one stream of their allowed updates.
//! Auth keys exist in the clear only in memory; what reaches the database is sealed
//! (`sealed::StorageKey`).

use super::account::{Account, AccountOptions, Hygiene, HygieneReport, LoginStep, Me};
use super::error::TgError;
use super::mtproto::{MtprotoClient, StoredSession};
use super::sealed::StorageKey;
use super::simclient::SimClient;
use super::transport::{Transport, UpdateRx};
use crate::store::{Store, Table};
use grammers_tl_types as tl;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Where the accounts' Telegram is.
#[derive(Debug, Clone)]
pub enum Cloud {
    /// Telegram itself, through grammers.
    Telegram,
    /// The simulated cloud at this address.
    Sim(SocketAddr),
}

/// An account's state as `siptg storage list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    /// Login started (code sent or QR shown), not finished.
    LoggingIn,
    /// Logged in and connected.
    Active,
    /// Logged in before, but Telegram no longer accepts the session (logged out elsewhere).
    Inactive,
    /// Logged out by us.
    LoggedOut,
}

/// What the database keeps about an account (never secrets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    pub name: String,
    pub state: AccountState,
    #[serde(default)]
    pub me: Option<Me>,
    #[serde(default)]
    pub phone: Option<String>,
}

/// An update from one of the accounts, already filtered by the allow-list of updates.
#[derive(Debug, Clone)]
pub struct AccountUpdate {
    pub account: String,
    pub update: tl::enums::Update,
}

/// Which updates leave the Storage (SIP.TG's `allowed_updates`).
pub fn update_allowed(u: &tl::enums::Update) -> bool {
    matches!(
        u,
        tl::enums::Update::PhoneCall(_)
            | tl::enums::Update::PhoneCallSignalingData(_)
            | tl::enums::Update::NewMessage(_)
            | tl::enums::Update::LoginToken
            // A keypad bot's inline queries and button presses (`gateway::keypad`).
            | tl::enums::Update::BotInlineQuery(_)
            | tl::enums::Update::InlineBotCallbackQuery(_)
    )
}

/// The accounts of one Storage.
pub struct Accounts {
    store: Store,
    key: StorageKey,
    cloud: Cloud,
    opts: AccountOptions,
    hygiene: Hygiene,
    live: Mutex<HashMap<String, Arc<Account>>>,
    updates: broadcast::Sender<AccountUpdate>,
    /// One connect at a time: two concurrent connects of one account would open two
    /// sessions and keep the wrong one.
    connecting: tokio::sync::Mutex<()>,
}

fn store_err(e: crate::store::StoreError) -> TgError {
    TgError::store(e.to_string())
}

fn valid_name(name: &str) -> Result<(), TgError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(TgError::Invalid {
            what: "account name".into(),
            why: format!("{name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"),
        })
    }
}

impl Accounts {
    /// Accounts over `store`, sealing sessions with `key`.
    pub fn new(
        store: Store,
        key: StorageKey,
        cloud: Cloud,
        opts: AccountOptions,
        hygiene: Hygiene,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            key,
            cloud,
            opts,
            hygiene,
            live: Mutex::new(HashMap::new()),
            updates: broadcast::channel(1024).0,
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every account's allowed updates.
    pub fn subscribe(&self) -> broadcast::Receiver<AccountUpdate> {
        self.updates.subscribe()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Account>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The live account `name`, if connected.
    pub fn get(&self, name: &str) -> Result<Arc<Account>, TgError> {
        self.live()
            .get(name)
            .cloned()
            .ok_or_else(|| TgError::UnknownAccount {
                account: name.into(),
            })
    }

    /// Every stored record.
    pub async fn list(&self) -> Result<Vec<AccountRecord>, TgError> {
        let rows = self
            .store
            .list(Table::Accounts, "")
            .await
            .map_err(store_err)?;
        Ok(rows
            .iter()
            .filter_map(|(_, v)| serde_json::from_slice(v).ok())
            .collect())
    }

    /// One stored record.
    pub async fn record(&self, name: &str) -> Result<Option<AccountRecord>, TgError> {
        let v = self
            .store
            .get(Table::Accounts, name)
            .await
            .map_err(store_err)?;
        Ok(v.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    async fn save_record(&self, r: &AccountRecord) -> Result<(), TgError> {
        let v = serde_json::to_vec(r).map_err(|e| TgError::store(e.to_string()))?;
        self.store
            .put(Table::Accounts, &r.name, &v)
            .await
            .map_err(store_err)
    }

    /// Seals and stores the account's session as it is now.
    pub async fn persist(&self, account: &Account) -> Result<(), TgError> {
        let blob = account.transport().session_blob()?;
        let sealed = self.key.seal(account.name(), &blob);
        self.store
            .put_session(account.name(), &sealed)
            .await
            .map_err(store_err)
    }

    /// Connects `name` with its stored session (or a fresh one) and starts pumping its updates.
    pub async fn connect(self: &Arc<Self>, name: &str) -> Result<Arc<Account>, TgError> {
        valid_name(name)?;
        let _one_at_a_time = self.connecting.lock().await;
        if let Ok(a) = self.get(name) {
            return Ok(a);
        }
        let stored = match self.store.get_session(name).await.map_err(store_err)? {
            Some(sealed) => Some(
                self.key
                    .open(name, &sealed)
                    .map_err(|e| TgError::store(e.to_string()))?,
            ),
            None => None,
        };
        let (transport, rx): (Arc<dyn Transport>, UpdateRx) = match &self.cloud {
            Cloud::Sim(addr) => {
                let (c, rx) = SimClient::connect(*addr, stored.as_deref()).await?;
                (Arc::new(c), rx)
            }
            Cloud::Telegram => {
                let session = Arc::new(StoredSession::load(stored.as_deref())?);
                let mut changed = session.changed();
                let (c, rx) = MtprotoClient::connect(session.clone(), self.opts.api_id).await?;
                // grammers creates auth keys and moves DCs on its own: persist each change.
                let me = Arc::downgrade(self);
                let account_name = name.to_string();
                tokio::spawn(async move {
                    while changed.changed().await.is_ok() {
                        let Some(me) = me.upgrade() else { break };
                        if let Ok(blob) = session.blob() {
                            let sealed = me.key.seal(&account_name, &blob);
                            if let Err(e) = me.store.put_session(&account_name, &sealed).await {
                                tracing::error!(account = %account_name, error = %e, "cannot store the MTProto session");
                            }
                        }
                    }
                });
                (Arc::new(c), rx)
            }
        };
        let account = Arc::new(Account::new(name, transport, self.opts.clone()));
        self.persist(&account).await?;
        self.spawn_pump(name, rx);
        self.live().insert(name.to_string(), account.clone());
        Ok(account)
    }

    fn spawn_pump(self: &Arc<Self>, name: &str, mut rx: UpdateRx) {
        let tx = self.updates.clone();
        let account = name.to_string();
        // Weak: the pump must not keep the database open after the Storage is gone.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(incoming) = rx.recv().await {
                // Users met in updates become resolvable by id (their access hash).
                if let Some(me) = me.upgrade() {
                    for u in &incoming.users {
                        if let Some(peer) = super::resolve::Peer::from_user(u) {
                            if let Err(e) =
                                super::resolve::remember(&me.store, &account, &peer).await
                            {
                                tracing::warn!(%account, error = %e, "cannot cache a peer");
                            }
                        }
                    }
                }
                let update = incoming.update;
                if update_allowed(&update) {
                    let _ = tx.send(AccountUpdate {
                        account: account.clone(),
                        update,
                    });
                } else {
                    tracing::trace!(%account, "update outside the allow-list dropped");
                }
            }
        });
    }

    /// Drops the live connection of `name`.
    pub fn disconnect(&self, name: &str) {
        if let Some(a) = self.live().remove(name) {
            a.transport().close();
        }
    }

    /// Starts a phone login: the code goes to the account's apps.
    pub async fn begin_phone_login(
        self: &Arc<Self>,
        name: &str,
        phone: &str,
    ) -> Result<super::account::CodeSent, TgError> {
        let account = self.connect(name).await?;
        let sent = account.send_code(phone).await?;
        self.save_record(&AccountRecord {
            name: name.into(),
            state: AccountState::LoggingIn,
            me: None,
            phone: Some(sent.phone.clone()),
        })
        .await?;
        Ok(sent)
    }

    /// A bot's login by its token: connects `name`, signs in and records it (no hygiene: a
    /// bot has no calls, devices or privacy settings).
    pub async fn bot_login(self: &Arc<Self>, name: &str, token: &str) -> Result<Me, TgError> {
        let account = self.connect(name).await?;
        let step = account.bot_sign_in(token).await?;
        self.finish_step(name, &step).await?;
        match step {
            LoginStep::Done(me) if me.bot => Ok(me),
            LoginStep::Done(me) => Err(TgError::Invalid {
                what: "bot token".into(),
                why: format!("user {} is not a bot", me.user_id),
            }),
            other => Err(TgError::Invalid {
                what: "bot login".into(),
                why: format!("did not finish: {other:?}"),
            }),
        }
    }

    /// Records the outcome of a login step; on success applies hygiene and stores the session.
    pub async fn finish_step(
        &self,
        name: &str,
        step: &LoginStep,
    ) -> Result<Option<HygieneReport>, TgError> {
        let LoginStep::Done(me) = step else {
            return Ok(None);
        };
        let account = self.get(name)?;
        self.persist(&account).await?;
        self.save_record(&AccountRecord {
            name: name.into(),
            state: AccountState::Active,
            me: Some(me.clone()),
            phone: me.phone.clone(),
        })
        .await?;
        tracing::info!(
            account = name,
            user_id = me.user_id,
            bot = me.bot,
            "Telegram account logged in"
        );
        if me.bot {
            return Ok(None);
        }
        let report = account.apply_hygiene(&self.hygiene).await?;
        Ok(Some(report))
    }

    /// Logs `name` out at Telegram, forgets its session and marks it logged out.
    pub async fn log_out(&self, name: &str) -> Result<(), TgError> {
        if let Ok(a) = self.get(name) {
            if let Err(e) = a.log_out().await {
                tracing::warn!(account = name, error = %e, "log-out at Telegram failed; forgetting the session anyway");
            }
        }
        self.disconnect(name);
        self.store
            .delete(Table::Sessions, name)
            .await
            .map_err(store_err)?;
        let mut r = self
            .record(name)
            .await?
            .ok_or_else(|| TgError::UnknownAccount {
                account: name.into(),
            })?;
        r.state = AccountState::LoggedOut;
        self.save_record(&r).await
    }

    /// At start-up: reconnects every account that was logged in and checks Telegram still
    /// accepts it (Active), else marks it Inactive. Returns the records as they are now.
    pub async fn start_all(self: &Arc<Self>) -> Result<Vec<AccountRecord>, TgError> {
        let mut out = Vec::new();
        for mut r in self.list().await? {
            if matches!(r.state, AccountState::Active | AccountState::Inactive) {
                let state = match self.connect(&r.name).await {
                    Ok(a) => match a.me().await {
                        Ok(me) => {
                            let bot = me.bot;
                            r.me = Some(me);
                            if bot {
                                // Bots have no calls or privacy settings to tidy.
                            } else if let Err(e) = a.apply_hygiene(&self.hygiene).await {
                                tracing::warn!(account = %r.name, error = %e, "account hygiene not applied");
                            }
                            AccountState::Active
                        }
                        Err(TgError::NotAuthorized { account: _ }) => AccountState::Inactive,
                        Err(e) => {
                            tracing::warn!(account = %r.name, error = %e, "cannot check the account");
                            r.state
                        }
                    },
                    Err(e) => {
                        tracing::warn!(account = %r.name, error = %e, "cannot connect the account");
                        r.state
                    }
                };
                if state != r.state || state == AccountState::Active {
                    r.state = state;
                    self.save_record(&r).await?;
                }
            }
            out.push(r);
        }
        Ok(out)
    }
}
