//! The glommio driver: one executor per core (io_uring) runs a [`Shard`] over that core's
//! sockets, with one receive task per socket.
//!
//! Commands arrive on a crossbeam channel that the executor drains every [`COMMAND_POLL`] (a
//! thread outside glommio cannot wake an executor, and call setup tolerates a few ms).
//! Receiving, deciding and sending happen on the same core with no lock.
//!
//! Architecture invariant: the relay logic allocates nothing per packet — each receive task owns
//! one buffer for its lifetime; forwarding borrows it. (glommio 0.9's `recv_from` itself falls
//! back to an io_uring op with an allocated buffer when no datagram is waiting.)

use super::{execute, Housekeeping, LegIo, ShardRequest, ShardSpec};
use crate::shard::{Channel, Shard, MAX_DATAGRAM, PACKET_BUF};
use crossbeam::channel::{Receiver, Sender, TryRecvError};
use glommio::net::UdpSocket;
use glommio::{LocalExecutorBuilder, Placement, Task};
use siptg_proto::{Event, LegId, SessionId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often an idle shard looks for commands; bounds command latency.
const COMMAND_POLL: Duration = Duration::from_millis(2);

/// Starts the executor thread of one shard.
pub fn spawn(
    spec: ShardSpec,
    rx: Receiver<ShardRequest>,
    events: Sender<Event>,
) -> io::Result<glommio::ExecutorJoinHandle<()>> {
    let core = spec.core;
    let placement = if spec.pin {
        Placement::Fixed(core as usize)
    } else {
        Placement::Unbound
    };
    LocalExecutorBuilder::new(placement)
        .name(&format!("dp-core{core}"))
        .spawn(move || async move { run(spec, rx, events).await })
        .map_err(|e| io::Error::other(format!("cannot start shard on core {core}: {e}")))
}

type SocketKey = (SessionId, LegId, Channel);
/// Receive tasks per leg.
type LegTasks = HashMap<(SessionId, LegId), Vec<Task<()>>>;

struct Ctx {
    shard: RefCell<Shard>,
    sockets: RefCell<HashMap<SocketKey, Rc<UdpSocket>>>,
    /// Receive tasks of each leg; dropping them cancels them and closes the sockets.
    tasks: RefCell<LegTasks>,
}

/// [`LegIo`] over glommio sockets.
struct GlommioIo {
    ctx: Rc<Ctx>,
}

impl LegIo for GlommioIo {
    type Pair = (UdpSocket, Option<UdpSocket>);

    fn bind(
        &mut self,
        ip: IpAddr,
        port: u16,
        with_rtcp: bool,
    ) -> Result<Self::Pair, (SocketAddr, io::Error)> {
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

    fn local_addr(pair: &Self::Pair) -> Option<SocketAddr> {
        pair.0.local_addr().ok()
    }

    fn fd(&self, session: SessionId, leg: LegId, channel: Channel) -> Option<std::os::fd::RawFd> {
        self.ctx
            .sockets
            .borrow()
            .get(&(session, leg, channel))
            .map(|s| s.as_raw_fd())
    }

    fn attach(&mut self, session: SessionId, leg: LegId, (rtp, rtcp): Self::Pair) {
        let mut tasks = Vec::with_capacity(2);
        for (channel, sock) in [(Channel::Rtp, Some(rtp)), (Channel::Rtcp, rtcp)] {
            let Some(sock) = sock else { continue };
            let sock = Rc::new(sock);
            self.ctx
                .sockets
                .borrow_mut()
                .insert((session, leg, channel), sock.clone());
            tasks.push(glommio::spawn_local(receive_loop(
                self.ctx.clone(),
                session,
                leg,
                channel,
                sock,
            )));
        }
        self.ctx.tasks.borrow_mut().insert((session, leg), tasks);
    }

    fn detach(&mut self, session: SessionId, leg: LegId) {
        let mut sockets = self.ctx.sockets.borrow_mut();
        sockets.remove(&(session, leg, Channel::Rtp));
        sockets.remove(&(session, leg, Channel::Rtcp));
        drop(sockets);
        // Dropping the tasks cancels them; the sockets close with their last Rc.
        self.ctx.tasks.borrow_mut().remove(&(session, leg));
    }
}

async fn run(spec: ShardSpec, rx: Receiver<ShardRequest>, events: Sender<Event>) {
    let ctx = Rc::new(Ctx {
        shard: RefCell::new(Shard::new(
            spec.core,
            spec.ports,
            spec.timers,
            Instant::now(),
        )),
        sockets: RefCell::new(HashMap::new()),
        tasks: RefCell::new(HashMap::new()),
    });
    let mut io = GlommioIo { ctx: ctx.clone() };
    tracing::info!(core = spec.core, ports = ?spec.ports, driver = "glommio", "shard started");
    let mut house = Housekeeping::new(spec.core);
    loop {
        loop {
            match rx.try_recv() {
                Ok(req) => {
                    let answer = {
                        let mut shard = ctx.shard.borrow_mut();
                        execute(&mut shard, &mut io, req.op, spec.media_ip, Instant::now())
                    };
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
        {
            let sockets = ctx.sockets.borrow();
            house.run(
                &mut ctx.shard.borrow_mut(),
                Instant::now(),
                &events,
                |session, leg, channel| {
                    sockets.get(&(session, leg, channel)).map(|s| s.as_raw_fd())
                },
            );
        }
        glommio::timer::sleep(COMMAND_POLL).await;
    }
}

async fn receive_loop(
    ctx: Rc<Ctx>,
    session: SessionId,
    leg: LegId,
    channel: Channel,
    sock: Rc<UdpSocket>,
) {
    // One byte more than relayed, so an oversized datagram is seen as such and dropped.
    let mut buf = vec![0u8; PACKET_BUF];
    loop {
        let (n, src) = match sock.recv_from(&mut buf[..MAX_DATAGRAM + 1]).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors surface here on some kernels; they are not fatal for the leg.
                tracing::debug!(session, leg, error = %e, "receive error");
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let fwd = ctx.shard.borrow_mut().on_packet(
            session,
            leg,
            channel,
            src,
            &mut buf,
            n,
            Instant::now(),
        );
        let Some(fwd) = fwd else { continue };
        let out = ctx
            .sockets
            .borrow()
            .get(&(fwd.session, fwd.leg, fwd.channel))
            .cloned();
        if let Some(out) = out {
            if let Err(e) = out.send_to(&buf[..fwd.len], fwd.dest).await {
                tracing::debug!(session, leg = fwd.leg, dest = %fwd.dest, error = %e, "send failed");
            }
        }
    }
}
