//! The admin HTTP endpoint: `GET /metrics` (Prometheus), `GET /status` (JSON, read by
//! `siptg status`), `GET /health`, and the Worker's brute-force bans: `GET /bans` lists them,
//! `POST /bans/lift?ip=ADDR` lifts one; the Manager's gateways (`/gateways`, `siptg gateway`)
//! and SIP connections (`/connections`, `siptg connection`). HTTP/1.1 with `Connection: close`;
//! meant for loopback or a management network, never the PBX side.

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
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    // A request body (PUT /gateways/NAME), up to 64 KiB, by Content-Length.
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    if length > 64 * 1024 {
        return Ok(());
    }
    let mut req_body = buf[head_end..].to_vec();
    while req_body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        req_body.extend_from_slice(&chunk[..n]);
    }
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let gateway_name = path.strip_prefix("/gateways/").map(str::to_string);
    if path == "/connections" || path.starts_with("/connections/") {
        let (status, ctype, body) = connections(&node, method, path, &req_body).await;
        return respond(stream, status, ctype, body).await;
    }
    let (status, ctype, body) = match (method, path) {
        ("GET", "/gateways") => match &node.manager {
            Some(m) => {
                let list: Vec<serde_json::Value> = m
                    .routing()
                    .gateways()
                    .into_iter()
                    .map(|g| {
                        let fixed = m.routing().is_fixed_gateway(&g.name);
                        let mut v = serde_json::to_value(&g).unwrap_or_default();
                        v["source"] = serde_json::json!(if fixed { "config" } else { "api" });
                        v
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
                "no manager here\n".to_string(),
            ),
        },
        ("PUT", _) if gateway_name.is_some() => match &node.manager {
            Some(m) => {
                let name = gateway_name.clone().unwrap_or_default();
                match serde_json::from_slice::<crate::config::GatewayConfig>(&req_body) {
                    Ok(mut g) => {
                        g.name = name;
                        match m.save_gateway(g).await {
                            Ok(()) => ("200 OK", "text/plain", "saved\n".to_string()),
                            Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
                        }
                    }
                    Err(e) => (
                        "400 Bad Request",
                        "text/plain",
                        format!("gateway JSON: {e}\n"),
                    ),
                }
            }
            None => (
                "404 Not Found",
                "text/plain",
                "no manager here\n".to_string(),
            ),
        },
        ("DELETE", _) if gateway_name.is_some() => match &node.manager {
            Some(m) => match m
                .delete_gateway(gateway_name.as_deref().unwrap_or_default())
                .await
            {
                Ok(true) => ("200 OK", "text/plain", "removed\n".to_string()),
                Ok(false) => (
                    "404 Not Found",
                    "text/plain",
                    "no such gateway\n".to_string(),
                ),
                Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
            },
            None => (
                "404 Not Found",
                "text/plain",
                "no manager here\n".to_string(),
            ),
        },
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
            "GET, POST /bans/lift, PUT or DELETE /gateways/NAME or /connections/NAME\n".to_string(),
        ),
    };
    respond(stream, status, ctype, body).await
}

async fn respond(
    mut stream: TcpStream,
    status: &str,
    ctype: &str,
    body: String,
) -> std::io::Result<()> {
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

/// `method path` with a JSON `body` to a running siptg's admin endpoint; returns the status
/// line's code and the body.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), FetchError> {
    let io = |source| FetchError::Connect { addr, source };
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
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
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// `GET path` from a running siptg's admin endpoint; returns the body.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<String, FetchError> {
    match send(addr, "GET", path, "").await? {
        (200, body) => Ok(body),
        (code, body) => Err(FetchError::Http {
            addr,
            message: format!("HTTP {code}: {}", body.trim()),
        }),
    }
}

/// `GET /connections` (passwords shown as `***`), `GET /connections/NAME` (all settings, for
/// `siptg connection show`), `PUT /connections/NAME` (JSON as the config's `[[connection]]`),
/// `DELETE /connections/NAME`. Connections of the config file are listed, not changed.
async fn connections(
    node: &Node,
    method: &str,
    path: &str,
    body: &[u8],
) -> (&'static str, &'static str, String) {
    let text = |status, msg: String| (status, "text/plain", msg);
    let Some(m) = &node.manager else {
        return text("404 Not Found", "no manager here\n".into());
    };
    let routing = m.routing();
    let shown = |c: &crate::config::ConnectionConfig| {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        v["source"] = serde_json::json!(if routing.is_fixed_connection(&c.name) {
            "config"
        } else {
            "api"
        });
        v
    };
    let name = path.strip_prefix("/connections/").unwrap_or_default();
    match (method, name) {
        ("GET", "") => {
            let list: Vec<serde_json::Value> = routing
                .connections()
                .iter()
                .map(|c| {
                    let mut v = shown(c);
                    if c.password.is_some() {
                        v["password"] = serde_json::json!("***");
                    }
                    v
                })
                .collect();
            (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&list).unwrap_or_default(),
            )
        }
        ("GET", _) => match routing.connections().iter().find(|c| c.name == name) {
            Some(c) => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&shown(c)).unwrap_or_default(),
            ),
            None => text("404 Not Found", format!("no connection {name:?}\n")),
        },
        ("PUT", _) if !name.is_empty() => {
            match serde_json::from_slice::<crate::config::ConnectionConfig>(body) {
                Ok(mut c) => {
                    c.name = name.to_string();
                    match m.save_connection(c).await {
                        Ok(()) => text("200 OK", "saved\n".into()),
                        Err(e) => text("400 Bad Request", format!("{e}\n")),
                    }
                }
                Err(e) => text("400 Bad Request", format!("connection JSON: {e}\n")),
            }
        }
        ("DELETE", _) if !name.is_empty() => match m.delete_connection(name).await {
            Ok(true) => text("200 OK", "removed\n".into()),
            Ok(false) => text("404 Not Found", format!("no connection {name:?}\n")),
            Err(e) => text("400 Bad Request", format!("{e}\n")),
        },
        _ => text(
            "405 Method Not Allowed",
            "GET /connections, GET, PUT or DELETE /connections/NAME\n".into(),
        ),
    }
}
