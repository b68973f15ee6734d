//! Tokio client of the dataplane's control socket: handshake, requests matched to responses by
//! id, and a broadcast of the dataplane's events.

use siptg_proto::{
    encode_frame, Codec, Command, CommandError, DataplaneStatus, Event, FrameDecoder, Hello, LegId,
    LegInfo, LegSpec, Message, Reply, SessionId, SessionStats, SessionSummary, Welcome, MAGIC,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// How long a command may take before the dataplane is considered stuck.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why talking to the dataplane failed.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("cannot reach the dataplane at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("dataplane refused the connection: {0}")]
    Refused(String),
    #[error("dataplane protocol error: {0}")]
    Protocol(String),
    #[error("dataplane connection closed")]
    Closed,
    #[error("dataplane did not answer within {0:?}")]
    Timeout(Duration),
    #[error("dataplane rejected the command: {0}")]
    Command(#[from] CommandError),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, CommandError>>>>>;

/// A connection to the dataplane; cheap to clone.
#[derive(Clone)]
pub struct DataplaneClient {
    welcome: Welcome,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<Event>,
    up: Arc<AtomicBool>,
    closed: watch::Receiver<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DataplaneClient {
    /// Connects and performs the handshake; `client` names us in the dataplane's logs.
    pub async fn connect(path: &Path, client: &str) -> Result<Self, DpError> {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|source| DpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let mut out = Vec::new();
        encode_frame(&Hello::new(client), &mut out)
            .map_err(|e| DpError::Protocol(e.to_string()))?;
        let mut dec = FrameDecoder::new();
        let welcome: Welcome = tokio::time::timeout(COMMAND_TIMEOUT, async {
            stream.write_all(&out).await.map_err(|_| DpError::Closed)?;
            let mut buf = [0u8; 4096];
            loop {
                if let Some(w) = dec
                    .next_frame::<Welcome>()
                    .map_err(|e| DpError::Protocol(e.to_string()))?
                {
                    return Ok::<_, DpError>(w);
                }
                let n = stream.read(&mut buf).await.map_err(|_| DpError::Closed)?;
                if n == 0 {
                    return Err(DpError::Closed);
                }
                dec.push(&buf[..n]);
            }
        })
        .await
        .map_err(|_| DpError::Timeout(COMMAND_TIMEOUT))??;
        if welcome.magic != MAGIC {
            return Err(DpError::Protocol("peer is not a siptg dataplane".into()));
        }
        if let Some(reason) = welcome.refused.clone() {
            return Err(DpError::Refused(reason));
        }

        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let (events, _) = broadcast::channel(4096);
        let (closed_tx, closed_rx) = watch::channel(false);
        let client = Self {
            welcome,
            tx,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: Arc::new(AtomicU64::new(1)),
            events,
            up: Arc::new(AtomicBool::new(true)),
            closed: closed_rx,
        };
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        let c = client.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            'read: loop {
                loop {
                    match dec.next_frame::<Message>() {
                        Ok(Some(Message::Response { id, result })) => {
                            if let Some(w) = lock(&c.pending).remove(&id) {
                                let _ = w.send(result);
                            }
                        }
                        Ok(Some(Message::Event(ev))) => {
                            let _ = c.events.send(ev);
                        }
                        Ok(Some(Message::Request { .. })) => {
                            tracing::warn!("dataplane sent a request frame; ignoring");
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "dataplane stream out of sync");
                            break 'read;
                        }
                    }
                }
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => dec.push(&buf[..n]),
                }
            }
            c.up.store(false, Ordering::Relaxed);
            lock(&c.pending).clear();
            let _ = closed_tx.send(true);
        });
        Ok(client)
    }

    /// What the dataplane said in its handshake (boot id, cores, driver).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// False once the connection has dropped.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Resolves when the connection drops.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Subscribes to dataplane events (RTP timeouts, DTMF, stream stats).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Sends one command and waits for its reply.
    pub async fn request(&self, command: Command) -> Result<Reply, DpError> {
        if !self.is_up() {
            return Err(DpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        encode_frame(&Message::Request { id, command }, &mut out)
            .map_err(|e| DpError::Protocol(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let result = async {
            self.tx.send(out).await.map_err(|_| DpError::Closed)?;
            match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                Err(_) => Err(DpError::Timeout(COMMAND_TIMEOUT)),
                Ok(Err(_)) => Err(DpError::Closed),
                Ok(Ok(r)) => Ok(r?),
            }
        }
        .await;
        lock(&self.pending).remove(&id);
        result
    }

    /// The dataplane's health.
    pub async fn status(&self) -> Result<DataplaneStatus, DpError> {
        match self.request(Command::Status).await? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a session; returns its id.
    pub async fn create_session(&self, tag: &str) -> Result<SessionId, DpError> {
        match self
            .request(Command::CreateSession { tag: tag.into() })
            .await?
        {
            Reply::SessionCreated { session, .. } => Ok(session),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a leg; returns where it listens.
    pub async fn add_leg(&self, session: SessionId, spec: LegSpec) -> Result<LegInfo, DpError> {
        match self.request(Command::AddLeg { session, spec }).await? {
            Reply::Leg(l) => Ok(l),
            other => Err(unexpected(other)),
        }
    }

    /// Re-targets a leg.
    pub async fn update_leg(
        &self,
        session: SessionId,
        leg: LegId,
        spec: LegSpec,
    ) -> Result<LegInfo, DpError> {
        match self
            .request(Command::UpdateLeg { session, leg, spec })
            .await?
        {
            Reply::Leg(l) => Ok(l),
            other => Err(unexpected(other)),
        }
    }

    /// Bridges two legs.
    pub async fn bridge(&self, session: SessionId, a: LegId, b: LegId) -> Result<(), DpError> {
        self.request(Command::Bridge { session, a, b })
            .await
            .map(drop)
    }

    /// Deletes a session.
    pub async fn delete_session(&self, session: SessionId) -> Result<(), DpError> {
        self.request(Command::DeleteSession { session })
            .await
            .map(drop)
    }

    /// Per-leg counters.
    pub async fn stats(&self, session: SessionId) -> Result<SessionStats, DpError> {
        match self.request(Command::Stats { session }).await? {
            Reply::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Drives a Telegram leg (what the call signalling learnt).
    pub async fn telegram(
        &self,
        session: SessionId,
        leg: LegId,
        op: siptg_proto::TelegramOp,
    ) -> Result<(), DpError> {
        self.request(Command::Telegram { session, leg, op })
            .await
            .map(drop)
    }

    /// All sessions.
    pub async fn list(&self) -> Result<Vec<SessionSummary>, DpError> {
        match self.request(Command::List).await? {
            Reply::Sessions(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: Reply) -> DpError {
    DpError::Protocol(format!("unexpected reply {r:?}"))
}

/// A Telegram leg: WebRTC towards Telegram, transcoded to whatever SIP leg it is bridged to.
pub fn telegram_leg(telegram: siptg_proto::TelegramLegSpec) -> LegSpec {
    LegSpec {
        remote: None,
        latch: false,
        local_ip: None,
        rtcp_mux: true,
        codec: Codec {
            payload_type: 111,
            name: "opus".into(),
            clock_rate: 48_000,
            telephone_event: None,
        },
        srtp: None,
        continuity: false,
        telegram: Some(telegram),
        direction: Default::default(),
    }
}

/// A latching plain-RTP leg with the given codec: what a SIP leg usually starts as.
pub fn latching_leg(codec: Codec, remote: Option<std::net::SocketAddr>) -> LegSpec {
    LegSpec {
        remote,
        latch: true,
        local_ip: None,
        rtcp_mux: true,
        codec,
        srtp: None,
        continuity: false,
        telegram: None,
        direction: Default::default(),
    }
}
