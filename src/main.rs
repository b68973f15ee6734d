//! The `siptg` command: wires the CLI to the roles in `siptg-control` and `siptg-dataplane`.

mod connection_cli;
mod gateway_cli;
mod selftest;
mod status_view;
mod storage_cli;
mod tgcall_peer;
mod tgsim_app;

use clap::{Parser, Subcommand};
use siptg_control::config::{self, Loaded, TelegramBackend};
use siptg_control::run::{self, Invocation};
use siptg_control::{admin, observability, tls};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "siptg", version, about = "SIP <-> Telegram voice gateway")]
struct Cli {
    /// Configuration file (default: the built-in example, config/siptg.example.toml).
    #[arg(long, short, global = true, env = "SIPTG_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every role on this host: manager, worker, storage, and the dataplane as a child.
    Up,
    /// Run the gateway like `up`, with the simulated Telegram cloud.
    Demo {
        /// Call the demo's Telegram user from a built-in SIP phone, check audio both ways and
        /// DTMF, print the result and exit (non-zero on failure).
        #[arg(long)]
        self_test: bool,
    },
    /// Run the Manager alone (links to workers and storages over mutual TLS).
    Manager,
    /// Run a Worker alone (SIP, media via the dataplane; its Manager connects over mutual TLS).
    Worker,
    /// Run a Session Storage alone (Telegram sessions; its Manager connects over mutual TLS),
    /// or manage its accounts: `siptg storage login|logout|list`.
    Storage {
        #[command(subcommand)]
        action: Option<storage_cli::StorageCmd>,
    },
    /// The Telegram accounts of the Session Storage: `siptg account login|logout|list` (the
    /// same as `siptg storage login|logout|list`, under the name the issue and SIP.TG use).
    Account {
        #[command(subcommand)]
        action: storage_cli::StorageCmd,
    },
    /// A simulated user's Telegram app on stdin/stdout (JSON lines), for conformance tests.
    #[command(hide = true)]
    TgsimApp {
        /// The simulated cloud.
        #[arg(long, default_value = "127.0.0.1:50003")]
        sim: SocketAddr,
        /// The user's phone.
        #[arg(long)]
        phone: String,
        #[arg(long, default_value = "12345")]
        code: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Gateways (a Telegram account + SIP connections) of a running siptg: list, show, add,
    /// set, rm. Kept in the Manager's database.
    Gateway {
        /// Admin address (default: [admin] listen from the config).
        #[arg(long, global = true)]
        admin: Option<SocketAddr>,
        #[command(subcommand)]
        action: gateway_cli::GatewayCmd,
    },
    /// SIP connections (the PBX side of gateways) of a running siptg: list, show, add, set,
    /// reset-password, rm. Kept in the Manager's database.
    Connection {
        /// Admin address (default: [admin] listen from the config).
        #[arg(long, global = true)]
        admin: Option<SocketAddr>,
        #[command(subcommand)]
        action: connection_cli::ConnectionCmd,
    },
    /// Run the simulated Telegram cloud alone (tests, demos; Telegram's servers stand-in).
    Tgsim {
        /// Where to listen (the Storage's `[telegram] sim_address`).
        #[arg(long, default_value = "127.0.0.1:50003")]
        listen: SocketAddr,
        /// The world's users (TOML; see config/tgsim.example.toml). Built-in demo users when
        /// missing.
        #[arg(long)]
        world: Option<PathBuf>,
    },
    /// Run the media dataplane: one pinned relay shard per configured core.
    Dataplane,
    /// Validate a configuration file; errors name the key and line.
    CheckConfig {
        /// The file to check (or use --config).
        file: Option<PathBuf>,
    },
    /// Show the roles, links, dataplane cores and sessions of a running siptg.
    Status {
        /// Admin address (default: [admin] listen from the config).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// One Telegram call endpoint driven over stdin/stdout by a harness playing Telegram's
    /// servers (the conformance suite against ntgcalls uses it).
    #[command(hide = true)]
    TgcallPeer {
        /// Place the call (else answer it).
        #[arg(long)]
        caller: bool,
        /// Address to bind the media socket to.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Frequency of the tone we send, Hz.
        #[arg(long, default_value_t = 1000.0)]
        tone: f64,
        /// Frequency we expect to hear from the peer, Hz.
        #[arg(long, default_value_t = 440.0)]
        expect: f64,
        /// Seconds of connected audio before reporting what we heard.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Create the CA and node certificates for mutual-TLS links.
    Certs {
        #[command(subcommand)]
        action: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a new CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long, default_value = "var/certs")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "siptg CA")]
        name: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for node NAME (its CN and DNS name), signed by the CA in DIR.
    Issue {
        name: String,
        #[arg(long, default_value = "var/certs")]
        dir: PathBuf,
        /// Certificate output (default: DIR/NAME.pem).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Private key output (default: DIR/NAME.key).
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long, default_value_t = tls::NODE_CERT_DAYS)]
        days: i64,
        #[arg(long)]
        force: bool,
    },
}

fn load(path: Option<&Path>) -> Result<Loaded, String> {
    config::load(path, std::env::vars()).map_err(|e| e.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// A role's entry point, boxed so the CLI can pick one.
type RoleMain =
    fn(
        Invocation,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), run::RunError>>>>;

fn run_role(cli_config: Option<PathBuf>, demo: bool, f: RoleMain) -> Result<(), String> {
    let mut loaded = load(cli_config.as_deref())?;
    if demo {
        loaded.config.telegram.backend = TelegramBackend::Sim;
    }
    observability::init(&loaded.config.log);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the siptg binary: {e}"))?;
    let config_path = cli_config.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    if demo {
        print_demo_banner(&loaded);
    }
    let inv = Invocation {
        loaded,
        config_path,
        exe,
    };
    runtime()?.block_on(f(inv)).map_err(|e| e.to_string())
}

/// `siptg demo --self-test`: the demo runs until the built-in phone's test is over.
fn demo_self_test(cli_config: Option<PathBuf>) -> Result<(), String> {
    let mut loaded = load(cli_config.as_deref())?;
    loaded.config.telegram.backend = TelegramBackend::Sim;
    if std::env::var_os("RUST_LOG").is_none() {
        loaded.config.log.level = "warn".into();
    }
    observability::init(&loaded.config.log);
    let sip = loaded
        .config
        .sip
        .listen
        .iter()
        .find(|l| l.transport == config::SipTransport::Udp)
        .map(|l| l.addr)
        .ok_or("the self-test needs a UDP SIP listener ([sip] listen)")?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the siptg binary: {e}"))?;
    let config_path = cli_config.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let inv = Invocation {
        loaded,
        config_path,
        exe,
    };
    let passed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = passed.clone();
    runtime()?
        .block_on(run::up_until(inv, async move {
            let ok = selftest::run(sip).await;
            flag.store(ok, std::sync::atomic::Ordering::SeqCst);
        }))
        .map_err(|e| e.to_string())?;
    if passed.load(std::sync::atomic::Ordering::SeqCst) {
        Ok(())
    } else {
        Err("demo self-test failed".into())
    }
}

fn print_demo_banner(loaded: &Loaded) {
    let c = &loaded.config;
    let sip: Vec<String> = c
        .sip
        .listen
        .iter()
        .map(|l| format!("udp:{}", l.addr))
        .collect();
    eprintln!(
        "siptg demo — all roles on this host, Telegram backend: simulated cloud\n  \
         config:  {}\n  SIP:     {}\n  status:  siptg status   (http://{}/status)\n  \
         metrics: http://{}/metrics\n  try:     sipp -sn uac -m 1 {}   (OPTIONS/INVITE get SIP.TG's answers)\n",
        loaded.source_name,
        sip.join(", "),
        c.admin.listen,
        c.admin.listen,
        c.sip.listen.first().map(|l| l.addr.to_string()).unwrap_or_default(),
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up => run_role(cli.config, false, |i| Box::pin(run::up(i))),
        Cmd::Demo { self_test: false } => run_role(cli.config, true, |i| Box::pin(run::up(i))),
        Cmd::Demo { self_test: true } => demo_self_test(cli.config),
        Cmd::Manager => run_role(cli.config, false, |i| Box::pin(run::manager(i))),
        Cmd::Worker => run_role(cli.config, false, |i| Box::pin(run::worker(i))),
        Cmd::Storage { action: None } => run_role(cli.config, false, |i| Box::pin(run::storage(i))),
        Cmd::Storage {
            action: Some(action),
        }
        | Cmd::Account { action } => load(cli.config.as_deref()).and_then(|loaded| {
            observability::init(&loaded.config.log);
            runtime()?.block_on(storage_cli::run(loaded, action))
        }),
        Cmd::Gateway { admin, action } => load(cli.config.as_deref()).and_then(|loaded| {
            let addr = admin.unwrap_or(loaded.config.admin.listen);
            runtime()?.block_on(gateway_cli::run(addr, action))
        }),
        Cmd::Connection { admin, action } => load(cli.config.as_deref()).and_then(|loaded| {
            let addr = admin.unwrap_or(loaded.config.admin.listen);
            runtime()?.block_on(connection_cli::run(addr, action))
        }),
        Cmd::TgsimApp {
            sim,
            phone,
            code,
            password,
        } => runtime().and_then(|rt| rt.block_on(tgsim_app::run(sim, phone, code, password))),
        Cmd::Tgsim { listen, world } => {
            observability::init(&Default::default());
            runtime().and_then(|rt| rt.block_on(storage_cli::tgsim(listen, world)))
        }
        Cmd::Dataplane => run_dataplane(cli.config),
        Cmd::CheckConfig { file } => check_config(file.or(cli.config)),
        Cmd::Status { admin, json } => status(cli.config, admin, json),
        Cmd::Certs { action } => certs(action),
        Cmd::TgcallPeer {
            caller,
            bind,
            tone,
            expect,
            seconds,
        } => tgcall_peer::run(tgcall_peer::PeerArgs {
            caller,
            bind,
            tone,
            expect,
            seconds,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siptg: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_dataplane(cli_config: Option<PathBuf>) -> Result<(), String> {
    let loaded = load(cli_config.as_deref())?;
    observability::init(&loaded.config.log);
    let dp = &loaded.config.dataplane;
    let cfg = siptg_dataplane::DataplaneConfig {
        cores: dp.core_list(),
        pin_cores: dp.pin_cores,
        port_min: dp.rtp_port_min,
        port_max: dp.rtp_port_max,
        media_ip: dp.media_ip,
        socket: loaded.path(&dp.socket),
        rtp_timeout: dp.rtp_timeout,
        stats_interval: (!dp.stats_interval.is_zero()).then_some(dp.stats_interval),
        driver: match dp.driver {
            config::DriverSetting::Auto => siptg_dataplane::DriverChoice::Auto,
            config::DriverSetting::Uring => siptg_dataplane::DriverChoice::Uring,
            config::DriverSetting::Glommio => siptg_dataplane::DriverChoice::Glommio,
            config::DriverSetting::Portable => siptg_dataplane::DriverChoice::Portable,
        },
        poll_interval: dp.poll_interval,
    };
    siptg_dataplane::run(&cfg).map_err(|e| e.to_string())
}

fn check_config(file: Option<PathBuf>) -> Result<(), String> {
    let loaded = load(file.as_deref())?;
    let c = &loaded.config;
    let dp = &c.dataplane;
    println!(
        "{}: OK\n  dataplane: cores {:?}, RTP ports {}-{}, socket {}\n  sip: {}\n  telegram: {:?}, database: {:?}",
        loaded.source_name,
        dp.core_list(),
        dp.rtp_port_min,
        dp.rtp_port_max,
        loaded.path(&dp.socket).display(),
        c.sip
            .listen
            .iter()
            .map(|l| format!("udp:{}", l.addr))
            .collect::<Vec<_>>()
            .join(", "),
        c.telegram.backend,
        c.database.backend,
    );
    Ok(())
}

fn status(
    cli_config: Option<PathBuf>,
    admin_addr: Option<SocketAddr>,
    json: bool,
) -> Result<(), String> {
    let addr = match admin_addr {
        Some(a) => a,
        None => load(cli_config.as_deref())?.config.admin.listen,
    };
    let body = runtime()?
        .block_on(admin::fetch(addr, "/status"))
        .map_err(|e| e.to_string())?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("status is not JSON: {e}"))?;
    print!("{}", status_view::render(&v));
    Ok(())
}

fn certs(action: CertsCmd) -> Result<(), String> {
    match action {
        CertsCmd::Init { dir, name, force } => {
            let files = tls::init_ca(&dir, &name, force).map_err(|e| e.to_string())?;
            println!(
                "CA created: {} (certificate), {} (private key — keep it off worker hosts)",
                files.cert.display(),
                files.key.display()
            );
        }
        CertsCmd::Issue {
            name,
            dir,
            cert,
            key,
            days,
            force,
        } => {
            let cert = cert.unwrap_or_else(|| dir.join(format!("{name}.pem")));
            let key = key.unwrap_or_else(|| dir.join(format!("{name}.key")));
            let ca = tls::CaFiles::in_dir(&dir);
            tls::issue(&ca, &name, &cert, &key, days, force).map_err(|e| e.to_string())?;
            println!(
                "certificate for {name:?} valid {days} days: {} and {}; put them with {} in the node's [tls] section",
                cert.display(),
                key.display(),
                ca.cert.display()
            );
        }
    }
    Ok(())
}
