//! The Manager role: dials every configured Worker and Storage, keeps each link alive
//! (reconnecting with backoff), and answers Workers' routing questions.

use crate::config::{ConnectionConfig, ConnectionKind, ManagerConfig};
use crate::link::{
    self, Handler, LinkError, LinkHandle, Request as LinkRequest, Response as LinkResponse, Role,
    RouteQuery,
};
use crate::linkserver::{link_status, LinkStatus};
use crate::metrics::Metrics;
use crate::sip::reasons;
use crate::sip::registrar::{RegisterRequest, Registrar};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream a link can run over (TLS socket or in-process pipe).
pub trait LinkStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkStream for T {}

/// Opens a fresh stream to a peer.
pub type Connector = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Box<dyn LinkStream>, LinkError>> + Send>>
        + Send
        + Sync,
>;

#[derive(Default)]
struct PeerSlot {
    role: Option<Role>,
    address: String,
    link: Option<LinkHandle>,
    last_error: Option<String>,
    down_since: Option<Instant>,
    connects: u64,
}

/// A peer as shown by `siptg status`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub role: Option<Role>,
    pub address: String,
    pub state: &'static str,
    pub link: Option<LinkStatus>,
    pub down_for_s: Option<u64>,
    pub last_error: Option<String>,
    pub connects: u64,
}

/// A running Manager.
pub struct Manager {
    name: String,
    cfg: ManagerConfig,
    peers: Mutex<BTreeMap<String, PeerSlot>>,
    metrics: Arc<Metrics>,
    routing: Arc<Routing>,
    telegram_updates: tokio::sync::broadcast::Sender<StorageUpdate>,
    /// Where API-managed gateways are kept.
    store: std::sync::OnceLock<crate::store::Store>,
    /// Serialises writes of the gateways' usage.
    usage_writes: tokio::sync::Mutex<()>,
    /// Accounts found to accept incoming calls, and when (`callback_restricted`).
    callback_ok: Mutex<std::collections::HashMap<String, Instant>>,
    /// "Not delivered" notices for texts the Manager could not route, rate-limited.
    notices: Mutex<crate::gateway::messages::NoticeGate>,
}

/// How long an account found to accept incoming calls is not asked again.
pub const CALLBACK_CHECK_TTL: Duration = Duration::from_secs(60);

/// Is a phone-call privacy "nobody": no rule allows anybody (a `DisallowAll` with, at most,
/// exceptions for named users or chats still leaves Telegram users at large unable to call)?
fn privacy_is_nobody(rules: &[grammers_tl_types::enums::PrivacyRule]) -> bool {
    use grammers_tl_types::enums::PrivacyRule as R;
    let allows_many = rules
        .iter()
        .any(|r| matches!(r, R::PrivacyValueAllowAll | R::PrivacyValueAllowContacts));
    !allows_many
        && rules
            .iter()
            .any(|r| matches!(r, R::PrivacyValueDisallowAll))
}

/// An update from an account of a Storage, as the Manager hears it.
#[derive(Debug, Clone)]
pub struct StorageUpdate {
    pub storage: String,
    pub account: String,
    pub update: grammers_tl_types::enums::Update,
}

/// What the Manager decides SIP with: the connections and the registrations of their PBXs.
pub struct Routing {
    /// The config file's connections first, then those made through the control API; a
    /// snapshot is taken per decision so a change never blocks routing.
    connections: std::sync::RwLock<Arc<Vec<ConnectionConfig>>>,
    /// How many of `connections` come from the config file.
    fixed_connections: usize,
    registrar: Mutex<Registrar>,
    /// Gateways from the config file (fixed) and from the database (managed through the
    /// control API), in that order.
    gateways: std::sync::RwLock<Vec<crate::config::GatewayConfig>>,
    /// How many of `gateways` come from the config file.
    fixed_gateways: std::sync::atomic::AtomicUsize,
    /// The Storage a gateway without one uses (the Manager's first).
    default_storage: Mutex<Option<String>>,
    /// Peers (Workers, Storages) whose link is up, for routing decisions.
    live_peers: Mutex<std::collections::HashSet<String>>,
    /// The gateways' plan limits (monthly talk time, failed calls per hour).
    limits: Mutex<crate::gateway::limits::Limits>,
}

/// Checks the name of something the control API makes (a gateway, a connection): it ends up
/// in URLs, logs and metric labels.
fn api_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

impl Routing {
    /// Routing over `connections`, with a registrar challenging in realm `realm`.
    pub fn new(connections: Vec<ConnectionConfig>, realm: &str) -> Self {
        Routing {
            fixed_connections: connections.len(),
            connections: std::sync::RwLock::new(Arc::new(connections)),
            registrar: Mutex::new(Registrar::new(realm)),
            gateways: std::sync::RwLock::new(Vec::new()),
            fixed_gateways: 0.into(),
            default_storage: Mutex::new(None),
            live_peers: Mutex::new(Default::default()),
            limits: Mutex::new(Default::default()),
        }
    }

    /// Adds the gateways (calls between their connections and Telegram).
    pub fn with_gateways(self, gateways: Vec<crate::config::GatewayConfig>) -> Self {
        self.fixed_gateways
            .store(gateways.len(), std::sync::atomic::Ordering::SeqCst);
        *self.gateways.write().unwrap_or_else(|p| p.into_inner()) = gateways;
        self
    }

    /// The connections now (config file first, then the control API's).
    pub fn connections(&self) -> Arc<Vec<ConnectionConfig>> {
        self.connections
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether connection `name` comes from the config file (the API may not change it).
    pub fn is_fixed_connection(&self, name: &str) -> bool {
        self.connections()
            .iter()
            .take(self.fixed_connections)
            .any(|c| c.name == name)
    }

    /// Checks a connection the API wants to add or change: the config file's own checks
    /// ([`connection_problems`](crate::config::connection_problems)), a name that is new or an
    /// API connection's, a `pbx_registers` login no other connection uses.
    pub fn check_connection(&self, c: &ConnectionConfig) -> Result<(), String> {
        api_name("connection", &c.name)?;
        if self.is_fixed_connection(&c.name) {
            return Err(format!(
                "connection {:?} is defined in the config file; change it there",
                c.name
            ));
        }
        let problems = crate::config::connection_problems(c);
        if !problems.is_empty() {
            return Err(problems
                .iter()
                .map(|(field, message)| format!("{field}: {message}"))
                .collect::<Vec<_>>()
                .join("; "));
        }
        if c.kind == ConnectionKind::PbxRegisters {
            let taken = self
                .connections()
                .iter()
                .find(|x| {
                    x.name != c.name && x.kind == ConnectionKind::PbxRegisters && x.login == c.login
                })
                .map(|x| x.name.clone());
            if let Some(other) = taken {
                return Err(format!(
                    "login: {:?} is already the login of connection {other:?}",
                    c.login.as_deref().unwrap_or_default()
                ));
            }
        }
        if let Some(w) = c
            .worker
            .as_deref()
            .filter(|w| !crate::tls::valid_node_name(w))
        {
            return Err(format!(
                "worker: {w:?} is not a node name (letters, digits, '-', '.')"
            ));
        }
        Ok(())
    }

    /// Adds or replaces an API connection (after [`check_connection`](Self::check_connection)).
    pub fn put_connection(&self, c: ConnectionConfig) {
        let mut slot = self.connections.write().unwrap_or_else(|p| p.into_inner());
        let mut list = (**slot).clone();
        match list.iter_mut().find(|x| x.name == c.name) {
            Some(x) => *x = c,
            None => list.push(c),
        }
        *slot = Arc::new(list);
    }

    /// Whether the API may remove connection `name`: not one of the config file's, nor one a
    /// gateway uses (its calls would have nowhere to go); `Ok(false)` when there is none.
    pub fn removable_connection(&self, name: &str) -> Result<bool, String> {
        if self.is_fixed_connection(name) {
            return Err(format!(
                "connection {name:?} is defined in the config file; remove it there"
            ));
        }
        if !self.connections().iter().any(|c| c.name == name) {
            return Ok(false);
        }
        if let Some(g) = self.gateway_of_connection(name) {
            return Err(format!(
                "connection {name:?} belongs to gateway {:?}; take it out of the gateway first \
                 (`siptg gateway set {} connections=…`)",
                g.name, g.name
            ));
        }
        Ok(true)
    }

    /// Removes an API connection (after [`removable_connection`](Self::removable_connection)).
    pub fn remove_connection(&self, name: &str) {
        let mut slot = self.connections.write().unwrap_or_else(|p| p.into_inner());
        let mut list = (**slot).clone();
        list.retain(|c| c.name != name);
        *slot = Arc::new(list);
    }

    /// The API connections Worker `worker` runs itself (outbound registrations and OPTIONS
    /// keep-alives): `register_to_pbx` and `ip` ones pinned to it or to no Worker. The config
    /// file's connections are in every Worker's own config.
    pub fn worker_connections(&self, worker: &str) -> Vec<ConnectionConfig> {
        self.connections()
            .iter()
            .skip(self.fixed_connections)
            .filter(|c| c.kind != ConnectionKind::PbxRegisters)
            .filter(|c| c.worker.as_deref().is_none_or(|w| w == worker))
            .cloned()
            .collect()
    }

    /// Every gateway (config file first).
    pub fn gateways(&self) -> Vec<crate::config::GatewayConfig> {
        self.gateways
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Is `name` a gateway of the config file (not changeable through the API)?
    pub fn is_fixed_gateway(&self, name: &str) -> bool {
        let n = self
            .fixed_gateways
            .load(std::sync::atomic::Ordering::SeqCst);
        self.gateways
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .take(n)
            .any(|g| g.name == name)
    }

    /// Checks a gateway the API wants to add or change: its connections exist and belong to no
    /// other gateway, its callers parse, its name is new or an API gateway's.
    pub fn check_gateway(&self, g: &crate::config::GatewayConfig) -> Result<(), String> {
        api_name("gateway", &g.name)?;
        if self.is_fixed_gateway(&g.name) {
            return Err(format!(
                "gateway {:?} is defined in the config file; change it there",
                g.name
            ));
        }
        if g.account.trim().is_empty() {
            return Err("account is empty".into());
        }
        if g.connections.is_empty() {
            return Err("a gateway needs at least one SIP connection".into());
        }
        if g.lines == 0 {
            return Err("lines must be at least 1".into());
        }
        for c in &g.connections {
            if !self.connections().iter().any(|x| &x.name == c) {
                return Err(format!("no connection named {c:?}"));
            }
            if let Some(other) = self.gateway_of_connection(c).filter(|o| o.name != g.name) {
                return Err(format!(
                    "connection {c:?} already belongs to gateway {:?}",
                    other.name
                ));
            }
        }
        for who in &g.allowed_callers {
            crate::telegram::resolve::PeerQuery::parse(who)
                .map_err(|e| format!("allowed_callers: {e}"))?;
        }
        if let Some(w) = g
            .allowed_workers
            .iter()
            .find(|w| !crate::tls::valid_node_name(w))
        {
            return Err(format!(
                "allowed_workers: {w:?} is not a node name (letters, digits, '-', '.')"
            ));
        }
        Ok(())
    }

    /// Adds or replaces an API gateway (after [`check_gateway`](Self::check_gateway)).
    pub fn put_gateway(&self, g: crate::config::GatewayConfig) {
        let mut list = self.gateways.write().unwrap_or_else(|p| p.into_inner());
        match list.iter_mut().find(|x| x.name == g.name) {
            Some(x) => *x = g,
            None => list.push(g),
        }
    }

    /// Removes an API gateway; false when there is none of that name.
    pub fn remove_gateway(&self, name: &str) -> bool {
        if self.is_fixed_gateway(name) {
            return false;
        }
        let mut list = self.gateways.write().unwrap_or_else(|p| p.into_inner());
        let before = list.len();
        list.retain(|g| g.name != name);
        list.len() != before
    }

    /// The gateway a connection belongs to.
    pub fn gateway_of_connection(&self, connection: &str) -> Option<crate::config::GatewayConfig> {
        self.gateways
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|g| g.connections.iter().any(|c| c == connection))
            .cloned()
    }

    /// The gateway of a Telegram account.
    pub fn gateway_of_account(&self, account: &str) -> Option<crate::config::GatewayConfig> {
        self.gateways
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|g| g.account == account)
            .cloned()
    }

    /// Marks a peer's link up or down.
    pub fn set_live(&self, peer: &str, up: bool) {
        let mut l = self.live_peers.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            l.insert(peer.to_string());
        } else {
            l.remove(peer);
        }
    }

    fn is_live(&self, peer: &str) -> bool {
        self.live_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer)
    }

    /// A connection pinned to a Worker: refused on another Worker, or while its Worker is down.
    fn worker_check(&self, c: &ConnectionConfig, worker: &str) -> Option<LinkResponse> {
        let pinned = c.worker.as_deref()?;
        let refuse = |reason: &str| LinkResponse::Route {
            code: 403,
            reason: reason.to_string(),
            headers: Vec::new(),
        };
        if !self.is_live(pinned) {
            tracing::info!(connection = %c.name, worker = pinned, "the connection's Worker is down; 403");
            return Some(refuse(reasons::WORKER_INACTIVE));
        }
        if pinned != worker {
            tracing::info!(connection = %c.name, pinned, asked = worker, "request on a Worker that does not serve the connection; 403");
            return Some(refuse(reasons::WORKER_ADDRESS_NOT_SET));
        }
        None
    }

    /// SIP.TG's `402 SIP account has disallowed settings`: the gateway's plan
    /// (`allowed_workers`) forbids a Worker one of its connections is pinned to, or the Worker
    /// (`worker`) that would carry this call.
    fn disallowed(&self, g: &crate::config::GatewayConfig, worker: Option<&str>) -> bool {
        if g.allowed_workers.is_empty() {
            return false;
        }
        let allowed = |w: &str| g.allowed_workers.iter().any(|a| a == w);
        let conns = self.connections();
        let pinned = conns
            .iter()
            .filter(|c| g.connections.contains(&c.name))
            .filter_map(|c| c.worker.as_deref())
            .find(|w| !allowed(w));
        if let Some(w) = pinned {
            tracing::info!(gateway = %g.name, worker = w, "a connection is pinned to a Worker the plan does not allow; 402");
            return true;
        }
        if let Some(w) = worker.filter(|w| !allowed(w)) {
            tracing::info!(gateway = %g.name, worker = w, "the call's Worker is not allowed by the plan; 402");
            return true;
        }
        false
    }

    /// The plan limits of a new call of `g` (`to_telegram`: from the PBX): the talk time left
    /// this month, or SIP.TG's 402.
    pub fn admit(
        &self,
        g: &crate::config::GatewayConfig,
        to_telegram: bool,
    ) -> Result<Option<Duration>, crate::gateway::limits::Refusal> {
        let r = self.limits.lock().unwrap_or_else(|p| p.into_inner()).admit(
            g,
            to_telegram,
            std::time::SystemTime::now(),
        );
        if let Err(refusal) = &r {
            tracing::info!(gateway = %g.name, reason = refusal.reason, "plan limit reached; 402");
        }
        r
    }

    /// Counts a finished call of Worker `worker` against its gateway's limits; the usage to
    /// store.
    pub fn record_call(
        &self,
        worker: &str,
        report: &crate::link::CallReport,
    ) -> crate::gateway::limits::Usage {
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        l.hung_up(&(worker.to_string(), report.call));
        l.record(report, std::time::SystemTime::now())
    }

    /// Call `call` of Worker `worker` on gateway `gateway` was answered.
    pub fn call_answered(&self, worker: &str, gateway: &str, call: u64) {
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answered((worker.to_string(), call), gateway, Instant::now());
    }

    /// Each talking call of `gateway` and how long it may go on (the month's rest shared).
    pub fn talk_shares(&self, gateway: &str) -> Vec<(crate::gateway::limits::LiveCall, Duration)> {
        let Some(g) = self
            .gateways
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|g| g.name == gateway)
            .cloned()
        else {
            return Vec::new();
        };
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shares(&g, std::time::SystemTime::now(), Instant::now())
    }

    /// A gateway's usage now (`siptg status`).
    pub fn usage(&self, gateway: &str) -> crate::gateway::limits::Usage {
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .usage(gateway, std::time::SystemTime::now())
            .clone()
    }

    fn storage_of(&self, g: &crate::config::GatewayConfig) -> Option<String> {
        g.storage.clone().or_else(|| {
            self.default_storage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// A PBX's INVITE on a gateway's connection: which Telegram user to call.
    fn gateway_route(
        &self,
        g: &crate::config::GatewayConfig,
        caller: &ConnectionConfig,
        q: &RouteQuery,
        talk_budget: Option<Duration>,
    ) -> LinkResponse {
        let reply = |code: u16, reason: &str| LinkResponse::Route {
            code,
            reason: reason.to_string(),
            headers: Vec::new(),
        };
        if !g.enabled {
            tracing::info!(gateway = %g.name, "gateway disabled; 403");
            return reply(403, reasons::ROUTE_NOT_PERMITTED);
        }
        let Some(storage) = self.storage_of(g) else {
            return reply(503, reasons::STORAGE_UNAVAILABLE);
        };
        if !self.is_live(&storage) {
            tracing::info!(gateway = %g.name, %storage, "the gateway's Session Storage is not linked; 403");
            return reply(403, reasons::STORAGE_INACTIVE);
        }
        let dialled = crate::sip::message::uri_user(&q.request_uri)
            .or_else(|| q.to_user.clone())
            .unwrap_or_default();
        let dialled = percent_decode(&dialled);
        let rules = match crate::gateway::dialrules::DialRules::new(&caller.dial_rules) {
            Ok(r) => r,
            Err(_) => return reply(500, reasons::DATABASE_ERROR),
        };
        let Some(number) = rules.apply(&dialled) else {
            tracing::info!(gateway = %g.name, %dialled, "dial rules filtered the number out; 404");
            return reply(404, reasons::ROUTE_NOT_FOUND);
        };
        let query = match crate::telegram::resolve::PeerQuery::parse(&number) {
            Ok(q) => q,
            Err(_) => {
                tracing::info!(gateway = %g.name, %dialled, %number, "not a phone, @username or user id; 404");
                return reply(404, reasons::NOT_FOUND);
            }
        };
        tracing::info!(method = %q.method, gateway = %g.name, connection = %caller.name, %dialled, ?query, "to Telegram");
        LinkResponse::Gateway(Box::new(crate::link::GatewayRoute {
            gateway: g.name.clone(),
            storage,
            account: g.account.clone(),
            query,
            codecs: caller.codecs.clone(),
            dtmf: caller.dtmf.clone(),
            lines: g.lines,
            max_call_secs: g.max_call_duration.as_secs(),
            talk_budget_ms: talk_budget.map(|b| u64::try_from(b.as_millis()).unwrap_or(u64::MAX)),
            messages: g.messages,
            keypad_bot: g.keypad_bot.clone(),
        }))
    }

    /// How a Worker (`worker`) must answer a SIP request, or where it must forward a call.
    pub fn route(&self, q: &RouteQuery, worker: &str) -> LinkResponse {
        let reply = |code: u16, reason: &str, headers: Vec<(String, String)>| LinkResponse::Route {
            code,
            reason: reason.to_string(),
            headers,
        };
        let now = std::time::SystemTime::now();
        let mut registrar = self.registrar.lock().unwrap_or_else(|p| p.into_inner());
        let conns = self.connections();
        if q.method == "REGISTER" {
            if let Some(c) = conns.iter().find(|c| {
                c.kind == ConnectionKind::PbxRegisters && c.login.is_some() && c.login == q.to_user
            }) {
                if let Some(refusal) = self.worker_check(c, worker) {
                    return refusal;
                }
            }
            let reply = registrar.register(
                &conns,
                &RegisterRequest {
                    login: q.to_user.as_deref(),
                    source: q.source,
                    authorization: q.authorization.as_deref(),
                    contact: q.contact.as_deref(),
                    expires: q.expires,
                    worker,
                },
                now,
            );
            if reply.code != 401 {
                tracing::info!(source = %q.source, login = ?q.to_user, code = reply.code, reason = %reply.reason, "REGISTER");
            }
            return LinkResponse::Route {
                code: reply.code,
                reason: reply.reason,
                headers: reply.headers,
            };
        }
        if q.method == "MESSAGE" {
            // A PBX's text for a Telegram user: the same connection matching as an INVITE.
            let caller = match self.caller(&conns, q, &registrar, now) {
                Ok(c) => c,
                Err(refusal) => return refusal,
            };
            if let Some(refusal) = self.worker_check(caller, worker) {
                return refusal;
            }
            let Some(g) = self.gateway_of_connection(&caller.name) else {
                tracing::info!(connection = %caller.name, "MESSAGE on a connection of no gateway; 404");
                return reply(404, reasons::ROUTE_NOT_FOUND, Vec::new());
            };
            if g.enabled && !g.messages {
                tracing::info!(gateway = %g.name, "MESSAGE to a gateway with messages off; 403");
                return reply(403, reasons::MESSAGES_DISABLED, Vec::new());
            }
            return self.gateway_route(&g, caller, q, None);
        }
        if q.method == "INVITE" {
            // Which connection is calling? Unknown sources get nothing through.
            let caller = match self.caller(&conns, q, &registrar, now) {
                Ok(c) => c,
                Err(refusal) => return refusal,
            };
            tracing::debug!(connection = %caller.name, source = %q.source, "INVITE from a known connection");
            let gateway = self.gateway_of_connection(&caller.name);
            // The plan comes first: a disallowed setting is refused whatever else is wrong.
            if let Some(g) = &gateway {
                if g.enabled && self.disallowed(g, Some(worker)) {
                    return reply(402, reasons::DISALLOWED_SETTINGS, Vec::new());
                }
            }
            if let Some(refusal) = self.worker_check(caller, worker) {
                return refusal;
            }
            if let Some(g) = gateway {
                if !g.enabled {
                    tracing::info!(gateway = %g.name, "gateway disabled; 403");
                    return reply(403, reasons::ROUTE_NOT_PERMITTED, Vec::new());
                }
                let budget = match self.admit(&g, true) {
                    Ok(b) => b,
                    Err(r) => return reply(r.code, r.reason, Vec::new()),
                };
                return self.gateway_route(&g, caller, q, budget);
            }
            // A call to the login of a registered PBX goes to that PBX (B2BUA through the
            // Worker that holds its registration). The login is the To user or, when a PBX
            // routes a dialled number to our registered contact (To naming our own AOR there),
            // the Request-URI user.
            let ruri_user = crate::sip::message::uri_user(&q.request_uri);
            let target = conns.iter().find(|c| {
                c.kind == ConnectionKind::PbxRegisters
                    && c.login.is_some()
                    && (c.login == q.to_user || c.login == ruri_user)
            });
            if let Some(c) = target {
                return match registrar.binding(&c.name, now) {
                    Some(b) => {
                        tracing::info!(from = %caller.name, connection = %c.name, contact = %b.contact, "INVITE forwarded to a registered PBX");
                        LinkResponse::Forward {
                            connection: c.name.clone(),
                            contact: b.contact.clone(),
                            address: b.source,
                            codecs: caller.codecs.clone(),
                        }
                    }
                    None => reply(480, "Temporarily Unavailable", Vec::new()),
                };
            }
        }
        let (code, reason) = route(q);
        reply(code, &reason, Vec::new())
    }
}

impl Routing {
    /// The connection an INVITE comes from, as SIP.TG matches them:
    /// - a `pbx_registers` PBX, by its login in From (from a trusted address; it must have
    ///   registered: else `405 REGISTER is required first`) or by the address it registered from;
    /// - an `ip` trunk, by source address (its `server` or `trusted_ips`) and, when configured,
    ///   its extra header `Name: Value`.
    ///
    /// Anything else is `404 Route not found`.
    fn caller<'a>(
        &self,
        conns: &'a [ConnectionConfig],
        q: &RouteQuery,
        registrar: &Registrar,
        now: std::time::SystemTime,
    ) -> Result<&'a ConnectionConfig, LinkResponse> {
        let refuse = |code: u16, reason: &str| LinkResponse::Route {
            code,
            reason: reason.to_string(),
            headers: Vec::new(),
        };
        if let Some(c) = conns.iter().find(|c| {
            c.kind == ConnectionKind::PbxRegisters
                && c.login.is_some()
                && c.login == q.from_user
                && crate::sip::registrar::trusted(c, q.source)
        }) {
            if registrar.binding(&c.name, now).is_none() {
                tracing::info!(method = %q.method, connection = %c.name, source = %q.source, "request before REGISTER; 405");
                return Err(refuse(405, reasons::REGISTER_REQUIRED));
            }
            return Ok(c);
        }
        // A PBX (ip trunk or one we register to) whose configured `server`/`proxy` is exactly
        // the source address: more specific than a registration from the same IP.
        if let Some(c) = conns.iter().find(|c| {
            matches!(c.kind, ConnectionKind::Ip | ConnectionKind::RegisterToPbx)
                && (c.kind != ConnectionKind::Ip || ip_trunk_matches(c, q))
                && [c.server.as_deref(), c.proxy.as_deref()]
                    .into_iter()
                    .flatten()
                    .any(|s| s.trim().parse::<std::net::SocketAddr>().ok() == Some(q.source))
        }) {
            return Ok(c);
        }
        if let Some(c) = conns.iter().find(|c| {
            c.kind == ConnectionKind::PbxRegisters
                && registrar
                    .binding(&c.name, now)
                    .is_some_and(|b| b.source.ip() == q.source.ip())
        }) {
            return Ok(c);
        }
        if let Some(c) = conns
            .iter()
            .find(|c| c.kind == ConnectionKind::Ip && ip_trunk_matches(c, q))
        {
            return Ok(c);
        }
        // A PBX we register to calls us from its own address (the registrar or its proxy).
        if let Some(c) = conns.iter().find(|c| {
            c.kind == ConnectionKind::RegisterToPbx
                && [c.server.as_deref(), c.proxy.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter_map(host_ip)
                    .any(|ip| ip == q.source.ip())
        }) {
            return Ok(c);
        }
        tracing::info!(method = %q.method, source = %q.source, from = ?q.from_user, "request from no known connection; 404");
        Err(refuse(404, reasons::ROUTE_NOT_FOUND))
    }
}

/// A private text a Telegram user sent the account (`updateNewMessage`; grammers turns
/// `updateShortMessage` into one): its sender and text. The account's own messages (sent
/// from another device), group and channel posts, and media without text are none.
fn private_text(update: &grammers_tl_types::enums::Update) -> Option<(i64, String)> {
    use grammers_tl_types::enums::{Message, Peer, Update};
    let Update::NewMessage(u) = update else {
        return None;
    };
    let Message::Message(m) = &u.message else {
        return None;
    };
    if m.out || m.message.trim().is_empty() {
        return None;
    }
    // In a private chat the chat is the other user; Telegram may leave `from_id` out there.
    let Peer::User(chat) = &m.peer_id else {
        return None;
    };
    match &m.from_id {
        Some(Peer::User(from)) if from.user_id == chat.user_id => {}
        None => {}
        Some(_) => return None,
    }
    Some((chat.user_id, m.message.clone()))
}

/// `%2B79…` → `+79…` (PBXs escape `+` and `@` in Request-URI users).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// The IP of a `host[:port]` setting when the host is a literal address.
fn host_ip(s: &str) -> Option<std::net::IpAddr> {
    s.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse::<std::net::IpAddr>())
        .ok()
}

/// Whether `q` comes from IP trunk `c`: its address (the `server` host, or a `trusted_ips`
/// entry) and, if set, its extra header.
fn ip_trunk_matches(c: &ConnectionConfig, q: &RouteQuery) -> bool {
    let server_ip = c.server.as_deref().and_then(host_ip);
    let from_address = server_ip == Some(q.source.ip())
        || (!c.trusted_ips.is_empty() && crate::sip::registrar::trusted(c, q.source));
    if !from_address {
        return false;
    }
    match c.header.as_deref().and_then(|h| h.split_once(':')) {
        None => true,
        Some((name, value)) => q
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case(name.trim()) && v.trim() == value.trim()),
    }
}

impl Manager {
    /// A Manager named `name` (its certificate's name on TLS links).
    pub fn new(
        name: String,
        cfg: ManagerConfig,
        connections: Vec<ConnectionConfig>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_gateways(name, cfg, connections, Vec::new(), metrics)
    }

    /// A Manager that also routes the calls of `gateways`.
    pub fn with_gateways(
        name: String,
        cfg: ManagerConfig,
        connections: Vec<ConnectionConfig>,
        gateways: Vec<crate::config::GatewayConfig>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            routing: Arc::new(Routing::new(connections, "siptg").with_gateways(gateways)),
            name,
            cfg,
            peers: Mutex::new(BTreeMap::new()),
            metrics,
            telegram_updates: tokio::sync::broadcast::channel(1024).0,
            store: std::sync::OnceLock::new(),
            usage_writes: tokio::sync::Mutex::new(()),
            callback_ok: Mutex::new(Default::default()),
            notices: Mutex::default(),
        })
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerSlot>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts keeping a link to peer `name` of `role`, opened by `connect`.
    pub fn add_peer(
        self: &Arc<Self>,
        role: Role,
        name: String,
        address: String,
        connect: Connector,
    ) {
        if role == Role::Storage {
            let mut d = self
                .routing
                .default_storage
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if d.is_none() {
                *d = Some(name.clone());
            }
        }
        self.peers().insert(
            name.clone(),
            PeerSlot {
                role: Some(role),
                address,
                down_since: Some(Instant::now()),
                ..Default::default()
            },
        );
        let me = self.clone();
        tokio::spawn(async move { me.keep_link(role, name, connect).await });
    }

    async fn keep_link(self: Arc<Self>, role: Role, name: String, connect: Connector) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.open(role, &name, &connect).await {
                Ok(link) => {
                    backoff = Duration::from_millis(200);
                    {
                        let mut peers = self.peers();
                        if let Some(p) = peers.get_mut(&name) {
                            p.link = Some(link.clone());
                            p.last_error = None;
                            p.down_since = None;
                            p.connects += 1;
                        }
                    }
                    self.metrics
                        .inc("siptg_link_connects_total", &[("peer", &name)]);
                    self.routing.set_live(&name, true);
                    if role == Role::Worker {
                        self.send_connections_to(name.clone(), link.clone());
                    }
                    link.closed().await;
                    self.routing.set_live(&name, false);
                    // Its calls' ends will not be reported: they no longer share the budget.
                    self.routing
                        .limits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget_worker(&name);
                    if let Some(p) = self.peers().get_mut(&name) {
                        p.link = None;
                        p.down_since = Some(Instant::now());
                        p.last_error = Some("link lost".into());
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    let mut peers = self.peers();
                    if let Some(p) = peers.get_mut(&name) {
                        if p.last_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(peer = %name, %role, error = %msg, "cannot link to peer");
                        }
                        p.last_error = Some(msg);
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn open(
        self: &Arc<Self>,
        role: Role,
        name: &str,
        connect: &Connector,
    ) -> Result<LinkHandle, LinkError> {
        let mut stream = connect().await?;
        let hb = self.cfg.heartbeat_interval;
        let peer =
            link::client_handshake(&mut stream, Role::Manager, &self.name, hb, role, name).await?;
        Ok(link::spawn(
            stream,
            peer,
            Some(hb),
            self.cfg.link_timeout,
            self.handler(name),
        ))
    }

    /// The routing (connections, registrations, gateways).
    pub fn routing(&self) -> &Arc<Routing> {
        &self.routing
    }

    /// Gives the Manager its database and loads the gateways kept there.
    pub async fn attach_store(&self, store: crate::store::Store) -> Result<usize, String> {
        // Connections first: gateways name them.
        let rows = store
            .list(crate::store::Table::Connections, "")
            .await
            .map_err(|e| e.to_string())?;
        for (name, value) in rows {
            match serde_json::from_slice::<ConnectionConfig>(&value) {
                Ok(c) => match self.routing.check_connection(&c) {
                    Ok(()) => self.routing.put_connection(c),
                    Err(e) => {
                        tracing::warn!(connection = %name, error = %e, "stored connection ignored")
                    }
                },
                Err(e) => {
                    tracing::warn!(connection = %name, error = %e, "stored connection unreadable")
                }
            }
        }
        // Workers linked before the database was attached learn them now.
        self.send_worker_connections();
        let rows = store
            .list(crate::store::Table::Gateways, "")
            .await
            .map_err(|e| e.to_string())?;
        let mut n = 0;
        for (name, value) in rows {
            match serde_json::from_slice::<crate::config::GatewayConfig>(&value) {
                Ok(g) => match self.routing.check_gateway(&g) {
                    Ok(()) => {
                        self.routing.put_gateway(g);
                        n += 1;
                    }
                    Err(e) => tracing::warn!(gateway = %name, error = %e, "stored gateway ignored"),
                },
                Err(e) => tracing::warn!(gateway = %name, error = %e, "stored gateway unreadable"),
            }
        }
        match store.list(crate::store::Table::Usage, "").await {
            Ok(rows) => {
                let mut limits = self
                    .routing
                    .limits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for (name, value) in rows {
                    match serde_json::from_slice(&value) {
                        Ok(u) => limits.load(&name, u),
                        Err(e) => {
                            tracing::warn!(gateway = %name, error = %e, "stored usage unreadable")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot load the gateways' usage"),
        }
        let _ = self.store.set(store);
        Ok(n)
    }

    /// A Worker's report of a finished gateway call: counted against the gateway's limits and
    /// the usage written to the database (one writer at a time, so a slower write never
    /// replaces a newer total).
    pub async fn call_ended(&self, worker: &str, report: &crate::link::CallReport) {
        let _one_writer = self.usage_writes.lock().await;
        let usage = self.routing.record_call(worker, report);
        // The calls still talking share what this one leaves.
        self.send_talk_shares(&report.gateway);
        tracing::info!(
            gateway = %report.gateway,
            direction = ?report.direction,
            answered = report.answered,
            talk_ms = report.talk_ms,
            month_talk_ms = usage.talk_ms,
            failed_last_hour = usage.failed.len(),
            "gateway call counted"
        );
        let Some(store) = self.store.get() else {
            return;
        };
        let value = match serde_json::to_vec(&usage) {
            Ok(v) => v,
            Err(e) => return tracing::warn!(error = %e, "usage not encodable"),
        };
        if let Err(e) = store
            .put(crate::store::Table::Usage, &report.gateway, &value)
            .await
        {
            tracing::warn!(gateway = %report.gateway, error = %e, "usage not saved");
        }
    }

    /// Tells every talking call of `gateway` its share of the month's rest of talk time.
    fn send_talk_shares(&self, gateway: &str) {
        let shares = self.routing.talk_shares(gateway);
        if shares.is_empty() {
            return;
        }
        let links = self.worker_links();
        for ((worker, call), left) in shares {
            let Some((_, link)) = links.iter().find(|(n, _)| *n == worker) else {
                continue;
            };
            let (link, remaining_ms) = (
                link.clone(),
                u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            );
            tracing::debug!(%gateway, %worker, call, remaining_ms, "talk time share");
            tokio::spawn(async move {
                let req = LinkRequest::TalkBudget { call, remaining_ms };
                if let Err(e) = link.request(req, Duration::from_secs(5)).await {
                    tracing::warn!(error = %e, "talk time share not delivered");
                }
            });
        }
    }

    /// SIP.TG's `380 Callback is restricted`: the gateway's own account does not accept
    /// incoming calls (its current authorization has calls disabled, or its phone-call privacy
    /// is "nobody"), so a Telegram user could not call back. Account hygiene normally prevents
    /// it. An allowed account is remembered for [`CALLBACK_CHECK_TTL`] (two requests per
    /// call otherwise); a restricted one is asked again on every call, so fixing it takes
    /// effect at once. A check that cannot be made lets the call through.
    pub async fn callback_restricted(&self, storage: &str, account: &str) -> bool {
        use grammers_tl_types as tl;
        let key = format!("{storage}/{account}");
        let fresh = self
            .callback_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|t| t.elapsed() < CALLBACK_CHECK_TTL);
        if fresh {
            return false;
        }
        let calls_disabled = match self
            .invoke(
                storage,
                account,
                &tl::functions::account::GetAuthorizations {},
            )
            .await
        {
            Ok(tl::enums::account::Authorizations::Authorizations(list)) => {
                list.authorizations.iter().any(|a| {
                    let tl::enums::Authorization::Authorization(a) = a;
                    a.current && a.call_requests_disabled
                })
            }
            Err(e) => {
                tracing::debug!(%account, error = %e, "authorizations not checked");
                false
            }
        };
        let nobody = match self
            .invoke(
                storage,
                account,
                &tl::functions::account::GetPrivacy {
                    key: tl::enums::InputPrivacyKey::PhoneCall,
                },
            )
            .await
        {
            Ok(tl::enums::account::PrivacyRules::Rules(r)) => privacy_is_nobody(&r.rules),
            Err(e) => {
                tracing::debug!(%account, error = %e, "call privacy not checked");
                false
            }
        };
        if calls_disabled || nobody {
            tracing::info!(%account, calls_disabled, privacy_nobody = nobody, "the gateway's account does not accept calls; 380");
            self.callback_ok
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            return true;
        }
        self.callback_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Instant::now());
        false
    }

    /// Adds or changes a gateway through the control API; kept in the database.
    pub async fn save_gateway(&self, g: crate::config::GatewayConfig) -> Result<(), String> {
        self.routing.check_gateway(&g)?;
        let store = self.store.get().ok_or(reasons::DATABASE_ERROR)?;
        let value = serde_json::to_vec(&g).map_err(|e| e.to_string())?;
        store
            .put(crate::store::Table::Gateways, &g.name, &value)
            .await
            .map_err(|e| format!("{}: {e}", reasons::DATABASE_ERROR))?;
        tracing::info!(gateway = %g.name, account = %g.account, "gateway saved");
        self.routing.put_gateway(g);
        Ok(())
    }

    /// Adds or changes a SIP connection through the control API; kept in the database and
    /// sent to the Workers (they run its registration and keep-alive).
    pub async fn save_connection(&self, c: ConnectionConfig) -> Result<(), String> {
        self.routing.check_connection(&c)?;
        let store = self.store.get().ok_or(reasons::DATABASE_ERROR)?;
        let value = serde_json::to_vec(&c).map_err(|e| e.to_string())?;
        store
            .put(crate::store::Table::Connections, &c.name, &value)
            .await
            .map_err(|e| format!("{}: {e}", reasons::DATABASE_ERROR))?;
        tracing::info!(connection = %c.name, kind = ?c.kind, "connection saved");
        self.routing.put_connection(c);
        self.send_worker_connections();
        Ok(())
    }

    /// Removes a connection made through the control API (not while a gateway uses it).
    pub async fn delete_connection(&self, name: &str) -> Result<bool, String> {
        if !self.routing.removable_connection(name)? {
            return Ok(false);
        }
        let store = self.store.get().ok_or(reasons::DATABASE_ERROR)?;
        store
            .delete(crate::store::Table::Connections, name)
            .await
            .map_err(|e| format!("{}: {e}", reasons::DATABASE_ERROR))?;
        self.routing.remove_connection(name);
        tracing::info!(connection = %name, "connection removed");
        self.send_worker_connections();
        Ok(true)
    }

    /// Sends every linked Worker the API connections it runs.
    fn send_worker_connections(&self) {
        for (worker, link) in self.worker_links() {
            self.send_connections_to(worker, link);
        }
    }

    fn send_connections_to(&self, worker: String, link: LinkHandle) {
        let req = LinkRequest::Connections {
            connections: self.routing.worker_connections(&worker),
        };
        tokio::spawn(async move {
            if let Err(e) = link.request(req, Duration::from_secs(5)).await {
                tracing::warn!(%worker, error = %e, "connections not delivered to the Worker");
            }
        });
    }

    /// Removes a gateway made through the control API.
    pub async fn delete_gateway(&self, name: &str) -> Result<bool, String> {
        if self.routing.is_fixed_gateway(name) {
            return Err(format!(
                "gateway {name:?} is defined in the config file; remove it there"
            ));
        }
        let store = self.store.get().ok_or(reasons::DATABASE_ERROR)?;
        store
            .delete(crate::store::Table::Gateways, name)
            .await
            .map_err(|e| format!("{}: {e}", reasons::DATABASE_ERROR))?;
        Ok(self.routing.remove_gateway(name))
    }

    /// Updates of every Storage's accounts.
    pub fn telegram_updates(&self) -> tokio::sync::broadcast::Receiver<StorageUpdate> {
        self.telegram_updates.subscribe()
    }

    /// A Telegram request through Storage `storage`. A Storage without a live link is
    /// `TgError::Transport` naming it.
    pub async fn telegram(
        &self,
        storage: &str,
        account: &str,
        op: crate::link::TelegramOp,
    ) -> Result<crate::link::TelegramAnswer, crate::telegram::TgError> {
        use crate::telegram::TgError;
        let link = self
            .peers()
            .get(storage)
            .and_then(|p| p.link.clone())
            .ok_or_else(|| {
                TgError::transport(format!("session storage {storage} is not linked"))
            })?;
        let req = LinkRequest::Telegram(Box::new(crate::link::TelegramRequest {
            account: account.to_string(),
            op,
            storage: None,
        }));
        // The Storage times the RPC out itself; this only covers a dead link.
        match link.request(req, Duration::from_secs(60)).await {
            Ok(LinkResponse::Telegram { result }) => result,
            Ok(other) => Err(TgError::transport(format!(
                "storage {storage} answered {other:?}"
            ))),
            Err(crate::link::LinkError::Timeout(_)) => Err(TgError::Timeout),
            Err(e) => Err(TgError::transport(format!("storage {storage}: {e}"))),
        }
    }

    /// A typed TL request for `account` through Storage `storage`.
    pub async fn invoke<R: grammers_tl_types::RemoteCall>(
        &self,
        storage: &str,
        account: &str,
        request: &R,
    ) -> Result<R::Return, crate::telegram::TgError> {
        use crate::telegram::TgError;
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = b64.encode(request.to_bytes());
        match self
            .telegram(storage, account, crate::link::TelegramOp::Invoke { body })
            .await?
        {
            crate::link::TelegramAnswer::Invoked { body } => {
                let bytes = b64
                    .decode(body.as_bytes())
                    .map_err(|e| TgError::transport(format!("storage answer: {e}")))?;
                <R::Return as grammers_tl_types::Deserializable>::from_bytes(&bytes).map_err(|e| {
                    TgError::Decode {
                        request: crate::telegram::account::method_name(&request.to_bytes()).into(),
                        why: e.to_string(),
                    }
                })
            }
            other => Err(TgError::transport(format!(
                "unexpected storage answer {other:?}"
            ))),
        }
    }

    /// Live links to Workers.
    fn worker_links(&self) -> Vec<(String, LinkHandle)> {
        self.peers()
            .iter()
            .filter(|(_, p)| p.role == Some(Role::Worker))
            .filter_map(|(n, p)| p.link.clone().filter(|l| l.is_up()).map(|l| (n.clone(), l)))
            .collect()
    }

    /// An update from Storage `storage`: to every Worker (they own the calls), and a
    /// Telegram user's new call to the gateway's routing.
    fn on_storage_update(
        self: &Arc<Self>,
        storage: &str,
        account: &str,
        raw: &str,
        update: &grammers_tl_types::enums::Update,
    ) {
        for (_, link) in self.worker_links() {
            let req = LinkRequest::TelegramUpdate {
                account: account.to_string(),
                update: raw.to_string(),
            };
            tokio::spawn(async move {
                if let Err(e) = link.request(req, Duration::from_secs(5)).await {
                    tracing::debug!(error = %e, "update not delivered to a worker");
                }
            });
        }
        if let Some((user_id, text)) = private_text(update) {
            let me = self.clone();
            let (storage, account) = (storage.to_string(), account.to_string());
            tokio::spawn(async move { me.route_text(storage, account, user_id, text).await });
        }
        if let grammers_tl_types::enums::Update::PhoneCall(u) = update {
            if let grammers_tl_types::enums::PhoneCall::Requested(r) = &u.phone_call {
                let me = self.clone();
                let (storage, account, r) = (storage.to_string(), account.to_string(), r.clone());
                tokio::spawn(async move { me.route_incoming(storage, account, r).await });
            }
        }
    }

    /// The Telegram user `user_id` as the account `account` sees it (cached by the Storage);
    /// `None` when it cannot be resolved.
    async fn user_peer(
        &self,
        storage: &str,
        account: &str,
        user_id: i64,
    ) -> Option<crate::telegram::resolve::Peer> {
        use crate::link::{TelegramAnswer, TelegramOp};
        use crate::telegram::resolve::PeerQuery;
        match self
            .telegram(
                storage,
                account,
                TelegramOp::Resolve {
                    query: PeerQuery::UserId(user_id),
                },
            )
            .await
        {
            Ok(TelegramAnswer::Peer { peer, .. }) => Some(peer),
            _ => None,
        }
    }

    /// Whether `user_id` is itself the Telegram account of a gateway (of this or another).
    async fn is_gateway_user(&self, storage: &str, account: &str, user_id: i64) -> bool {
        use crate::link::{TelegramAnswer, TelegramOp};
        match self.telegram(storage, account, TelegramOp::Accounts).await {
            Ok(TelegramAnswer::Accounts { accounts }) => accounts.iter().any(|r| {
                r.me.as_ref().is_some_and(|m| m.user_id == user_id)
                    && self.routing.gateway_of_account(&r.name).is_some()
            }),
            _ => false,
        }
    }

    /// A Telegram user calls a gateway's account: answer through a PBX connection, or refuse
    /// (the user hears busy and reads why in the chat, as with SIP.TG).
    async fn route_incoming(
        self: Arc<Self>,
        storage: String,
        account: String,
        call: grammers_tl_types::types::PhoneCallRequested,
    ) {
        use crate::gateway::incoming::{allowed, CallerInfo};
        let Some(g) = self.routing.gateway_of_account(&account) else {
            return; // not a gateway's account
        };
        let caller_id = call.admin_id;
        let peer = self.user_peer(&storage, &account, caller_id).await;
        if !allowed(&g, caller_id, peer.as_ref()) {
            tracing::info!(gateway = %g.name, caller = caller_id, "caller not in allowed_callers: not answered");
            return;
        }
        // A caller who is itself a gateway account (of this or another gateway).
        if self.is_gateway_user(&storage, &account, caller_id).await {
            return self
                .refuse_incoming(
                    &storage,
                    &account,
                    &call,
                    peer.as_ref(),
                    482,
                    reasons::CALLER_HAS_GATEWAY,
                )
                .await;
        }
        // The plan: disallowed settings, then the month's talk time.
        if self.routing.disallowed(&g, None) {
            return self
                .refuse_incoming(
                    &storage,
                    &account,
                    &call,
                    peer.as_ref(),
                    402,
                    reasons::DISALLOWED_SETTINGS,
                )
                .await;
        }
        let talk_budget = match self.routing.admit(&g, false) {
            Ok(b) => b,
            Err(r) => {
                return self
                    .refuse_incoming(&storage, &account, &call, peer.as_ref(), r.code, r.reason)
                    .await
            }
        };
        let info = CallerInfo {
            user_id: caller_id,
            peer: peer.as_ref(),
        };
        let number = g.pbx_number.clone().unwrap_or_else(|| "s".into());
        // Priority hunting: every rung's reachable PBXs (the Worker rings a rung in parallel
        // and moves on when all of it failed). A registered PBX's Worker carries the call.
        let (rungs, worker) = self.hunt_rungs(&g, &number);
        if rungs.is_empty() {
            tracing::info!(gateway = %g.name, "no PBX connection reachable for a Telegram call");
            return self
                .refuse_incoming(
                    &storage,
                    &account,
                    &call,
                    peer.as_ref(),
                    503,
                    reasons::SIP_ACCOUNT_UNAVAILABLE,
                )
                .await;
        }
        // Only Workers the plan allows may carry the call.
        let workers: Vec<_> = self
            .worker_links()
            .into_iter()
            .filter(|(n, _)| g.allowed_workers.is_empty() || g.allowed_workers.contains(n))
            .collect();
        let link = worker
            .and_then(|w| {
                workers
                    .iter()
                    .find(|(n, _)| *n == w)
                    .map(|(_, l)| l.clone())
            })
            .or_else(|| workers.first().map(|(_, l)| l.clone()));
        let Some(link) = link else {
            return self
                .refuse_incoming(
                    &storage,
                    &account,
                    &call,
                    peer.as_ref(),
                    503,
                    reasons::WORKER_UNAVAILABLE,
                )
                .await;
        };
        let dtmf = g
            .connections
            .first()
            .and_then(|n| {
                self.routing
                    .connections()
                    .iter()
                    .find(|c| &c.name == n)
                    .cloned()
            })
            .map(|c| c.dtmf.clone())
            .unwrap_or_default();
        use base64::Engine;
        use grammers_tl_types::Serializable;
        let plan: Vec<Vec<String>> = rungs
            .iter()
            .map(|r| r.iter().map(|t| t.connection.clone()).collect())
            .collect();
        let incoming = crate::link::IncomingCall {
            gateway: g.name.clone(),
            storage: storage.clone(),
            account: account.clone(),
            call: base64::engine::general_purpose::STANDARD.encode(call.to_bytes()),
            from_user: info
                .render(&g.caller_id)
                .unwrap_or_else(|| caller_id.to_string()),
            from_name: info.render(&g.caller_name),
            headers: info.headers(),
            dtmf,
            talk_budget_ms: talk_budget.map(|b| u64::try_from(b.as_millis()).unwrap_or(u64::MAX)),
            rungs,
            messages: g.messages,
            keypad_bot: g.keypad_bot.clone(),
        };
        tracing::info!(gateway = %g.name, caller = caller_id, rungs = ?plan, "Telegram call to the PBX");
        match link
            .request(
                LinkRequest::GatewayIncoming(Box::new(incoming)),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(LinkResponse::Done) => {}
            other => {
                tracing::warn!(?other, "worker did not take the Telegram call");
                self.refuse_incoming(
                    &storage,
                    &account,
                    &call,
                    peer.as_ref(),
                    503,
                    reasons::WORKER_UNAVAILABLE,
                )
                .await;
            }
        }
    }

    /// A Telegram user's text to gateway account `account`: a SIP `MESSAGE` to the PBX, through
    /// the Worker and to the PBXs a call would take (the "Number on the PBX", the connections
    /// by priority), from the Caller ID and name a call would show. Left alone when the
    /// gateway's messages are off or it is disabled, the sender is not an allowed caller, or
    /// the sender is a gateway account (two gateways must not talk in a loop).
    async fn route_text(
        self: Arc<Self>,
        storage: String,
        account: String,
        user_id: i64,
        text: String,
    ) {
        use crate::gateway::incoming::{allowed, CallerInfo};
        let Some(g) = self.routing.gateway_of_account(&account) else {
            return; // not a gateway's account
        };
        if !g.enabled || !g.messages {
            tracing::info!(gateway = %g.name, user = user_id, "text message left alone: the gateway's messages are off");
            return;
        }
        let peer = self.user_peer(&storage, &account, user_id).await;
        if !allowed(&g, user_id, peer.as_ref()) {
            tracing::info!(gateway = %g.name, user = user_id, "text message from outside allowed_callers: not forwarded");
            return;
        }
        if self.is_gateway_user(&storage, &account, user_id).await {
            tracing::info!(gateway = %g.name, user = user_id, "text message from a gateway account: not forwarded");
            return;
        }
        let notify = |code: u16, reason: &'static str| {
            let (me, storage, account, peer, gateway) = (
                self.clone(),
                storage.clone(),
                account.clone(),
                peer.clone(),
                g.name.clone(),
            );
            async move {
                tracing::info!(%gateway, user = user_id, code, reason, "text message not delivered");
                let may = me.notices.lock().unwrap_or_else(|p| p.into_inner()).allow(
                    &account,
                    user_id,
                    std::time::Instant::now(),
                );
                if let (Some(p), true) = (peer, may) {
                    let notice = crate::gateway::messages::not_delivered(code, reason);
                    let _ = me
                        .invoke(
                            &storage,
                            &account,
                            &crate::gateway::text_message(&p, &notice),
                        )
                        .await;
                }
            }
        };
        let number = g.pbx_number.clone().unwrap_or_else(|| "s".into());
        let (rungs, worker) = self.hunt_rungs(&g, &number);
        let targets: Vec<crate::link::HuntTarget> = rungs.into_iter().flatten().collect();
        if targets.is_empty() {
            return notify(503, reasons::SIP_ACCOUNT_UNAVAILABLE).await;
        }
        let workers: Vec<_> = self
            .worker_links()
            .into_iter()
            .filter(|(n, _)| g.allowed_workers.is_empty() || g.allowed_workers.contains(n))
            .collect();
        let link = worker
            .and_then(|w| {
                workers
                    .iter()
                    .find(|(n, _)| *n == w)
                    .map(|(_, l)| l.clone())
            })
            .or_else(|| workers.first().map(|(_, l)| l.clone()));
        let Some(link) = link else {
            return notify(503, reasons::WORKER_UNAVAILABLE).await;
        };
        let info = CallerInfo {
            user_id,
            peer: peer.as_ref(),
        };
        let message = crate::link::GatewayMessage {
            gateway: g.name.clone(),
            storage: storage.clone(),
            account: account.clone(),
            user_id,
            peer: peer.clone(),
            text,
            targets,
            from_user: info
                .render(&g.caller_id)
                .unwrap_or_else(|| user_id.to_string()),
            from_name: info.render(&g.caller_name),
            headers: info.headers(),
        };
        match link
            .request(
                LinkRequest::GatewayMessage(Box::new(message)),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(LinkResponse::Done) => {}
            other => {
                tracing::warn!(?other, "worker did not take a text message");
                notify(503, reasons::WORKER_UNAVAILABLE).await;
            }
        }
    }

    /// The hunt for a call to `number` on `g`'s connections: its rungs (lowest `priority`
    /// first; only reachable PBXs: registered ones, and trunks with a literal address; empty
    /// rungs dropped) and the Worker that carries the call: the one holding the first
    /// registration met, or the first connection's pinned `worker`.
    fn hunt_rungs(
        &self,
        g: &crate::config::GatewayConfig,
        number: &str,
    ) -> (Vec<Vec<crate::link::HuntTarget>>, Option<String>) {
        use crate::gateway::incoming::rungs;
        let now = std::time::SystemTime::now();
        let registrar = self
            .routing
            .registrar
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut worker = None;
        let mut out = Vec::new();
        let conns = self.routing.connections();
        for rung in rungs(g, &conns) {
            let mut targets = Vec::new();
            for c in rung {
                let t = match c.kind {
                    ConnectionKind::PbxRegisters => registrar.binding(&c.name, now).map(|b| {
                        let host = crate::sip::message::uri_host_port(&b.contact)
                            .unwrap_or_else(|| b.source.to_string());
                        worker.get_or_insert_with(|| b.worker.clone());
                        (format!("sip:{number}@{host}"), b.source)
                    }),
                    ConnectionKind::Ip | ConnectionKind::RegisterToPbx => c
                        .proxy
                        .as_deref()
                        .or(c.server.as_deref())
                        .and_then(|s| s.trim().parse::<std::net::SocketAddr>().ok())
                        .map(|addr| {
                            let domain = c.domain.clone().unwrap_or_else(|| addr.to_string());
                            (format!("sip:{number}@{domain}"), addr)
                        }),
                };
                if let Some((request_uri, address)) = t {
                    if let Some(w) = &c.worker {
                        worker.get_or_insert_with(|| w.clone());
                    }
                    targets.push(crate::link::HuntTarget {
                        request_uri,
                        address,
                        connection: c.name.clone(),
                        codecs: c.codecs.clone(),
                    });
                }
            }
            if !targets.is_empty() {
                out.push(targets);
            }
        }
        (out, worker)
    }

    /// Declines a Telegram user's call (busy) and tells them why in the chat.
    async fn refuse_incoming(
        &self,
        storage: &str,
        account: &str,
        call: &grammers_tl_types::types::PhoneCallRequested,
        peer: Option<&crate::telegram::resolve::Peer>,
        code: u16,
        reason: &str,
    ) {
        use grammers_tl_types as tl;
        tracing::info!(
            caller = call.admin_id,
            code,
            reason,
            "Telegram call refused"
        );
        let peer_call = tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
            id: call.id,
            access_hash: call.access_hash,
        });
        let _ = self
            .invoke(
                storage,
                account,
                &tl::functions::phone::DiscardCall {
                    video: false,
                    peer: peer_call,
                    duration: 0,
                    reason: tl::enums::PhoneCallDiscardReason::Busy,
                    connection_id: 0,
                },
            )
            .await;
        if let Some(p) = peer {
            let _ = self
                .invoke(
                    storage,
                    account,
                    &crate::gateway::text_message(p, &format!("{code} {reason}")),
                )
                .await;
        }
    }

    /// Answers the questions of Worker or Storage `peer`.
    fn handler(self: &Arc<Self>, peer: &str) -> Handler {
        let metrics = self.metrics.clone();
        let routing = self.routing.clone();
        let updates = self.telegram_updates.clone();
        let peer = peer.to_string();
        let me = Arc::downgrade(self);
        Arc::new(move |req| {
            let metrics = metrics.clone();
            let routing = routing.clone();
            let updates = updates.clone();
            let peer = peer.clone();
            let me = me.clone();
            Box::pin(async move {
                match req {
                    LinkRequest::Telegram(r) => {
                        // A Worker's Telegram request, for the Storage it names.
                        let Some(me) = me.upgrade() else {
                            return LinkResponse::Error {
                                message: "manager stopping".into(),
                            };
                        };
                        let storage = r.storage.clone().or_else(|| {
                            routing
                                .default_storage
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone()
                        });
                        let result = match storage {
                            Some(s) => me.telegram(&s, &r.account, r.op).await,
                            None => Err(crate::telegram::TgError::transport(
                                "no session storage configured",
                            )),
                        };
                        LinkResponse::Telegram { result }
                    }
                    LinkRequest::TelegramUpdate { account, update } => {
                        let raw = update.clone();
                        use base64::Engine;
                        use grammers_tl_types::Deserializable;
                        let decoded = base64::engine::general_purpose::STANDARD
                            .decode(update.as_bytes())
                            .ok()
                            .and_then(|b| grammers_tl_types::enums::Update::from_bytes(&b).ok());
                        match decoded {
                            Some(update) => {
                                if let Some(me) = me.upgrade() {
                                    me.on_storage_update(&peer, &account, &raw, &update);
                                }
                                let _ = updates.send(StorageUpdate {
                                    storage: peer.clone(),
                                    account,
                                    update,
                                });
                                LinkResponse::Done
                            }
                            None => LinkResponse::Error {
                                message: "undecodable Telegram update".into(),
                            },
                        }
                    }
                    LinkRequest::CallEnded(report) => {
                        if let Some(me) = me.upgrade() {
                            me.call_ended(&peer, &report).await;
                        }
                        LinkResponse::Done
                    }
                    LinkRequest::CallAnswered { gateway, call } => {
                        if let Some(me) = me.upgrade() {
                            me.routing.call_answered(&peer, &gateway, call);
                            me.send_talk_shares(&gateway);
                        }
                        LinkResponse::Done
                    }
                    LinkRequest::Route(q) => {
                        let mut answer = routing.route(&q, &peer);
                        // The account's call settings concern calls, not messages.
                        let is_call = q.method == "INVITE";
                        if let (LinkResponse::Gateway(g), Some(me), true) =
                            (&answer, me.upgrade(), is_call)
                        {
                            if me.callback_restricted(&g.storage, &g.account).await {
                                answer = LinkResponse::Route {
                                    code: 380,
                                    reason: reasons::CALLBACK_RESTRICTED.into(),
                                    headers: Vec::new(),
                                };
                            }
                        }
                        let decision = match &answer {
                            LinkResponse::Route { code, .. } => code.to_string(),
                            _ => "forward".to_string(),
                        };
                        metrics.inc("siptg_route_decisions_total", &[("code", &decision)]);
                        answer
                    }
                    other => LinkResponse::Error {
                        message: format!("a manager does not answer {other:?}"),
                    },
                }
            })
        })
    }

    /// Link state of every configured peer.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers()
            .iter()
            .map(|(name, p)| PeerStatus {
                name: name.clone(),
                role: p.role,
                address: p.address.clone(),
                state: if p.link.as_ref().is_some_and(LinkHandle::is_up) {
                    "up"
                } else {
                    "down"
                },
                link: p.link.as_ref().filter(|l| l.is_up()).map(link_status),
                down_for_s: p.down_since.map(|t| t.elapsed().as_secs()),
                last_error: p.last_error.clone(),
                connects: p.connects,
            })
            .collect()
    }

    /// Asks every linked peer for its status (for `siptg status` on a Manager host).
    pub async fn remote_status(&self) -> BTreeMap<String, serde_json::Value> {
        let links: Vec<(String, LinkHandle)> = self
            .peers()
            .iter()
            .filter_map(|(n, p)| {
                p.link
                    .clone()
                    .filter(LinkHandle::is_up)
                    .map(|l| (n.clone(), l))
            })
            .collect();
        let mut out = BTreeMap::new();
        for (name, l) in links {
            let v = match l.request(LinkRequest::Status, Duration::from_secs(2)).await {
                Ok(LinkResponse::Status { status }) => status,
                Ok(other) => serde_json::json!({"error": format!("{other:?}")}),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            };
            out.insert(name, v);
        }
        out
    }
}

/// The routing decision for a Worker's request. No SIP connection is configured on this Manager
/// yet, so every request is answered `404 Route not found` — SIP.TG's answer for an unknown route.
pub fn route(q: &RouteQuery) -> (u16, String) {
    tracing::info!(
        method = %q.method,
        uri = %q.request_uri,
        from = ?q.from_user,
        to = ?q.to_user,
        source = %q.source,
        "no connection matches; 404"
    );
    (404, reasons::ROUTE_NOT_FOUND.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest;

    fn conn(login: &str) -> ConnectionConfig {
        ConnectionConfig {
            name: login.into(),
            kind: ConnectionKind::PbxRegisters,
            login: Some(login.into()),
            password: Some(format!("{login}-password")),
            trusted_ips: vec!["127.0.0.0/8".into()],
            server: None,
            domain: None,
            proxy: None,
            expires: 3600,
            header: None,
            codecs: vec!["PCMA".into()],
            digest: vec!["MD5".into()],
            keepalive: std::time::Duration::from_secs(30),
            transport: Default::default(),
            tls_ca: None,
            tls_verify: true,
            dial_rules: Vec::new(),
            priority: 1,
            dtmf: vec!["rfc2833".into()],
            worker: None,
        }
    }

    fn query(method: &str, from: &str, to: &str, auth: Option<String>) -> RouteQuery {
        RouteQuery {
            method: method.into(),
            request_uri: format!("sip:{to}@127.0.0.1"),
            from_user: Some(from.into()),
            to_user: Some(to.into()),
            source: "127.0.0.1:5070".parse().unwrap(),
            authorization: auth,
            contact: Some(format!("<sip:{from}@127.0.0.1:5070>")),
            expires: Some(600),
            headers: Vec::new(),
        }
    }

    fn register(r: &Routing, login: &str) {
        let LinkResponse::Route { headers, .. } =
            r.route(&query("REGISTER", login, login, None), "w1")
        else {
            panic!("no challenge");
        };
        let auth = digest::respond(
            &headers[0].1,
            "REGISTER",
            "sip:127.0.0.1",
            login,
            &format!("{login}-password"),
            digest::new_cnonce,
            1,
        )
        .unwrap();
        let got = r.route(&query("REGISTER", login, login, Some(auth)), "w1");
        assert!(
            matches!(got, LinkResponse::Route { code: 200, .. }),
            "{got:?}"
        );
    }

    #[test]
    fn invites_need_registration_and_go_to_the_registered_pbx() {
        let r = Routing::new(vec![conn("alice"), conn("bob")], "siptg");
        let got = r.route(&query("INVITE", "alice", "bob", None), "w1");
        assert!(
            matches!(&got, LinkResponse::Route { code: 405, reason, .. } if reason == "REGISTER is required first"),
            "{got:?}"
        );
        register(&r, "alice");
        let got = r.route(&query("INVITE", "alice", "bob", None), "w1");
        assert!(
            matches!(got, LinkResponse::Route { code: 480, .. }),
            "{got:?}"
        );
        register(&r, "bob");
        let got = r.route(&query("INVITE", "alice", "bob", None), "w1");
        assert_eq!(
            got,
            LinkResponse::Forward {
                connection: "bob".into(),
                contact: "<sip:bob@127.0.0.1:5070>".into(),
                address: "127.0.0.1:5070".parse().unwrap(),
                codecs: vec!["PCMA".into()],
            }
        );
        let got = r.route(&query("INVITE", "alice", "+15550001", None), "w1");
        assert!(
            matches!(&got, LinkResponse::Route { code: 404, reason, .. } if reason == "Route not found"),
            "{got:?}"
        );
    }

    #[test]
    fn invites_from_unknown_sources_are_refused_and_ip_trunks_match_by_address_and_header() {
        let mut trunk = conn("trunk");
        trunk.kind = ConnectionKind::Ip;
        trunk.login = None;
        trunk.trusted_ips = vec![];
        trunk.server = Some("127.0.0.9:5060".into());
        trunk.header = Some("X-Line: trunk-a".into());
        let r = Routing::new(vec![conn("bob"), trunk], "siptg");
        register(&r, "bob");
        // A stranger cannot reach bob through the B2BUA.
        let mut q = query("INVITE", "mallory", "bob", None);
        q.source = "127.0.0.7:5060".parse().unwrap();
        let got = r.route(&q, "w1");
        assert!(
            matches!(&got, LinkResponse::Route { code: 404, .. }),
            "{got:?}"
        );
        // The trunk's address without its header is not the trunk.
        q.source = "127.0.0.9:5060".parse().unwrap();
        let got = r.route(&q, "w1");
        assert!(
            matches!(&got, LinkResponse::Route { code: 404, .. }),
            "{got:?}"
        );
        q.headers = vec![("X-Line".into(), " trunk-a".into())];
        let got = r.route(&q, "w1");
        assert!(matches!(got, LinkResponse::Forward { .. }), "{got:?}");
    }

    #[test]
    fn a_pbx_we_register_to_may_call_us_from_its_address() {
        let mut pbx = conn("asterisk");
        pbx.kind = ConnectionKind::RegisterToPbx;
        pbx.trusted_ips = vec![];
        pbx.server = Some("127.0.0.8:5060".into());
        let r = Routing::new(vec![conn("bob"), pbx], "siptg");
        register(&r, "bob");
        let mut q = query("INVITE", "someone", "bob", None);
        q.source = "127.0.0.8:5060".parse().unwrap();
        let got = r.route(&q, "w1");
        assert!(matches!(got, LinkResponse::Forward { .. }), "{got:?}");
        q.source = "127.0.0.18:5060".parse().unwrap();
        let got = r.route(&q, "w1");
        assert!(
            matches!(&got, LinkResponse::Route { code: 404, .. }),
            "{got:?}"
        );
    }

    /// Kamailio on the same host as a registered phone: the exact address picks the PBX we
    /// register to (its codecs), and the dialled login comes from the Request-URI when To
    /// names our AOR at the PBX.
    #[test]
    fn a_call_from_the_pbx_we_register_to_reaches_the_dialled_phone() {
        let mut pbx = conn("kamailio");
        pbx.kind = ConnectionKind::RegisterToPbx;
        pbx.login = Some("gateway".into());
        pbx.trusted_ips = vec![];
        pbx.server = Some("127.0.0.1:5090".into());
        pbx.codecs = vec!["PCMU".into()];
        let r = Routing::new(vec![conn("bob"), pbx], "siptg");
        register(&r, "bob");
        let mut q = query("INVITE", "carol", "gateway", None);
        q.source = "127.0.0.1:5090".parse().unwrap();
        q.request_uri = "sip:bob@127.0.0.1:5060".into();
        let got = r.route(&q, "w1");
        assert_eq!(
            got,
            LinkResponse::Forward {
                connection: "bob".into(),
                contact: "<sip:bob@127.0.0.1:5070>".into(),
                address: "127.0.0.1:5070".parse().unwrap(),
                codecs: vec!["PCMU".into()],
            }
        );
        // Nobody dialled: our own AOR in both is no route.
        q.request_uri = "sip:gateway@127.0.0.1:5060".into();
        let got = r.route(&q, "w1");
        assert!(
            matches!(&got, LinkResponse::Route { code: 404, .. }),
            "{got:?}"
        );
    }
}

#[cfg(test)]
mod text_tests {
    use super::private_text;
    use grammers_tl_types as tl;

    fn update(m: tl::enums::Message) -> tl::enums::Update {
        tl::enums::Update::NewMessage(tl::types::UpdateNewMessage {
            message: m,
            pts: 1,
            pts_count: 1,
        })
    }

    fn text(from: i64) -> tl::types::Message {
        match crate::tgsim::world::text_message(1, from, 1, 0, "hello") {
            tl::enums::Message::Message(m) => m,
            _ => unreachable!("text_message makes a Message"),
        }
    }

    #[test]
    fn only_a_users_private_incoming_text_is_forwarded() {
        let m = text(2);
        assert_eq!(
            private_text(&update(tl::enums::Message::Message(m.clone()))),
            Some((2, "hello".into()))
        );
        // Telegram may leave `from_id` out in a private chat.
        let mut bare = m.clone();
        bare.from_id = None;
        assert_eq!(
            private_text(&update(tl::enums::Message::Message(bare))),
            Some((2, "hello".into()))
        );
        // The account's own message from another device.
        let mut out = m.clone();
        out.out = true;
        assert_eq!(
            private_text(&update(tl::enums::Message::Message(out))),
            None
        );
        // A group's message.
        let mut group = m.clone();
        group.peer_id = tl::enums::Peer::Chat(tl::types::PeerChat { chat_id: 9 });
        assert_eq!(
            private_text(&update(tl::enums::Message::Message(group))),
            None
        );
        // Media without a caption.
        let mut empty = m;
        empty.message = String::new();
        assert_eq!(
            private_text(&update(tl::enums::Message::Message(empty))),
            None
        );
        // Not a message at all.
        assert_eq!(private_text(&tl::enums::Update::LoginToken), None);
    }
}
