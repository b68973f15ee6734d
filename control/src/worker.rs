//! The Worker role: the SIP edge facing the PBX and the owner of the dataplane connection.
//!
//! Routing decisions belong to the Manager. A Worker without a live Manager link still answers
//! every SIP request, with `503 No response from Manager`, until the link is back (as SIP.TG's
//! Worker does), so a PBX fails over instead of timing out.

use crate::config::{ConnectionConfig, ConnectionKind, SipConfig, WorkerConfig};
use crate::dataplane::Supervisor;
use crate::link::{Handler, Request as LinkRequest, Response as LinkResponse, Role, RouteQuery};
use crate::linkserver::LinkServer;
use crate::metrics::Metrics;
use crate::sip::ban::{BanConfig, BanList};
use crate::sip::edge::{self, Answer, Reply, Responder};
use crate::sip::keepalive::{KeepAlive, PeerState};
use crate::sip::message::{uri_user, Request};
use crate::sip::outbound::{OutboundRegistration, Status as OutboundStatus};
use crate::sip::reasons;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// A running Worker.
pub struct Worker {
    cfg: WorkerConfig,
    links: Arc<LinkServer>,
    dataplane: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    sip_listen: std::sync::Mutex<Vec<String>>,
    /// Brute-force protection: addresses that failed to register too often are ignored.
    bans: std::sync::Mutex<BanList>,
    /// The configured connections; `register_to_pbx` ones get an outbound registration.
    connections: Vec<ConnectionConfig>,
    /// Running outbound registrations (gateway → PBX).
    outbound: std::sync::Mutex<Vec<Outbound>>,
    /// OPTIONS keep-alives toward PBXs (`ip` and `register_to_pbx` connections).
    keepalives: std::sync::Mutex<Vec<KeepaliveEntry>>,
    /// The control API's connections this Worker runs, as the Manager last sent them.
    api_connections: std::sync::Mutex<Vec<ConnectionConfig>>,
    /// Where outbound registrations and keep-alives send from (the first SIP listener) and
    /// the User-Agent; set once SIP is up, so later API connections can start.
    sip_origin: std::sync::OnceLock<(SocketAddr, String)>,
    /// The first SIP core's gateway calls: Telegram updates and incoming calls go there.
    gateway: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::gateway::runtime::GwMsg>>,
}

/// One PBX watched by OPTIONS, as `/status` and `/metrics` show it.
struct KeepaliveEntry {
    name: String,
    target: String,
    view: Arc<std::sync::Mutex<PeerView>>,
    /// The control API's connection it runs for (`None`: the config file's).
    api: Option<ConnectionConfig>,
    task: tokio::task::JoinHandle<()>,
}

/// The last known state of a watched PBX.
#[derive(Debug, Clone, Copy)]
struct PeerView {
    state: PeerState,
    rtt: Option<Duration>,
    since: Instant,
}

/// One running outbound registration: what `/status` shows and how to stop it.
struct Outbound {
    name: String,
    server: String,
    status: Arc<std::sync::Mutex<OutboundStatus>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The control API's connection it runs for (`None`: the config file's).
    api: Option<ConnectionConfig>,
}

impl Worker {
    /// A Worker whose Manager links arrive through `links` and whose media goes to `dataplane`.
    /// `connections` are the configured SIP connections: each `register_to_pbx` one is
    /// registered at its PBX once SIP starts.
    pub fn new(
        cfg: WorkerConfig,
        links: Arc<LinkServer>,
        dataplane: Arc<Supervisor>,
        metrics: Arc<Metrics>,
        connections: Vec<ConnectionConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            links,
            dataplane,
            metrics,
            sip_listen: std::sync::Mutex::new(Vec::new()),
            bans: std::sync::Mutex::new(BanList::new(BanConfig::default())),
            connections,
            outbound: std::sync::Mutex::new(Vec::new()),
            keepalives: std::sync::Mutex::new(Vec::new()),
            api_connections: std::sync::Mutex::new(Vec::new()),
            sip_origin: std::sync::OnceLock::new(),
            gateway: std::sync::OnceLock::new(),
        })
    }

    /// The SIP core that runs gateway calls registers its channel here (the first one wins).
    pub fn set_gateway_channel(
        &self,
        tx: tokio::sync::mpsc::Sender<crate::gateway::runtime::GwMsg>,
    ) -> bool {
        self.gateway.set(tx).is_ok()
    }

    /// A Telegram request through the Manager to Session Storage `storage`.
    pub async fn telegram(
        &self,
        storage: &str,
        account: &str,
        op: crate::link::TelegramOp,
    ) -> Result<crate::link::TelegramAnswer, crate::telegram::TgError> {
        use crate::telegram::TgError;
        let Some(manager) = self.links.manager() else {
            return Err(TgError::transport(format!(
                "{} (no Manager link)",
                reasons::NO_RESPONSE_FROM_MANAGER
            )));
        };
        let req = crate::link::Request::Telegram(Box::new(crate::link::TelegramRequest {
            account: account.to_string(),
            op,
            storage: Some(storage.to_string()),
        }));
        match manager.request(req, Duration::from_secs(30)).await {
            Ok(LinkResponse::Telegram { result }) => result,
            Ok(other) => Err(TgError::transport(format!("Manager answered {other:?}"))),
            Err(crate::link::LinkError::Timeout(_)) => Err(TgError::Timeout),
            Err(e) => Err(TgError::transport(format!(
                "{}: {e}",
                reasons::NO_RESPONSE_FROM_MANAGER
            ))),
        }
    }

    /// Tells the Manager about a gateway call (answered, ended: its plan limits count them).
    /// Without a live Manager link the news is lost: it is logged, and the Manager's limits
    /// miss the call.
    pub async fn tell_manager(&self, news: crate::link::Request) {
        let Some(manager) = self.links.manager() else {
            tracing::warn!(?news, "no Manager link: a gateway call is not counted");
            return;
        };
        match manager.request(news, Duration::from_secs(10)).await {
            Ok(LinkResponse::Done) => {}
            other => tracing::warn!(?other, "the Manager did not take a gateway call's news"),
        }
    }

    /// The metrics registry SIP counters go to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The Worker's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Where Manager links arrive.
    pub fn links(&self) -> &Arc<LinkServer> {
        &self.links
    }

    /// Our login and password at the PBX of `connection` (a `register_to_pbx` one with both
    /// set): the gateway answers that PBX's digest challenges to its INVITEs and MESSAGEs.
    pub fn pbx_credentials(&self, connection: &str) -> Option<crate::gateway::auth::Credentials> {
        // The config file's connections, then the control API's (a challenge is rare: the
        // lock is not on a hot path).
        let api = self
            .api_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.connections
            .iter()
            .chain(api.iter())
            .find(|c| c.name == connection && c.kind == ConnectionKind::RegisterToPbx)
            .and_then(|c| {
                Some(crate::gateway::auth::Credentials {
                    login: c.login.clone()?,
                    password: c.password.clone()?,
                })
            })
    }

    /// The dataplane supervisor.
    pub fn dataplane(&self) -> &Arc<Supervisor> {
        &self.dataplane
    }

    /// Answers the Manager's requests on a link.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let me = self.clone();
        Arc::new(move |req| {
            let me = me.clone();
            Box::pin(async move {
                use crate::gateway::runtime::GwMsg;

                match req {
                    LinkRequest::Status => LinkResponse::Status {
                        status: me.status().await,
                    },
                    LinkRequest::TelegramUpdate { account, update } => {
                        use base64::Engine;
                        use grammers_tl_types::Deserializable;
                        let decoded = base64::engine::general_purpose::STANDARD
                            .decode(update.as_bytes())
                            .ok()
                            .and_then(|b| grammers_tl_types::enums::Update::from_bytes(&b).ok());
                        if let (Some(update), Some(tx)) = (decoded, me.gateway.get()) {
                            let _ = tx
                                .send(GwMsg::Update {
                                    account,
                                    update: Box::new(update),
                                })
                                .await;
                        }
                        LinkResponse::Done
                    }
                    LinkRequest::TalkBudget { call, remaining_ms } => {
                        if let Some(tx) = me.gateway.get() {
                            let _ = tx.send(GwMsg::TalkBudget { call, remaining_ms }).await;
                        }
                        LinkResponse::Done
                    }
                    LinkRequest::GatewayIncoming(call) => match me.gateway.get() {
                        Some(tx) if me.dataplane.client().is_some() => {
                            let _ = tx.send(GwMsg::Incoming(call)).await;
                            LinkResponse::Done
                        }
                        _ => LinkResponse::Error {
                            message: reasons::WORKER_NOT_READY.into(),
                        },
                    },
                    LinkRequest::Connections { connections } => {
                        me.set_api_connections(connections);
                        LinkResponse::Done
                    }
                    LinkRequest::GatewayMessage(m) => match me.gateway.get() {
                        Some(tx) => {
                            let _ = tx.send(GwMsg::Message(m)).await;
                            LinkResponse::Done
                        }
                        None => LinkResponse::Error {
                            message: reasons::WORKER_NOT_READY.into(),
                        },
                    },
                    other => LinkResponse::Error {
                        message: format!("a {} does not answer {other:?}", Role::Worker),
                    },
                }
            })
        })
    }

    /// Binds every SIP listener and serves them, then starts the outbound registrations
    /// (their Contact is the first listener).
    pub async fn start_sip(self: &Arc<Self>, sip: &SipConfig) -> std::io::Result<()> {
        use crate::config::SipTransport;
        let call_config = crate::sip::call::CallConfig {
            session_expires: sip.session_expires,
            min_se: sip.min_se,
            ..Default::default()
        };
        let mut first = None;
        let mut listening = Vec::new();
        // TCP listeners first: their connections feed the first core.
        let mut tcp = None;
        for l in sip
            .listen
            .iter()
            .filter(|l| l.transport == SipTransport::Tcp)
        {
            let listener = tokio::net::TcpListener::bind(l.addr).await?;
            let bound = listener.local_addr().unwrap_or(l.addr);
            let (events, _) = tcp.get_or_insert_with(|| {
                let (t, r) = tokio::sync::mpsc::channel(4096);
                ((t, r), bound)
            });
            tokio::spawn(edge::serve_tcp(listener, events.0.clone()));
            listening.push(format!("tcp:{bound}"));
        }
        // TLS listeners feed the same core; one acceptor (sip.tls_cert, sip.tls_key) for all.
        let mut acceptor = None;
        for l in sip
            .listen
            .iter()
            .filter(|l| l.transport == SipTransport::Tls)
        {
            let acceptor = match &acceptor {
                Some(a) => a,
                None => acceptor.insert(sip_tls_acceptor(sip)?),
            };
            let listener = tokio::net::TcpListener::bind(l.addr).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen for SIP on tls:{}: {e}", l.addr),
                )
            })?;
            let bound = listener.local_addr().unwrap_or(l.addr);
            let (events, _) = tcp.get_or_insert_with(|| {
                let (t, r) = tokio::sync::mpsc::channel(4096);
                ((t, r), bound)
            });
            tokio::spawn(edge::serve_tls(
                listener,
                acceptor.clone(),
                events.0.clone(),
            ));
            listening.push(format!("tls:{bound}"));
        }
        for l in sip
            .listen
            .iter()
            .filter(|l| l.transport == SipTransport::Udp)
        {
            let sock = Arc::new(edge::bind_udp(l.addr).await?);
            let bound = sock.local_addr().unwrap_or(l.addr);
            first.get_or_insert(bound);
            listening.push(format!("udp:{bound}"));
            tokio::spawn(crate::sip::core::serve(
                Some(sock),
                tcp.take(),
                self.clone(),
                sip.user_agent.clone(),
                call_config,
            ));
        }
        if let Some(t) = tcp.take() {
            // Only TCP listeners: a core without UDP.
            first.get_or_insert(t.1);
            tokio::spawn(crate::sip::core::serve(
                None,
                Some(t),
                self.clone(),
                sip.user_agent.clone(),
                call_config,
            ));
        }
        for l in listening {
            tracing::info!(listen = %l, "SIP listening");
            self.sip_listen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(l);
        }
        if let Some(listen) = first {
            self.start_outbound(listen, &sip.user_agent);
            self.start_keepalives(listen, &sip.user_agent);
            if self
                .sip_origin
                .set((listen, sip.user_agent.clone()))
                .is_ok()
            {
                // API connections the Manager sent before SIP was up.
                self.run_api_connections();
            }
        }
        Ok(())
    }

    fn outbound(&self) -> std::sync::MutexGuard<'_, Vec<Outbound>> {
        self.outbound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One registration task per `register_to_pbx` connection of the config file.
    fn start_outbound(&self, listen: SocketAddr, user_agent: &str) {
        let mut running = self.outbound();
        for conn in &self.connections {
            if conn.kind == ConnectionKind::RegisterToPbx {
                running.push(spawn_outbound(conn, listen, user_agent, None));
            }
        }
    }

    /// One OPTIONS keep-alive task per `ip` connection with a `server` and per
    /// `register_to_pbx` connection of the config file, unless its `keepalive` is 0.
    fn start_keepalives(&self, listen: SocketAddr, user_agent: &str) {
        let mut list = self.keepalives.lock().unwrap_or_else(|p| p.into_inner());
        for conn in &self.connections {
            list.extend(spawn_keepalive(conn, listen, user_agent, None));
        }
    }

    /// Takes the Manager's list of the control API's connections this Worker runs: what
    /// changed or went away stops (a registration un-registers), what is new starts.
    pub fn set_api_connections(&self, connections: Vec<ConnectionConfig>) {
        *self
            .api_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = connections;
        if self.sip_origin.get().is_some() {
            self.run_api_connections();
        }
    }

    /// Brings the running API registrations and keep-alives in line with `api_connections`.
    fn run_api_connections(&self) {
        let Some((listen, user_agent)) = self.sip_origin.get() else {
            return;
        };
        let wanted = self
            .api_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        {
            let mut running = self.outbound();
            running.retain_mut(|o| match &o.api {
                Some(c) if !wanted.contains(c) => {
                    tracing::info!(connection = %o.name, "outbound registration stopped (connection changed or removed)");
                    let _ = o.stop.send(true);
                    false
                }
                _ => true,
            });
            for conn in &wanted {
                let runs = running.iter().any(|o| o.api.as_ref() == Some(conn));
                if conn.kind == ConnectionKind::RegisterToPbx && !runs {
                    tracing::info!(connection = %conn.name, "outbound registration started (control API)");
                    running.push(spawn_outbound(
                        conn,
                        *listen,
                        user_agent,
                        Some(conn.clone()),
                    ));
                }
            }
        }
        let mut list = self.keepalives.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|k| match &k.api {
            Some(c) if !wanted.contains(c) => {
                k.task.abort();
                false
            }
            _ => true,
        });
        for conn in &wanted {
            if !list.iter().any(|k| k.api.as_ref() == Some(conn)) {
                list.extend(spawn_keepalive(
                    conn,
                    *listen,
                    user_agent,
                    Some(conn.clone()),
                ));
            }
        }
    }

    fn keepalive_status(&self) -> serde_json::Value {
        let now = Instant::now();
        let list = self.keepalives.lock().unwrap_or_else(|p| p.into_inner());
        json!(list
            .iter()
            .map(|k| {
                let v = *k.view.lock().unwrap_or_else(|p| p.into_inner());
                let mut j = json!({
                    "name": k.name,
                    "target": k.target,
                    "state": v.state.label(),
                    "since_s": now.saturating_duration_since(v.since).as_secs(),
                });
                if let Some(rtt) = v.rtt {
                    j["rtt_ms"] = json!(rtt.as_millis() as u64);
                }
                j
            })
            .collect::<Vec<_>>())
    }

    /// Each watched PBX and whether it answers OPTIONS, for the `siptg_sip_peer_up` gauge.
    pub fn peers_up(&self) -> Vec<(String, bool)> {
        let list = self.keepalives.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .map(|k| {
                let v = k.view.lock().unwrap_or_else(|p| p.into_inner());
                (k.name.clone(), v.state == PeerState::Up)
            })
            .collect()
    }

    /// Un-registers every outbound registration, waiting at most `limit` for the PBX.
    pub async fn stop_outbound(&self, limit: Duration) {
        let tasks: Vec<_> = self
            .outbound()
            .iter_mut()
            .filter_map(|o| {
                let _ = o.stop.send(true);
                o.task.take()
            })
            .collect();
        if tasks.is_empty() {
            return;
        }
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("outbound un-registration did not finish in time");
        }
    }

    fn outbound_status(&self) -> serde_json::Value {
        let now = Instant::now();
        let list: Vec<_> = self
            .outbound()
            .iter()
            .map(|o| {
                let status = o.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut v = json!({
                    "name": o.name,
                    "server": o.server,
                    "state": status.label(),
                });
                match status {
                    OutboundStatus::Registered { until } => {
                        v["expires_in_s"] = json!(until.saturating_duration_since(now).as_secs());
                    }
                    OutboundStatus::Failed { code, reason } => {
                        v["code"] = json!(code);
                        v["reason"] = json!(reason);
                    }
                    _ => {}
                }
                v
            })
            .collect();
        json!(list)
    }

    /// The Worker's part of `siptg status`.
    pub async fn status(&self) -> serde_json::Value {
        let dp = self.dataplane.status();
        let shards = match self.dataplane.client() {
            Some(c) => match c.status().await {
                Ok(s) => {
                    json!({"pid": s.pid, "driver": s.driver, "uptime_ms": s.uptime_ms, "shards": s.shards})
                }
                Err(e) => json!({"error": e.to_string()}),
            },
            None => json!(null),
        };
        json!({
            "name": self.cfg.name,
            "manager_links": self.links.status(),
            "sip_listen": *self.sip_listen.lock().unwrap_or_else(|p| p.into_inner()),
            "outbound_registrations": self.outbound_status(),
            "pbx_options": self.keepalive_status(),
            "dataplane": { "supervisor": dp, "process": shards },
        })
    }

    fn bans(&self) -> std::sync::MutexGuard<'_, BanList> {
        self.bans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current bans, for the admin API.
    pub fn ban_list(&self) -> Vec<crate::sip::ban::BanInfo> {
        self.bans().list(std::time::Instant::now())
    }

    /// Lifts the ban of `ip`; false if it was not banned.
    pub fn lift_ban(&self, ip: std::net::IpAddr) -> bool {
        self.bans().lift(ip)
    }

    /// The Manager's decision for a request: a final answer or, for an INVITE, where to forward
    /// the call. `None` when the source is banned (no answer at all).
    pub async fn decide(&self, req: &Request, source: SocketAddr) -> Option<LinkResponse> {
        if self
            .bans()
            .is_banned(source.ip(), std::time::Instant::now())
            .is_some()
        {
            self.metrics.inc("siptg_sip_banned_drops_total", &[]);
            return None;
        }
        Some(self.ask_manager(req, source).await)
    }

    async fn route(&self, req: &Request, source: SocketAddr) -> Reply {
        match self.ask_manager(req, source).await {
            LinkResponse::Route {
                code,
                reason,
                headers,
            } => Reply {
                code,
                reason,
                headers,
            },
            other => {
                tracing::warn!(?other, "Manager answered a non-INVITE with something else");
                Reply::new(503, reasons::NO_RESPONSE_FROM_MANAGER)
            }
        }
    }

    async fn ask_manager(&self, req: &Request, source: SocketAddr) -> LinkResponse {
        let no_manager = LinkResponse::Route {
            code: 503,
            reason: reasons::NO_RESPONSE_FROM_MANAGER.to_string(),
            headers: Vec::new(),
        };
        let Some(manager) = self.links.manager() else {
            return no_manager;
        };
        if req.method == "OPTIONS" {
            return LinkResponse::Route {
                code: 200,
                reason: "OK".into(),
                headers: Vec::new(),
            };
        }
        let query = RouteQuery {
            method: req.method.clone(),
            request_uri: req.uri.clone(),
            from_user: req.header("From").and_then(uri_user),
            to_user: req.header("To").and_then(uri_user),
            source,
            authorization: req.header("Authorization").map(str::to_string),
            contact: req.header("Contact").map(str::to_string),
            expires: req.header("Expires").and_then(|e| e.trim().parse().ok()),
            headers: extension_headers(req),
        };
        match manager
            .request(
                LinkRequest::Route(Box::new(query)),
                self.cfg.manager_timeout,
            )
            .await
        {
            Ok(
                r @ (LinkResponse::Route { .. }
                | LinkResponse::Forward { .. }
                | LinkResponse::Gateway(_)),
            ) => r,
            Ok(other) => {
                tracing::warn!(?other, "Manager answered a route query with something else");
                no_manager
            }
            Err(e) => {
                tracing::warn!(error = %e, "Manager did not answer a route query");
                no_manager
            }
        }
    }
}

/// Headers an IP trunk may be told apart by: everything but RFC 3261's own, at most 32.
fn extension_headers(req: &Request) -> Vec<(String, String)> {
    const STANDARD: &[&str] = &[
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Max-Forwards",
        "Route",
        "Record-Route",
        "Content-Length",
        "Content-Type",
        "Authorization",
        "Proxy-Authorization",
        "Allow",
        "Supported",
        "User-Agent",
        "Expires",
    ];
    req.all()
        .filter(|(n, _)| !STANDARD.iter().any(|s| s.eq_ignore_ascii_case(n)))
        .take(32)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

impl Responder for Worker {
    fn answer(
        &self,
        req: Request,
        source: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
        Box::pin(async move {
            if req.method == "ACK" {
                return None;
            }
            let now = std::time::Instant::now();
            let banned = self.bans().is_banned(source.ip(), now);
            if let Some(left) = banned {
                // Like a firewall ban: no answer at all, so a scanner learns nothing.
                tracing::debug!(%source, left_s = left.as_secs(), "request from a banned address dropped");
                self.metrics.inc("siptg_sip_banned_drops_total", &[]);
                return None;
            }
            let reply = self.route(&req, source).await;
            if req.method == "REGISTER" {
                let failed = matches!(reply.code, 403 | 404);
                let mut bans = self.bans();
                if failed {
                    if let Some(ban) = bans.record_failure(source.ip(), now) {
                        tracing::warn!(%source, ban_s = ban.duration.as_secs(), "too many failed registrations; address banned");
                        self.metrics.inc("siptg_sip_bans_total", &[]);
                    }
                } else if reply.code == 200 {
                    bans.record_success(source.ip());
                }
            }
            Some(reply)
        })
    }
}

/// Resolves where a connection's REGISTERs go (DNS for host names), preferring the family of
/// `local`.
async fn resolve_target(conn: &ConnectionConfig, local: SocketAddr) -> Result<SocketAddr, String> {
    let (host, port) = OutboundRegistration::target_spec(conn).map_err(|e| e.to_string())?;
    resolve_host(&host, port, local).await
}

/// `host:port` to an address (DNS for names), preferring the family of `local`.
async fn resolve_host(host: &str, port: u16, local: SocketAddr) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host} has no address"))
}

/// Binds the registration socket next to the SIP listener `listen` (same IP, ephemeral port)
/// and works out the addresses to advertise: Via (this socket) and Contact (the listener).
async fn bind_outbound(
    listen: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<(UdpSocket, SocketAddr, SocketAddr)> {
    let sock = UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).await?;
    let mut local = sock.local_addr()?;
    if local.ip().is_unspecified() {
        // A wildcard listener: the routing table tells which of our addresses the PBX sees.
        sock.connect(target).await?;
        local = sock.local_addr()?;
    }
    Ok((sock, local, SocketAddr::new(local.ip(), listen.port())))
}

fn set_status(
    name: &str,
    shared: &std::sync::Mutex<OutboundStatus>,
    new: &OutboundStatus,
    now: Instant,
) {
    let mut cur = shared.lock().unwrap_or_else(|p| p.into_inner());
    if *cur == *new {
        return;
    }
    let same_kind = std::mem::discriminant(&*cur) == std::mem::discriminant(new);
    match new {
        OutboundStatus::Registered { until } => {
            let expires_s = until.saturating_duration_since(now).as_secs();
            if same_kind {
                tracing::debug!(connection = %name, expires_s, "registration at the PBX refreshed");
            } else {
                tracing::info!(connection = %name, expires_s, "registered at the PBX");
            }
        }
        OutboundStatus::Failed { code, reason } => {
            tracing::warn!(connection = %name, code, %reason, "registration at the PBX failed")
        }
        OutboundStatus::Unreachable => {
            tracing::warn!(connection = %name, "PBX unreachable: no answer to REGISTER")
        }
        OutboundStatus::Stopped => {
            tracing::info!(connection = %name, "outbound registration stopped")
        }
        OutboundStatus::Registering => {}
    }
    *cur = new.clone();
}

/// Starts the registration of `register_to_pbx` connection `conn` at its PBX.
fn spawn_outbound(
    conn: &ConnectionConfig,
    listen: SocketAddr,
    user_agent: &str,
    api: Option<ConnectionConfig>,
) -> Outbound {
    let status = Arc::new(std::sync::Mutex::new(OutboundStatus::Registering));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_outbound(
        conn.clone(),
        listen,
        user_agent.to_string(),
        status.clone(),
        stop_rx,
    ));
    Outbound {
        name: conn.name.clone(),
        server: conn
            .proxy
            .clone()
            .or(conn.server.clone())
            .unwrap_or_default(),
        status,
        stop,
        task: Some(task),
        api,
    }
}

/// Starts the OPTIONS keep-alive of `conn`, if it has a PBX address and a keep-alive period.
fn spawn_keepalive(
    conn: &ConnectionConfig,
    listen: SocketAddr,
    user_agent: &str,
    api: Option<ConnectionConfig>,
) -> Option<KeepaliveEntry> {
    let (host, port) = match conn.kind {
        ConnectionKind::RegisterToPbx => OutboundRegistration::target_spec(conn).ok(),
        ConnectionKind::Ip => conn
            .server
            .as_deref()
            .and_then(crate::sip::outbound::split_host_port),
        ConnectionKind::PbxRegisters => None,
    }?;
    if conn.keepalive.is_zero() {
        return None;
    }
    let view = Arc::new(std::sync::Mutex::new(PeerView {
        state: PeerState::Unknown,
        rtt: None,
        since: Instant::now(),
    }));
    let target = format!("{host}:{port}");
    let task = tokio::spawn(run_keepalive(
        conn.name.clone(),
        (host, port),
        conn.keepalive,
        listen,
        user_agent.to_string(),
        view.clone(),
    ));
    Some(KeepaliveEntry {
        name: conn.name.clone(),
        target,
        view,
        api,
        task,
    })
}

/// Drives one outbound registration until stopped: resolves the PBX, binds a socket, then
/// feeds the sans-IO client with datagrams and timers.
async fn run_outbound(
    conn: ConnectionConfig,
    listen: SocketAddr,
    user_agent: String,
    status: Arc<std::sync::Mutex<OutboundStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    if conn.transport == crate::config::RegisterTransport::Tls {
        return run_outbound_tls(conn, listen, user_agent, status, stop).await;
    }
    let name = conn.name.clone();
    let mut delay = crate::sip::outbound::BACKOFF_MIN;
    let (sock, mut reg) = loop {
        let setup = async {
            let target = resolve_target(&conn, listen).await?;
            let (sock, local, contact) = bind_outbound(listen, target)
                .await
                .map_err(|e| format!("cannot bind a registration socket: {e}"))?;
            let reg = OutboundRegistration::with_target(&conn, target, local, Instant::now())
                .map_err(|e| e.to_string())?
                .with_contact(contact)
                .with_user_agent(user_agent.clone());
            tracing::info!(connection = %name, pbx = %target, %local, %contact, "registering at the PBX");
            Ok::<_, String>((sock, reg))
        };
        match setup.await {
            Ok(ready) => break ready,
            Err(e) => {
                tracing::warn!(connection = %name, error = %e, "outbound registration cannot start");
                set_status(&name, &status, &OutboundStatus::Unreachable, Instant::now());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {
                set_status(&name, &status, &OutboundStatus::Stopped, Instant::now());
                return;
            }
        }
        delay = (delay * 2).min(crate::sip::outbound::BACKOFF_MAX);
    };
    let mut buf = vec![0u8; 65_535];
    let mut stopping = false;
    loop {
        while let Some((to, bytes)) = reg.poll_transmit() {
            if let Err(e) = sock.send_to(&bytes, to).await {
                // Timers retransmit and eventually report the PBX unreachable.
                tracing::debug!(connection = %name, %to, error = %e, "cannot send REGISTER");
            }
        }
        set_status(&name, &status, reg.status(), Instant::now());
        if reg.is_stopped() {
            return;
        }
        let deadline = reg
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if let Err(e) = reg.on_response(Instant::now(), &buf[..n]) {
                        tracing::debug!(connection = %name, %from, error = %e, "datagram ignored");
                    }
                }
                // ICMP unreachable on a connected socket and the like: timers handle it.
                Err(e) => {
                    tracing::debug!(connection = %name, error = %e, "registration socket error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = tokio::time::sleep_until(deadline) => reg.handle_timeout(Instant::now()),
            // A stop request, or the Worker is gone.
            _ = stop.changed(), if !stopping => {
                stopping = true;
                reg.stop(Instant::now());
            }
        }
    }
}

/// How one TLS registration connection ended.
enum TlsEnd {
    /// Un-registered (or told to stop): the task is done.
    Stopped,
    /// The connection broke or never came up: reconnect after a backoff.
    Broken(String),
}

/// An outbound registration over TLS (`transport = "tls"`): connects to the PBX, checks its
/// certificate (`tls_ca`, the system store, or not at all with `tls_verify = false`), and drives
/// the registration client over the connection, reconnecting with backoff when it breaks. The
/// Contact stays the Worker's first listener: calls from the PBX arrive there.
async fn run_outbound_tls(
    conn: ConnectionConfig,
    listen: SocketAddr,
    user_agent: String,
    status: Arc<std::sync::Mutex<OutboundStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let name = conn.name.clone();
    let config = match crate::sip::tls_client::client_config(
        conn.tls_ca.as_deref(),
        conn.tls_verify,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(connection = %name, error = %e, "outbound registration over TLS cannot start");
            set_status(
                &name,
                &status,
                &OutboundStatus::Failed {
                    code: 0,
                    reason: e.to_string(),
                },
                Instant::now(),
            );
            return;
        }
    };
    if !conn.tls_verify {
        tracing::warn!(connection = %name, "tls_verify = false: the PBX's certificate is not checked");
    }
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut delay = crate::sip::outbound::BACKOFF_MIN;
    loop {
        let end =
            outbound_tls_once(&conn, &connector, listen, &user_agent, &status, &mut stop).await;
        match end {
            TlsEnd::Stopped => {
                set_status(&name, &status, &OutboundStatus::Stopped, Instant::now());
                return;
            }
            TlsEnd::Broken(e) => {
                tracing::warn!(connection = %name, error = %e, "TLS connection to the PBX lost or refused");
                set_status(&name, &status, &OutboundStatus::Unreachable, Instant::now());
            }
        }
        if *stop.borrow() {
            set_status(&name, &status, &OutboundStatus::Stopped, Instant::now());
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {
                set_status(&name, &status, &OutboundStatus::Stopped, Instant::now());
                return;
            }
        }
        delay = (delay * 2).min(crate::sip::outbound::BACKOFF_MAX);
    }
}

/// One TLS connection's life: connect, handshake, register and refresh until it breaks or the
/// registration is stopped.
async fn outbound_tls_once(
    conn: &ConnectionConfig,
    connector: &tokio_rustls::TlsConnector,
    listen: SocketAddr,
    user_agent: &str,
    status: &std::sync::Mutex<OutboundStatus>,
    stop: &mut watch::Receiver<bool>,
) -> TlsEnd {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = &conn.name;
    let (host, _) = match OutboundRegistration::target_spec(conn) {
        Ok(t) => t,
        Err(e) => return TlsEnd::Broken(e.to_string()),
    };
    let target = match resolve_target(conn, listen).await {
        Ok(t) => t,
        Err(e) => return TlsEnd::Broken(e),
    };
    let tcp = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return TlsEnd::Broken(format!("cannot connect to {target}: {e}")),
        Err(_) => return TlsEnd::Broken(format!("no TCP connection to {target} within 10 s")),
    };
    let local = match tcp.local_addr() {
        Ok(l) => l,
        Err(e) => return TlsEnd::Broken(e.to_string()),
    };
    let server_name = match rustls::pki_types::ServerName::try_from(host.clone()) {
        Ok(n) => n,
        Err(e) => return TlsEnd::Broken(format!("{host:?} is not a TLS server name: {e}")),
    };
    let stream =
        match tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return TlsEnd::Broken(format!("TLS handshake with {host}: {e}")),
            Err(_) => return TlsEnd::Broken(format!("no TLS handshake with {host} within 10 s")),
        };
    let contact = SocketAddr::new(local.ip(), listen.port());
    let mut reg = match OutboundRegistration::with_target(conn, target, local, Instant::now()) {
        Ok(r) => r
            .with_contact(contact)
            .with_user_agent(user_agent)
            .over_tls(),
        Err(e) => return TlsEnd::Broken(e.to_string()),
    };
    tracing::info!(connection = %name, pbx = %target, %local, %contact, "registering at the PBX over TLS");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16_384];
    let mut stopping = *stop.borrow();
    if stopping {
        return TlsEnd::Stopped;
    }
    loop {
        while let Some((_, bytes)) = reg.poll_transmit() {
            if let Err(e) = wr.write_all(&bytes).await {
                return TlsEnd::Broken(format!("write: {e}"));
            }
        }
        set_status(name, status, reg.status(), Instant::now());
        if reg.is_stopped() {
            return TlsEnd::Stopped;
        }
        let deadline = reg
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = rd.read(&mut chunk) => match r {
                Ok(0) => return TlsEnd::Broken("the PBX closed the connection".into()),
                Err(e) => return TlsEnd::Broken(format!("read: {e}")),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    loop {
                        match crate::sip::msg::parse_stream_frame(&buf) {
                            Ok(Some((frame, used))) => {
                                let bytes: Vec<u8> = buf.drain(..used).collect();
                                match frame {
                                    crate::sip::msg::StreamFrame::Message(_) => {
                                        if let Err(e) = reg.on_response(Instant::now(), &bytes) {
                                            tracing::debug!(connection = %name, error = %e, "message on the registration connection ignored");
                                        }
                                    }
                                    crate::sip::msg::StreamFrame::Ping => {
                                        if wr.write_all(b"\r\n").await.is_err() {
                                            return TlsEnd::Broken("write: pong".into());
                                        }
                                    }
                                    crate::sip::msg::StreamFrame::Pong => {}
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return TlsEnd::Broken(format!("unframeable SIP from the PBX: {e}")),
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => reg.handle_timeout(Instant::now()),
            _ = stop.changed(), if !stopping => {
                stopping = true;
                reg.stop(Instant::now());
            }
        }
    }
}

/// Pings one PBX with OPTIONS every `interval` from a socket next to the SIP listener, keeps
/// `view` current and logs each change of state. Runs for the life of the process.
async fn run_keepalive(
    name: String,
    (host, port): (String, u16),
    interval: Duration,
    listen: SocketAddr,
    user_agent: String,
    view: Arc<std::sync::Mutex<PeerView>>,
) {
    let set = |state: PeerState, rtt: Option<Duration>| {
        let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
        if v.state != state {
            v.since = Instant::now();
        }
        v.state = state;
        v.rtt = rtt;
    };
    let (sock, mut ka) = loop {
        let setup = async {
            let target = resolve_host(&host, port, listen).await?;
            let (sock, local, _) = bind_outbound(listen, target)
                .await
                .map_err(|e| format!("cannot bind a keep-alive socket: {e}"))?;
            let ka = KeepAlive::new(target, local, interval, Instant::now())
                .with_user_agent(user_agent.clone());
            Ok::<_, String>((sock, ka))
        };
        match setup.await {
            Ok(ready) => break ready,
            Err(e) => {
                tracing::warn!(connection = %name, error = %e, "OPTIONS keep-alive cannot start");
                set(PeerState::Down, None);
                tokio::time::sleep(interval).await;
            }
        }
    };
    let mut buf = vec![0u8; 65_535];
    loop {
        while let Some((to, bytes)) = ka.poll_transmit() {
            if let Err(e) = sock.send_to(&bytes, to).await {
                tracing::debug!(connection = %name, %to, error = %e, "cannot send OPTIONS");
            }
        }
        match ka.take_change() {
            Some(PeerState::Up) => {
                tracing::info!(connection = %name, pbx = %host, rtt_ms = ka.last_rtt().map(|d| d.as_millis() as u64), "PBX answers OPTIONS: up")
            }
            Some(PeerState::Down) => {
                tracing::warn!(connection = %name, pbx = %host, "PBX does not answer OPTIONS: down")
            }
            _ => {}
        }
        set(ka.state(), ka.last_rtt());
        let deadline = ka
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + interval);
        tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if let Err(e) = ka.on_datagram(Instant::now(), &buf[..n]) {
                        tracing::debug!(connection = %name, %from, error = %e, "keep-alive datagram ignored");
                    }
                }
                Err(e) => {
                    // ICMP port unreachable and the like: the timeout reports the PBX down.
                    tracing::debug!(connection = %name, error = %e, "keep-alive socket error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = tokio::time::sleep_until(deadline) => ka.handle_timeout(Instant::now()),
        }
    }
}

/// The SIP TLS acceptor from `sip.tls_cert` and `sip.tls_key` (validation made sure both are
/// set when a `tls:` listener exists); failures name the file.
fn sip_tls_acceptor(sip: &SipConfig) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let (Some(cert), Some(key)) = (&sip.tls_cert, &sip.tls_key) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a tls SIP listener needs sip.tls_cert and sip.tls_key",
        ));
    };
    edge::tls_acceptor(cert, key).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("SIP over TLS: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::msg::{parse_stream, SipMessage, SipResponse};
    use std::path::{Path, PathBuf};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS "PBX" on 127.0.0.1 with a certificate for `localhost` from a fresh CA in `dir`:
    /// answers every REGISTER 200 (Expires 600) and reports each request's top Via. Returns
    /// its address, the CA file and the Via channel.
    async fn tls_pbx(dir: &Path) -> (SocketAddr, PathBuf, tokio::sync::mpsc::Receiver<String>) {
        let ca = crate::tls::init_ca(dir, "test-pbx-ca", false).expect("ca");
        let (cert, key) = (dir.join("pbx.pem"), dir.join("pbx.key"));
        crate::tls::issue(&ca, "localhost", &cert, &key, 1, false).expect("leaf");
        let acceptor = edge::tls_acceptor(&cert, &key).expect("acceptor");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                    loop {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Ok(Some((msg, used))) = parse_stream(&buf) {
                            buf.drain(..used);
                            let SipMessage::Request(req) = msg else {
                                continue;
                            };
                            let _ = tx
                                .send(req.header("Via").unwrap_or_default().to_string())
                                .await;
                            let mut ok = SipResponse::to(&req, 200, "OK", Some("pbx"));
                            let expires = req.header("Expires").unwrap_or("600").to_string();
                            ok.headers_mut().add(
                                "Contact",
                                format!(
                                    "{};expires={expires}",
                                    req.header("Contact").unwrap_or_default()
                                ),
                            );
                            ok.headers_mut().add("Expires", expires);
                            if s.write_all(&ok.to_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, ca.cert, rx)
    }

    fn tls_conn(port: u16, ca: Option<PathBuf>, verify: bool) -> ConnectionConfig {
        let mut c: ConnectionConfig = toml::from_str(
            "name = \"pbx\"\ntype = \"register_to_pbx\"\nlogin = \"siptg\"\npassword = \"pw\"\ntransport = \"tls\"\n",
        )
        .expect("connection parses");
        c.server = Some(format!("localhost:{port}"));
        c.tls_ca = ca;
        c.tls_verify = verify;
        c
    }

    /// Runs the registration of `conn` until `want` holds for its status (true) or 5 s pass.
    async fn registration_reaches(
        conn: ConnectionConfig,
        want: fn(&OutboundStatus) -> bool,
    ) -> (
        bool,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
        Arc<std::sync::Mutex<OutboundStatus>>,
    ) {
        let status = Arc::new(std::sync::Mutex::new(OutboundStatus::Registering));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_outbound(
            conn,
            "127.0.0.1:5060".parse().expect("addr"),
            "siptg-test".into(),
            status.clone(),
            stop_rx,
        ));
        for _ in 0..50 {
            if want(&status.lock().unwrap_or_else(|p| p.into_inner())) {
                return (true, stop, task, status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (false, stop, task, status)
    }

    #[tokio::test]
    async fn registers_over_tls_with_the_pbx_certificate_checked_and_unregisters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, ca, mut vias) = tls_pbx(dir.path()).await;
        let (ok, stop, task, status) =
            registration_reaches(tls_conn(addr.port(), Some(ca), true), |s| {
                matches!(s, OutboundStatus::Registered { .. })
            })
            .await;
        assert!(ok, "not registered: {:?}", status.lock().map(|s| s.clone()));
        let via = vias.recv().await.expect("a REGISTER reached the PBX");
        assert!(via.starts_with("SIP/2.0/TLS 127.0.0.1:"), "{via}");
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("task");
        let unregister = vias.recv().await.expect("an un-REGISTER");
        assert!(unregister.starts_with("SIP/2.0/TLS"), "{unregister}");
        assert_eq!(
            *status.lock().unwrap_or_else(|p| p.into_inner()),
            OutboundStatus::Stopped
        );
    }

    #[tokio::test]
    async fn a_pbx_certificate_from_another_ca_is_refused_unless_verification_is_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        let (addr, _ca, mut vias) = tls_pbx(dir.path()).await;
        let other_ca = crate::tls::init_ca(other.path(), "other-ca", false)
            .expect("ca")
            .cert;
        let (refused, stop, task, status) =
            registration_reaches(tls_conn(addr.port(), Some(other_ca), true), |s| {
                *s == OutboundStatus::Unreachable
            })
            .await;
        assert!(refused, "{:?}", status.lock().map(|s| s.clone()));
        assert!(
            vias.try_recv().is_err(),
            "no REGISTER may cross an unverified connection"
        );
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        // tls_verify = false: the same PBX is accepted.
        let (ok, stop, task, _) = registration_reaches(tls_conn(addr.port(), None, false), |s| {
            matches!(s, OutboundStatus::Registered { .. })
        })
        .await;
        assert!(ok);
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
}
