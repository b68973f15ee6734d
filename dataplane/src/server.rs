//! The dataplane's control socket: accepts control-side connections, routes commands to the shard
//! that owns each session, and forwards shard events to every connected control client.
//!
//! This is the control path (a few commands per call), so plain threads and a mutex are fine here;
//! none of it touches a packet.
//!
//! Architecture invariant: sessions belong to the dataplane process, not to a connection. A
//! control side that disconnects leaves every session running; it reconciles with `List` later.

use crate::driver::{spawn_shard, ShardHandle, ShardOp, ShardReply, ShardRequest, ShardSpec};
use crate::ports::split_range;
use crate::shard::ShardTimers;
use crate::DataplaneConfig;
use crossbeam::channel::{Receiver, Sender};
use siptg_proto::{
    encode_frame, Command, CommandError, DataplaneStatus, Event, FrameDecoder, Hello, Message,
    Reply, SessionId, ShardStatus, Welcome, MAGIC, PROTOCOL_VERSION,
};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a shard may take to answer before it is reported down.
const SHARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Events kept while no control side is connected (oldest dropped beyond this).
const EVENT_BACKLOG: usize = 4096;
/// A client that does not take a frame within this long is dropped.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("another dataplane already listens on {0}")]
    AlreadyRunning(String),
    #[error("cannot listen on control socket {path}: {source}")]
    Listen { path: String, source: io::Error },
    #[error("cannot start shard: {0}")]
    Shard(io::Error),
    #[error("invalid dataplane configuration: {0}")]
    Config(String),
}

struct Clients {
    next: u64,
    writers: Vec<(u64, Arc<Mutex<UnixStream>>)>,
    backlog: VecDeque<Event>,
}

/// Shared state of the server threads.
pub struct Server {
    driver: crate::driver::DriverKind,
    shards: Vec<ShardHandle>,
    owner: Mutex<HashMap<SessionId, usize>>,
    next_session: AtomicU64,
    boot_id: u64,
    started: Instant,
    clients: Mutex<Clients>,
}

/// A running dataplane: shards started and the control socket listening.
pub struct Running {
    server: Arc<Server>,
    listener: UnixListener,
}

impl Running {
    /// Starts the shards and binds the control socket.
    pub fn start(cfg: &DataplaneConfig) -> Result<Self, StartError> {
        if cfg.cores.is_empty() {
            return Err(StartError::Config("no cores configured".into()));
        }
        if cfg.port_min > cfg.port_max {
            return Err(StartError::Config(format!(
                "port range {}-{} is empty",
                cfg.port_min, cfg.port_max
            )));
        }
        if let Err(e) = std::net::UdpSocket::bind((cfg.media_ip, 0)) {
            return Err(StartError::Config(format!(
                "media_ip {} is not usable on this host: {e}",
                cfg.media_ip
            )));
        }
        let listener = bind_socket(&cfg.socket)?;
        let (ev_tx, ev_rx) = crossbeam::channel::bounded::<Event>(16 * 1024);
        let ranges = split_range(cfg.port_min, cfg.port_max, cfg.cores.len());
        let driver = cfg.driver.resolve();
        let mut shards = Vec::with_capacity(cfg.cores.len());
        for (&core, &ports) in cfg.cores.iter().zip(&ranges) {
            let spec = ShardSpec {
                core,
                ports,
                media_ip: cfg.media_ip,
                timers: ShardTimers {
                    rtp_timeout: cfg.rtp_timeout,
                    stats_interval: cfg.stats_interval,
                },
                pin: cfg.pin_cores,
                poll_interval: cfg.poll_interval,
            };
            shards.push(spawn_shard(driver, spec, ev_tx.clone()).map_err(StartError::Shard)?);
        }
        drop(ev_tx);
        let boot_id: u64 = rand::random();
        let server = Arc::new(Server {
            driver,
            shards,
            owner: Mutex::new(HashMap::new()),
            // Ids never repeat across dataplane restarts, so a stale id held by a control side
            // cannot reach another call's session.
            next_session: AtomicU64::new((boot_id & 0xffff_ffff) << 31 | 1),
            boot_id,
            started: Instant::now(),
            clients: Mutex::new(Clients {
                next: 0,
                writers: Vec::new(),
                backlog: VecDeque::new(),
            }),
        });
        let pump = server.clone();
        std::thread::Builder::new()
            .name("dp-events".into())
            .spawn(move || pump.pump_events(ev_rx))
            .map_err(StartError::Shard)?;
        tracing::info!(
            socket = %cfg.socket.display(),
            cores = ?cfg.cores,
            driver = driver.name(),
            ports = %format!("{}-{}", cfg.port_min, cfg.port_max),
            boot_id = server.boot_id,
            "dataplane listening"
        );
        Ok(Self { server, listener })
    }

    /// Random id of this dataplane process (see [`Welcome::boot_id`]).
    pub fn boot_id(&self) -> u64 {
        self.server.boot_id
    }

    /// Accepts control connections until the process ends.
    pub fn serve(self) -> io::Result<()> {
        for conn in self.listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let server = self.server.clone();
            std::thread::Builder::new()
                .name("dp-conn".into())
                .spawn(move || {
                    if let Err(e) = server.serve_connection(conn) {
                        tracing::info!(error = %e, "control connection ended");
                    }
                })?;
        }
        Ok(())
    }
}

fn bind_socket(path: &Path) -> Result<UnixListener, StartError> {
    let shown = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning(shown));
        }
        // Left behind by a dataplane that died; nobody listens on it.
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| StartError::Listen {
                path: shown.clone(),
                source,
            })?;
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| StartError::Listen {
        path: shown.clone(),
        source,
    })?;
    // Only the owner and its group may drive the dataplane.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        StartError::Listen {
            path: shown,
            source,
        }
    })?;
    Ok(listener)
}

impl Server {
    fn serve_connection(self: &Arc<Self>, mut conn: UnixStream) -> io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut dec = FrameDecoder::new();
        let hello: Hello = read_frame(&mut conn, &mut dec)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before hello"))?;
        let refused = if hello.magic != MAGIC {
            Some("not a siptg control client (bad magic)".to_string())
        } else if hello.version == 0 {
            Some(format!(
                "protocol version {} unsupported; this dataplane speaks 1..={PROTOCOL_VERSION}",
                hello.version
            ))
        } else {
            None
        };
        let welcome = Welcome {
            magic: MAGIC,
            version: hello.version.min(PROTOCOL_VERSION),
            refused: refused.clone(),
            boot_id: self.boot_id,
            cores: self.shards.iter().map(|s| s.core).collect(),
            driver: self.driver.name().into(),
        };
        let mut out = Vec::new();
        encode_frame(&welcome, &mut out).map_err(io::Error::other)?;
        conn.write_all(&out)?;
        if let Some(reason) = refused {
            tracing::warn!(client = %hello.client, %reason, "control client refused");
            return Ok(());
        }
        tracing::info!(client = %hello.client, version = welcome.version, "control client connected");
        conn.set_read_timeout(None)?;
        // A control side that stops reading must not stall event delivery to the others.
        conn.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
        let writer = Arc::new(Mutex::new(conn.try_clone()?));
        let id = self.register_client(writer.clone());
        let result = self.request_loop(&mut conn, &mut dec, &writer);
        self.lock_clients().writers.retain(|(c, _)| *c != id);
        tracing::info!(client = %hello.client, "control client disconnected; sessions kept");
        result
    }

    fn request_loop(
        &self,
        conn: &mut UnixStream,
        dec: &mut FrameDecoder,
        writer: &Arc<Mutex<UnixStream>>,
    ) -> io::Result<()> {
        let mut out = Vec::new();
        while let Some(msg) = read_frame::<Message>(conn, dec)? {
            let Message::Request { id, command } = msg else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "control client sent a non-request frame",
                ));
            };
            let result = self.dispatch(command);
            out.clear();
            encode_frame(&Message::Response { id, result }, &mut out).map_err(io::Error::other)?;
            lock(writer).write_all(&out)?;
        }
        Ok(())
    }

    fn register_client(&self, writer: Arc<Mutex<UnixStream>>) -> u64 {
        let mut clients = self.lock_clients();
        clients.next += 1;
        let id = clients.next;
        // Events that happened while nobody listened go to the first client back.
        let mut out = Vec::new();
        for ev in clients.backlog.drain(..) {
            let _ = encode_frame(&Message::Event(ev), &mut out);
        }
        if !out.is_empty() {
            let _ = lock(&writer).write_all(&out);
        }
        clients.writers.push((id, writer));
        id
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pump_events(&self, rx: Receiver<Event>) {
        let mut out = Vec::new();
        for ev in rx {
            if let Event::ShardDown { core, .. } = &ev {
                // Its sessions are gone with it.
                if let Some(idx) = self.shards.iter().position(|s| s.core == *core) {
                    self.owners().retain(|_, s| *s != idx);
                }
            }
            let writers: Vec<(u64, Arc<Mutex<UnixStream>>)> = {
                let mut clients = self.lock_clients();
                if clients.writers.is_empty() {
                    if clients.backlog.len() == EVENT_BACKLOG {
                        clients.backlog.pop_front();
                    }
                    clients.backlog.push_back(ev);
                    continue;
                }
                clients.writers.clone()
            };
            out.clear();
            if encode_frame(&Message::Event(ev), &mut out).is_err() {
                continue;
            }
            // Written outside the clients lock; a stuck client times out and is dropped.
            let failed: Vec<u64> = writers
                .iter()
                .filter(|(_, w)| lock(w).write_all(&out).is_err())
                .map(|(id, _)| *id)
                .collect();
            if !failed.is_empty() {
                tracing::warn!(clients = ?failed, "dropping control clients that stopped reading");
                let mut clients = self.lock_clients();
                clients.writers.retain(|(id, w)| {
                    let keep = !failed.contains(id);
                    if !keep {
                        let _ = lock(w).shutdown(std::net::Shutdown::Both);
                    }
                    keep
                });
            }
        }
    }

    fn ask(&self, shard: usize, op: ShardOp) -> Option<ShardReply> {
        let (tx, rx): (Sender<ShardReply>, _) = crossbeam::channel::bounded(1);
        if !self
            .shards
            .get(shard)?
            .send(ShardRequest { op, reply: tx }, SHARD_TIMEOUT)
        {
            return None;
        }
        rx.recv_timeout(SHARD_TIMEOUT).ok()
    }

    fn ask_proto(&self, shard: usize, op: ShardOp) -> Result<Reply, CommandError> {
        let core = self.shards.get(shard).map_or(u16::MAX, |s| s.core);
        match self.ask(shard, op) {
            Some(ShardReply::Proto(r)) => r,
            Some(ShardReply::Status(_)) => {
                Err(CommandError::Invalid("unexpected shard reply".into()))
            }
            None => Err(CommandError::ShardDown { core }),
        }
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, usize>> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Executes one command; every outcome, including a dead shard, is a reply.
    pub fn dispatch(&self, command: Command) -> Result<Reply, CommandError> {
        match command {
            Command::Status => Ok(Reply::Status(self.status())),
            Command::CreateSession { tag } => {
                let shard = self.least_loaded_shard().ok_or(CommandError::ShardDown {
                    core: self.shards.first().map_or(0, |s| s.core),
                })?;
                let id = self.next_session.fetch_add(1, Ordering::Relaxed);
                // Owned before the shard answers, so a slow shard's session stays reachable.
                self.owners().insert(id, shard);
                let reply = self.ask_proto(shard, ShardOp::Create { id, tag });
                if let Err(CommandError::Invalid(_) | CommandError::Unsupported(_)) = &reply {
                    self.owners().remove(&id);
                }
                reply
            }
            Command::List => {
                let mut all = Vec::new();
                for shard in 0..self.shards.len() {
                    if let Ok(Reply::Sessions(s)) =
                        self.ask_proto(shard, ShardOp::Command(Box::new(Command::List)))
                    {
                        all.extend(s);
                    }
                }
                all.sort_by_key(|s| s.session);
                Ok(Reply::Sessions(all))
            }
            cmd => {
                let session = match &cmd {
                    Command::AddLeg { session, .. }
                    | Command::UpdateLeg { session, .. }
                    | Command::Bridge { session, .. }
                    | Command::DeleteLeg { session, .. }
                    | Command::DeleteSession { session }
                    | Command::Stats { session }
                    | Command::Telegram { session, .. } => *session,
                    Command::Status | Command::CreateSession { .. } | Command::List => {
                        unreachable!("handled above")
                    }
                };
                let shard = *self
                    .owners()
                    .get(&session)
                    .ok_or(CommandError::UnknownSession(session))?;
                let deleting = matches!(cmd, Command::DeleteSession { .. });
                let reply = self.ask_proto(shard, ShardOp::Command(Box::new(cmd)));
                let gone = matches!(reply, Err(CommandError::UnknownSession(_)));
                if gone || (deleting && reply.is_ok()) {
                    self.owners().remove(&session);
                }
                reply
            }
        }
    }

    /// The live shard with the fewest sessions; `None` when every shard is down.
    fn least_loaded_shard(&self) -> Option<usize> {
        let owners = self.owners();
        let mut load = vec![0usize; self.shards.len()];
        for &s in owners.values() {
            if let Some(l) = load.get_mut(s) {
                *l += 1;
            }
        }
        (0..self.shards.len())
            .filter(|&i| {
                self.shards[i].alive.load(Ordering::Acquire) && !self.shards[i].tx.is_full()
            })
            .min_by_key(|&i| load[i])
    }

    fn status(&self) -> DataplaneStatus {
        let shards = (0..self.shards.len())
            .map(|i| match self.shards[i].alive.load(Ordering::Acquire) {
                true => self.ask(i, ShardOp::Status),
                false => None,
            })
            .enumerate()
            .map(|(i, reply)| match reply {
                Some(ShardReply::Status(s)) => s,
                _ => ShardStatus {
                    core: self.shards[i].core,
                    running: false,
                    sessions: 0,
                    legs: 0,
                    port_min: 0,
                    port_max: 0,
                    ports_free: 0,
                    packets_relayed: 0,
                    dropped_malformed: 0,
                    dropped_foreign: 0,
                    dropped_srtp: 0,
                },
            })
            .collect();
        DataplaneStatus {
            pid: std::process::id(),
            boot_id: self.boot_id,
            driver: self.driver.name().into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            shards,
        }
    }
}

fn lock(w: &Arc<Mutex<UnixStream>>) -> std::sync::MutexGuard<'_, UnixStream> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads until one whole frame is decoded; `None` on a clean end of stream.
fn read_frame<T: serde::de::DeserializeOwned>(
    conn: &mut UnixStream,
    dec: &mut FrameDecoder,
) -> io::Result<Option<T>> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(msg) = dec
            .next_frame::<T>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            return Ok(Some(msg));
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        dec.push(&buf[..n]);
    }
}
