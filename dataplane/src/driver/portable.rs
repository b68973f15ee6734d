//! The portable driver: a pinned OS thread per core with its own epoll set over every socket of
//! the core, draining ready sockets with `recvmmsg` and relaying with `sendto`.
//!
//! It needs nothing beyond epoll, so it runs where io_uring is blocked (Docker's default seccomp
//! profile, `kernel.io_uring_disabled`). Its cost at low load is wake-ups, not packets, so after a
//! wake-up that carried traffic it waits `poll_interval` before looking again: at 50 packets/s per
//! leg one wake-up then serves many legs (the added delay is bounded by the interval).
//!
//! Architecture invariant: no allocation and no lock per packet. The receive buffers, message
//! headers and address slots are allocated once per thread; the shard, the sockets and the epoll
//! set belong to this thread alone.

use super::sockaddr::{read_sockaddr, send_to};
use super::{
    bind_pair, disconnect, execute, pin_current_thread, Housekeeping, LegIo, ShardRequest,
    ShardSpec,
};
use crate::shard::{Channel, Shard, MAX_DATAGRAM, PACKET_BUF};
use crossbeam::channel::{Receiver, Sender, TryRecvError};
use siptg_proto::{Event, LegId, SessionId};
use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A wake-up that relayed at least this many datagrams already amortises its cost: look again
/// at once instead of waiting `poll_interval` (keeps latency low under load).
const COALESCE_BELOW: usize = 32;
/// Batches read from one socket per turn; a socket with more waiting is revisited after the others.
const MAX_ROUNDS: usize = 4;
/// Datagrams read from one socket per `recvmmsg`.
const BATCH: usize = 16;
/// Ready sockets taken from one `epoll_wait`.
const MAX_EVENTS: usize = 512;
/// epoll token of the command eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// Slot size: one byte more than relayed, so an oversized datagram shows as such.
const SLOT: usize = MAX_DATAGRAM + 1;

/// Starts the thread of one shard; `wake` is the eventfd the server signals on each command.
pub fn spawn(
    spec: ShardSpec,
    rx: Receiver<ShardRequest>,
    events: Sender<Event>,
    wake: OwnedFd,
) -> io::Result<std::thread::JoinHandle<()>> {
    let core = spec.core;
    // SAFETY: epoll_create1(2) returns a new descriptor or -1; ownership is taken at once.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: epfd is fresh and owned by nobody else.
    let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
    epoll_add(epfd.as_raw_fd(), wake.as_raw_fd(), WAKE_TOKEN, false)?;
    std::thread::Builder::new()
        .name(format!("dp-core{core}"))
        .spawn(move || {
            if spec.pin {
                if let Err(e) = pin_current_thread(core) {
                    tracing::warn!(core, error = %e, "cannot pin shard thread");
                }
            }
            // The coalescing sleep is short; the default 50 µs timer slack would stretch it.
            // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
            let mut shard = Shard::new(core, spec.ports, spec.timers, Instant::now());
            let mut io = PortableIo {
                epfd,
                slots: Vec::new(),
                free: Vec::new(),
                by_key: HashMap::new(),
            };
            tracing::info!(core, ports = ?spec.ports, driver = "portable", "shard started");
            run(&spec, &mut shard, &mut io, &rx, &events, &wake);
            tracing::info!(core, "shard stopping: server gone");
        })
}

/// Watches `fd`; edge-triggered for sockets, which are then drained until empty, so epoll does
/// not re-poll every socket it reported.
fn epoll_add(epfd: RawFd, fd: RawFd, token: u64, edge: bool) -> io::Result<()> {
    let flags = if edge {
        libc::EPOLLIN | libc::EPOLLET
    } else {
        libc::EPOLLIN
    };
    let mut ev = libc::epoll_event {
        events: flags as u32,
        u64: token,
    };
    // SAFETY: registers a descriptor we own with an epoll set we own; `ev` is a live struct.
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Sock {
    sock: UdpSocket,
    session: SessionId,
    leg: LegId,
    channel: Channel,
    /// The destination the socket is `connect()`ed to: sends then skip the route lookup.
    connected: Option<SocketAddr>,
}

/// [`LegIo`] over non-blocking std sockets in this thread's epoll set.
struct PortableIo {
    epfd: OwnedFd,
    /// Sockets by epoll token.
    slots: Vec<Option<Sock>>,
    free: Vec<usize>,
    by_key: HashMap<(SessionId, LegId, Channel), usize>,
}

impl PortableIo {
    fn insert(&mut self, sock: Sock) -> io::Result<()> {
        let token = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        epoll_add(
            self.epfd.as_raw_fd(),
            sock.sock.as_raw_fd(),
            token as u64,
            true,
        )?;
        self.by_key
            .insert((sock.session, sock.leg, sock.channel), token);
        self.slots[token] = Some(sock);
        Ok(())
    }

    fn remove(&mut self, key: (SessionId, LegId, Channel)) {
        let Some(token) = self.by_key.remove(&key) else {
            return;
        };
        if let Some(s) = self.slots[token].take() {
            // SAFETY: removes a descriptor we registered from our epoll set.
            unsafe {
                libc::epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    s.sock.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
        self.free.push(token);
    }
}

impl LegIo for PortableIo {
    type Pair = (UdpSocket, Option<UdpSocket>);

    fn bind(
        &mut self,
        ip: IpAddr,
        port: u16,
        with_rtcp: bool,
    ) -> Result<Self::Pair, (SocketAddr, io::Error)> {
        bind_pair(ip, port, with_rtcp)
    }

    fn local_addr(pair: &Self::Pair) -> Option<SocketAddr> {
        pair.0.local_addr().ok()
    }

    fn fd(&self, session: SessionId, leg: LegId, channel: Channel) -> Option<RawFd> {
        let token = *self.by_key.get(&(session, leg, channel))?;
        self.slots.get(token)?.as_ref().map(|s| s.sock.as_raw_fd())
    }

    fn attach(&mut self, session: SessionId, leg: LegId, (rtp, rtcp): Self::Pair) {
        for (channel, sock) in [(Channel::Rtp, Some(rtp)), (Channel::Rtcp, rtcp)] {
            let Some(sock) = sock else { continue };
            if let Err(e) = self.insert(Sock {
                sock,
                session,
                leg,
                channel,
                connected: None,
            }) {
                tracing::error!(session, leg, error = %e, "cannot watch leg socket");
            }
        }
    }

    fn detach(&mut self, session: SessionId, leg: LegId) {
        self.remove((session, leg, Channel::Rtp));
        self.remove((session, leg, Channel::Rtcp));
    }

    fn remote_changed(&mut self, session: SessionId, leg: LegId) {
        for channel in [Channel::Rtp, Channel::Rtcp] {
            let Some(&token) = self.by_key.get(&(session, leg, channel)) else {
                continue;
            };
            if let Some(Some(s)) = self.slots.get_mut(token) {
                if s.connected.take().is_some() {
                    disconnect(s.sock.as_raw_fd());
                }
            }
        }
    }
}

/// Buffers for `recvmmsg`, allocated once per thread.
struct RecvBatch {
    /// Each slot receives at most `SLOT` bytes and keeps room for an SRTP tag after them.
    data: Vec<[u8; PACKET_BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new() -> Self {
        // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which all-zero is valid.
        let (addrs, hdrs) = unsafe {
            (
                vec![zeroed::<libc::sockaddr_storage>(); BATCH],
                vec![zeroed::<libc::mmsghdr>(); BATCH],
            )
        };
        let mut b = RecvBatch {
            data: vec![[0u8; PACKET_BUF]; BATCH],
            addrs,
            iovs: Vec::with_capacity(BATCH),
            hdrs,
        };
        for i in 0..BATCH {
            b.iovs.push(libc::iovec {
                iov_base: b.data[i].as_mut_ptr().cast(),
                iov_len: SLOT,
            });
        }
        for i in 0..BATCH {
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
        }
        b
    }

    /// Reads up to `BATCH` datagrams from `fd` without blocking; returns how many.
    fn recv(&mut self, fd: RawFd) -> usize {
        for h in &mut self.hdrs {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            h.msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self` that outlive the call (their
        // addresses are stable: the Vecs are never resized after `new`).
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            // A pending socket error (ICMP unreachable on a connected socket) is reported before
            // the queue is read; it is consumed now, so read again.
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                // SAFETY: as above.
                let n = unsafe {
                    libc::recvmmsg(
                        fd,
                        self.hdrs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                return n.max(0) as usize;
            }
        }
        n.max(0) as usize
    }
}

fn run(
    spec: &ShardSpec,
    shard: &mut Shard,
    io: &mut PortableIo,
    rx: &Receiver<ShardRequest>,
    events: &Sender<Event>,
    wake: &OwnedFd,
) {
    let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut batch = RecvBatch::new();
    let mut house = Housekeeping::new(spec.core);
    let mut coalesce = false;
    // Sockets that still had data after their share (see `MAX_ROUNDS`), this turn and next.
    let mut hot: Vec<usize> = Vec::with_capacity(64);
    let mut hot_now: Vec<usize> = Vec::with_capacity(64);
    loop {
        if coalesce {
            // Traffic is flowing: let more sockets become ready before the next look.
            std::thread::sleep(spec.poll_interval);
        }
        let until_tick = house.until_tick();
        let timeout_ms = if coalesce || !hot_now.is_empty() {
            0
        } else {
            until_tick.as_millis().max(1) as i32
        };
        // SAFETY: `ready` is a live buffer of MAX_EVENTS entries.
        let n = unsafe {
            libc::epoll_wait(
                io.epfd.as_raw_fd(),
                ready.as_mut_ptr(),
                MAX_EVENTS as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(core = spec.core, error = %e, "epoll_wait failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        let now = Instant::now();
        let mut packets = 0usize;
        for ev in &ready[..n as usize] {
            let token = ev.u64;
            if token == WAKE_TOKEN {
                let mut counter = [0u8; 8];
                // SAFETY: reads 8 bytes into a live local from the eventfd we own.
                unsafe { libc::read(wake.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
                loop {
                    match rx.try_recv() {
                        Ok(req) => {
                            let answer = execute(shard, io, req.op, spec.media_ip, Instant::now());
                            let _ = req.reply.send(answer);
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
                continue;
            }
            packets += relay_from(shard, io, &mut batch, token as usize, now, &mut hot);
        }
        // Sockets left with data (a flood) get their next share now, after everyone else.
        for &token in &hot_now {
            packets += relay_from(shard, io, &mut batch, token, now, &mut hot);
        }
        hot_now.clear();
        std::mem::swap(&mut hot, &mut hot_now);
        coalesce = packets > 0 && packets < COALESCE_BELOW && !spec.poll_interval.is_zero();
        house.run(shard, now, events, |session, leg, channel| {
            let token = *io.by_key.get(&(session, leg, channel))?;
            io.slots.get(token)?.as_ref().map(|s| s.sock.as_raw_fd())
        });
    }
}

/// Drains one ready socket (edge-triggered: until it is empty) and relays what it held; returns
/// the datagrams read.
fn relay_from(
    shard: &mut Shard,
    io: &mut PortableIo,
    batch: &mut RecvBatch,
    token: usize,
    now: Instant,
    hot: &mut Vec<usize>,
) -> usize {
    let Some(Some(s)) = io.slots.get(token) else {
        return 0;
    };
    let (session, leg, channel, fd) = (s.session, s.leg, s.channel, s.sock.as_raw_fd());
    let mut total = 0;
    let mut rounds = 0;
    loop {
        let n = batch.recv(fd);
        for i in 0..n {
            let len = (batch.hdrs[i].msg_len as usize).min(SLOT);
            let Some(src) = read_sockaddr(storage_bytes(&batch.addrs[i])) else {
                continue;
            };
            let buf = &mut batch.data[i];
            let Some(fwd) = shard.on_packet(session, leg, channel, src, buf, len, now) else {
                continue;
            };
            let data = &buf[..fwd.len];
            let Some(&out_token) = io.by_key.get(&(fwd.session, fwd.leg, fwd.channel)) else {
                continue;
            };
            if let Some(Some(out)) = io.slots.get_mut(out_token) {
                send(out, data, fwd.dest, fwd.settled);
            }
        }
        total += n;
        if n < BATCH {
            return total;
        }
        rounds += 1;
        if rounds == MAX_ROUNDS {
            // Still more: a flood. Leave the rest for the next turn so other legs get served.
            hot.push(token);
            return total;
        }
    }
}

/// Sends on a leg socket, connecting it to a settled destination first so later sends are
/// cheaper (no per-packet route lookup); a socket connected elsewhere uses `sendto`.
fn send(out: &mut Sock, data: &[u8], dest: SocketAddr, settled: bool) {
    let fd = out.sock.as_raw_fd();
    if out.connected == Some(dest) {
        // SAFETY: `data` is a live slice; the socket is ours.
        unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
        return;
    }
    if settled && out.connected.is_none() && out.sock.connect(dest).is_ok() {
        out.connected = Some(dest);
        // SAFETY: as above.
        unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
        return;
    }
    send_to(fd, data, dest);
}

/// The bytes of a socket address the kernel filled in.
fn storage_bytes(ss: &libc::sockaddr_storage) -> &[u8] {
    // SAFETY: views a live, fully initialised (zeroed, then written by the kernel) struct as bytes.
    unsafe {
        std::slice::from_raw_parts(
            (ss as *const libc::sockaddr_storage).cast::<u8>(),
            size_of::<libc::sockaddr_storage>(),
        )
    }
}
