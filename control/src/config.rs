//! The one TOML configuration file: typed sections, environment overrides, validation whose
//! every error names the key and the line.
//!
//! Loading goes text → TOML table → environment overrides → typed [`Config`] (type errors carry
//! the key path) → semantic checks (ranges, cores present, credentials). Spans come from
//! `toml_edit`, so each message points at the line an operator has to fix.

use serde::{de, Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The commented example shipped in the repository; `siptg up` uses it when given no file.
pub const EXAMPLE: &str = include_str!("../../config/siptg.example.toml");

/// Prefix of environment variables that override keys: `SIPTG__SECTION__KEY=value`.
pub const ENV_PREFIX: &str = "SIPTG__";

/// A whole siptg configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub manager: Option<ManagerConfig>,
    pub worker: Option<WorkerConfig>,
    pub storage: Option<StorageConfig>,
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub dataplane: DataplaneSection,
    #[serde(default)]
    pub sip: SipConfig,
    #[serde(default)]
    pub telegram: TelegramConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    /// SIP connections ("lines") to PBXs; the Manager routes and authenticates by them.
    #[serde(default)]
    pub connection: Vec<ConnectionConfig>,
    /// Gateways: a Telegram account joined to SIP connections.
    #[serde(default)]
    pub gateway: Vec<GatewayConfig>,
}

/// A gateway (SIP.TG's "Gateway" session): one Telegram account of a Session Storage, the SIP
/// connections its calls use, and how calls are placed and presented.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Unique name.
    pub name: String,
    /// The Telegram account (its name in the Session Storage, `siptg storage list`).
    pub account: String,
    /// The Session Storage holding the account (default: the Manager's only one).
    #[serde(default)]
    pub storage: Option<String>,
    /// The SIP connections (`[[connection]]` names): calls from them go to Telegram, calls
    /// from Telegram go to them (by `priority`).
    pub connections: Vec<String>,
    /// "Number on the PBX": where a Telegram user's call goes.
    #[serde(default)]
    pub pbx_number: Option<String>,
    /// Telegram users whose calls the gateway answers (`+phone`, `@username`, `id:N`); empty
    /// means everybody.
    #[serde(default)]
    pub allowed_callers: Vec<String>,
    /// Caller ID templates for calls to the PBX; the first whose placeholders are all known
    /// wins (`{phone}`, `{username}`, `{userid}`).
    #[serde(default = "default_caller_id")]
    pub caller_id: Vec<String>,
    /// Caller name templates (`{name}`, `{name_ascii}`, and the caller ID placeholders).
    #[serde(default = "default_caller_name")]
    pub caller_name: Vec<String>,
    /// Concurrent calls.
    #[serde(default = "default_lines")]
    pub lines: u32,
    /// Longest call; 0 = unlimited.
    #[serde(
        default,
        deserialize_with = "duration_or_zero",
        serialize_with = "duration_text"
    )]
    pub max_call_duration: Duration,
    /// Talk time of all the gateway's calls (both directions) per calendar month in UTC;
    /// 0 = unlimited. When it is used up new calls get `402 Total calls duration is
    /// exceeded` and calls in progress end when it runs out (SIP.TG's plan limit, kept in the
    /// Manager's database across restarts). Seconds-granular (`"30m"`, `"90s"`).
    #[serde(
        default,
        deserialize_with = "month_duration",
        serialize_with = "duration_text"
    )]
    pub monthly_duration: Duration,
    /// Calls to Telegram that may fail (not answered for a Telegram-side reason) within a
    /// rolling hour before new calls get `402 Amount of fail calls is exceeded`; 0 =
    /// unlimited. Unanswered calls draw Telegram's spam bans, hence the limit.
    #[serde(default)]
    pub failed_calls_per_hour: u32,
    /// The Workers this gateway's plan allows its connections to use; empty = any. A call on a
    /// connection pinned (`worker`) to another Worker, or served by one, gets `402 SIP account
    /// has disallowed settings` (SIP.TG keeps such settings and refuses the calls).
    #[serde(default)]
    pub allowed_workers: Vec<String>,
    /// Telegram text messages ⇄ SIP MESSAGE (RFC 3428): a Telegram user's private text to the
    /// account goes to the PBX like a call would (`pbx_number`, the connections by priority,
    /// Caller ID templates, `allowed_callers`), and a PBX's MESSAGE goes to the Telegram user
    /// its Request-URI names. Off: MESSAGE gets `403 Messages are disabled` and texts stay in
    /// Telegram (a switched-off feature answers rather than drops).
    #[serde(default = "default_true")]
    pub messages: bool,
    /// The keypad bot: the name of a bot account in the same Session Storage (`siptg account
    /// login NAME --bot-token …`). During every answered call the gateway's account puts an
    /// inline keypad made by this bot into the chat (a user account cannot attach buttons
    /// itself); a press is DTMF to the PBX like a typed digit. None: digits are typed only.
    #[serde(default)]
    pub keypad_bot: Option<String>,
    /// A disabled gateway refuses its calls (`403 Route is not permitted`).
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_priority() -> u32 {
    1
}
fn default_dtmf() -> Vec<String> {
    vec!["rfc2833".into(), "info".into()]
}

fn default_caller_id() -> Vec<String> {
    vec!["+{phone}".into(), "{userid}".into()]
}
fn default_caller_name() -> Vec<String> {
    vec!["{name}".into(), "@{username}".into()]
}
fn default_lines() -> u32 {
    10
}

fn duration_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d)
}

/// Writes a duration the way the config reads it (`"90s"`).
fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs()))
}

/// A SIP connection between a PBX and the gateway, of one of SIP.TG's three kinds.
/// Serialized as the config reads it: the control API keeps connections in the database and
/// the Manager sends them to its Workers.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Unique name (logs, metrics, routing).
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ConnectionKind,
    /// `pbx_registers`: the login the PBX registers with; `register_to_pbx`: ours at the PBX.
    #[serde(default)]
    pub login: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// `pbx_registers` and `ip`: addresses or CIDR blocks requests may come from; empty = any
    /// (for `pbx_registers` only: an IP trunk is always matched by its address).
    #[serde(default)]
    pub trusted_ips: Vec<String>,
    /// `register_to_pbx`: the PBX registrar (`host[:port]`); `ip`: the PBX address.
    #[serde(default)]
    pub server: Option<String>,
    /// `register_to_pbx`: the SIP domain of our AOR (default: the server's host).
    #[serde(default)]
    pub domain: Option<String>,
    /// `register_to_pbx`: an outbound proxy (`host[:port]`) to send through.
    #[serde(default)]
    pub proxy: Option<String>,
    /// `register_to_pbx`: registration lifetime we ask for, seconds.
    #[serde(default = "default_expires")]
    pub expires: u32,
    /// `ip`: an extra header `Name: Value` that tells several connections between the same
    /// hosts apart.
    #[serde(default)]
    pub header: Option<String>,
    /// Audio codecs offered and accepted, in preference order.
    #[serde(default = "default_codecs")]
    pub codecs: Vec<String>,
    /// `pbx_registers`: digest algorithms challenged with, in order of preference ("MD5",
    /// "SHA-256"). MD5 alone by default: many deployed UAs (baresip 1.0, older Asterisk) give up
    /// on a REGISTER whose challenges include any algorithm they do not know.
    #[serde(default = "default_digest")]
    pub digest: Vec<String>,
    /// `ip` and `register_to_pbx`: how often an OPTIONS checks that the PBX answers (any
    /// response means up); `"0s"` turns it off.
    #[serde(
        default = "default_keepalive",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub keepalive: Duration,
    /// `register_to_pbx`: `"udp"` (default) or `"tls"` (REGISTERs over a TLS connection to
    /// `server`/`proxy`, usually port 5061).
    #[serde(default)]
    pub transport: RegisterTransport,
    /// `register_to_pbx` over TLS: PEM CA file the PBX's certificate must chain to (default:
    /// the system trust store).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// `register_to_pbx` over TLS: `false` accepts any certificate (lab PBXs with self-signed
    /// ones; encrypted but not authenticated).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Dial rules applied to the number a PBX dials (SIP.TG's "Dial Rules": `left=right`
    /// regex rewrites in order, filters without `=`).
    #[serde(default)]
    pub dial_rules: Vec<String>,
    /// Telegram → PBX hunting: lower rings first, equal ones ring together.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// DTMF methods towards this PBX, in order: `rfc2833` (RFC 4733), `info`.
    #[serde(default = "default_dtmf")]
    pub dtmf: Vec<String>,
    /// The Worker that serves this connection (its node name); any Worker when unset.
    #[serde(default)]
    pub worker: Option<String>,
}

/// How REGISTERs reach a PBX.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterTransport {
    #[default]
    Udp,
    Tls,
}

fn default_true() -> bool {
    true
}

fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}

fn default_digest() -> Vec<String> {
    vec!["MD5".into()]
}

/// The three kinds of SIP.TG connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    /// PBX → gateway: the PBX registers to the Worker with a login and password.
    PbxRegisters,
    /// Gateway → PBX: the Worker registers to the PBX as a client.
    RegisterToPbx,
    /// IP ⇿ IP: no registration; matched by source address (and an optional header).
    Ip,
}

fn default_expires() -> u32 {
    3600
}

fn default_codecs() -> Vec<String> {
    ["PCMA", "PCMU", "opus", "G722"].map(String::from).to_vec()
}

/// Codec names a connection may list.
pub const KNOWN_CODECS: &[&str] = &["opus", "PCMA", "PCMU", "G722"];

/// Where this node keeps its state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("var")
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_level")]
    pub level: String,
    /// Per-module levels: `tracing` target → level.
    #[serde(default)]
    pub modules: BTreeMap<String, String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: default_level(),
            modules: BTreeMap::new(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

/// Human-readable or one JSON object per line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// The admin HTTP endpoint (metrics and status).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9600))
}

/// A peer the Manager dials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    /// Node name; must be in the peer's certificate.
    pub name: String,
    pub address: String,
}

/// The Manager role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// This Manager's node name (its certificate's name on TLS links).
    #[serde(default = "default_manager_name")]
    pub name: String,
    #[serde(default = "default_heartbeat", deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    #[serde(default = "default_link_timeout", deserialize_with = "duration")]
    pub link_timeout: Duration,
    #[serde(default)]
    pub workers: Vec<PeerAddr>,
    #[serde(default)]
    pub storages: Vec<PeerAddr>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            name: default_manager_name(),
            heartbeat_interval: default_heartbeat(),
            link_timeout: default_link_timeout(),
            workers: Vec::new(),
            storages: Vec::new(),
        }
    }
}

fn default_manager_name() -> String {
    "manager-1".into()
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}
fn default_link_timeout() -> Duration {
    Duration::from_secs(6)
}

/// The Worker role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    #[serde(default = "default_worker_name")]
    pub name: String,
    #[serde(default = "default_worker_link")]
    pub link_listen: SocketAddr,
    #[serde(default = "default_manager_timeout", deserialize_with = "duration")]
    pub manager_timeout: Duration,
    /// How long media sessions found on the dataplane after a control restart wait to be claimed
    /// by a call before they are deleted.
    #[serde(default = "default_orphan_grace", deserialize_with = "duration")]
    pub orphan_grace: Duration,
    /// Manager names (certificate CNs) allowed to link; empty allows any Manager from the CA.
    #[serde(default)]
    pub managers: Vec<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: default_worker_name(),
            link_listen: default_worker_link(),
            manager_timeout: default_manager_timeout(),
            orphan_grace: default_orphan_grace(),
            managers: Vec::new(),
        }
    }
}

fn default_worker_name() -> String {
    "worker-1".into()
}
fn default_worker_link() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50001))
}
fn default_orphan_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_manager_timeout() -> Duration {
    Duration::from_secs(2)
}

/// The Session Storage role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "default_storage_name")]
    pub name: String,
    #[serde(default = "default_storage_link")]
    pub link_listen: SocketAddr,
    /// Manager names (certificate CNs) allowed to link; empty allows any Manager from the CA.
    #[serde(default)]
    pub managers: Vec<String>,
    /// The file with the key that seals MTProto sessions at rest (64 hex digits; created with
    /// a random key if missing). `SIPTG_STORAGE_KEY` overrides it.
    #[serde(default = "default_storage_key_file")]
    pub key_file: PathBuf,
    /// A request Telegram has not answered after this gets `408 Timeout of waiting RPC result`.
    #[serde(default = "default_rpc_timeout", deserialize_with = "duration")]
    pub rpc_timeout: Duration,
    /// How long PEER_FLOOD holds back an account's calls and messages (Telegram does not say).
    #[serde(default = "default_peer_flood_hold", deserialize_with = "duration")]
    pub peer_flood_hold: Duration,
    /// Account settings applied on connect.
    #[serde(default)]
    pub hygiene: crate::telegram::account::Hygiene,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            name: default_storage_name(),
            link_listen: default_storage_link(),
            managers: Vec::new(),
            key_file: default_storage_key_file(),
            rpc_timeout: default_rpc_timeout(),
            peer_flood_hold: default_peer_flood_hold(),
            hygiene: Default::default(),
        }
    }
}

/// The environment variable that overrides `[storage] key_file`.
pub const STORAGE_KEY_ENV: &str = "SIPTG_STORAGE_KEY";

fn default_storage_key_file() -> PathBuf {
    PathBuf::from("var/storage.key")
}
fn default_rpc_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_peer_flood_hold() -> Duration {
    Duration::from_secs(3600)
}

fn default_storage_name() -> String {
    "storage-1".into()
}
fn default_storage_link() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50002))
}

/// Certificates for the mTLS links between nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The `[dataplane]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    #[serde(default)]
    pub cores: Cores,
    #[serde(default = "yes")]
    pub pin_cores: bool,
    /// Start (and restart) the dataplane process when none answers on the socket.
    #[serde(default = "yes")]
    pub spawn: bool,
    #[serde(default = "default_port_min")]
    pub rtp_port_min: u16,
    #[serde(default = "default_port_max")]
    pub rtp_port_max: u16,
    #[serde(default = "default_media_ip")]
    pub media_ip: IpAddr,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_rtp_timeout", deserialize_with = "duration")]
    pub rtp_timeout: Duration,
    #[serde(default = "default_stats_interval", deserialize_with = "duration")]
    pub stats_interval: Duration,
    /// `auto` (uring where io_uring works, else portable), `uring`, `glommio` or `portable`.
    #[serde(default)]
    pub driver: DriverSetting,
    /// Portable driver: after a wake-up with traffic, wait this long before polling again.
    #[serde(default = "default_poll_interval", deserialize_with = "duration")]
    pub poll_interval: Duration,
}

/// Which dataplane I/O driver to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverSetting {
    #[default]
    Auto,
    Uring,
    Glommio,
    Portable,
}

fn default_poll_interval() -> Duration {
    Duration::from_micros(300)
}

impl Default for DataplaneSection {
    fn default() -> Self {
        Self {
            cores: Cores::All,
            pin_cores: true,
            spawn: true,
            rtp_port_min: default_port_min(),
            rtp_port_max: default_port_max(),
            media_ip: default_media_ip(),
            socket: default_socket(),
            rtp_timeout: default_rtp_timeout(),
            stats_interval: default_stats_interval(),
            driver: DriverSetting::Auto,
            poll_interval: default_poll_interval(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_port_min() -> u16 {
    30000
}
fn default_port_max() -> u16 {
    39999
}
fn default_media_ip() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_socket() -> PathBuf {
    PathBuf::from("var/dataplane.sock")
}
fn default_rtp_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_stats_interval() -> Duration {
    Duration::from_secs(5)
}

impl DataplaneSection {
    /// The core list with `all` expanded to this machine's CPUs.
    pub fn core_list(&self) -> Vec<u16> {
        match &self.cores {
            Cores::All => available_cores(),
            Cores::List(l) => l.clone(),
        }
    }
}

/// Which CPU cores get a dataplane shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cores {
    #[default]
    All,
    List(Vec<u16>),
}

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Cores;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"all\" or a list of CPU core numbers such as [0, 1]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cores, E> {
                if v == "all" {
                    Ok(Cores::All)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Cores, A::Error> {
                let mut out = Vec::new();
                while let Some(c) = seq.next_element::<u16>()? {
                    out.push(c);
                }
                Ok(Cores::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// CPUs this process may run on.
pub fn available_cores() -> Vec<u16> {
    // SAFETY: CPU_ZERO/sched_getaffinity write only into the zeroed set we own and pass by
    // pointer with its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let cores: Vec<u16> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .map(|c| c as u16)
                .collect();
            if !cores.is_empty() {
                return cores;
            }
        }
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n as u16).collect()
}

/// The SIP edge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipConfig {
    #[serde(default = "default_sip_listen")]
    pub listen: Vec<SipListen>,
    #[serde(default = "default_user_agent")]
    pub user_agent: String,
    /// PEM certificate chain for `tls:` listeners (resolved against the config's directory).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls:` listeners.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Session timers (RFC 4028): the interval granted to a caller that supports timers
    /// without asking for one, and the longest accepted.
    #[serde(default = "default_session_expires", deserialize_with = "duration")]
    pub session_expires: Duration,
    /// The shortest session interval accepted (`Min-SE`); shorter requests get
    /// `422 Session Interval Too Small`. At least 90 s (RFC 4028).
    #[serde(default = "default_min_se", deserialize_with = "duration")]
    pub min_se: Duration,
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            listen: default_sip_listen(),
            user_agent: default_user_agent(),
            tls_cert: None,
            tls_key: None,
            session_expires: default_session_expires(),
            min_se: default_min_se(),
        }
    }
}

fn default_session_expires() -> Duration {
    Duration::from_secs(1800)
}
fn default_min_se() -> Duration {
    Duration::from_secs(90)
}

fn default_sip_listen() -> Vec<SipListen> {
    vec![SipListen {
        transport: SipTransport::Udp,
        addr: SocketAddr::from(([127, 0, 0, 1], 5060)),
    }]
}
fn default_user_agent() -> String {
    "siptg".into()
}

/// SIP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SipTransport {
    Udp,
    /// Connections framed by Content-Length (RFC 3261 §18.3).
    Tcp,
    /// TCP connections inside TLS (RFC 3261 §26), with `sip.tls_cert` and `sip.tls_key`.
    Tls,
}

/// One SIP listener, written `"udp:127.0.0.1:5060"`, `"tcp:[::1]:5060"` or
/// `"tls:0.0.0.0:5061"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipListen {
    pub transport: SipTransport,
    pub addr: SocketAddr,
}

impl<'de> Deserialize<'de> for SipListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (t, addr) = s.split_once(':').ok_or_else(|| {
            de::Error::custom(format!(
                "{s:?} is not \"transport:address:port\" (e.g. \"udp:0.0.0.0:5060\")"
            ))
        })?;
        let transport = match t {
            "udp" => SipTransport::Udp,
            "tcp" => SipTransport::Tcp,
            "tls" => SipTransport::Tls,
            other => {
                return Err(de::Error::custom(format!(
                    "unknown SIP transport {other:?}"
                )))
            }
        };
        let addr = addr
            .parse()
            .map_err(|e| de::Error::custom(format!("{addr:?} is not an address:port ({e})")))?;
        Ok(SipListen { transport, addr })
    }
}

/// How the gateway reaches Telegram.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    #[serde(default)]
    pub backend: TelegramBackend,
    pub api_id: Option<i64>,
    pub api_hash: Option<String>,
    /// backend = "sim": where the simulated cloud listens (`siptg tgsim`, or the one `siptg up`
    /// starts when `sim_embedded`).
    #[serde(default = "default_sim_address")]
    pub sim_address: SocketAddr,
    /// backend = "sim": start the simulated cloud inside `siptg up`/`siptg demo`.
    #[serde(default = "default_true")]
    pub sim_embedded: bool,
    /// The simulated cloud's users (a TOML file, see `config/tgsim.example.toml`); the
    /// built-in demo users when unset.
    #[serde(default)]
    pub sim_world: Option<PathBuf>,
    /// With the embedded simulated cloud: accounts logged in at start (account name → phone;
    /// the cloud's code is 12345; or → a bot's token `<id>:<secret>` for a bot such as a
    /// gateway's `keypad_bot`), so `siptg demo` needs no login step.
    #[serde(default)]
    pub sim_autologin: std::collections::BTreeMap<String, String>,
    /// With the embedded simulated cloud: users (phones) whose app answers every call and
    /// echoes it, and echoes text messages (the demo's Telegram user).
    #[serde(default)]
    pub sim_echo_users: Vec<String>,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            backend: TelegramBackend::Sim,
            api_id: None,
            api_hash: None,
            sim_address: default_sim_address(),
            sim_embedded: true,
            sim_world: None,
            sim_autologin: Default::default(),
            sim_echo_users: Vec::new(),
        }
    }
}

fn default_sim_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50003))
}

/// The simulated cloud or the real MTProto client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TelegramBackend {
    #[default]
    Sim,
    Mtproto,
}

/// Where shared state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default)]
    pub backend: DatabaseBackend,
    #[serde(default = "default_db_path")]
    pub path: PathBuf,
    pub url: Option<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            backend: DatabaseBackend::Redb,
            path: default_db_path(),
            url: None,
        }
    }
}

fn default_db_path() -> PathBuf {
    PathBuf::from("var/siptg.redb")
}

/// Embedded file or PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseBackend {
    #[default]
    Redb,
    Postgres,
}

/// Accepts `"300us"`, `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_up_to(s, MAX_DURATION)
}

/// A month's worth of talk time at most (31 days: `"744h"`), for `monthly_duration`.
pub fn parse_month_duration(s: &str) -> Result<Duration, String> {
    parse_duration_up_to(s, MAX_MONTH_DURATION)
}

const MAX_MONTH_DURATION: Duration = Duration::from_secs(31 * 24 * 3600);

fn month_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_month_duration(&s).map_err(de::Error::custom)
}

fn parse_duration_up_to(s: &str, max: Duration) -> Result<Duration, String> {
    let cap = |d: Duration, text: &str| cap_at(d, text, max);
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"500ms\", \"10s\", \"5m\""))?;
    let secs_per = match unit.trim() {
        "us" => return cap(Duration::from_micros(n), s),
        "ms" => return cap(Duration::from_millis(n), s),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        u => {
            return Err(format!(
                "unknown duration unit {u:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    let secs = n
        .checked_mul(secs_per)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    cap(Duration::from_secs(secs), s)
}

/// Durations in the config are at most a week; anything longer is a typo.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn cap_at(d: Duration, text: &str, max: Duration) -> Result<Duration, String> {
    if d > max {
        Err(format!(
            "{text:?} is longer than {}",
            if max == MAX_DURATION {
                "a week".to_string()
            } else {
                format!("{}h", max.as_secs() / 3600)
            }
        ))
    } else {
        Ok(d)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

/// Resolves a configured path against the config file's directory.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// One thing wrong with a config, tied to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted key path, e.g. `dataplane.cores`.
    pub key: String,
    /// 1-based line in the file, when the key is in the file.
    pub line: Option<usize>,
    /// Set when the value came from an environment variable.
    pub env: Option<String>,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "`{}`: {}", self.key, self.message)?;
        if let Some(env) = &self.env {
            write!(f, " (set by environment variable {env})")?;
        }
        Ok(())
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{source_name}: TOML syntax error: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: invalid configuration:\n{}", list(.issues))]
    Invalid {
        source_name: String,
        issues: Vec<Issue>,
    },
}

fn list(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("  {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A loaded, validated configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Directory relative paths are resolved against.
    pub base: PathBuf,
    /// File name, or `built-in example`.
    pub source_name: String,
}

impl Loaded {
    /// The state directory, absolute.
    pub fn state_dir(&self) -> PathBuf {
        resolve(&self.base, &self.config.node.state_dir)
    }

    /// A configured path, absolute.
    pub fn path(&self, p: &Path) -> PathBuf {
        resolve(&self.base, p)
    }
}

/// Loads `path`, or the built-in example when `None`, applying `SIPTG__…` overrides from `env`.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let (text, source_name, base) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?;
            let base = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            (text, p.display().to_string(), base)
        }
        None => (
            EXAMPLE.to_string(),
            "built-in example config".to_string(),
            PathBuf::from("."),
        ),
    };
    let mut config = parse(&text, &source_name, env)?;
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    // The SIP edge gets only its section, so its PEM paths are made absolute here.
    for p in [&mut config.sip.tls_cert, &mut config.sip.tls_key]
        .into_iter()
        .chain(config.connection.iter_mut().map(|c| &mut c.tls_ca))
    {
        if let Some(path) = p.as_mut() {
            *path = resolve(&base, path);
        }
    }
    Ok(Loaded {
        config,
        base,
        source_name,
    })
}

/// Parses and validates config text.
pub fn parse(
    text: &str,
    source_name: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                source_name: source_name.to_string(),
                message: e.to_string(),
            })?;
    let spans = toml_edit::ImDocument::parse(text.to_string()).ok();
    let line_of = |key: &str| spans.as_ref().and_then(|d| line_of_key(d, key));
    let overridden = apply_env(&mut table, env);
    let env_of = |key: &str| {
        overridden
            .iter()
            .find(|(k, _)| key == k || key.starts_with(&format!("{k}.")))
            .map(|(_, v)| v.clone())
    };
    let invalid = |issues: Vec<Issue>| ConfigError::Invalid {
        source_name: source_name.to_string(),
        issues,
    };
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let mut key = e.path().to_string();
            // toml appends "in `key`" on its own line; the key is reported separately.
            let message = e
                .inner()
                .to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("in `"))
                .collect::<Vec<_>>()
                .join(" ");
            if let Some(field) = unknown_field(&message) {
                if key == "." {
                    key = field;
                } else if !key.ends_with(&field) {
                    key = format!("{key}.{field}");
                }
            }
            invalid(vec![Issue {
                line: line_of(&key),
                env: env_of(&key),
                key,
                message,
            }])
        })?;
    let issues: Vec<Issue> = validate(&config)
        .into_iter()
        .map(|(key, message)| Issue {
            line: line_of(&key),
            env: env_of(&key),
            key,
            message,
        })
        .collect();
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(invalid(issues))
    }
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// 1-based line of a dotted key (array indices like `manager.workers[1].name` included).
fn line_of_key(doc: &toml_edit::ImDocument<String>, key: &str) -> Option<usize> {
    let mut item: &toml_edit::Item = doc.as_item();
    let mut span = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let next = item.get(name)?;
        span = next.span().or(span);
        item = next;
        if let Some(i) = index {
            let next = item.get(i)?;
            span = next.span().or(span);
            item = next;
        }
        if let Some(t) = item.as_table_like() {
            if let Some((k, _)) = t.get_key_value(name) {
                span = k.span().or(span);
            }
        }
    }
    let offset = span?.start;
    Some(doc.raw()[..offset].matches('\n').count() + 1)
}

/// Applies `SIPTG__SECTION__KEY=value` overrides; returns (dotted key, variable name) of each.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let mut applied = Vec::new();
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(String::is_empty) {
            continue;
        }
        // `key = <raw>` parsed as TOML gives numbers, booleans and lists their types.
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let (last, sections) = parts.split_last().expect("non-empty");
        if let Some(t) = table_at(table, sections) {
            t.insert(last.clone(), value);
            applied.push((parts.join("."), name.clone()));
        }
    }
    applied
}

/// The table at `path`, creating missing tables; `None` if a non-table is in the way.
fn table_at<'a>(t: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let Some((first, rest)) = path.split_first() else {
        return Some(t);
    };
    match t
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(inner) => table_at(inner, rest),
        _ => None,
    }
}

/// What is wrong with one connection on its own (the checks across connections — unique
/// names and logins — are the caller's): (field, message) pairs, empty when it is sound. The
/// config file and the control API check connections with this same list.
pub fn connection_problems(conn: &ConnectionConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut bad = |k: &'static str, m: String| out.push((k, m));
    if let Err(e) = crate::gateway::dialrules::DialRules::new(&conn.dial_rules) {
        bad("dial_rules", e.to_string());
    }
    for m in &conn.dtmf {
        if !["rfc2833", "info"].contains(&m.as_str()) {
            bad("dtmf", format!("{m:?}: use \"rfc2833\" or \"info\""));
        }
    }
    if conn.name.trim().is_empty() {
        bad("name", "is empty".into());
    }
    let need = |f: &'static str, v: &Option<String>| {
        v.as_deref()
            .is_none_or(|s| s.trim().is_empty())
            .then(|| (f, format!("is required for a {:?} connection", conn.kind)))
    };
    match conn.kind {
        ConnectionKind::PbxRegisters => {
            for (f, v) in [("login", &conn.login), ("password", &conn.password)] {
                if let Some((k, m)) = need(f, v) {
                    bad(k, m);
                }
            }
        }
        ConnectionKind::RegisterToPbx => {
            for (f, v) in [
                ("server", &conn.server),
                ("login", &conn.login),
                ("password", &conn.password),
            ] {
                if let Some((k, m)) = need(f, v) {
                    bad(k, m);
                }
            }
            if conn.expires < 60 {
                bad(
                    "expires",
                    format!("{} s is too short; use 60 or more", conn.expires),
                );
            }
        }
        ConnectionKind::Ip => {
            if let Some((k, m)) = need("server", &conn.server) {
                bad(k, m);
            }
            if let Some(h) = &conn.header {
                match h.split_once(':') {
                    Some((n, v))
                        if !n.trim().is_empty()
                            && !n.trim().contains(' ')
                            && !v.trim().is_empty() => {}
                    _ => bad("header", format!("{h:?} is not `Name: Value`")),
                }
            }
        }
    }
    for ip in &conn.trusted_ips {
        if let Err(e) = ip.parse::<crate::sip::cidr::Cidr>() {
            bad("trusted_ips", format!("{ip:?}: {e}"));
        }
    }
    for alg in &conn.digest {
        if crate::sip::digest::Algorithm::from_name(alg).is_none() {
            bad(
                "digest",
                format!("unknown digest algorithm {alg:?} (use \"MD5\" or \"SHA-256\")"),
            );
        }
    }
    if conn.codecs.is_empty() {
        bad("codecs", "lists no codec".into());
    }
    for codec in &conn.codecs {
        if !KNOWN_CODECS.iter().any(|k| k.eq_ignore_ascii_case(codec)) {
            bad(
                "codecs",
                format!(
                    "unknown codec {codec:?} (known: {})",
                    KNOWN_CODECS.join(", ")
                ),
            );
        }
    }
    out
}

/// Semantic checks; each finding is (dotted key, message).
fn validate(c: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |k: &str, m: String| out.push((k.to_string(), m));

    let mut gw_names = std::collections::HashSet::new();
    let mut gw_of_conn = std::collections::HashMap::new();
    // Workers a gateway's `allowed_workers` may name: the Manager's peers and this node's own.
    let mut known_workers: std::collections::BTreeSet<&str> = c
        .manager
        .iter()
        .flat_map(|m| m.workers.iter().map(|w| w.name.as_str()))
        .collect();
    let default_worker = default_worker_name();
    match &c.worker {
        Some(w) => {
            known_workers.insert(w.name.as_str());
        }
        // `siptg up` without a [worker] section runs one with the default name.
        None if known_workers.is_empty() => {
            known_workers.insert(default_worker.as_str());
        }
        None => {}
    }
    for (i, g) in c.gateway.iter().enumerate() {
        let key = |f: &str| format!("gateway[{i}].{f}");
        if g.name.trim().is_empty() || !gw_names.insert(g.name.clone()) {
            bad(
                &key("name"),
                format!("{:?} is empty or names two gateways", g.name),
            );
        }
        if g.account.trim().is_empty() {
            bad(&key("account"), "is empty".into());
        }
        if g.connections.is_empty() {
            bad(
                &key("connections"),
                "a gateway needs at least one SIP connection".into(),
            );
        }
        for name in &g.connections {
            if !c.connection.iter().any(|x| &x.name == name) {
                bad(
                    &key("connections"),
                    format!("no [[connection]] named {name:?}"),
                );
            } else if let Some(other) = gw_of_conn.insert(name.clone(), g.name.clone()) {
                bad(
                    &key("connections"),
                    format!("connection {name:?} already belongs to gateway {other:?}"),
                );
            }
        }
        if g.lines == 0 {
            bad(&key("lines"), "must be at least 1".into());
        }
        if let Some(bot) = &g.keypad_bot {
            if bot.trim().is_empty() {
                bad(
                    &key("keypad_bot"),
                    "is empty (leave it out for no keypad)".into(),
                );
            } else if bot == &g.account {
                bad(
                    &key("keypad_bot"),
                    format!("{bot:?} is the gateway's own account: name a bot account (siptg account login NAME --bot-token …)"),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for w in &g.allowed_workers {
            if !crate::tls::valid_node_name(w) {
                bad(
                    &key("allowed_workers"),
                    format!("{w:?} is not a node name (letters, digits, '-', '.')"),
                );
            } else if !seen.insert(w.as_str()) {
                bad(&key("allowed_workers"), format!("{w:?} appears twice"));
            } else if !known_workers.is_empty() && !known_workers.contains(w.as_str()) {
                bad(
                    &key("allowed_workers"),
                    format!(
                        "{w:?} is not a Worker of this configuration (known: {})",
                        known_workers.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }

    let mut names = std::collections::HashSet::new();
    let mut logins = std::collections::HashSet::new();
    for (i, conn) in c.connection.iter().enumerate() {
        let key = |f: &str| format!("connection[{i}].{f}");
        if !conn.name.trim().is_empty() && !names.insert(conn.name.clone()) {
            bad(
                &key("name"),
                format!("{:?} names two connections", conn.name),
            );
        }
        if conn.kind == ConnectionKind::PbxRegisters {
            if let Some(l) = &conn.login {
                if !logins.insert(l.clone()) {
                    bad(
                        &key("login"),
                        format!("{l:?} is the login of two connections"),
                    );
                }
            }
        }
        for (field, message) in connection_problems(conn) {
            bad(&key(field), message);
        }
    }

    if let Err(e) = crate::observability::filter_directives(&c.log) {
        bad("log.level", e);
    }

    let dp = &c.dataplane;
    if let Cores::List(list) = &dp.cores {
        if list.is_empty() {
            bad(
                "dataplane.cores",
                "lists no core; use \"all\" or e.g. [0]".into(),
            );
        }
        let available = available_cores();
        for core in list {
            if !available.contains(core) {
                bad(
                    "dataplane.cores",
                    format!(
                        "core {core} is not available on this machine (available: {available:?})"
                    ),
                );
            }
        }
        let mut seen = list.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != list.len() {
            bad("dataplane.cores", "lists a core twice".into());
        }
    }
    if dp.rtp_port_min < 1024 {
        bad(
            "dataplane.rtp_port_min",
            format!(
                "{} is a privileged port; use 1024 or above",
                dp.rtp_port_min
            ),
        );
    }
    if dp.rtp_port_min >= dp.rtp_port_max {
        bad(
            "dataplane.rtp_port_max",
            format!(
                "must be above rtp_port_min ({} >= {})",
                dp.rtp_port_min, dp.rtp_port_max
            ),
        );
    } else {
        let pairs = (dp.rtp_port_max - dp.rtp_port_min) as usize / 2;
        let cores = dp.core_list().len().max(1);
        if pairs < cores {
            bad(
                "dataplane.rtp_port_max",
                format!(
                    "range {}-{} has fewer port pairs than cores ({cores})",
                    dp.rtp_port_min, dp.rtp_port_max
                ),
            );
        }
    }
    if dp.rtp_timeout < Duration::from_secs(1) {
        bad("dataplane.rtp_timeout", "must be at least 1s".into());
    }
    if dp.poll_interval > Duration::from_millis(5) {
        bad(
            "dataplane.poll_interval",
            "must be at most 5ms: it delays every packet by up to that much".into(),
        );
    }
    if dp.media_ip.is_unspecified() || dp.media_ip.is_multicast() {
        bad(
            "dataplane.media_ip",
            format!(
                "{} is not a unicast address of this host (it is put in SDP)",
                dp.media_ip
            ),
        );
    }

    if c.telegram.backend == TelegramBackend::Mtproto {
        match c.telegram.api_id {
            Some(id) if id > 0 && id <= i32::MAX as i64 => {}
            Some(id) => bad("telegram.api_id", format!("{id} is not a valid api_id")),
            None => bad(
                "telegram.api_id",
                "required when backend = \"mtproto\" (get it at https://my.telegram.org)".into(),
            ),
        }
        match &c.telegram.api_hash {
            Some(h) if h.len() == 32 && h.chars().all(|ch| ch.is_ascii_hexdigit()) => {}
            Some(_) => bad(
                "telegram.api_hash",
                "must be 32 hexadecimal characters".into(),
            ),
            None => bad(
                "telegram.api_hash",
                "required when backend = \"mtproto\"".into(),
            ),
        }
    }

    match c.database.backend {
        DatabaseBackend::Redb => {
            if c.database.path.as_os_str().is_empty() {
                bad("database.path", "is empty".into());
            }
        }
        DatabaseBackend::Postgres => match &c.database.url {
            None => bad(
                "database.url",
                "required when backend = \"postgres\"".into(),
            ),
            Some(u) => match url::Url::parse(u) {
                Ok(parsed) if matches!(parsed.scheme(), "postgres" | "postgresql") => {
                    if parsed.host_str().is_none_or(str::is_empty) {
                        bad("database.url", "names no host".into());
                    }
                }
                Ok(parsed) => bad(
                    "database.url",
                    format!(
                        "scheme {:?} is not postgres:// or postgresql://",
                        parsed.scheme()
                    ),
                ),
                Err(e) => bad("database.url", format!("is not a URL: {e}")),
            },
        },
    }

    if let Some(m) = &c.manager {
        if m.heartbeat_interval.is_zero() {
            bad("manager.heartbeat_interval", "must be above 0".into());
        }
        if m.heartbeat_interval > Duration::from_secs(60) {
            bad("manager.heartbeat_interval", "must be at most 60s".into());
        }
        if m.link_timeout <= m.heartbeat_interval {
            bad(
                "manager.link_timeout",
                "must be longer than heartbeat_interval (3× is usual)".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (kind, peers) in [("workers", &m.workers), ("storages", &m.storages)] {
            for (i, p) in peers.iter().enumerate() {
                if !crate::tls::valid_node_name(&p.name) {
                    bad(
                        &format!("manager.{kind}[{i}].name"),
                        format!(
                            "{:?} is not a node name (letters, digits, '-', '.')",
                            p.name
                        ),
                    );
                }
                if !names.insert(p.name.clone()) {
                    bad(
                        &format!("manager.{kind}[{i}].name"),
                        format!("{:?} appears twice", p.name),
                    );
                }
                if p.address
                    .rsplit_once(':')
                    .and_then(|(_, port)| port.parse::<u16>().ok())
                    .is_none()
                {
                    bad(
                        &format!("manager.{kind}[{i}].address"),
                        format!("{:?} is not host:port", p.address),
                    );
                }
            }
        }
    }
    if let Some(m) = &c.manager {
        if !crate::tls::valid_node_name(&m.name) {
            bad(
                "manager.name",
                format!(
                    "{:?} is not a node name (letters, digits, '-', '.')",
                    m.name
                ),
            );
        }
    }
    for (key, name) in [
        ("worker.name", c.worker.as_ref().map(|w| &w.name)),
        ("storage.name", c.storage.as_ref().map(|s| &s.name)),
    ] {
        if let Some(name) = name {
            if !crate::tls::valid_node_name(name) {
                bad(
                    key,
                    format!("{name:?} is not a node name (letters, digits, '-', '.')"),
                );
            }
        }
    }
    if let Some(w) = &c.worker {
        if w.manager_timeout < Duration::from_millis(100)
            || w.manager_timeout > Duration::from_secs(30)
        {
            bad(
                "worker.manager_timeout",
                "must be between 100ms and 30s".into(),
            );
        }
        if w.orphan_grace < Duration::from_secs(5) {
            bad(
                "worker.orphan_grace",
                "must be at least 5s, or calls lose their media when the control side restarts"
                    .into(),
            );
        }
    }
    if let (Some(w), Some(s)) = (&c.worker, &c.storage) {
        if w.name == s.name {
            bad(
                "storage.name",
                format!("{:?} is also the worker's name", s.name),
            );
        }
    }
    if c.sip.listen.is_empty() {
        bad("sip.listen", "needs at least one listener".into());
    }
    if c.sip.min_se < Duration::from_secs(90) {
        bad("sip.min_se", "must be at least 90s (RFC 4028 §4)".into());
    }
    if c.sip.session_expires < c.sip.min_se {
        bad(
            "sip.session_expires",
            format!("must not be shorter than sip.min_se ({:?})", c.sip.min_se),
        );
    }
    if let Some(i) = c
        .sip
        .listen
        .iter()
        .position(|l| l.transport == SipTransport::Tls)
    {
        for (key, value) in [
            ("sip.tls_cert", &c.sip.tls_cert),
            ("sip.tls_key", &c.sip.tls_key),
        ] {
            if value.as_deref().is_none_or(|p| p.as_os_str().is_empty()) {
                bad(
                    key,
                    format!("a PEM file path is required by the tls listener sip.listen[{i}]"),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> Vec<Issue> {
        match parse(text, "t.toml", Vec::new()) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    /// Session timers: Min-SE below RFC 4028's 90 s, or an interval below Min-SE, is refused;
    /// connection keys for keep-alive and TLS registration parse.
    #[test]
    fn session_timer_bounds_and_connection_transport_keys() {
        let issues = err("[sip]\nmin_se = \"30s\"\n");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "sip.min_se");
        let issues = err("[sip]\nmin_se = \"120s\"\nsession_expires = \"100s\"\n");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "sip.session_expires");
        let c = parse(
            "[[connection]]\nname = \"pbx\"\ntype = \"register_to_pbx\"\nserver = \"pbx.example:5061\"\nlogin = \"a\"\npassword = \"b\"\ntransport = \"tls\"\ntls_verify = false\nkeepalive = \"0s\"\n",
            "t.toml",
            Vec::new(),
        )
        .expect("valid");
        let conn = &c.connection[0];
        assert_eq!(conn.transport, RegisterTransport::Tls);
        assert!(!conn.tls_verify);
        assert!(conn.keepalive.is_zero());
        assert_eq!(c.sip.min_se, Duration::from_secs(90));
        assert_eq!(c.sip.session_expires, Duration::from_secs(1800));
    }

    /// `keypad_bot` is optional and names another account than the gateway's own.
    #[test]
    fn a_keypad_bot_is_another_account_than_the_gateways() {
        let base = "[[connection]]\nname = \"t\"\ntype = \"ip\"\nserver = \"127.0.0.1:9\"\n\
                    [[gateway]]\nname = \"g\"\naccount = \"a\"\nconnections = [\"t\"]\n";
        let c = parse(
            &format!("{base}keypad_bot = \"kb\"\n"),
            "t.toml",
            Vec::new(),
        )
        .expect("valid");
        assert_eq!(c.gateway[0].keypad_bot.as_deref(), Some("kb"));
        assert_eq!(
            parse(base, "t.toml", Vec::new()).expect("valid").gateway[0].keypad_bot,
            None
        );
        let issues = err(&format!("{base}keypad_bot = \"a\"\n"));
        assert_eq!(issues[0].key, "gateway[0].keypad_bot", "{issues:?}");
        let issues = err(&format!("{base}keypad_bot = \" \"\n"));
        assert_eq!(issues[0].key, "gateway[0].keypad_bot", "{issues:?}");
    }

    /// The plan limits parse (durations as elsewhere, "0s" = unlimited) and `allowed_workers`
    /// must name Workers this configuration knows.
    #[test]
    fn gateway_limits_parse_and_allowed_workers_must_be_known_workers() {
        let base = "[[connection]]\nname = \"t\"\ntype = \"ip\"\nserver = \"127.0.0.1:9\"\n\
                    [[gateway]]\nname = \"g\"\naccount = \"a\"\nconnections = [\"t\"]\n";
        let c = parse(
            &format!("{base}monthly_duration = \"30m\"\nfailed_calls_per_hour = 10\nallowed_workers = [\"worker-1\"]\n"),
            "t.toml",
            Vec::new(),
        )
        .expect("valid");
        let g = &c.gateway[0];
        assert_eq!(g.monthly_duration, Duration::from_secs(1800));
        assert_eq!(g.failed_calls_per_hour, 10);
        assert_eq!(g.allowed_workers, ["worker-1"]);
        // A month's talk time may exceed the week other durations are capped at.
        let long = parse(
            &format!("{base}monthly_duration = \"744h\"\n"),
            "t.toml",
            Vec::new(),
        )
        .expect("valid");
        assert_eq!(
            long.gateway[0].monthly_duration,
            Duration::from_secs(744 * 3600)
        );
        let issues = err(&format!("{base}monthly_duration = \"745h\"\n"));
        assert!(issues[0].message.contains("longer than 744h"), "{issues:?}");
        let c = parse(base, "t.toml", Vec::new()).expect("valid");
        assert!(c.gateway[0].monthly_duration.is_zero());
        assert_eq!(c.gateway[0].failed_calls_per_hour, 0);
        let issues = err(&format!(
            "{base}allowed_workers = [\"worker-7\", \"bad name\"]\n"
        ));
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert_eq!(issues[0].key, "gateway[0].allowed_workers");
        assert!(
            issues[0]
                .message
                .contains("\"worker-7\" is not a Worker of this configuration (known: worker-1)"),
            "{issues:?}"
        );
        assert!(issues[1].message.contains("not a node name"), "{issues:?}");
        // A Manager's configured Workers are the known ones.
        let with_peers = format!(
            "[manager]\n[[manager.workers]]\nname = \"w-a\"\naddress = \"127.0.0.1:50001\"\n{base}allowed_workers = [\"w-a\"]\n"
        );
        parse(&with_peers, "t.toml", Vec::new()).expect("valid");
    }

    #[test]
    fn sip_listen_takes_udp_and_tcp_and_names_unknown_transports() {
        let c = parse(
            "[sip]\nlisten = [\"udp:127.0.0.1:5060\", \"tcp:127.0.0.1:5060\", \"tcp:[::1]:5061\"]\n",
            "t.toml",
            Vec::new(),
        )
        .unwrap();
        let kinds: Vec<_> = c.sip.listen.iter().map(|l| l.transport).collect();
        assert_eq!(
            kinds,
            [SipTransport::Udp, SipTransport::Tcp, SipTransport::Tcp]
        );
        assert_eq!(c.sip.listen[2].addr, "[::1]:5061".parse().unwrap());
        for bad in ["sctp:127.0.0.1:5060", "tls:nowhere", "tcp:nowhere"] {
            let issues = err(&format!(
                "[node]\nstate_dir = \"x\"\n\n[sip]\nlisten = [\"{bad}\"]\n"
            ));
            assert_eq!(issues[0].key, "sip.listen[0]", "{bad}");
            assert_eq!(issues[0].line, Some(5), "{bad}");
        }
    }

    #[test]
    fn sip_tls_listener_needs_cert_and_key() {
        let c = parse(
            "[sip]\nlisten = [\"tls:127.0.0.1:5061\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
            "t.toml",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(c.sip.listen[0].transport, SipTransport::Tls);
        assert_eq!(c.sip.tls_key.as_deref(), Some(Path::new("k.pem")));
        let issues = err("[sip]\nlisten = [\"udp:127.0.0.1:5060\", \"tls:127.0.0.1:5061\"]\ntls_key = \"k.pem\"\n");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "sip.tls_cert");
        assert!(issues[0].message.contains("sip.listen[1]"), "{issues:?}");
        let issues = err("[sip]\nlisten = [\"tls:127.0.0.1:5061\"]\ntls_cert = \"c.pem\"\n");
        assert_eq!(issues[0].key, "sip.tls_key");
    }

    #[test]
    fn example_config_is_valid() {
        parse(EXAMPLE, "example", Vec::new()).unwrap();
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let issues = err("[node]\nstate_dir = \"x\"\n\n[dataplane]\ncores = \"many\"\n");
        assert_eq!(issues[0].key, "dataplane.cores");
        assert_eq!(issues[0].line, Some(5));
        assert!(
            issues[0].message.contains("\"all\""),
            "{}",
            issues[0].message
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let issues = err("[dataplane]\nrtp_port_minimum = 3\n");
        assert_eq!(issues[0].key, "dataplane.rtp_port_minimum");
        assert_eq!(issues[0].line, Some(2));
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let issues = err("[dataplane]\nrtp_port_min = 40000\nrtp_port_max = 30000\n");
        assert_eq!(issues[0].key, "dataplane.rtp_port_max");
        assert_eq!(issues[0].line, Some(3));
    }

    #[test]
    fn connections_are_validated_by_kind_naming_key_and_line() {
        let issues = err("[[connection]]\nname = \"office\"\ntype = \"pbx_registers\"\nlogin = \"office\"\ntrusted_ips = [\"10.0.0.0/33\"]\ncodecs = [\"PCMA\", \"GSM\"]\n\n[[connection]]\nname = \"office\"\ntype = \"ip\"\nheader = \"no colon\"\n");
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"connection[0].password"), "{keys:?}");
        assert!(keys.contains(&"connection[0].trusted_ips"), "{keys:?}");
        assert!(keys.contains(&"connection[0].codecs"), "{keys:?}");
        assert!(keys.contains(&"connection[1].name"), "{keys:?}");
        assert!(keys.contains(&"connection[1].server"), "{keys:?}");
        assert!(keys.contains(&"connection[1].header"), "{keys:?}");
        let codecs = issues
            .iter()
            .find(|i| i.key == "connection[0].codecs")
            .unwrap();
        assert_eq!(codecs.line, Some(6));
        assert!(codecs.message.contains("GSM"));
    }

    #[test]
    fn core_missing_from_machine_is_rejected() {
        let issues = err("[dataplane]\ncores = [0, 4000]\n");
        assert!(issues[0].message.contains("core 4000"), "{issues:?}");
    }

    #[test]
    fn mtproto_needs_credentials() {
        let issues = err("[telegram]\nbackend = \"mtproto\"\napi_hash = \"xyz\"\n");
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["telegram.api_id", "telegram.api_hash"]);
        assert_eq!(issues[1].line, Some(3));
    }

    #[test]
    fn postgres_url_is_checked() {
        let issues = err("[database]\nbackend = \"postgres\"\nurl = \"mysql://x/y\"\n");
        assert_eq!(issues[0].key, "database.url");
    }

    #[test]
    fn bad_peer_in_array_points_at_its_line() {
        let issues = err("[manager]\nworkers = [\n  { name = \"w1\", address = \"127.0.0.1:1\" },\n  { name = \"w 2\", address = \"nope\" },\n]\n");
        assert_eq!(issues[0].key, "manager.workers[1].name");
        assert_eq!(issues[0].line, Some(4));
        assert_eq!(issues[1].key, "manager.workers[1].address");
    }

    #[test]
    fn environment_overrides_keys_and_is_blamed_for_errors() {
        let env = vec![
            (
                "SIPTG__DATAPLANE__RTP_PORT_MIN".to_string(),
                "32000".to_string(),
            ),
            ("SIPTG__LOG__FORMAT".to_string(), "json".to_string()),
            ("UNRELATED".to_string(), "1".to_string()),
        ];
        let c = parse("[dataplane]\nrtp_port_min = 30000\n", "t", env).unwrap();
        assert_eq!(c.dataplane.rtp_port_min, 32000);
        assert_eq!(c.log.format, LogFormat::Json);

        let env = vec![("SIPTG__DATAPLANE__CORES".to_string(), "many".to_string())];
        match parse("", "t", env) {
            Err(ConfigError::Invalid { issues, .. }) => {
                assert_eq!(issues[0].env.as_deref(), Some("SIPTG__DATAPLANE__CORES"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_error_reports_position() {
        match parse("[dataplane\n", "t", Vec::new()) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains("line 1"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn absurd_durations_and_addresses_are_rejected() {
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("999999h").is_err());
        let issues = err("[manager]\nheartbeat_interval = \"5m\"\nlink_timeout = \"1h\"\n[dataplane]\nmedia_ip = \"0.0.0.0\"\n[worker]\norphan_grace = \"0s\"\n");
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"manager.heartbeat_interval"), "{keys:?}");
        assert!(keys.contains(&"dataplane.media_ip"), "{keys:?}");
        assert!(keys.contains(&"worker.orphan_grace"), "{keys:?}");
    }

    #[test]
    fn peer_names_are_unique_across_workers_and_storages() {
        let issues = err("[manager]\nworkers = [{ name = \"n1\", address = \"127.0.0.1:1\" }]\nstorages = [{ name = \"n1\", address = \"127.0.0.1:2\" }]\n");
        assert_eq!(issues[0].key, "manager.storages[0].name");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10 parsecs").is_err());
    }
}
