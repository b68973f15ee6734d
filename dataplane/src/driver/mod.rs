//! Drivers run a [`Shard`] over real sockets, one OS thread per configured core.
//!
//! Two drivers share everything but the I/O loop: [`glommio_shard`] (a glommio executor on
//! io_uring, one receive task per socket) and [`portable`] (a pinned thread with epoll and
//! recvmmsg, which also runs where io_uring is blocked, e.g. Docker's default seccomp profile).
//! Both execute commands through [`execute`], so a command means the same on either.

pub mod glommio_shard;
pub mod portable;
pub mod sockaddr;
pub mod uring;

use crate::shard::{Channel, Shard, ShardTimers, Transmit};
use crossbeam::channel::Sender;
use siptg_proto::{
    Command, CommandError, Event, LegId, LegInfo, LegSpec, Reply, SessionId, ShardStatus,
};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often timers (RTP timeout, stats) run.
pub const TICK: Duration = Duration::from_millis(200);

/// How often Telegram legs' timers run while a shard has any (ICE paces checks every 50 ms,
/// DTLS retransmits from 100 ms): fine enough that call setup does not wait on the loop.
pub const TELEGRAM_TICK: Duration = Duration::from_millis(5);

/// Which I/O loop runs the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Pinned threads on our own io_uring: multishot receive, provided buffers, batched sends.
    Uring,
    /// glommio executors on io_uring.
    Glommio,
    /// Pinned threads with epoll + recvmmsg; needs no io_uring.
    Portable,
}

impl DriverKind {
    /// Name shown in status and the handshake.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Uring => "uring",
            DriverKind::Glommio => "glommio",
            DriverKind::Portable => "portable",
        }
    }
}

/// Whether this kernel offers what the uring driver needs (multishot recvmsg, provided buffer
/// rings, deferred task running: Linux 6.1+), and io_uring is not blocked here.
pub fn uring_driver_supported() -> bool {
    let Ok(ring) = io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
    else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    probe.is_supported(io_uring::opcode::RecvMsgMulti::CODE)
        && probe.is_supported(io_uring::opcode::SendMsg::CODE)
}

/// Whether io_uring can be used by this process (it is blocked by some container profiles and by
/// `kernel.io_uring_disabled`).
pub fn io_uring_available() -> bool {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup(2) with 1 entry and a zeroed params struct of the size the kernel
                                 // expects; the returned fd, if any, is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a descriptor we own from the successful call above.
    unsafe { libc::close(fd as i32) };
    true
}

/// What the server asks of one shard.
#[derive(Debug)]
pub enum ShardOp {
    /// Open a session with an id the server assigned.
    Create { id: SessionId, tag: String },
    /// This shard's health.
    Status,
    /// A per-session command (AddLeg, UpdateLeg, Bridge, DeleteLeg, DeleteSession, Stats) or List.
    Command(Box<Command>),
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

/// Wakes a shard that waits for I/O so it sees a new command at once (an eventfd); drivers that
/// poll for commands have none.
pub struct Waker(Option<OwnedFd>);

impl Waker {
    /// A waker with no effect.
    pub fn none() -> Self {
        Waker(None)
    }

    /// A new eventfd-based waker and the fd the shard waits on.
    pub fn eventfd() -> io::Result<(Self, OwnedFd)> {
        // SAFETY: eventfd(2) returns a new descriptor or -1; ownership is taken right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let theirs = owned.try_clone()?;
        Ok((Waker(Some(owned)), theirs))
    }

    /// Signals the shard.
    pub fn wake(&self) {
        if let Some(fd) = &self.0 {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own; failure (counter
            // overflow) only means the shard is already signalled.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

/// The server's handle on a running shard.
pub struct ShardHandle {
    pub core: u16,
    pub tx: Sender<ShardRequest>,
    /// Cleared when the shard's thread ends; a dead shard gets no new sessions.
    pub alive: Arc<AtomicBool>,
    pub waker: Waker,
}

impl ShardHandle {
    /// Queues a request and wakes the shard.
    pub fn send(&self, req: ShardRequest, timeout: Duration) -> bool {
        let ok = self.tx.send_timeout(req, timeout).is_ok();
        self.waker.wake();
        ok
    }
}

/// What a shard needs to start.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    pub core: u16,
    pub ports: (u16, u16),
    pub media_ip: IpAddr,
    pub timers: ShardTimers,
    /// Pin the thread to `core` (off in tests that run more shards than the machine has cores).
    pub pin: bool,
    /// Portable driver: after a wake-up with traffic, wait this long before looking again so the
    /// next wake-up serves many sockets at once (0 = wake per packet, lowest latency).
    pub poll_interval: Duration,
}

/// Starts a shard's thread with the given driver; a watcher reports the shard's end.
pub fn spawn_shard(
    kind: DriverKind,
    spec: ShardSpec,
    events: Sender<Event>,
) -> io::Result<ShardHandle> {
    let (tx, rx) = crossbeam::channel::bounded::<ShardRequest>(1024);
    let core = spec.core;
    let shard_events = events.clone();
    let (join, waker): (Box<dyn FnOnce() -> Result<(), String> + Send>, Waker) = match kind {
        DriverKind::Glommio => {
            let h = glommio_shard::spawn(spec, rx, shard_events)?;
            (
                Box::new(move || h.join().map_err(|e| e.to_string())),
                Waker::none(),
            )
        }
        DriverKind::Uring => {
            let (waker, wait_fd) = Waker::eventfd()?;
            let h = uring::spawn(spec, rx, shard_events, wait_fd)?;
            (
                Box::new(move || h.join().map_err(|_| "shard thread panicked".to_string())),
                waker,
            )
        }
        DriverKind::Portable => {
            let (waker, wait_fd) = Waker::eventfd()?;
            let h = portable::spawn(spec, rx, shard_events, wait_fd)?;
            (
                Box::new(move || h.join().map_err(|_| "shard thread panicked".to_string())),
                waker,
            )
        }
    };
    // A shard only ends by panicking (a bug) or when the server is gone; either way say so.
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    std::thread::Builder::new()
        .name(format!("dp-watch{core}"))
        .spawn(move || {
            let reason = match join() {
                Ok(()) => "shard stopped".to_string(),
                Err(e) => format!("shard failed: {e}"),
            };
            flag.store(false, Ordering::Release);
            tracing::error!(core, %reason, "dataplane shard ended");
            let _ = events.send(Event::ShardDown { core, reason });
        })?;
    Ok(ShardHandle {
        core,
        tx,
        alive,
        waker,
    })
}

/// What every driver does after each turn of its loop: run the shard's timers every [`TICK`] and
/// forward the events it queued to the server (dropping, with a warning, when the queue is full).
pub struct Housekeeping {
    core: u16,
    last_tick: Instant,
    last_telegram_tick: Instant,
    /// The shard had Telegram legs at the last run: tick every [`TELEGRAM_TICK`].
    fast: bool,
    pending: Vec<Event>,
    transmits: Vec<Transmit>,
}

impl Housekeeping {
    /// Housekeeping for the shard on `core`, starting its clock now.
    pub fn new(core: u16) -> Self {
        Self {
            core,
            last_tick: Instant::now(),
            last_telegram_tick: Instant::now(),
            fast: false,
            pending: Vec::new(),
            transmits: Vec::new(),
        }
    }

    /// Time left until the next tick (what an idle driver may sleep).
    pub fn until_tick(&self) -> Duration {
        let slow = TICK.saturating_sub(self.last_tick.elapsed());
        if self.fast {
            slow.min(TELEGRAM_TICK.saturating_sub(self.last_telegram_tick.elapsed()))
        } else {
            slow
        }
    }

    /// Runs due timers, sends the datagrams the shard originated (through `fd_of`, the socket
    /// of a leg's channel) and forwards queued events.
    pub fn run(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        events: &Sender<Event>,
        fd_of: impl Fn(SessionId, LegId, Channel) -> Option<RawFd>,
    ) {
        if now.duration_since(self.last_tick) >= TICK {
            self.last_tick = now;
            shard.on_tick(now);
        }
        self.fast = shard.has_telegram();
        if self.fast && now.duration_since(self.last_telegram_tick) >= TELEGRAM_TICK {
            self.last_telegram_tick = now;
            shard.on_telegram_timers(now);
        }
        shard.take_transmits(&mut self.transmits);
        for t in self.transmits.drain(..) {
            match fd_of(t.session, t.leg, t.channel) {
                Some(fd) => {
                    sockaddr::send_to(fd, &t.data, t.dest);
                }
                None => tracing::debug!(session = t.session, leg = t.leg, "no socket for datagram"),
            }
        }
        shard.drain_events(&mut self.pending);
        for ev in self.pending.drain(..) {
            if events.try_send(ev).is_err() {
                tracing::warn!(core = self.core, "event queue full, event dropped");
            }
        }
    }
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: u16) -> io::Result<()> {
    // SAFETY: builds a zeroed cpu_set_t we own, sets one bit and passes it by pointer with its
    // exact size to sched_setaffinity(2) for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A driver's sockets for legs: how to bind a port pair and start/stop receiving on it.
pub trait LegIo {
    /// A bound RTP socket and, without rtcp-mux, its RTCP socket.
    type Pair;
    /// Binds `port` (and `port + 1` when `with_rtcp`) on `ip`.
    fn bind(
        &mut self,
        ip: IpAddr,
        port: u16,
        with_rtcp: bool,
    ) -> Result<Self::Pair, (SocketAddr, io::Error)>;
    /// The bound RTP address.
    fn local_addr(pair: &Self::Pair) -> Option<SocketAddr>;
    /// Starts receiving on a leg's sockets.
    fn attach(&mut self, session: SessionId, leg: LegId, pair: Self::Pair);
    /// Stops receiving and closes a leg's sockets.
    fn detach(&mut self, session: SessionId, leg: LegId);
    /// The leg's remote changed (re-INVITE): forget any destination the sockets were bound to.
    fn remote_changed(&mut self, _session: SessionId, _leg: LegId) {}
    /// The socket of a leg's channel, for datagrams the shard originates.
    fn fd(&self, session: SessionId, leg: LegId, channel: Channel) -> Option<RawFd>;
}

/// Sends what the shard queued (a Telegram leg's DTLS close-notify and TURN release) while the
/// legs' sockets still exist.
fn flush_transmits<Io: LegIo>(shard: &mut Shard, io: &Io) {
    let mut out = Vec::new();
    shard.take_transmits(&mut out);
    for t in out {
        if let Some(fd) = io.fd(t.session, t.leg, t.channel) {
            sockaddr::send_to(fd, &t.data, t.dest);
        }
    }
}

/// Executes one request on a shard; both drivers answer through here.
pub fn execute<Io: LegIo>(
    shard: &mut Shard,
    io: &mut Io,
    op: ShardOp,
    media_ip: IpAddr,
    now: Instant,
) -> ShardReply {
    match op {
        ShardOp::Create { id, tag } => {
            shard.create_session(id, tag, now);
            ShardReply::Proto(Ok(Reply::SessionCreated {
                session: id,
                core: shard.core(),
            }))
        }
        ShardOp::Status => ShardReply::Status(shard.status()),
        ShardOp::Command(cmd) => ShardReply::Proto(command(shard, io, *cmd, media_ip, now)),
    }
}

fn command<Io: LegIo>(
    shard: &mut Shard,
    io: &mut Io,
    cmd: Command,
    media_ip: IpAddr,
    now: Instant,
) -> Result<Reply, CommandError> {
    match cmd {
        Command::AddLeg { session, spec } => {
            add_leg(shard, io, session, spec, media_ip, now).map(Reply::Leg)
        }
        Command::UpdateLeg { session, leg, spec } => {
            let info = shard.update_leg(session, leg, spec, now)?;
            io.remote_changed(session, leg);
            Ok(Reply::Leg(info))
        }
        Command::Bridge { session, a, b } => shard.bridge(session, a, b).map(|()| Reply::Bridged),
        Command::DeleteLeg { session, leg } => {
            shard.close_telegram(session, Some(leg), now);
            flush_transmits(shard, io);
            shard.delete_leg(session, leg)?;
            io.detach(session, leg);
            Ok(Reply::Deleted)
        }
        Command::DeleteSession { session } => {
            shard.close_telegram(session, None, now);
            flush_transmits(shard, io);
            for leg in shard.delete_session(session)? {
                io.detach(session, leg);
            }
            Ok(Reply::Deleted)
        }
        Command::Stats { session } => shard.stats(session, now).map(Reply::Stats),
        Command::List => Ok(Reply::Sessions(shard.summaries(now))),
        Command::Telegram { session, leg, op } => {
            shard.telegram(session, leg, op, now).map(|()| Reply::Done)
        }
        Command::Status | Command::CreateSession { .. } => Err(CommandError::Invalid(
            "Status and CreateSession are answered by the server, not a shard".into(),
        )),
    }
}

fn add_leg<Io: LegIo>(
    shard: &mut Shard,
    io: &mut Io,
    session: SessionId,
    spec: LegSpec,
    media_ip: IpAddr,
    now: Instant,
) -> Result<LegInfo, CommandError> {
    let ip = spec.local_ip.unwrap_or(media_ip);
    // A port another program holds (EADDRINUSE) is skipped; try a few. Any other bind error (an
    // address not on this host, say) fails the command at once and burns no port.
    for _ in 0..16 {
        let port = shard.begin_add_leg(session, &spec)?;
        let pair = match io.bind(ip, port, !spec.rtcp_mux) {
            Ok(pair) => pair,
            Err((addr, e)) => {
                shard.abort_add_leg(port);
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
        let local = Io::local_addr(&pair).unwrap_or(SocketAddr::new(ip, port));
        let info = shard.complete_add_leg(session, spec, port, local, now)?;
        io.attach(session, info.leg, pair);
        return Ok(info);
    }
    Err(CommandError::Bind {
        addr: ip.to_string(),
        reason: "16 ports in a row are held by other programs".into(),
    })
}

/// Binds a leg's non-blocking std sockets: RTP on `port` and, when asked, RTCP on `port + 1`.
pub fn bind_pair(
    ip: IpAddr,
    port: u16,
    with_rtcp: bool,
) -> Result<(std::net::UdpSocket, Option<std::net::UdpSocket>), (SocketAddr, io::Error)> {
    let bind = |addr: SocketAddr| {
        let s = std::net::UdpSocket::bind(addr).map_err(|e| (addr, e))?;
        s.set_nonblocking(true).map_err(|e| (addr, e))?;
        Ok(s)
    };
    let rtp_addr = SocketAddr::new(ip, port);
    let rtp = bind(rtp_addr)?;
    if !with_rtcp {
        return Ok((rtp, None));
    }
    let Some(rtcp_port) = port.checked_add(1) else {
        return Err((rtp_addr, io::ErrorKind::AddrNotAvailable.into()));
    };
    Ok((rtp, Some(bind(SocketAddr::new(ip, rtcp_port))?)))
}

/// Dissolves a UDP socket's association (connect with AF_UNSPEC), so it takes any source again.
pub fn disconnect(fd: std::os::fd::RawFd) {
    // SAFETY: an all-zero sockaddr with family AF_UNSPEC, passed with its size.
    unsafe {
        let mut a: libc::sockaddr = std::mem::zeroed();
        a.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(fd, &a, std::mem::size_of::<libc::sockaddr>() as u32);
    }
}
