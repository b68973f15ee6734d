//! The transport to the simulated cloud: the sim wire over TCP. The 32-byte key the cloud binds
//! the connection to plays the auth key's part and is what gets sealed and stored.

use super::error::TgError;
use super::simwire::{read_frame, SimFrame};
use super::transport::{unpack, BoxFuture, Transport, UpdateRx};
use grammers_tl_types::{self as tl, Deserializable};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, TgError>>>>>;

/// A connection to `tgsim` for one account.
pub struct SimClient {
    key: [u8; 32],
    next: AtomicU64,
    pending: Pending,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Set when the cloud closed the connection: requests fail at once.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl SimClient {
    /// Connects and presents `stored` (a previous session's key), if any.
    pub async fn connect(
        addr: SocketAddr,
        stored: Option<&[u8]>,
    ) -> Result<(Self, UpdateRx), TgError> {
        let auth_key = match stored {
            Some(s) => Some(
                <[u8; 32]>::try_from(s)
                    .map_err(|_| TgError::transport("stored sim session is not 32 bytes"))?,
            ),
            None => None,
        };
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| TgError::transport(format!("connect {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        wr.write_all(&SimFrame::Hello { auth_key }.encode())
            .await
            .map_err(|e| TgError::transport(e.to_string()))?;
        let key = match read_frame(&mut rd).await {
            Ok(Some(SimFrame::Welcome { auth_key })) => auth_key,
            Ok(_) => return Err(TgError::transport("tgsim did not welcome us")),
            Err(e) => return Err(TgError::transport(e.to_string())),
        };
        let pending: Pending = Arc::default();
        let (utx, urx) = mpsc::unbounded_channel();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if wr.write_all(&f).await.is_err() {
                    break;
                }
            }
        });
        let p = pending.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed2 = closed.clone();
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok(Some(SimFrame::Result { id, body })) => {
                        if let Some(tx) = lock(&p).remove(&id) {
                            let _ = tx.send(Ok(body));
                        }
                    }
                    Ok(Some(SimFrame::RpcError { id, code, message })) => {
                        if let Some(tx) = lock(&p).remove(&id) {
                            let _ = tx.send(Err(TgError::from_rpc(code, &message)));
                        }
                    }
                    Ok(Some(SimFrame::Updates { body })) => {
                        match tl::enums::Updates::from_bytes(&body) {
                            Ok(u) => {
                                for one in unpack(u) {
                                    let _ = utx.send(one);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "undecodable updates from tgsim"),
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            closed2.store(true, Ordering::SeqCst);
            // Everyone still waiting learns the connection is gone.
            for (_, tx) in lock(&p).drain() {
                let _ = tx.send(Err(TgError::transport("connection to tgsim lost")));
            }
        });
        Ok((
            Self {
                key,
                next: AtomicU64::new(1),
                pending,
                tx,
                tasks: vec![writer, reader],
                closed,
            },
            urx,
        ))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Transport for SimClient {
    fn invoke_raw(&self, body: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TgError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return Err(TgError::transport("connection to tgsim lost"));
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&self.pending).insert(id, tx);
            if self
                .tx
                .send(SimFrame::Invoke { id, body }.encode())
                .is_err()
            {
                lock(&self.pending).remove(&id);
                return Err(TgError::transport("connection to tgsim lost"));
            }
            rx.await
                .map_err(|_| TgError::transport("connection to tgsim lost"))?
        })
    }

    fn session_blob(&self) -> Result<Vec<u8>, TgError> {
        Ok(self.key.to_vec())
    }

    fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for SimClient {
    fn drop(&mut self) {
        self.close();
    }
}
