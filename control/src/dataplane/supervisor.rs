//! Keeps the control side connected to a dataplane: adopts one that already runs (so a restart of
//! the control side keeps every call's media), otherwise starts `siptg dataplane` as a child and
//! restarts it if it dies. On every (re)connect it reconciles its session registry with the
//! dataplane's `List`.

use super::client::{DataplaneClient, DpError};
use crate::metrics::Metrics;
use serde::Serialize;
use siptg_proto::{Event, SessionId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// How to start the dataplane process when none answers on the socket.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The `siptg` binary.
    pub exe: PathBuf,
    /// Config file to pass with `--config` (none: the built-in example, like the parent).
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Tracked {
    tag: String,
    /// Set for sessions found on the dataplane that no call of ours claims (after a control
    /// restart); they are deleted once older than the grace period.
    orphan_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    connected_since: Option<Instant>,
    last_error: Option<String>,
    boot_id: Option<u64>,
    restarts: u64,
    child_pid: Option<u32>,
    /// Set by `stop_child`: no dataplane is started any more (the process is shutting down).
    stopping: bool,
}

/// The supervisor's view, for `siptg status`.
#[derive(Debug, Clone, Serialize)]
pub struct SupervisorStatus {
    pub socket: String,
    pub connected: bool,
    pub connected_for_s: Option<u64>,
    pub last_error: Option<String>,
    pub boot_id: Option<u64>,
    pub restarts: u64,
    pub child_pid: Option<u32>,
    pub tracked_sessions: usize,
    pub orphaned_sessions: usize,
}

/// Owner of the control side's dataplane connection.
pub struct Supervisor {
    socket: PathBuf,
    client_name: String,
    spawn: Option<SpawnSpec>,
    orphan_grace: Duration,
    metrics: Arc<Metrics>,
    client: Mutex<Option<DataplaneClient>>,
    state: Mutex<State>,
    registry: Mutex<HashMap<SessionId, Tracked>>,
    /// Every connection's events, re-sent: one subscription outlives reconnects and sees a
    /// new connection's events from its first (a call can use the connection as soon as
    /// `client()` returns it).
    events: tokio::sync::broadcast::Sender<siptg_proto::Event>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    /// A supervisor for the dataplane at `socket`; `spawn` is `None` to only connect.
    pub fn new(
        socket: PathBuf,
        client_name: String,
        spawn: Option<SpawnSpec>,
        orphan_grace: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            socket,
            client_name,
            spawn,
            orphan_grace,
            metrics,
            client: Mutex::new(None),
            state: Mutex::new(State::default()),
            registry: Mutex::new(HashMap::new()),
            events: tokio::sync::broadcast::channel(4096).0,
        })
    }

    /// The dataplane's events across connections and restarts (subscribe once, before any
    /// call can start: nothing a call's media reports is missed).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<siptg_proto::Event> {
        self.events.subscribe()
    }

    /// The live connection, if any.
    pub fn client(&self) -> Option<DataplaneClient> {
        lock(&self.client).clone().filter(DataplaneClient::is_up)
    }

    /// Records a session created by this control side (a call's media).
    pub fn track(&self, session: SessionId, tag: &str) {
        lock(&self.registry).insert(
            session,
            Tracked {
                tag: tag.to_string(),
                orphan_since: None,
            },
        );
    }

    /// Takes over an orphaned session by tag (a restarted call layer recognising its media).
    pub fn claim(&self, tag: &str) -> Option<SessionId> {
        let mut reg = lock(&self.registry);
        let (&id, t) = reg.iter_mut().find(|(_, t)| t.tag == tag)?;
        t.orphan_since = None;
        Some(id)
    }

    /// Forgets a session (after deleting it).
    pub fn untrack(&self, session: SessionId) {
        lock(&self.registry).remove(&session);
    }

    /// Snapshot for status output.
    pub fn status(&self) -> SupervisorStatus {
        let st = lock(&self.state);
        let reg = lock(&self.registry);
        SupervisorStatus {
            socket: self.socket.display().to_string(),
            connected: self.client().is_some(),
            connected_for_s: st.connected_since.map(|t| t.elapsed().as_secs()),
            last_error: st.last_error.clone(),
            boot_id: st.boot_id,
            restarts: st.restarts,
            child_pid: st.child_pid,
            tracked_sessions: reg.len(),
            orphaned_sessions: reg.values().filter(|t| t.orphan_since.is_some()).count(),
        }
    }

    /// Stops the dataplane process this supervisor started (a graceful stop of the gateway). A
    /// dataplane that was adopted, or one whose parent crashed, is left running.
    pub fn stop_child(&self) {
        let pid = {
            let mut st = lock(&self.state);
            st.stopping = true;
            st.child_pid.take()
        };
        let Some(pid) = pid else {
            return;
        };
        tracing::info!(pid, "stopping the dataplane process");
        // SAFETY: kill(2) with a pid we spawned and SIGTERM has no memory effects; if the process
        // is already gone the call fails harmlessly with ESRCH.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Connects, spawns and reconnects forever.
    pub async fn run(self: Arc<Self>) {
        let mut child: Option<tokio::process::Child> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            match DataplaneClient::connect(&self.socket, &self.client_name).await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    self.serve_connection(c).await;
                }
                Err(e) => {
                    self.note_error(&e);
                    if let Some(spec) = &self.spawn {
                        self.ensure_child(spec, &mut child);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn note_error(&self, e: &DpError) {
        let mut st = lock(&self.state);
        let msg = e.to_string();
        if st.last_error.as_deref() != Some(msg.as_str()) {
            if self.spawn.is_some() && st.child_pid.is_none() {
                tracing::info!(socket = %self.socket.display(), "no dataplane running; starting one");
            } else {
                tracing::warn!(error = %msg, "dataplane unavailable");
            }
        }
        st.last_error = Some(msg);
    }

    fn ensure_child(&self, spec: &SpawnSpec, child: &mut Option<tokio::process::Child>) {
        if lock(&self.state).stopping {
            return;
        }
        if let Some(ch) = child.as_mut() {
            match ch.try_wait() {
                Ok(None) => return, // still starting up
                Ok(Some(status)) => {
                    lock(&self.state).child_pid = None;
                    tracing::error!(%status, "dataplane process exited; restarting it");
                    lock(&self.state).restarts += 1;
                    self.metrics.inc("siptg_dataplane_restarts_total", &[]);
                }
                Err(e) => tracing::error!(error = %e, "cannot check the dataplane process"),
            }
        }
        let mut cmd = Command::new(&spec.exe);
        cmd.arg("dataplane");
        if let Some(cfg) = &spec.config {
            cmd.arg("--config").arg(cfg);
        }
        // The dataplane must outlive us: that is what keeps calls up across a control restart.
        // Its own process group keeps a terminal's Ctrl-C from reaching it; a graceful stop of
        // ours stops it explicitly (`stop_child`).
        cmd.kill_on_drop(false)
            .stdin(std::process::Stdio::null())
            .process_group(0);
        match cmd.spawn() {
            Ok(mut ch) => {
                let mut st = lock(&self.state);
                if st.stopping {
                    // A stop raced with this start: the new process must not outlive us.
                    let _ = ch.start_kill();
                    return;
                }
                tracing::info!(pid = ch.id(), "dataplane process started");
                st.child_pid = ch.id();
                drop(st);
                *child = Some(ch);
            }
            Err(e) => {
                tracing::error!(exe = %spec.exe.display(), error = %e, "cannot start the dataplane");
                *child = None;
            }
        }
    }

    async fn serve_connection(&self, c: DataplaneClient) {
        let boot_id = c.welcome().boot_id;
        let mut events = c.events();
        if let Err(e) = self.reconcile(&c, boot_id).await {
            tracing::warn!(error = %e, "reconcile with the dataplane failed; reconnecting");
            return;
        }
        {
            let mut st = lock(&self.state);
            st.connected_since = Some(Instant::now());
            st.last_error = None;
            st.boot_id = Some(boot_id);
        }
        *lock(&self.client) = Some(c.clone());
        tracing::info!(
            boot_id,
            cores = ?c.welcome().cores,
            driver = %c.welcome().driver,
            "connected to the dataplane"
        );
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = c.closed() => break,
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let _ = self.events.send(ev.clone());
                        self.on_event(ev)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "dataplane events dropped (consumer too slow)");
                    }
                    Err(_) => break,
                },
                _ = sweep.tick() => self.sweep_orphans(&c).await,
            }
        }
        *lock(&self.client) = None;
        lock(&self.state).connected_since = None;
        tracing::warn!("dataplane connection lost");
    }

    async fn reconcile(&self, c: &DataplaneClient, boot_id: u64) -> Result<(), DpError> {
        let previous = lock(&self.state).boot_id;
        if previous.is_some_and(|b| b != boot_id) {
            let lost = std::mem::take(&mut *lock(&self.registry));
            if !lost.is_empty() {
                tracing::error!(
                    sessions = lost.len(),
                    "dataplane restarted: its sessions are gone"
                );
            }
        }
        let listed = c.list().await?;
        let mut reg = lock(&self.registry);
        let now = Instant::now();
        let mut adopted = 0;
        for s in &listed {
            reg.entry(s.session).or_insert_with(|| {
                adopted += 1;
                Tracked {
                    tag: s.tag.clone(),
                    orphan_since: Some(now),
                }
            });
        }
        let before = reg.len();
        reg.retain(|id, _| listed.iter().any(|s| s.session == *id));
        let vanished = before - reg.len();
        tracing::info!(
            sessions = listed.len(),
            adopted,
            vanished,
            "reconciled with the dataplane"
        );
        Ok(())
    }

    async fn sweep_orphans(&self, c: &DataplaneClient) {
        let expired: Vec<SessionId> = lock(&self.registry)
            .iter()
            .filter(|(_, t)| {
                t.orphan_since
                    .is_some_and(|s| s.elapsed() >= self.orphan_grace)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            match c.delete_session(id).await {
                Ok(()) | Err(DpError::Command(siptg_proto::CommandError::UnknownSession(_))) => {
                    tracing::info!(session = id, "deleted orphaned session nobody claimed");
                    self.untrack(id);
                }
                Err(e) => {
                    tracing::warn!(session = id, error = %e, "cannot delete orphaned session")
                }
            }
        }
    }

    fn on_event(&self, ev: Event) {
        let kind = match &ev {
            Event::RtpTimeout {
                session,
                leg,
                idle_ms,
            } => {
                tracing::info!(session, leg, idle_ms, "RTP timeout");
                "rtp_timeout"
            }
            Event::Dtmf {
                session,
                leg,
                digit,
                duration_ms,
            } => {
                tracing::info!(session, leg, %digit, duration_ms, "DTMF");
                "dtmf"
            }
            Event::StreamStats { .. } => "stream_stats",
            Event::Telegram {
                session,
                leg,
                event,
            } => {
                tracing::debug!(session, leg, ?event, "Telegram leg");
                "telegram"
            }
            Event::ShardDown { core, reason } => {
                tracing::error!(core, %reason, "dataplane shard down");
                "shard_down"
            }
        };
        self.metrics
            .inc("siptg_dataplane_events_total", &[("kind", kind)]);
    }
}
