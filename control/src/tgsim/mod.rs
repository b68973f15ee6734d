//! `tgsim`, the simulated Telegram cloud: stands in for Telegram's servers in tests and the demo
//! (they are unreachable from CI). It serves the TL API the Session Storage uses — the same
//! serialized functions and results — over the sim wire (`telegram::simwire`).
//!
//! `world` holds the rules (sans-IO); this module runs them on tokio: a TCP listener, one task
//! per connection, updates delivered to every connection of a user, ring timeouts on a timer.

pub mod srp;
pub mod world;

use crate::telegram::simwire::{read_frame, SimFrame};
use grammers_tl_types::{self as tl, Serializable};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use world::{Delivery, Reply, Ticket, To};
pub use world::{Privacy, SimUser, TurnServer, World, WorldConfig};

/// The built-in world (`config/tgsim.example.toml`).
pub const EXAMPLE_WORLD: &str = include_str!("../../../config/tgsim.example.toml");

/// Why a world file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("{path}: {message}")]
    Bad { path: String, message: String },
}

/// Reads a world file (or the built-in one) and checks it: ids, phones and usernames unique.
pub fn load_world(path: Option<&std::path::Path>) -> Result<WorldConfig, WorldError> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| WorldError::Bad {
                path: p.display().to_string(),
                message: e.to_string(),
            })?,
        ),
        None => ("built-in world".to_string(), EXAMPLE_WORLD.to_string()),
    };
    let bad = |message: String| WorldError::Bad {
        path: name.clone(),
        message,
    };
    let cfg: WorldConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut ids = std::collections::HashSet::new();
    let mut tokens = std::collections::HashSet::new();
    let mut phones = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for u in &cfg.users {
        if u.id <= 0 || !ids.insert(u.id) {
            return Err(bad(format!(
                "user id {} is not positive or not unique",
                u.id
            )));
        }
        if u.phone.is_empty()
            || !u.phone.bytes().all(|b| b.is_ascii_digit())
            || !phones.insert(u.phone.clone())
        {
            return Err(bad(format!(
                "user {}: phone {:?} must be unique digits",
                u.id, u.phone
            )));
        }
        if let Some(n) = &u.username {
            if !names.insert(n.to_ascii_lowercase()) {
                return Err(bad(format!("user {}: username {n} is taken", u.id)));
            }
        }
        // As @BotFather makes them: a bot has a username ending in "bot" and a unique token.
        if u.bot {
            let named = u
                .username
                .as_deref()
                .is_some_and(|n| n.to_ascii_lowercase().ends_with("bot"));
            if !named {
                return Err(bad(format!(
                    "bot {}: a bot's username must end in \"bot\"",
                    u.id
                )));
            }
            match &u.bot_token {
                Some(t) if t.starts_with(&format!("{}:", u.id)) && tokens.insert(t.clone()) => {}
                _ => {
                    return Err(bad(format!(
                        "bot {}: bot_token must be unique and look like \"{}:SECRET\"",
                        u.id, u.id
                    )))
                }
            }
        } else if u.bot_token.is_some() {
            return Err(bad(format!("user {}: only bots have a bot_token", u.id)));
        }
    }
    Ok(cfg)
}

/// A running simulated cloud.
#[derive(Clone)]
pub struct TgSim {
    inner: Arc<Inner>,
}

struct Inner {
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    world: Mutex<World>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: std::sync::atomic::AtomicU64,
    addr: SocketAddr,
    wake: tokio::sync::Notify,
    /// Parked requests (waiting for a bot): the connection and request id to answer.
    parked: Mutex<HashMap<Ticket, (u64, u64)>>,
}

struct Conn {
    key: [u8; 32],
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

fn unix_now() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

impl TgSim {
    /// Binds `listen` and serves `cfg` until the returned handle and every clone are dropped
    /// (the accept loop stops with the runtime).
    pub async fn start(cfg: WorldConfig, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let sim = TgSim {
            inner: Arc::new(Inner {
                tasks: Mutex::new(Vec::new()),
                world: Mutex::new(World::new(cfg, Instant::now(), unix_now())),
                conns: Mutex::new(HashMap::new()),
                next_conn: 0.into(),
                addr,
                wake: tokio::sync::Notify::new(),
                parked: Mutex::new(HashMap::new()),
            }),
        };
        tracing::info!(%addr, "simulated Telegram cloud listening");
        let weak = Arc::downgrade(&sim.inner);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let Some(inner) = weak.upgrade() else { break };
                let sim = TgSim { inner };
                let task = tokio::spawn({
                    let sim = sim.clone();
                    async move {
                        if let Err(e) = sim.serve(stream).await {
                            tracing::debug!(%peer, error = %e, "tgsim connection ended");
                        }
                    }
                });
                sim.inner
                    .tasks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(task);
            }
        });
        sim.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(accept);
        let weak = Arc::downgrade(&sim.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { break };
                let next = inner.world.lock().map(|w| w.next_deadline()).ok().flatten();
                let sleep = match next {
                    Some(at) => tokio::time::sleep_until(at.into()),
                    None => tokio::time::sleep(std::time::Duration::from_secs(3600)),
                };
                let wake = async { inner.wake.notified().await };
                tokio::select! {
                    _ = sleep => {}
                    _ = wake => {}
                }
                let (out, answers) = match inner.world.lock() {
                    Ok(mut w) => (w.tick(Instant::now()), w.take_answers()),
                    Err(_) => break,
                };
                let sim = TgSim { inner };
                sim.answer_parked(answers);
                sim.deliver(out);
            }
        });
        Ok(sim)
    }

    /// Stops the cloud: no new connections, every open one dropped (an outage, for tests).
    pub fn shutdown(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
        self.inner
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Where the cloud listens.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Runs `f` on the world (tests and the admin view change users through it).
    pub fn with_world<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        let mut w = self
            .inner
            .world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut w)
    }

    /// Accepts a QR login token as `user` (scanning the code in the app).
    pub fn accept_qr(&self, token: &[u8], user: i64) -> Result<(), world::RpcErr> {
        let d = self.with_world(|w| w.accept_qr(token, user))?;
        self.deliver(vec![d]);
        Ok(())
    }

    /// Sends late answers (a bot's, or its timeout) to the requests that wait for them.
    fn answer_parked(&self, answers: Vec<(Ticket, Result<Vec<u8>, world::RpcErr>)>) {
        if answers.is_empty() {
            return;
        }
        let conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut parked = self
            .inner
            .parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (ticket, answer) in answers {
            // A connection that went away has nobody left to answer.
            let Some((conn, id)) = parked.remove(&ticket) else {
                continue;
            };
            let frame = match answer {
                Ok(body) => SimFrame::Result { id, body },
                Err((code, message)) => SimFrame::RpcError { id, code, message },
            };
            if let Some(c) = conns.get(&conn) {
                let _ = c.tx.send(frame.encode());
            }
        }
    }

    fn deliver(&self, out: Vec<Delivery>) {
        if out.is_empty() {
            return;
        }
        let date = unix_now();
        let conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let world = self
            .inner
            .world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for d in out {
            // As Telegram does, a call request, a message (and the bot it came via), an inline
            // query or a button press comes with the users it names, so the recipient can
            // address them (access hash).
            let from: Vec<i64> = match &d.update {
                tl::enums::Update::PhoneCall(u) => match &u.phone_call {
                    tl::enums::PhoneCall::Requested(r) => vec![r.admin_id],
                    _ => vec![],
                },
                tl::enums::Update::NewMessage(m) => match &m.message {
                    tl::enums::Message::Message(m) => {
                        let sender = match &m.from_id {
                            Some(tl::enums::Peer::User(u)) => Some(u.user_id),
                            _ => None,
                        };
                        sender.into_iter().chain(m.via_bot_id).collect()
                    }
                    _ => vec![],
                },
                tl::enums::Update::BotInlineQuery(q) => vec![q.user_id],
                tl::enums::Update::InlineBotCallbackQuery(q) => vec![q.user_id],
                _ => vec![],
            };
            let viewer = match d.to {
                To::User(u) => u,
                To::Key(_) => 0,
            };
            let users: Vec<tl::enums::User> = from
                .iter()
                .filter_map(|f| world.user_tl_for(*f, viewer))
                .collect();
            let body = if users.is_empty() {
                tl::enums::Updates::UpdateShort(tl::types::UpdateShort {
                    update: d.update.clone(),
                    date,
                })
                .to_bytes()
            } else {
                tl::enums::Updates::Updates(tl::types::Updates {
                    updates: vec![d.update.clone()],
                    users,
                    chats: vec![],
                    date,
                    seq: 0,
                })
                .to_bytes()
            };
            let frame = SimFrame::Updates { body }.encode();
            for c in conns.values() {
                let target = match d.to {
                    To::Key(k) => c.key == k,
                    To::User(u) => {
                        world.user_of(&c.key) == Some(u)
                            && !(d.is_call
                                && world
                                    .keys_of(u)
                                    .iter()
                                    .any(|(k, disabled)| *k == c.key && *disabled))
                            && !world.user(u).is_some_and(|u| u.offline)
                    }
                };
                if target {
                    let _ = c.tx.send(frame.clone());
                }
            }
        }
    }

    async fn serve(&self, stream: TcpStream) -> Result<(), crate::telegram::simwire::WireError> {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let Some(SimFrame::Hello { auth_key }) = read_frame(&mut rd).await? else {
            return Ok(());
        };
        let key = self.with_world(|w| w.hello(auth_key, Instant::now()));
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let conn_id = self
            .inner
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send(SimFrame::Welcome { auth_key: key }.encode());
        self.inner
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                conn_id,
                Conn {
                    key,
                    tx: tx.clone(),
                },
            );
        // A device that comes online hears the calls still ringing for it.
        let pending = self.with_world(|w| {
            w.user_of(&key)
                .map(|u| w.pending_for(u))
                .unwrap_or_default()
        });
        self.deliver(pending);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let result = loop {
            match read_frame(&mut rd).await {
                Ok(Some(SimFrame::Invoke { id, body })) => {
                    if self.with_world(|w| w.unanswered(&body)) {
                        continue;
                    }
                    let (outcome, answers) = self.with_world(|w| {
                        let o = w.handle(key, &body, Instant::now());
                        (o, w.take_answers())
                    });
                    match outcome.reply {
                        Reply::Now(Ok(body)) => {
                            let _ = tx.send(SimFrame::Result { id, body }.encode());
                        }
                        Reply::Now(Err((code, message))) => {
                            let _ = tx.send(SimFrame::RpcError { id, code, message }.encode());
                        }
                        // Answered when the bot answers (or times out); registered before
                        // the bot hears the query.
                        Reply::Later(ticket) => {
                            self.inner
                                .parked
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert(ticket, (conn_id, id));
                        }
                    }
                    self.answer_parked(answers);
                    // A login on this connection makes it a device of its user: deliver what
                    // still rings.
                    self.deliver(outcome.deliveries);
                    self.inner.wake.notify_one();
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.inner
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&conn_id);
        self.inner
            .parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, (c, _)| *c != conn_id);
        self.with_world(|w| w.bye(&key));
        writer.abort();
        result
    }
}
