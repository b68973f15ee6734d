//! The sans-IO TURN client (`tgmedia::turn`) against a real coturn (`/usr/bin/turnserver`) on
//! 127.0.0.1, driven over real UDP sockets: allocations with long-term credentials, data relayed
//! both ways (Send/Data indications first, then ChannelData), a wrong password, stale nonces and
//! releasing an allocation. Each test runs its own coturn on a free port with a temporary config,
//! killed when the test ends. `SIPTG_SKIP_COTURN=1` skips them where coturn cannot be installed.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use siptg_dataplane::tgmedia::turn::{TurnClient, TurnError, TurnEvent};

const TURNSERVER: &str = "/usr/bin/turnserver";
const REALM: &str = "siptg.test";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long any one step (allocating, a packet getting through, closing) may take.
const STEP: Duration = Duration::from_secs(5);

/// A coturn process with its own config, database and log in a temporary directory.
struct Coturn {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Coturn {
    /// Starts coturn with the `extra` config lines and waits until it answers STUN; `None` when
    /// `SIPTG_SKIP_COTURN=1`.
    fn start(extra: &[&str]) -> Option<Coturn> {
        if std::env::var("SIPTG_SKIP_COTURN").as_deref() == Ok("1") {
            eprintln!("SIPTG_SKIP_COTURN=1: skipping the coturn test");
            return None;
        }
        assert!(
            Path::new(TURNSERVER).exists(),
            "{TURNSERVER} is missing: install coturn (`apt-get install coturn`), \
             or set SIPTG_SKIP_COTURN=1 to skip the tests against it"
        );
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "siptg-coturn-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = UdpSocket::bind((LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "listening-ip=127.0.0.1\n\
             listening-port={port}\n\
             relay-ip=127.0.0.1\n\
             min-port=49152\n\
             max-port=65535\n\
             realm={REALM}\n\
             lt-cred-mech\n\
             user=tguser:tgpass\n\
             fingerprint\n\
             no-tls\n\
             no-dtls\n\
             no-tcp\n\
             no-cli\n\
             no-rfc5780\n\
             no-multicast-peers\n\
             allow-loopback-peers\n\
             no-software-attribute\n\
             userdb={dir}/turndb.sqlite\n\
             pidfile={dir}/turnserver.pid\n\
             log-file=stdout\n\
             simple-log\n",
            dir = dir.display()
        );
        for line in extra {
            config.push_str(line);
            config.push('\n');
        }
        let conf = dir.join("turnserver.conf");
        std::fs::write(&conf, config).unwrap();
        let log = File::create(dir.join("turnserver.log")).unwrap();
        let child = Command::new(TURNSERVER)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {TURNSERVER}: {e}"));
        let mut coturn = Coturn {
            child,
            dir,
            addr: SocketAddr::new(LOCALHOST, port),
        };
        coturn.wait_ready();
        Some(coturn)
    }

    /// Sends STUN Binding requests until coturn answers one.
    fn wait_ready(&mut self) {
        let probe = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        binding.extend_from_slice(b"siptg-probe!");
        let start = Instant::now();
        let mut buf = [0u8; 1500];
        while start.elapsed() < STEP {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("coturn exited with {status}:\n{}", self.log());
            }
            probe.send_to(&binding, self.addr).unwrap();
            if let Ok((n, _)) = probe.recv_from(&mut buf) {
                if n >= 20 && buf[8..20] == binding[8..20] {
                    return;
                }
            }
        }
        panic!(
            "coturn did not answer on {} within {STEP:?}:\n{}",
            self.addr,
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("turnserver.log")).unwrap_or_default()
    }
}

/// One TURN client on its own UDP socket, and what came out of it.
struct Peer {
    client: TurnClient,
    socket: UdpSocket,
    /// Relayed data returned by `receive`, with whether it came as ChannelData.
    received: Vec<(SocketAddr, Vec<u8>, bool)>,
    events: Vec<TurnEvent>,
    errors: Vec<TurnError>,
    /// ERROR-CODEs of the error responses the server sent.
    error_codes: Vec<u16>,
}

impl Peer {
    fn new(server: SocketAddr, username: &str, password: &str) -> Peer {
        let socket = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        Peer::on_socket(socket, server, username, password)
    }

    fn on_socket(socket: UdpSocket, server: SocketAddr, username: &str, password: &str) -> Peer {
        socket.set_nonblocking(true).unwrap();
        Peer {
            client: TurnClient::new(server, username, password, Instant::now()),
            socket,
            received: Vec::new(),
            events: Vec::new(),
            errors: Vec::new(),
            error_codes: Vec::new(),
        }
    }

    /// One round: due timers, queued requests out, everything that arrived in.
    fn pump(&mut self) {
        let now = Instant::now();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        self.flush();
        let mut buf = [0u8; 2048];
        loop {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert!(self.client.is_from_server(from), "datagram from {from}");
                    let datagram = &buf[..n];
                    self.error_codes.extend(error_code(datagram));
                    let channel_data = (0x40..0x80).contains(&datagram[0]);
                    match self.client.receive(Instant::now(), datagram) {
                        Ok(Some((peer, data))) => self.received.push((peer, data, channel_data)),
                        Ok(None) => {}
                        Err(e) => self.errors.push(e),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        self.flush();
        self.events
            .extend(std::iter::from_fn(|| self.client.poll_event()));
    }

    fn flush(&mut self) {
        while let Some(datagram) = self.client.poll_transmit() {
            self.socket
                .send_to(&datagram, self.client.server())
                .unwrap();
        }
    }

    /// Sends `data` to `peer` through the relay; true if it went as ChannelData.
    fn send(&mut self, peer: SocketAddr, data: &[u8]) -> bool {
        let datagram = self
            .client
            .send_to(Instant::now(), peer, data)
            .expect("allocated");
        self.socket
            .send_to(&datagram, self.client.server())
            .unwrap();
        self.flush();
        (0x40..0x80).contains(&datagram[0])
    }

    fn got(&self, from: SocketAddr, data: &[u8]) -> bool {
        self.received
            .iter()
            .any(|(f, d, _)| *f == from && d.as_slice() == data)
    }
}

/// Pumps `peers` until `done` holds, at most [`STEP`]; `what` names the step for the failure.
fn drive(peers: &mut [&mut Peer], what: &str, mut done: impl FnMut(&mut [&mut Peer]) -> bool) {
    let start = Instant::now();
    loop {
        for peer in peers.iter_mut() {
            peer.pump();
        }
        if done(peers) {
            return;
        }
        assert!(
            start.elapsed() < STEP,
            "{what}: not within {STEP:?}; events {:?}, errors {:?}",
            peers.iter().map(|p| &p.events).collect::<Vec<_>>(),
            peers.iter().map(|p| &p.errors).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Allocates on both peers and returns their relayed addresses.
fn allocate_both(a: &mut Peer, b: &mut Peer) -> (SocketAddr, SocketAddr) {
    drive(&mut [a, b], "both allocations", |p| {
        p.iter().all(|p| p.client.relayed().is_some())
    });
    let relayed = |p: &Peer| p.client.relayed().unwrap();
    for p in [&*a, &*b] {
        assert_eq!(
            p.events,
            [TurnEvent::Allocated {
                relayed: relayed(p)
            }]
        );
        assert_eq!(relayed(p).ip(), LOCALHOST);
        assert_eq!(p.client.mapped(), Some(p.socket.local_addr().unwrap()));
    }
    (relayed(a), relayed(b))
}

/// The ERROR-CODE of a STUN error response, read straight off the wire.
fn error_code(datagram: &[u8]) -> Option<u16> {
    let kind = u16::from_be_bytes([*datagram.first()?, *datagram.get(1)?]);
    if datagram.len() < 20 || kind & 0xC110 != 0x0110 {
        return None;
    }
    let mut offset = 20;
    while let Some(header) = datagram.get(offset..offset + 4) {
        let attr = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if attr == 0x0009 {
            let value = datagram.get(offset + 4..offset + 8)?;
            return Some(u16::from(value[2] & 0x07) * 100 + u16::from(value[3]));
        }
        offset += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// Sends from `from` to `to` (every 50 ms) until `to` receives it; returns whether the last
/// send went out as ChannelData.
fn deliver(from: &mut Peer, to: &mut Peer, to_relayed: SocketAddr, data: &[u8]) -> bool {
    let from_relayed = from.client.relayed().unwrap();
    let mut last_send: Option<Instant> = None;
    let mut channel = false;
    let start = Instant::now();
    while !to.got(from_relayed, data) {
        if last_send.is_none_or(|t| t.elapsed() >= Duration::from_millis(50)) {
            channel = from.send(to_relayed, data);
            last_send = Some(Instant::now());
        }
        from.pump();
        to.pump();
        assert!(
            start.elapsed() < STEP,
            "{:?} from {from_relayed} never reached {to_relayed}; errors {:?} / {:?}",
            String::from_utf8_lossy(data),
            from.errors,
            to.errors
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    channel
}

#[test]
fn two_allocations_relay_data_both_ways_through_coturn() {
    let Some(coturn) = Coturn::start(&[]) else {
        return;
    };
    let mut a = Peer::new(coturn.addr, "tguser", "tgpass");
    let mut b = Peer::new(coturn.addr, "tguser", "tgpass");
    let (a_relayed, b_relayed) = allocate_both(&mut a, &mut b);
    assert_ne!(a_relayed, b_relayed);
    let now = Instant::now();
    a.client.add_permission(now, b_relayed.ip());
    b.client.add_permission(now, a_relayed.ip());

    // A's first packets are Send indications; B has bound no channel to A, so the server hands
    // them to B as Data indications.
    deliver(&mut a, &mut b, b_relayed, b"ping from a");
    assert!(b.received.iter().any(|(_, _, channel)| !channel));
    deliver(&mut b, &mut a, a_relayed, b"pong from b");

    // Once both channels are bound, both directions go as ChannelData.
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let data = format!("channel data {n}");
        let a_channel = deliver(&mut a, &mut b, b_relayed, data.as_bytes());
        let b_channel = deliver(&mut b, &mut a, a_relayed, data.as_bytes());
        let arrived_as_channel_data = |p: &Peer| {
            p.received
                .iter()
                .any(|(_, d, channel)| *channel && d.as_slice() == data.as_bytes())
        };
        if a_channel && b_channel && arrived_as_channel_data(&a) && arrived_as_channel_data(&b) {
            break;
        }
        assert!(start.elapsed() < STEP, "channels never bound");
    }

    for p in [&a, &b] {
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.events.len(), 1, "{:?}", p.events);
    }
}

#[test]
fn coturn_refuses_a_wrong_password_with_a_typed_unauthorized_error() {
    let Some(coturn) = Coturn::start(&[]) else {
        return;
    };
    let mut peer = Peer::new(coturn.addr, "tguser", "not-the-password");
    drive(&mut [&mut peer], "the allocation to fail", |p| {
        !p[0].events.is_empty()
    });
    let [TurnEvent::Failed(error)] = peer.events.as_slice() else {
        panic!("expected one failure, got {:?}", peer.events);
    };
    assert!(
        matches!(
            error,
            TurnError::Unauthorized { username, realm, code: 401, .. }
                if username == "tguser" && realm == REALM
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("wrong username or password"));
    assert!(peer.client.is_closed());
    assert_eq!(peer.client.relayed(), None);
}

#[test]
fn close_releases_the_coturn_allocation_so_the_socket_can_allocate_again() {
    let Some(coturn) = Coturn::start(&[]) else {
        return;
    };
    let socket = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let mut first = Peer::on_socket(socket.try_clone().unwrap(), coturn.addr, "tguser", "tgpass");
    drive(&mut [&mut first], "the first allocation", |p| {
        p[0].client.relayed().is_some()
    });

    // While it exists, the same 5-tuple cannot allocate again: 437 Allocation Mismatch.
    let mut second = Peer::on_socket(socket.try_clone().unwrap(), coturn.addr, "tguser", "tgpass");
    drive(
        &mut [&mut second],
        "the duplicate allocation to fail",
        |p| !p[0].events.is_empty(),
    );
    assert!(
        matches!(
            second.events.as_slice(),
            [TurnEvent::Failed(TurnError::Rejected {
                method: "Allocate",
                code: 437,
                ..
            })]
        ),
        "{:?}",
        second.events
    );

    first.client.close(Instant::now());
    assert_eq!(first.client.relayed(), None);
    drive(&mut [&mut first], "the allocation to be released", |p| {
        p[0].client.is_closed()
    });
    assert!(first
        .events
        .iter()
        .all(|e| !matches!(e, TurnEvent::Failed(_))));
    // Only the initial challenge: the Refresh with LIFETIME 0 succeeded.
    assert_eq!(first.error_codes, [401]);

    // coturn deletes a released allocation on its next one-second timer; until then the 5-tuple
    // still answers 437. Afterwards a new allocation succeeds.
    let start = Instant::now();
    loop {
        let mut third =
            Peer::on_socket(socket.try_clone().unwrap(), coturn.addr, "tguser", "tgpass");
        drive(&mut [&mut third], "a new allocation to settle", |p| {
            p[0].client.relayed().is_some() || !p[0].events.is_empty()
        });
        match third.events.as_slice() {
            [TurnEvent::Allocated { .. }] => break,
            [TurnEvent::Failed(TurnError::Rejected { code: 437, .. })] => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(start.elapsed() < STEP, "the allocation was never released");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn coturn_stale_nonces_are_renewed_and_the_requests_retried() {
    // coturn's nonces last one second here; requests made later get 438 Stale Nonce.
    let Some(coturn) = Coturn::start(&["stale-nonce=1"]) else {
        return;
    };
    let mut a = Peer::new(coturn.addr, "tguser", "tgpass");
    let mut b = Peer::new(coturn.addr, "tguser", "tgpass");
    let (a_relayed, b_relayed) = allocate_both(&mut a, &mut b);
    let wait = Instant::now();
    drive(&mut [&mut a, &mut b], "nonces to go stale", |_| {
        wait.elapsed() > Duration::from_millis(2500)
    });
    let now = Instant::now();
    a.client.add_permission(now, b_relayed.ip());
    b.client.add_permission(now, a_relayed.ip());
    deliver(&mut a, &mut b, b_relayed, b"after a stale nonce");
    deliver(&mut b, &mut a, a_relayed, b"and back");
    assert!(
        a.error_codes.contains(&438) && b.error_codes.contains(&438),
        "{:?} {:?}",
        a.error_codes,
        b.error_codes
    );
    for p in [&a, &b] {
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.events.len(), 1, "{:?}", p.events);
    }
}
