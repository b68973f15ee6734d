//! The admin HTTP endpoint: `GET /metrics` (Prometheus), `GET /status` (JSON, read by
//! `siptg status`), `GET /health`, and the Worker's brute-force bans: `GET /bans` lists them,
//! `POST /bans/lift?ip=ADDR` lifts one. HTTP/1.1 with `Connection: close`; meant for loopback or
//! a management network, never the PBX side.

use crate::node::Node;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Binds the admin listener; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for admin HTTP on {addr}: {e}"),
        )
    })
}

/// Serves requests until the process ends.
pub async fn serve(listener: TcpListener, node: Arc<Node>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin HTTP: /metrics /status /health");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, node)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, node: Arc<Node>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/bans") => match &node.worker {
            Some(w) => {
                let list: Vec<serde_json::Value> = w
                    .ban_list()
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "net": b.net.to_string(),
                            "remaining_s": b.remaining.as_secs(),
                            "offences": b.offences,
                        })
                    })
                    .collect();
                (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&list).unwrap_or_default(),
                )
            }
            None => (
                "404 Not Found",
                "text/plain",
                "no worker here\n".to_string(),
            ),
        },
        ("POST", "/bans/lift") => {
            let ip = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ip="))
                .and_then(|v| v.parse::<std::net::IpAddr>().ok());
            match (&node.worker, ip) {
                (Some(w), Some(ip)) => {
                    if w.lift_ban(ip) {
                        tracing::info!(%ip, "ban lifted through the admin API");
                        ("200 OK", "text/plain", format!("lifted {ip}\n"))
                    } else {
                        (
                            "404 Not Found",
                            "text/plain",
                            format!("{ip} is not banned\n"),
                        )
                    }
                }
                (None, _) => (
                    "404 Not Found",
                    "text/plain",
                    "no worker here\n".to_string(),
                ),
                (_, None) => (
                    "400 Bad Request",
                    "text/plain",
                    "want ?ip=ADDRESS\n".to_string(),
                ),
            }
        }
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            node.metrics_text().await,
        ),
        ("GET", "/status") => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&node.status().await).unwrap_or_default(),
        ),
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET, or POST /bans/lift\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// Why the admin endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach siptg's admin endpoint at {addr}: {source} (is siptg running? is [admin] listen right?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin endpoint at {addr}: {message}")]
    Http { addr: SocketAddr, message: String },
}

/// `GET path` from a running siptg's admin endpoint; returns the body.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<String, FetchError> {
    let io = |source| FetchError::Connect { addr, source };
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(io)?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| FetchError::Http {
            addr,
            message: "malformed HTTP response".into(),
        })?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(FetchError::Http {
            addr,
            message: head.lines().next().unwrap_or("").to_string(),
        });
    }
    Ok(body.to_string())
}
