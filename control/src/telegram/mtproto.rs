//! The real path: grammers over MTProto. grammers' `Session` trait is implemented on our own
//! state (`StoredSession`) so that auth keys live only in the Storage's database, sealed; the
//! account persists `session_blob()` whenever grammers changes it (`changed()`).

use super::error::TgError;
use super::transport::{unpack, BoxFuture, Transport, UpdateRx};
use grammers_mtsender::{InvocationError, SenderPool, SenderPoolHandle};
use grammers_session::types::{
    ChannelState, DcOption, PeerId, PeerInfo, UpdateState, UpdatesState,
};
use grammers_session::{Session, SessionData};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// What is persisted of a grammers session.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct State {
    home_dc: i32,
    dc_options: Vec<DcOption>,
    peers: Vec<PeerInfo>,
    updates: UpdatesState,
}

/// grammers' session state kept by us; every change bumps `changed`.
pub struct StoredSession {
    home_dc: Mutex<i32>,
    dc_options: Mutex<HashMap<i32, DcOption>>,
    peers: Mutex<HashMap<PeerId, PeerInfo>>,
    updates: Mutex<UpdatesState>,
    changed: watch::Sender<u64>,
}

/// Session state errors (a poisoned lock only).
#[derive(Debug, thiserror::Error)]
#[error("session state lock poisoned")]
pub struct SessionLockError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StoredSession {
    /// A fresh session (grammers' known DCs) or the one stored in `blob`.
    pub fn load(blob: Option<&[u8]>) -> Result<Self, TgError> {
        let state = match blob {
            Some(b) => serde_json::from_slice::<State>(b)
                .map_err(|e| TgError::store(format!("stored MTProto session: {e}")))?,
            None => {
                let d = SessionData::default();
                State {
                    home_dc: d.home_dc,
                    dc_options: d.dc_options.into_values().collect(),
                    peers: Vec::new(),
                    updates: d.updates_state,
                }
            }
        };
        Ok(Self {
            home_dc: Mutex::new(state.home_dc),
            dc_options: Mutex::new(state.dc_options.into_iter().map(|d| (d.id, d)).collect()),
            peers: Mutex::new(state.peers.into_iter().map(|p| (p.id(), p)).collect()),
            updates: Mutex::new(state.updates),
            changed: watch::channel(0).0,
        })
    }

    /// Serialized state, to be sealed and stored.
    pub fn blob(&self) -> Result<Vec<u8>, TgError> {
        let state = State {
            home_dc: *lock(&self.home_dc),
            dc_options: lock(&self.dc_options).values().cloned().collect(),
            peers: lock(&self.peers).values().cloned().collect(),
            updates: lock(&self.updates).clone(),
        };
        serde_json::to_vec(&state).map_err(|e| TgError::store(e.to_string()))
    }

    /// Fires whenever something worth persisting changed (a new auth key, a DC move).
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Session for StoredSession {
    type Error = SessionLockError;

    fn home_dc_id(&self) -> Result<i32, Self::Error> {
        Ok(*lock(&self.home_dc))
    }

    fn set_home_dc_id(
        &self,
        dc_id: i32,
    ) -> grammers_session::BoxFuture<'_, Result<(), Self::Error>> {
        Box::pin(async move {
            *lock(&self.home_dc) = dc_id;
            self.bump();
            Ok(())
        })
    }

    fn dc_option(&self, dc_id: i32) -> Result<Option<DcOption>, Self::Error> {
        Ok(lock(&self.dc_options).get(&dc_id).cloned())
    }

    fn set_dc_option(
        &self,
        dc_option: &DcOption,
    ) -> grammers_session::BoxFuture<'_, Result<(), Self::Error>> {
        let dc_option = dc_option.clone();
        Box::pin(async move {
            lock(&self.dc_options).insert(dc_option.id, dc_option);
            self.bump();
            Ok(())
        })
    }

    fn peer(
        &self,
        peer: PeerId,
    ) -> grammers_session::BoxFuture<'_, Result<Option<PeerInfo>, Self::Error>> {
        Box::pin(async move { Ok(lock(&self.peers).get(&peer).cloned()) })
    }

    fn cache_peer(
        &self,
        peer: PeerInfo,
    ) -> grammers_session::BoxFuture<'_, Result<(), Self::Error>> {
        Box::pin(async move {
            lock(&self.peers)
                .entry(peer.id())
                .or_insert_with(|| peer.clone())
                .extend_info(&peer);
            Ok(())
        })
    }

    fn updates_state(&self) -> grammers_session::BoxFuture<'_, Result<UpdatesState, Self::Error>> {
        Box::pin(async move { Ok(lock(&self.updates).clone()) })
    }

    fn set_update_state(
        &self,
        update: UpdateState,
    ) -> grammers_session::BoxFuture<'_, Result<(), Self::Error>> {
        Box::pin(async move {
            let mut s = lock(&self.updates);
            match update {
                UpdateState::All(all) => *s = all,
                UpdateState::Primary { pts, date, seq } => {
                    s.pts = pts;
                    s.date = date;
                    s.seq = seq;
                }
                UpdateState::Secondary { qts } => s.qts = qts,
                UpdateState::Channel { id, pts } => {
                    s.channels.retain(|c| c.id != id);
                    s.channels.push(ChannelState { id, pts });
                }
            }
            Ok(())
        })
    }
}

/// An account's MTProto connection through grammers.
pub struct MtprotoClient {
    session: Arc<StoredSession>,
    handle: SenderPoolHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MtprotoClient {
    /// Starts grammers' sender pool on `session` and an update pump.
    pub async fn connect(
        session: Arc<StoredSession>,
        api_id: i32,
    ) -> Result<(Self, UpdateRx), TgError> {
        let SenderPool {
            runner,
            updates,
            handle,
        } = SenderPool::new(Arc::clone(&session), api_id);
        let thin = handle.thin.clone();
        let client = grammers_client::Client::new(handle);
        let pool = tokio::spawn(runner.run());
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stream = client
            .stream_updates(
                updates,
                grammers_mtsender::UpdatesConfiguration { catch_up: false },
            )
            .await
            .map_err(|e| TgError::transport(e.to_string()))?;
        let pump = tokio::spawn(async move {
            // grammers orders updates and fills gaps; we forward the raw TL update.
            while let Ok((update, _, _)) = stream.next_raw().await {
                // (grammers keeps the users of updates in its own session cache.)
                for u in unpack(tl_wrap(update)) {
                    if tx.send(u).is_err() {
                        return;
                    }
                }
            }
        });
        Ok((
            Self {
                session,
                handle: thin,
                tasks: vec![pool, pump],
            },
            rx,
        ))
    }
}

fn tl_wrap(update: grammers_tl_types::enums::Update) -> grammers_tl_types::enums::Updates {
    grammers_tl_types::enums::Updates::UpdateShort(grammers_tl_types::types::UpdateShort {
        update,
        date: 0,
    })
}

fn map_invocation(e: InvocationError) -> TgError {
    match e {
        InvocationError::Rpc(rpc) => {
            let name = match rpc.value {
                Some(v) => format!("{}_{v}", rpc.name),
                None => rpc.name.clone(),
            };
            TgError::from_rpc(rpc.code, &name)
        }
        other => TgError::transport(other.to_string()),
    }
}

impl Transport for MtprotoClient {
    fn invoke_raw(&self, body: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TgError>> {
        Box::pin(async move {
            let mut dc = self
                .session
                .home_dc_id()
                .map_err(|e| TgError::store(e.to_string()))?;
            // Follow at most one DC migration (PHONE_MIGRATE_N, USER_MIGRATE_N, …).
            for _ in 0..2 {
                match self.handle.raw_invoke_in_dc(dc, body.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        let e = map_invocation(e);
                        match e.migrate_to() {
                            Some(to) if to != dc => {
                                tracing::info!(
                                    from = dc,
                                    to,
                                    "Telegram moved the account to another DC"
                                );
                                let _ = self.session.set_home_dc_id(to).await;
                                dc = to;
                            }
                            _ => return Err(e),
                        }
                    }
                }
            }
            Err(TgError::transport("DC migration loop"))
        })
    }

    fn session_blob(&self) -> Result<Vec<u8>, TgError> {
        self.session.blob()
    }

    fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for MtprotoClient {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_session_round_trips_what_grammers_writes() {
        let s = StoredSession::load(None).unwrap();
        let changed = s.changed();
        let home = s.home_dc_id().unwrap();
        assert!((1..=5).contains(&home), "grammers' known DCs are preloaded");
        let mut dc = s.dc_option(home).unwrap().unwrap();
        dc.auth_key = Some([7u8; 256]);
        s.set_dc_option(&dc).await.unwrap();
        s.set_home_dc_id(4).await.unwrap();
        s.set_update_state(UpdateState::Primary {
            pts: 10,
            date: 20,
            seq: 3,
        })
        .await
        .unwrap();
        assert!(
            changed.has_changed().unwrap(),
            "a new auth key must be persisted"
        );
        let blob = s.blob().unwrap();
        let back = StoredSession::load(Some(&blob)).unwrap();
        assert_eq!(back.home_dc_id().unwrap(), 4);
        assert_eq!(
            back.dc_option(home).unwrap().unwrap().auth_key,
            Some([7u8; 256])
        );
        let st = back.updates_state().await.unwrap();
        assert_eq!((st.pts, st.date, st.seq), (10, 20, 3));
        assert!(matches!(
            StoredSession::load(Some(b"not json")),
            Err(TgError::Store { .. })
        ));
    }
}
