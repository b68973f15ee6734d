//! The glommio driver: one pinned executor per core runs a [`Shard`] over that core's sockets.
//!
//! Commands arrive on a crossbeam channel that the executor drains between packets (the control
//! path is not latency-critical; a few milliseconds per command is fine). Each leg socket has its
//! own receive task; receiving, deciding and sending happen on the same core with no lock.
//!
//! Architecture invariant: the relay logic allocates nothing per packet — each receive task owns
//! one buffer for its lifetime; forwarding borrows it. (glommio 0.9's `recv_from` itself falls
//! back to an io_uring op with an allocated buffer when no datagram is waiting.)

use crate::shard::{Channel, Shard, ShardTimers, MAX_DATAGRAM};
use crossbeam::channel::{Receiver, Sender, TryRecvError};
use glommio::net::UdpSocket;
use glommio::{LocalExecutorBuilder, Placement, Task};
use siptg_proto::{Command, CommandError, Event, LegId, Reply, SessionId, ShardStatus};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often an idle shard looks for commands; bounds command latency.
const COMMAND_POLL: Duration = Duration::from_millis(2);
/// How often timers (RTP timeout, stats) run.
const TICK: Duration = Duration::from_millis(200);

/// What the server asks of one shard.
#[derive(Debug)]
pub enum ShardOp {
    /// Open a session with an id the server assigned.
    Create { id: SessionId, tag: String },
    /// This shard's health.
    Status,
    /// A per-session command (AddLeg, UpdateLeg, Bridge, DeleteLeg, DeleteSession, Stats) or List.
    Command(Command),
}

/// A shard's answer to a [`ShardOp`].
#[derive(Debug)]
pub enum ShardReply {
    Proto(Result<Reply, CommandError>),
    Status(ShardStatus),
}

/// A request plus the one-shot channel its answer goes back on.
pub struct ShardRequest {
    pub op: ShardOp,
    pub reply: Sender<ShardReply>,
}

/// The server's handle on a running shard.
pub struct ShardHandle {
    pub core: u16,
    pub tx: Sender<ShardRequest>,
    /// Cleared when the shard's thread ends; a dead shard gets no new sessions.
    pub alive: Arc<AtomicBool>,
}

/// What a shard needs to start.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    pub core: u16,
    pub ports: (u16, u16),
    pub media_ip: IpAddr,
    pub timers: ShardTimers,
    /// Pin the executor to `core` (off in tests that run more shards than the machine has cores).
    pub pin: bool,
}

/// Starts a shard's executor thread.
pub fn spawn_shard(spec: ShardSpec, events: Sender<Event>) -> io::Result<ShardHandle> {
    let (tx, rx) = crossbeam::channel::bounded::<ShardRequest>(1024);
    let core = spec.core;
    let placement = if spec.pin {
        Placement::Fixed(core as usize)
    } else {
        Placement::Unbound
    };
    let shard_events = events.clone();
    let thread = LocalExecutorBuilder::new(placement)
        .name(&format!("dp-core{core}"))
        .spawn(move || async move { run_shard(spec, rx, shard_events).await })
        .map_err(|e| io::Error::other(format!("cannot start shard on core {core}: {e}")))?;
    // A shard only ends by panicking (a bug) or when the server is gone; either way say so.
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    std::thread::Builder::new()
        .name(format!("dp-watch{core}"))
        .spawn(move || {
            let reason = match thread.join() {
                Ok(()) => "shard stopped".to_string(),
                Err(e) => format!("shard failed: {e}"),
            };
            flag.store(false, Ordering::Release);
            tracing::error!(core, %reason, "dataplane shard ended");
            let _ = events.send(Event::ShardDown { core, reason });
        })?;
    Ok(ShardHandle { core, tx, alive })
}

type SocketKey = (SessionId, LegId, Channel);
/// Receive tasks per leg.
type LegTasks = HashMap<(SessionId, LegId), Vec<Task<()>>>;

struct Ctx {
    shard: RefCell<Shard>,
    media_ip: IpAddr,
    sockets: RefCell<HashMap<SocketKey, Rc<UdpSocket>>>,
    /// Receive tasks of each leg; dropping them cancels them and closes the sockets.
    tasks: RefCell<LegTasks>,
}

async fn run_shard(spec: ShardSpec, rx: Receiver<ShardRequest>, events: Sender<Event>) {
    let ctx = Rc::new(Ctx {
        shard: RefCell::new(Shard::new(
            spec.core,
            spec.ports,
            spec.timers,
            Instant::now(),
        )),
        media_ip: spec.media_ip,
        sockets: RefCell::new(HashMap::new()),
        tasks: RefCell::new(HashMap::new()),
    });
    tracing::info!(core = spec.core, ports = ?spec.ports, "shard started");
    let mut last_tick = Instant::now();
    let mut pending = Vec::new();
    loop {
        loop {
            match rx.try_recv() {
                Ok(req) => {
                    let answer = handle(&ctx, req.op);
                    // The requester may have given up waiting; nothing to do then.
                    let _ = req.reply.send(answer);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    tracing::info!(core = spec.core, "shard stopping: server gone");
                    return;
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            let mut shard = ctx.shard.borrow_mut();
            shard.on_tick(now);
            shard.drain_events(&mut pending);
        } else {
            ctx.shard.borrow_mut().drain_events(&mut pending);
        }
        for ev in pending.drain(..) {
            if events.try_send(ev).is_err() {
                tracing::warn!(core = spec.core, "event queue full, event dropped");
            }
        }
        glommio::timer::sleep(COMMAND_POLL).await;
    }
}

fn handle(ctx: &Rc<Ctx>, op: ShardOp) -> ShardReply {
    let now = Instant::now();
    match op {
        ShardOp::Create { id, tag } => {
            ctx.shard.borrow_mut().create_session(id, tag, now);
            let core = ctx.shard.borrow().core();
            ShardReply::Proto(Ok(Reply::SessionCreated { session: id, core }))
        }
        ShardOp::Status => ShardReply::Status(ctx.shard.borrow().status()),
        ShardOp::Command(cmd) => ShardReply::Proto(command(ctx, cmd, now)),
    }
}

fn command(ctx: &Rc<Ctx>, cmd: Command, now: Instant) -> Result<Reply, CommandError> {
    match cmd {
        Command::AddLeg { session, spec } => add_leg(ctx, session, spec, now).map(Reply::Leg),
        Command::UpdateLeg { session, leg, spec } => ctx
            .shard
            .borrow_mut()
            .update_leg(session, leg, spec)
            .map(Reply::Leg),
        Command::Bridge { session, a, b } => ctx
            .shard
            .borrow_mut()
            .bridge(session, a, b)
            .map(|()| Reply::Bridged),
        Command::DeleteLeg { session, leg } => {
            ctx.shard.borrow_mut().delete_leg(session, leg)?;
            close_leg(ctx, session, leg);
            Ok(Reply::Deleted)
        }
        Command::DeleteSession { session } => {
            let legs = ctx.shard.borrow_mut().delete_session(session)?;
            for leg in legs {
                close_leg(ctx, session, leg);
            }
            Ok(Reply::Deleted)
        }
        Command::Stats { session } => ctx.shard.borrow().stats(session, now).map(Reply::Stats),
        Command::List => Ok(Reply::Sessions(ctx.shard.borrow().summaries(now))),
        Command::Status | Command::CreateSession { .. } => Err(CommandError::Invalid(
            "Status and CreateSession are answered by the server, not a shard".into(),
        )),
    }
}

fn add_leg(
    ctx: &Rc<Ctx>,
    session: SessionId,
    spec: siptg_proto::LegSpec,
    now: Instant,
) -> Result<siptg_proto::LegInfo, CommandError> {
    let ip = spec.local_ip.unwrap_or(ctx.media_ip);
    // A port another program holds (EADDRINUSE) is skipped; try a few. Any other bind error (an
    // address not on this host, say) fails the command at once and burns no port.
    for _ in 0..16 {
        let port = ctx.shard.borrow_mut().begin_add_leg(session, &spec)?;
        let sockets = bind_pair(ip, port, !spec.rtcp_mux);
        let (rtp, rtcp) = match sockets {
            Ok(pair) => pair,
            Err((addr, e)) => {
                ctx.shard.borrow_mut().abort_add_leg(port);
                if e.kind() == io::ErrorKind::AddrInUse {
                    tracing::warn!(%addr, "port held by another program, skipping it");
                    continue;
                }
                return Err(CommandError::Bind {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        let local = rtp.local_addr().unwrap_or(SocketAddr::new(ip, port));
        let info = ctx
            .shard
            .borrow_mut()
            .complete_add_leg(session, spec, port, local, now)?;
        let mut tasks = Vec::with_capacity(2);
        for (channel, sock) in [(Channel::Rtp, Some(rtp)), (Channel::Rtcp, rtcp)] {
            let Some(sock) = sock else { continue };
            let sock = Rc::new(sock);
            ctx.sockets
                .borrow_mut()
                .insert((session, info.leg, channel), sock.clone());
            tasks.push(glommio::spawn_local(receive_loop(
                ctx.clone(),
                session,
                info.leg,
                channel,
                sock,
            )));
        }
        ctx.tasks.borrow_mut().insert((session, info.leg), tasks);
        return Ok(info);
    }
    Err(CommandError::Bind {
        addr: ip.to_string(),
        reason: "16 ports in a row are held by other programs".into(),
    })
}

/// Binds the RTP port and, when asked, the RTCP port above it.
fn bind_pair(
    ip: IpAddr,
    port: u16,
    with_rtcp: bool,
) -> Result<(UdpSocket, Option<UdpSocket>), (SocketAddr, io::Error)> {
    let rtp_addr = SocketAddr::new(ip, port);
    let rtp = UdpSocket::bind(rtp_addr).map_err(|e| (rtp_addr, io::Error::from(e)))?;
    if !with_rtcp {
        return Ok((rtp, None));
    }
    let Some(rtcp_port) = port.checked_add(1) else {
        return Err((rtp_addr, io::ErrorKind::AddrNotAvailable.into()));
    };
    let rtcp_addr = SocketAddr::new(ip, rtcp_port);
    let rtcp = UdpSocket::bind(rtcp_addr).map_err(|e| (rtcp_addr, io::Error::from(e)))?;
    Ok((rtp, Some(rtcp)))
}

fn close_leg(ctx: &Rc<Ctx>, session: SessionId, leg: LegId) {
    let mut sockets = ctx.sockets.borrow_mut();
    sockets.remove(&(session, leg, Channel::Rtp));
    sockets.remove(&(session, leg, Channel::Rtcp));
    drop(sockets);
    // Dropping the tasks cancels them; the sockets close with their last Rc.
    ctx.tasks.borrow_mut().remove(&(session, leg));
}

async fn receive_loop(
    ctx: Rc<Ctx>,
    session: SessionId,
    leg: LegId,
    channel: Channel,
    sock: Rc<UdpSocket>,
) {
    // One byte more than relayed, so an oversized datagram is seen as such and dropped.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors surface here on some kernels; they are not fatal for the leg.
                tracing::debug!(session, leg, error = %e, "receive error");
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let fwd = ctx.shard.borrow_mut().on_datagram(
            session,
            leg,
            channel,
            src,
            &buf[..n],
            Instant::now(),
        );
        let Some(fwd) = fwd else { continue };
        let out = ctx
            .sockets
            .borrow()
            .get(&(fwd.session, fwd.leg, fwd.channel))
            .cloned();
        if let Some(out) = out {
            if let Err(e) = out.send_to(&buf[..n], fwd.dest).await {
                tracing::debug!(session, leg = fwd.leg, dest = %fwd.dest, error = %e, "send failed");
            }
        }
    }
}
