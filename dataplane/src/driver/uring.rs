//! The io_uring driver: one pinned thread per core with its own ring. Every leg socket has a
//! multishot `recvmsg` that takes buffers from one provided-buffer ring, and relayed packets are
//! sent straight from those buffers with `sendmsg` entries submitted in bulk. One
//! `io_uring_enter` per wake-up submits every send and reaps every receive: no syscall per packet.
//!
//! With `DEFER_TASKRUN` the kernel wakes the thread only when `COALESCE_WANT` completions are
//! ready or `poll_interval` has passed (while traffic flows), so at low load one wake-up serves
//! many legs, and at high load the wake-up cost disappears into the batch.
//!
//! Why not glommio: glommio 0.9 has no multishot receive, no provided buffers and no batched
//! submission for sockets; measured with `cargo bench --bench relay` it costs about twice the CPU
//! per packet of this driver (see README, "Relay benchmark").
//!
//! Architecture invariant: no allocation and no lock per packet; buffers, message headers and
//! address slots are allocated once per thread, and a buffer is returned to the ring only after
//! the send that reads it has completed.

use super::sockaddr::{read_sockaddr, write_sockaddr};
use super::{
    bind_pair, disconnect, execute, pin_current_thread, Housekeeping, LegIo, ShardRequest,
    ShardSpec,
};
use crate::shard::{Channel, Shard, MAX_DATAGRAM};
use crate::srtp::MAX_OVERHEAD;
use crossbeam::channel::{Receiver, Sender, TryRecvError};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use siptg_proto::{Event, LegId, SessionId};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Submission queue size.
const RING_ENTRIES: u32 = 4096;
/// Completion queue size: every buffer's receive and send, plus one ending per socket, fit.
const CQ_ENTRIES: u32 = 65536;
/// Provided receive buffers per core (a power of two, at most 32768).
const BUFS: usize = 4096;
/// Space the kernel needs before the payload in a multishot recvmsg buffer.
const NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// `struct io_uring_recvmsg_out`: four u32 fields.
const HEADER: usize = 16;
/// One buffer: the recvmsg header, the source address, and a payload one byte larger than
/// relayed so an oversized datagram shows as such.
const BUF_SIZE: usize = (HEADER + NAME_LEN + MAX_DATAGRAM + 1 + MAX_OVERHEAD + 63) & !63;
/// What the kernel may fill of a buffer: the rest stays free for an SRTP tag added in place.
const RECV_LEN: usize = BUF_SIZE - MAX_OVERHEAD;
const BGID: u16 = 7;
/// While traffic flows, wake up when this many completions are ready (or `poll_interval` passed).
const COALESCE_WANT: usize = 48;
/// A wake-up with at least this many datagrams already amortises its cost: look again at once.
const COALESCE_BELOW: usize = 64;

const KIND_SHIFT: u32 = 56;
const RECV: u64 = 1 << KIND_SHIFT;
const SEND: u64 = 2 << KIND_SHIFT;
const WAKE: u64 = 3 << KIND_SHIFT;
const CANCEL: u64 = 4 << KIND_SHIFT;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Starts the thread of one shard; `wake` is the eventfd the server signals on each command.
pub fn spawn(
    spec: ShardSpec,
    rx: Receiver<ShardRequest>,
    events: Sender<Event>,
    wake: OwnedFd,
) -> io::Result<std::thread::JoinHandle<()>> {
    let core = spec.core;
    // A single-issuer ring belongs to the thread that creates it, so the shard thread builds it
    // and reports setup errors back before serving.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
    let handle = std::thread::Builder::new()
        .name(format!("dp-core{core}"))
        .spawn(move || {
            if spec.pin {
                if let Err(e) = pin_current_thread(core) {
                    tracing::warn!(core, error = %e, "cannot pin shard thread");
                }
            }
            let built = IoUring::<squeue::Entry, cqueue::Entry>::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_submit_all()
                .setup_cqsize(CQ_ENTRIES)
                .build(RING_ENTRIES)
                .and_then(UringIo::new);
            let mut io = match built {
                Ok(io) => {
                    let _ = ready_tx.send(Ok(()));
                    io
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut shard = Shard::new(core, spec.ports, spec.timers, Instant::now());
            tracing::info!(core, ports = ?spec.ports, driver = "uring", "shard started");
            if let Err(e) = run(&spec, &mut shard, &mut io, &rx, &events, &wake) {
                tracing::error!(core, error = %e, "io_uring loop failed");
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("io_uring setup on core {core}: {e}"),
        )),
        Err(_) => Err(io::Error::other(format!(
            "shard thread on core {core} died during setup"
        ))),
    }
}

/// The provided-buffer ring shared by every socket of the core.
struct BufRing {
    ring: *mut types::BufRingEntry,
    layout: Layout,
    /// BUFS × BUF_SIZE bytes. Kept as a raw pointer: the kernel writes some buffers while we read
    /// others, so no Rust reference may span the whole area.
    data: *mut u8,
    data_layout: Layout,
    tail: u16,
}

impl BufRing {
    fn new() -> io::Result<Self> {
        let layout = Layout::from_size_align(BUFS * size_of::<types::BufRingEntry>(), 4096)
            .map_err(io::Error::other)?;
        // SAFETY: a non-zero-sized layout; the memory is zeroed, page aligned, freed in Drop.
        let ring = unsafe { alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let data_layout = Layout::from_size_align(BUFS * BUF_SIZE, 64).map_err(io::Error::other)?;
        // SAFETY: a non-zero-sized layout; freed in Drop.
        let data = unsafe { alloc_zeroed(data_layout) };
        if data.is_null() {
            // SAFETY: allocated above with `layout`.
            unsafe { dealloc(ring.cast(), layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        Ok(BufRing {
            ring,
            layout,
            data,
            data_layout,
            tail: 0,
        })
    }

    fn ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < BUFS (ids come from us or the kernel echoing ours), so the offset stays
        // inside the allocation.
        unsafe { self.data.add((bid as usize % BUFS) * BUF_SIZE) }
    }

    /// Buffer `bid`, which the application owns (the kernel completed it and it was not given
    /// back yet).
    fn buf_mut(&mut self, bid: u16) -> &mut [u8] {
        // SAFETY: one buffer's bytes, owned by us until `give`; `&mut self` prevents overlap.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(bid), BUF_SIZE) }
    }

    /// Hands buffer `bid` back to the kernel (visible after `publish`).
    fn give(&mut self, bid: u16) {
        let addr = self.ptr(bid) as u64;
        // SAFETY: the index is masked into the ring's BUFS entries, which we own.
        let e = unsafe { &mut *self.ring.add(self.tail as usize & (BUFS - 1)) };
        e.set_addr(addr);
        e.set_len(RECV_LEN as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries given since the last call.
    fn publish(&self) {
        // SAFETY: the tail field lives inside the ring memory we own; the kernel reads it
        // concurrently, hence the atomic release store.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts.
        unsafe {
            dealloc(self.ring.cast(), self.layout);
            dealloc(self.data, self.data_layout);
        }
    }
}

/// A send in flight reads its buffer; its header and destination live here until completion.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_in6,
}

struct Sock {
    sock: UdpSocket,
    session: SessionId,
    leg: LegId,
    channel: Channel,
    connected: Option<SocketAddr>,
    /// `connect()` failed once; do not retry on every packet.
    connect_failed: bool,
    /// A multishot receive is live (armed and not yet ended).
    armed: bool,
    /// Detached: waiting for the receive to end before the socket closes and the token is reused.
    closing: bool,
}

/// [`LegIo`] and buffers of one core's ring.
struct UringIo {
    ring: IoUring,
    bufs: BufRing,
    sends: Box<[SendSlot]>,
    /// The msghdr template multishot receives are armed with (only the name length matters).
    recv_hdr: Box<libc::msghdr>,
    slots: Vec<Option<Sock>>,
    free: Vec<usize>,
    by_key: HashMap<(SessionId, LegId, Channel), usize>,
    /// Sockets whose multishot receive stopped for lack of buffers; re-armed once some return.
    rearm: Vec<usize>,
    /// Closed sockets kept until the entries already queued for them have been submitted.
    graveyard: Vec<Sock>,
    /// Buffers given back since the last look at `rearm`.
    returned: usize,
}

impl UringIo {
    fn new(ring: IoUring) -> io::Result<Self> {
        let mut bufs = BufRing::new()?;
        // SAFETY: the ring memory stays valid as long as the io_uring: `ring` is declared before
        // `bufs` in `UringIo`, so the io_uring is closed before the buffers are freed.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring as u64,
                BUFS as u16,
                BGID,
                0,
            )?;
        }
        for bid in 0..BUFS as u16 {
            bufs.give(bid);
        }
        bufs.publish();
        // SAFETY: all-zero msghdr/iovec/sockaddr_in6 are valid values.
        let sends = (0..BUFS)
            .map(|_| unsafe {
                SendSlot {
                    hdr: zeroed(),
                    iov: zeroed(),
                    addr: zeroed(),
                }
            })
            .collect();
        // SAFETY: as above.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        recv_hdr.msg_namelen = NAME_LEN as u32;
        Ok(UringIo {
            ring,
            bufs,
            sends,
            recv_hdr,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            rearm: Vec::new(),
            graveyard: Vec::new(),
            returned: 0,
        })
    }

    /// Queues an entry, flushing the submission queue if it is full; false if it could not be
    /// queued (the caller then undoes what the entry would have done).
    fn push(&mut self, e: squeue::Entry) -> bool {
        for _ in 0..64 {
            // SAFETY: every entry we push points only at memory owned by `self` that outlives
            // the operation (buffers, send slots, the recv template; sockets are closed only
            // after their receive ended and queued entries were submitted).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return true;
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue full: the kernel takes more once we reap; entries wait.
                    std::thread::yield_now();
                }
                Err(err) => {
                    tracing::error!(error = %err, "io_uring submit failed");
                    return false;
                }
            }
        }
        tracing::error!("io_uring submission queue stays full; entry dropped");
        false
    }

    /// Frees a slot whose receive has ended: the socket closes after the next submit.
    fn bury(&mut self, token: usize) {
        if let Some(sock) = self.slots.get_mut(token).and_then(Option::take) {
            self.graveyard.push(sock);
            self.free.push(token);
        }
    }

    fn arm(&mut self, token: usize) {
        let Some(Some(s)) = self.slots.get(token) else {
            return;
        };
        if s.closing {
            return;
        }
        let e = opcode::RecvMsgMulti::new(types::Fd(s.sock.as_raw_fd()), &*self.recv_hdr, BGID)
            .build()
            .user_data(RECV | token as u64);
        let queued = self.push(e);
        if let Some(Some(s)) = self.slots.get_mut(token) {
            s.armed = queued;
        }
        if !queued {
            self.rearm.push(token);
        }
    }

    fn insert(&mut self, sock: Sock) {
        let token = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.by_key
            .insert((sock.session, sock.leg, sock.channel), token);
        self.slots[token] = Some(sock);
        self.arm(token);
    }

    fn remove(&mut self, key: (SessionId, LegId, Channel)) {
        let Some(token) = self.by_key.remove(&key) else {
            return;
        };
        let armed = match self.slots.get_mut(token) {
            Some(Some(s)) => {
                s.closing = true;
                s.armed
            }
            _ => return,
        };
        if !armed {
            // No receive to wait for (it ended, e.g. for lack of buffers).
            self.rearm.retain(|&t| t != token);
            self.bury(token);
            return;
        }
        // The slot is freed when the receive's last completion arrives.
        let e = opcode::AsyncCancel::new(RECV | token as u64)
            .build()
            .user_data(CANCEL | token as u64);
        if !self.push(e) {
            tracing::error!(token, "cannot cancel a receive; its socket stays open");
        }
    }

    /// Queues a send of `len` bytes at `offset` of buffer `bid`; the buffer returns to the ring
    /// when the send completes.
    fn send(
        &mut self,
        out: usize,
        bid: u16,
        offset: usize,
        len: usize,
        dest: SocketAddr,
        settled: bool,
    ) -> bool {
        let Some(Some(s)) = self.slots.get_mut(out) else {
            return false;
        };
        if s.closing {
            return false;
        }
        let fd = s.sock.as_raw_fd();
        if settled && s.connected.is_none() && !s.connect_failed {
            match s.sock.connect(dest) {
                Ok(()) => s.connected = Some(dest),
                Err(_) => s.connect_failed = true,
            }
        }
        let connected = s.connected == Some(dest);
        if offset + len > BUF_SIZE {
            return false;
        }
        let base = self.bufs.ptr(bid);
        let slot = &mut self.sends[bid as usize % BUFS];
        // SAFETY: offset + len lie inside buffer `bid` (checked above).
        slot.iov.iov_base = unsafe { base.add(offset) }.cast();
        slot.iov.iov_len = len;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        if connected {
            slot.hdr.msg_name = std::ptr::null_mut();
            slot.hdr.msg_namelen = 0;
        } else {
            slot.hdr.msg_namelen = write_sockaddr(&mut slot.addr, dest);
            slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_in6).cast();
        }
        let e = opcode::SendMsg::new(types::Fd(fd), &slot.hdr)
            .build()
            .user_data(SEND | bid as u64);
        self.push(e)
    }
}

impl LegIo for UringIo {
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

    fn fd(&self, session: SessionId, leg: LegId, channel: Channel) -> Option<std::os::fd::RawFd> {
        let token = *self.by_key.get(&(session, leg, channel))?;
        self.slots.get(token)?.as_ref().map(|s| s.sock.as_raw_fd())
    }

    fn attach(&mut self, session: SessionId, leg: LegId, (rtp, rtcp): Self::Pair) {
        for (channel, sock) in [(Channel::Rtp, Some(rtp)), (Channel::Rtcp, rtcp)] {
            let Some(sock) = sock else { continue };
            self.insert(Sock {
                sock,
                session,
                leg,
                channel,
                connected: None,
                connect_failed: false,
                armed: false,
                closing: false,
            });
        }
    }

    fn detach(&mut self, session: SessionId, leg: LegId) {
        self.remove((session, leg, Channel::Rtp));
        self.remove((session, leg, Channel::Rtcp));
    }

    fn remote_changed(&mut self, session: SessionId, leg: LegId) {
        // Sends already queued for the old destination go out first.
        if let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "io_uring submit before re-targeting a leg failed");
        }
        for channel in [Channel::Rtp, Channel::Rtcp] {
            let Some(&token) = self.by_key.get(&(session, leg, channel)) else {
                continue;
            };
            if let Some(Some(s)) = self.slots.get_mut(token) {
                s.connect_failed = false;
                if s.connected.take().is_some() {
                    disconnect(s.sock.as_raw_fd());
                }
            }
        }
    }
}

fn arm_wake(io: &mut UringIo, wake: &OwnedFd) {
    let e = opcode::PollAdd::new(types::Fd(wake.as_raw_fd()), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(WAKE);
    io.push(e);
}

fn run(
    spec: &ShardSpec,
    shard: &mut Shard,
    io: &mut UringIo,
    rx: &Receiver<ShardRequest>,
    events: &Sender<Event>,
    wake: &OwnedFd,
) -> io::Result<()> {
    arm_wake(io, wake);
    let mut house = Housekeeping::new(spec.core);
    let mut coalesce = false;
    let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(CQ_ENTRIES as usize);
    let mut rearm = Vec::new();
    let mut overflow_seen = 0;
    loop {
        let (want, timeout) = if coalesce {
            (
                COALESCE_WANT,
                spec.poll_interval.max(Duration::from_micros(1)),
            )
        } else {
            (1, house.until_tick().max(Duration::from_millis(1)))
        };
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match io.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        // Entries for sockets closed last round have been submitted: they may close now.
        io.graveyard.clear();
        done.clear();
        let mut cq = io.ring.completion();
        let overflow = cq.overflow();
        done.extend(cq.by_ref().map(|c| (c.user_data(), c.result(), c.flags())));
        drop(cq);
        if overflow != overflow_seen {
            overflow_seen = overflow;
            tracing::error!(
                core = spec.core,
                overflow,
                "io_uring completion queue overflowed"
            );
        }
        let now = Instant::now();
        let mut packets = 0usize;
        for &(user_data, result, flags) in &done {
            let index = (user_data & INDEX_MASK) as usize;
            match user_data & !INDEX_MASK {
                RECV => packets += on_recv(shard, io, index, result, flags, now),
                SEND => {
                    if result < 0 {
                        tracing::debug!(error = %io::Error::from_raw_os_error(-result), "send failed");
                    }
                    io.bufs.give(index as u16);
                    io.returned += 1;
                }
                WAKE => {
                    let mut counter = [0u8; 8];
                    // SAFETY: reads 8 bytes into a live local from the eventfd we own.
                    unsafe { libc::read(wake.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
                    loop {
                        match rx.try_recv() {
                            Ok(req) => {
                                let answer =
                                    execute(shard, io, req.op, spec.media_ip, Instant::now());
                                let _ = req.reply.send(answer);
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => return Ok(()),
                        }
                    }
                    if !cqueue::more(flags) {
                        arm_wake(io, wake);
                    }
                }
                _ => {} // cancel completions carry nothing
            }
        }
        io.bufs.publish();
        // Re-arm receives that ran out of buffers only once some came back, or they would fail
        // again at once.
        if !io.rearm.is_empty() && io.returned > 0 {
            std::mem::swap(&mut rearm, &mut io.rearm);
            for token in rearm.drain(..) {
                io.arm(token);
            }
        }
        io.returned = 0;
        coalesce = packets > 0 && packets < COALESCE_BELOW && !spec.poll_interval.is_zero();
        house.run(shard, now, events, |session, leg, channel| {
            let token = *io.by_key.get(&(session, leg, channel))?;
            io.slots.get(token)?.as_ref().map(|s| s.sock.as_raw_fd())
        });
    }
}

/// Handles one receive completion; returns 1 if it carried a datagram.
fn on_recv(
    shard: &mut Shard,
    io: &mut UringIo,
    token: usize,
    result: i32,
    flags: u32,
    now: Instant,
) -> usize {
    let bid = cqueue::buffer_select(flags);
    let more = cqueue::more(flags);
    let closing = matches!(io.slots.get(token), Some(Some(s)) if s.closing);
    if !more {
        if let Some(Some(s)) = io.slots.get_mut(token) {
            s.armed = false;
        }
        if closing {
            // The receive is gone: the socket can close and the token be reused.
            io.bury(token);
        } else {
            if result < 0 && result != -libc::ENOBUFS {
                tracing::debug!(token, error = %io::Error::from_raw_os_error(-result), "receive ended; re-arming");
            }
            io.rearm.push(token);
        }
    }
    let Some(bid) = bid else { return 0 };
    if result < 0 || closing {
        io.bufs.give(bid);
        io.returned += 1;
        return 0;
    }
    let Some(Some(s)) = io.slots.get(token) else {
        io.bufs.give(bid);
        return 0;
    };
    let (session, leg, channel) = (s.session, s.leg, s.channel);
    let buf = &io.bufs.buf_mut(bid)[..(result as usize).min(RECV_LEN)];
    let Ok(msg) = types::RecvMsgOut::parse(buf, &io.recv_hdr) else {
        io.bufs.give(bid);
        return 0;
    };
    let payload = msg.payload_data();
    let offset = payload.as_ptr() as usize - buf.as_ptr() as usize;
    // A truncated payload is longer than anything relayed: hand the shard MAX + 1 bytes.
    let len = if msg.is_payload_truncated() {
        MAX_DATAGRAM + 1
    } else {
        payload.len()
    };
    let src = read_sockaddr(msg.name_data());
    let len = len.min(RECV_LEN - offset);
    let Some(src) = src else {
        io.bufs.give(bid);
        return 1;
    };
    let buf = &mut io.bufs.buf_mut(bid)[offset..];
    let fwd = shard.on_packet(session, leg, channel, src, buf, len, now);
    let sent = fwd.is_some_and(|f| {
        let out = io.by_key.get(&(f.session, f.leg, f.channel)).copied();
        out.is_some_and(|out| io.send(out, bid, offset, f.len, f.dest, f.settled))
    });
    if !sent {
        io.bufs.give(bid);
        io.returned += 1;
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_layout_leaves_room_for_an_oversized_datagram() {
        const { assert!(BUF_SIZE > HEADER + NAME_LEN + MAX_DATAGRAM) };
        assert!(BUFS.is_power_of_two() && BUFS <= 32768);
    }
}
