//! The passive end of Manager links, shared by Workers and Storages: accepts mutual-TLS
//! connections (or in-process streams in `siptg up`), runs the server handshake, and keeps the
//! live links.

use crate::link::{self, Handler, LinkError, LinkHandle, Role};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A link as shown by `siptg status`.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub peer: String,
    pub role: Role,
    pub up: bool,
    pub up_for_s: u64,
    pub rtt_ms: Option<f64>,
}

/// Accepts links from Managers for a node of `role` named `name`.
pub struct LinkServer {
    role: Role,
    name: String,
    /// Manager names (certificate CNs) allowed to link; empty allows any Manager certified by
    /// the CA.
    allowed: Vec<String>,
    links: Mutex<Vec<LinkHandle>>,
}

impl LinkServer {
    /// A server with no links yet, accepting the Managers named in `allowed` (any if empty).
    pub fn new(role: Role, name: String, allowed: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            role,
            name,
            allowed,
            links: Mutex::new(Vec::new()),
        })
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Vec<LinkHandle>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recent live Manager link.
    pub fn manager(&self) -> Option<LinkHandle> {
        let mut links = self.links();
        links.retain(LinkHandle::is_up);
        links.last().cloned()
    }

    /// Live links.
    pub fn status(&self) -> Vec<LinkStatus> {
        let mut links = self.links();
        links.retain(LinkHandle::is_up);
        links.iter().map(link_status).collect()
    }

    /// Runs the handshake on an accepted stream and keeps the link. `cert_name` is the CN of the
    /// peer's verified certificate (`None` for in-process links).
    pub async fn accept<S>(
        &self,
        mut stream: S,
        cert_name: Option<String>,
        handler: Handler,
    ) -> Result<LinkHandle, LinkError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, heartbeat) = link::server_handshake(
            &mut stream,
            self.role,
            &self.name,
            Role::Manager,
            cert_name.as_deref(),
        )
        .await?;
        if cert_name.is_some() && !self.allowed.is_empty() && !self.allowed.contains(&peer.name) {
            return Err(LinkError::Handshake(format!(
                "{:?} is not in this {}'s allowed managers {:?}",
                peer.name, self.role, self.allowed
            )));
        }
        let handle = link::spawn(stream, peer, None, heartbeat * 3, handler);
        self.links().push(handle.clone());
        Ok(handle)
    }

    /// Listens for mutual-TLS links on `addr` until the process ends.
    pub async fn listen_tls(
        self: Arc<Self>,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        handler: Handler,
    ) -> std::io::Result<()> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for links on {addr}: {e}"))
        })?;
        tracing::info!(%addr, role = %self.role, "accepting Manager links (mutual TLS)");
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "link accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let this = self.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let limit = std::time::Duration::from_secs(10);
                let tls = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Err(_) => {
                        tracing::warn!(%remote, "link refused: no TLS handshake within {limit:?}");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "link refused: TLS handshake failed (certificate not from our CA?)");
                        return;
                    }
                };
                let cn = crate::tls::peer_common_name(tls.get_ref().1.peer_certificates());
                match this.accept(tls, cn, handler).await {
                    Ok(link) => {
                        tracing::info!(%remote, peer = %link.peer().name, "Manager link accepted")
                    }
                    Err(e) => tracing::warn!(%remote, error = %e, "link refused"),
                }
            });
        }
    }
}

/// Status of one link.
pub fn link_status(l: &LinkHandle) -> LinkStatus {
    LinkStatus {
        peer: l.peer().name.clone(),
        role: l.peer().role,
        up: l.is_up(),
        up_for_s: l.since().elapsed().as_secs(),
        rtt_ms: l.rtt().map(|d| d.as_secs_f64() * 1000.0),
    }
}
