//! SIP listeners of a Worker. UDP sockets are bound here and served by the SIP core
//! (`super::core`), which answers through the transaction layer; the Worker's [`Responder`]
//! decides non-INVITE answers.
//! TCP ([`serve_tcp`], [`connect_tcp`]): per connection, messages framed by Content-Length go
//! to the SIP core as [`TcpEvent`]s and a [`TcpWriter`] carries what the core sends back.
//! TLS ([`serve_tls`], RFC 3261 §26): accepted connections run the same task once the
//! handshake is done; there is no outbound TLS, so the core can only answer TLS peers over the
//! connections they opened.

use super::message::Request;
use super::transaction::Transport;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::UdpSocket;

/// Methods counted by name in metrics; anything else is `other` (the label comes off the wire).
const KNOWN_METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "UPDATE",
    "PRACK",
    "MESSAGE",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "PUBLISH",
];

/// The metrics label of a method: known methods by name, anything else `other` (the value
/// comes off the wire, so it must not grow the label set).
pub fn method_label(method: &str) -> &str {
    KNOWN_METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("other")
}

/// A final answer to a request: status code and reason phrase; `None` sends nothing (ACK).
pub type Answer = Option<Reply>;

/// A final response: status, SIP.TG's reason phrase, and headers it must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// A response without extra headers.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Reply {
            code,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }
}

/// Decides how to answer a request.
pub trait Responder: Send + Sync + 'static {
    /// Answers one request from `source`.
    fn answer(
        &self,
        req: Request,
        source: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>>;
}

/// Binds a UDP listener; fails with the address in the message.
pub async fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for SIP on udp:{addr}: {e}"),
        )
    })
}

/// A TCP connection idle this long (no bytes in) is closed.
pub const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(600);
/// How long opening an outbound TCP connection may take.
pub const TCP_CONNECT: std::time::Duration = std::time::Duration::from_secs(5);
/// Messages queued for one connection's writer before sends to it fail.
const TCP_QUEUE: usize = 256;

/// The sending half of a SIP TCP connection: bytes queued here are written in order.
pub type TcpWriter = tokio::sync::mpsc::Sender<Vec<u8>>;

/// What TCP and TLS connections report to the SIP core.
#[derive(Debug)]
pub enum TcpEvent {
    /// A whole SIP message from `peer`, on the connection whose writer is `writer`.
    Message {
        msg: super::msg::SipMessage,
        peer: SocketAddr,
        local: SocketAddr,
        writer: TcpWriter,
        /// `Tcp` or `Tls`.
        transport: Transport,
    },
    /// The connection to `peer` (writer `writer`) ended; `failed` when it never opened or
    /// broke while sending.
    Closed {
        peer: SocketAddr,
        writer: TcpWriter,
        failed: bool,
        transport: Transport,
    },
}

/// Why a TCP connection ended.
#[derive(Debug, thiserror::Error)]
pub enum TcpClose {
    #[error("peer closed the connection")]
    Eof,
    #[error("idle for {0:?}")]
    Idle(std::time::Duration),
    #[error("SIP framing lost: {0}")]
    Framing(#[from] super::msg::ParseError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the SIP core is gone")]
    CoreGone,
}

/// Accepts SIP connections on `listener` until the process ends; every connection reports to
/// `events`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    events: tokio::sync::mpsc::Sender<TcpEvent>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (writer, queue) = tokio::sync::mpsc::channel(TCP_QUEUE);
                let _ = stream.set_nodelay(true);
                let local = stream.local_addr().unwrap_or(peer);
                let conn = Conn {
                    peer,
                    local,
                    transport: Transport::Tcp,
                };
                tokio::spawn(run_stream(stream, conn, writer, queue, events.clone()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "SIP TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Opens a connection to `peer` (within [`TCP_CONNECT`]) and runs it: `queue` is the receiving
/// end of the writer the core already registered. A failure is reported as `Closed { failed }`.
pub async fn connect_tcp(
    peer: SocketAddr,
    writer: TcpWriter,
    queue: tokio::sync::mpsc::Receiver<Vec<u8>>,
    events: tokio::sync::mpsc::Sender<TcpEvent>,
) {
    match tokio::time::timeout(TCP_CONNECT, tokio::net::TcpStream::connect(peer)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(peer);
            let conn = Conn {
                peer,
                local,
                transport: Transport::Tcp,
            };
            run_stream(stream, conn, writer, queue, events).await
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "SIP TCP connect failed");
            let _ = events
                .send(TcpEvent::Closed {
                    peer,
                    writer,
                    failed: true,
                    transport: Transport::Tcp,
                })
                .await;
        }
        Err(_) => {
            tracing::debug!(%peer, "SIP TCP connect timed out");
            let _ = events
                .send(TcpEvent::Closed {
                    peer,
                    writer,
                    failed: true,
                    transport: Transport::Tcp,
                })
                .await;
        }
    }
}

/// The addresses and transport of one connection.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
}

/// Runs one connection (TCP or TLS): a writer task drains `queue`; this task frames what
/// arrives.
async fn run_stream<S>(
    stream: S,
    conn: Conn,
    writer: TcpWriter,
    mut queue: tokio::sync::mpsc::Receiver<Vec<u8>>,
    events: tokio::sync::mpsc::Sender<TcpEvent>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let Conn {
        peer, transport, ..
    } = conn;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write_events = events.clone();
    let write_writer = writer.clone();
    let write_task = tokio::spawn(async move {
        while let Some(bytes) = queue.recv().await {
            // TLS buffers records: flush so each message leaves now.
            let sent = match wr.write_all(&bytes).await {
                Ok(()) => wr.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::debug!(%peer, ?transport, error = %e, "SIP stream write failed");
                let _ = write_events
                    .send(TcpEvent::Closed {
                        peer,
                        writer: write_writer,
                        failed: true,
                        transport,
                    })
                    .await;
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let why = read_stream(&mut rd, conn, &writer, &events).await;
    tracing::debug!(%peer, ?transport, reason = %why, "SIP connection closed");
    write_task.abort();
    let _ = events
        .send(TcpEvent::Closed {
            peer,
            writer,
            failed: false,
            transport,
        })
        .await;
}

/// Reads and frames messages until the connection ends; the reason is returned.
async fn read_stream<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    conn: Conn,
    writer: &TcpWriter,
    events: &tokio::sync::mpsc::Sender<TcpEvent>,
) -> TcpClose {
    let Conn {
        peer,
        local,
        transport,
    } = conn;
    use super::msg::{parse_stream_frame, StreamFrame};
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Every whole frame in the buffer first.
        loop {
            match parse_stream_frame(&buf) {
                Ok(None) => break,
                Ok(Some((frame, used))) => {
                    buf.drain(..used);
                    match frame {
                        StreamFrame::Message(msg) => {
                            let ev = TcpEvent::Message {
                                msg,
                                peer,
                                local,
                                writer: writer.clone(),
                                transport,
                            };
                            if events.send(ev).await.is_err() {
                                return TcpClose::CoreGone;
                            }
                        }
                        // RFC 5626 §4.4.1: a CRLFCRLF ping is answered with a CRLF pong.
                        StreamFrame::Ping => {
                            let _ = writer.try_send(b"\r\n".to_vec());
                        }
                        StreamFrame::Pong => {}
                    }
                }
                Err(e) => return TcpClose::Framing(e),
            }
        }
        match tokio::time::timeout(TCP_IDLE, rd.read(&mut chunk)).await {
            Err(_) => return TcpClose::Idle(TCP_IDLE),
            Ok(Err(e)) => return TcpClose::Io(e),
            Ok(Ok(0)) => return TcpClose::Eof,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// How long a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the SIP TLS server configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SipTlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Missing { path: String, what: &'static str },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor for SIP (TLS 1.2 and 1.3, `ring`, no client certificates) from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, SipTlsError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| SipTlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let missing = |p: &std::path::Path, what| SipTlsError::Missing {
        path: p.display().to_string(),
        what,
    };
    let pem = read(cert)?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(missing(cert, "PEM certificate"));
    }
    let pem = read(key)?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| missing(key, "PEM private key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts SIP-over-TLS connections on `listener` until the process ends; each completes its
/// handshake (within [`TLS_HANDSHAKE`]) in its own task, then runs like a TCP connection and
/// reports to `events` with `Transport::Tls`.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    events: tokio::sync::mpsc::Sender<TcpEvent>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let acceptor = acceptor.clone();
                let events = events.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let local = stream.local_addr().unwrap_or(peer);
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "SIP TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "SIP TLS handshake timed out");
                                return;
                            }
                        };
                    let (writer, queue) = tokio::sync::mpsc::channel(TCP_QUEUE);
                    let conn = Conn {
                        peer,
                        local,
                        transport: Transport::Tls,
                    };
                    run_stream(tls, conn, writer, queue, events).await;
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "SIP TLS accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tcp_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Pings get pongs, messages reach the core, a framing error closes the connection.
    #[tokio::test]
    async fn tcp_connection_frames_pings_and_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, mut rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(serve_tcp(listener, events));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"\r\n\r\n").await.unwrap();
        let mut pong = [0u8; 2];
        c.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"\r\n");
        let msg =
            "OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKt1\r\n\
From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n";
        // Split across writes: framing waits for the whole message.
        c.write_all(&msg.as_bytes()[..20]).await.unwrap();
        c.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        c.write_all(&msg.as_bytes()[20..]).await.unwrap();
        let peer = c.local_addr().unwrap();
        match rx.recv().await {
            Some(TcpEvent::Message {
                peer: p, writer, ..
            }) => {
                assert_eq!(p, peer);
                writer.send(b"hello".to_vec()).await.unwrap();
            }
            other => panic!("{other:?}"),
        }
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        c.write_all(b"NOT SIP AT ALL\r\nX\r\n\r\n").await.unwrap();
        match rx.recv().await {
            Some(TcpEvent::Closed {
                peer: p, failed, ..
            }) => {
                assert_eq!(p, peer);
                assert!(!failed);
            }
            other => panic!("{other:?}"),
        }
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).await.unwrap_or(0), 0);
    }

    /// A connect that fails reports `Closed { failed: true }`.
    #[tokio::test]
    async fn tcp_connect_failure_is_reported() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let (events, mut rx) = tokio::sync::mpsc::channel(4);
        let (writer, queue) = tokio::sync::mpsc::channel(4);
        connect_tcp(dead, writer, queue, events).await;
        match rx.recv().await {
            Some(TcpEvent::Closed { peer, failed, .. }) => {
                assert_eq!(peer, dead);
                assert!(failed);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS connection delivers messages as `Transport::Tls` and carries replies back; a
    /// plaintext client that sends garbage does not stop the listener.
    #[tokio::test]
    async fn tls_connection_reports_tls_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::tls::init_ca(dir.path(), "test CA", false).unwrap();
        let (cert, key) = (dir.path().join("w.pem"), dir.path().join("w.key"));
        crate::tls::issue(&ca, "worker-1", &cert, &key, 30, false).unwrap();
        let acceptor = tls_acceptor(&cert, &key).unwrap();
        assert!(matches!(
            tls_acceptor(&dir.path().join("none.pem"), &key),
            Err(SipTlsError::Read { .. })
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, mut rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(serve_tls(listener, acceptor, events));

        let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"OPTIONS sip:x SIP/2.0\r\n\r\n")
            .await
            .unwrap();
        drop(junk);

        let node = crate::tls::NodeTls {
            ca: ca.cert.clone(),
            cert,
            key,
        };
        let connector = tokio_rustls::TlsConnector::from(crate::tls::client_config(&node).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let peer = tcp.local_addr().unwrap();
        let name = crate::tls::server_name("worker-1").unwrap();
        let mut c = connector.connect(name, tcp).await.unwrap();
        let msg =
            "OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:1;branch=z9hG4bKt1\r\n\
From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n";
        c.write_all(msg.as_bytes()).await.unwrap();
        c.flush().await.unwrap();
        match rx.recv().await {
            Some(TcpEvent::Message {
                peer: p,
                writer,
                transport,
                ..
            }) => {
                assert_eq!(p, peer);
                assert_eq!(transport, Transport::Tls);
                writer.send(b"hello".to_vec()).await.unwrap();
            }
            other => panic!("{other:?}"),
        }
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
    }
}
