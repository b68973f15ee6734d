//! Starting roles as processes: `up` (all roles, in-process links), or `manager`, `worker`,
//! `storage` each on its own with mutual-TLS links.

use crate::admin;
use crate::config::{Loaded, ManagerConfig, StorageConfig, WorkerConfig};
use crate::dataplane::{SpawnSpec, Supervisor};
use crate::link::{Handler, LinkError, Role};
use crate::linkserver::LinkServer;
use crate::manager::{Connector, LinkStream, Manager};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::storage::Storage;
use crate::store::{Store, StoreError};
use crate::tls::{self, NodeTls, TlsError};
use crate::worker::Worker;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long shutdown waits for PBXs to confirm outbound un-registrations.
const UNREGISTER_LIMIT: Duration = Duration::from_secs(2);

/// What the CLI was started with.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub loaded: Loaded,
    /// The `--config` file, passed on to the dataplane child.
    pub config_path: Option<PathBuf>,
    /// This binary, to start `siptg dataplane`.
    pub exe: PathBuf,
}

/// Why a role could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

fn node_tls(inv: &Invocation, role: Role) -> Result<NodeTls, RunError> {
    let t = inv.loaded.config.tls.as_ref().ok_or_else(|| {
        RunError::Setup(format!(
            "the {role} role on its own needs a [tls] section (ca, cert, key) for its links; \
             create them with `siptg certs init` and `siptg certs issue NAME`, or run `siptg up`"
        ))
    })?;
    Ok(NodeTls {
        ca: inv.loaded.path(&t.ca),
        cert: inv.loaded.path(&t.cert),
        key: inv.loaded.path(&t.key),
    })
}

fn prepare_state_dir(inv: &Invocation) -> Result<(), RunError> {
    let dir = inv.loaded.state_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        RunError::Setup(format!(
            "cannot create state directory {}: {e}",
            dir.display()
        ))
    })
}

fn warn_open_links(role: Role, managers: &[String]) {
    if managers.is_empty() {
        tracing::info!(%role, "any Manager certified by the CA may link; list names in [{role}] managers to restrict");
    }
}

fn start_worker(inv: &Invocation, metrics: &Arc<Metrics>) -> Arc<Worker> {
    let cfg = &inv.loaded.config;
    let wcfg = cfg.worker.clone().unwrap_or_default();
    let dp = &cfg.dataplane;
    let spawn = dp.spawn.then(|| SpawnSpec {
        exe: inv.exe.clone(),
        config: inv.config_path.clone(),
    });
    let sup = Supervisor::new(
        inv.loaded.path(&dp.socket),
        format!("worker {} pid {}", wcfg.name, std::process::id()),
        spawn,
        wcfg.orphan_grace,
        metrics.clone(),
    );
    tokio::spawn(sup.clone().run());
    warn_open_links(Role::Worker, &wcfg.managers);
    let links = LinkServer::new(Role::Worker, wcfg.name.clone(), wcfg.managers.clone());
    Worker::new(wcfg, links, sup, metrics.clone(), cfg.connection.clone())
}

async fn start_storage(
    inv: &Invocation,
    name_cfg: StorageConfig,
) -> Result<Arc<Storage>, RunError> {
    let cfg = &inv.loaded.config;
    let store = Store::open(&cfg.database, &inv.loaded.base).await?;
    warn_open_links(Role::Storage, &name_cfg.managers);
    let links = LinkServer::new(
        Role::Storage,
        name_cfg.name.clone(),
        name_cfg.managers.clone(),
    );
    let accounts = crate::storage::open_accounts(cfg, &name_cfg, &inv.loaded.base, store.clone())
        .map_err(|e| RunError::Setup(format!("session storage: {e}")))?;
    Ok(Storage::start(
        name_cfg,
        cfg.telegram.clone(),
        links,
        store,
        accounts,
    ))
}

/// The roles a process runs.
struct Roles {
    manager: Option<Arc<Manager>>,
    worker: Option<Arc<Worker>>,
    storage: Option<Arc<Storage>>,
}

async fn serve_admin(
    inv: &Invocation,
    roles: Roles,
    metrics: Arc<Metrics>,
) -> Result<(), RunError> {
    let listener = admin::bind(inv.loaded.config.admin.listen).await?;
    let node = Node {
        started: Instant::now(),
        config_source: inv.loaded.source_name.clone(),
        manager: roles.manager,
        worker: roles.worker,
        storage: roles.storage,
        metrics,
    };
    tokio::spawn(admin::serve(listener, Arc::new(node)));
    Ok(())
}

/// Opens links to a role in this same process: an in-memory pipe, the same frames as over TLS.
fn in_process(links: Arc<LinkServer>, handler: Handler) -> Connector {
    Arc::new(move || {
        let (links, handler) = (links.clone(), handler.clone());
        Box::pin(async move {
            let (ours, theirs) = tokio::io::duplex(256 * 1024);
            tokio::spawn(async move {
                if let Err(e) = links.accept(theirs, None, handler).await {
                    tracing::warn!(error = %e, "in-process link failed");
                }
            });
            Ok(Box::new(ours) as Box<dyn LinkStream>)
        })
    })
}

fn tls_connector(address: String, name: String, cfg: Arc<rustls::ClientConfig>) -> Connector {
    Arc::new(move || {
        let (address, name, cfg) = (address.clone(), name.clone(), cfg.clone());
        Box::pin(async move {
            let limit = Duration::from_secs(5);
            let tcp = tokio::time::timeout(limit, TcpStream::connect(&address))
                .await
                .map_err(|_| LinkError::Timeout(limit))??;
            let sn = tls::server_name(&name).map_err(|e| LinkError::Handshake(e.to_string()))?;
            let stream = TlsConnector::from(cfg)
                .connect(sn, tcp)
                .await
                .map_err(|e| LinkError::Handshake(format!("TLS with {name} at {address}: {e}")))?;
            Ok(Box::new(stream) as Box<dyn LinkStream>)
        })
    })
}

async fn wait_for_shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// With the simulated cloud configured as embedded, starts it where the Storage looks for it.
/// If that port is taken (another siptg on this host), it takes a free port on the same
/// address instead and says so; the Storage in this process is pointed at it.
async fn start_embedded_sim(inv: &mut Invocation) -> Result<Option<crate::tgsim::TgSim>, RunError> {
    let t = &inv.loaded.config.telegram;
    if t.backend != crate::config::TelegramBackend::Sim || !t.sim_embedded {
        return Ok(None);
    }
    let path = t.sim_world.as_ref().map(|p| inv.loaded.path(p));
    let world =
        crate::tgsim::load_world(path.as_deref()).map_err(|e| RunError::Setup(e.to_string()))?;
    let wanted = t.sim_address;
    let sim = match crate::tgsim::TgSim::start(world.clone(), wanted).await {
        Ok(sim) => sim,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = std::net::SocketAddr::new(wanted.ip(), 0);
            let sim = crate::tgsim::TgSim::start(world, any)
                .await
                .map_err(|e| RunError::Setup(format!("simulated Telegram cloud on {any}: {e}")))?;
            tracing::warn!(%wanted, actual = %sim.addr(), "simulated Telegram cloud: port in use, took another");
            sim
        }
        Err(e) => {
            return Err(RunError::Setup(format!(
                "simulated Telegram cloud on {wanted}: {e}"
            )))
        }
    };
    inv.loaded.config.telegram.sim_address = sim.addr();
    Ok(Some(sim))
}

/// With the embedded simulated cloud: logs in `sim_autologin` accounts that are not yet, and
/// starts the `sim_echo_users` (the demo's Telegram user who answers and echoes).
async fn start_sim_helpers(
    cfg: &crate::config::Config,
    storage: &Arc<Storage>,
    worker: &Arc<Worker>,
) {
    use crate::telegram::account::LoginStep;
    let t = &cfg.telegram;
    for (account, phone) in &t.sim_autologin {
        let accounts = storage.accounts();
        // The embedded cloud forgets everything when it stops: a stored session may be one it
        // no longer knows. Log in again unless Telegram (the cloud) still accepts it.
        if let Ok(a) = accounts.connect(account).await {
            if a.me().await.is_ok() {
                continue;
            }
        }
        let result = async {
            // A bot logs in by its token (`<id>:<secret>`), a user by phone and code.
            if phone.contains(':') {
                let me = accounts.bot_login(account, phone).await?;
                return Ok(LoginStep::Done(me));
            }
            let sent = accounts.begin_phone_login(account, phone).await?;
            let step = accounts.get(account)?.sign_in(&sent, "12345").await?;
            accounts.finish_step(account, &step).await?;
            Ok::<_, crate::telegram::TgError>(step)
        }
        .await;
        match result {
            Ok(LoginStep::Done(me)) => {
                tracing::info!(%account, user = me.user_id, "simulated account logged in")
            }
            Ok(other) => tracing::warn!(%account, ?other, "simulated account login incomplete"),
            Err(e) => tracing::warn!(%account, error = %e, "simulated account login failed"),
        }
    }
    for phone in &t.sim_echo_users {
        tokio::spawn(crate::gateway::echo::run(
            t.sim_address,
            phone.clone(),
            worker.dataplane().clone(),
            cfg.dataplane.media_ip,
        ));
    }
}

/// All roles in one process, linked in-process; the dataplane as a supervised child. Runs
/// until SIGINT/SIGTERM.
pub async fn up(inv: Invocation) -> Result<(), RunError> {
    up_until(inv, wait_for_shutdown()).await
}

/// Like [`up`], until `stop` completes (the demo's self-test stops it when done).
pub async fn up_until(
    mut inv: Invocation,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    prepare_state_dir(&inv)?;
    // Held until shutdown: the simulated Telegram cloud stops when the last handle goes.
    let _sim = start_embedded_sim(&mut inv).await?;
    let metrics = Arc::new(Metrics::default());
    let cfg = &inv.loaded.config;
    let worker = start_worker(&inv, &metrics);
    let dataplane = worker.dataplane().clone();
    worker.start_sip(&cfg.sip).await?;
    let storage = start_storage(&inv, cfg.storage.clone().unwrap_or_default()).await?;
    if _sim.is_some() {
        start_sim_helpers(cfg, &storage, &worker).await;
    }
    let mcfg = cfg.manager.clone().unwrap_or_default();
    let manager = Manager::with_gateways(
        mcfg.name.clone(),
        mcfg,
        cfg.connection.clone(),
        cfg.gateway.clone(),
        metrics.clone(),
    );
    match manager.attach_store(storage.store().clone()).await {
        Ok(n) if n > 0 => tracing::info!(gateways = n, "gateways loaded from the database"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot load gateways from the database"),
    }
    manager.add_peer(
        Role::Worker,
        worker.name().to_string(),
        "in-process".into(),
        in_process(worker.links().clone(), worker.handler()),
    );
    manager.add_peer(
        Role::Storage,
        storage.name().to_string(),
        "in-process".into(),
        in_process(storage.links().clone(), storage.handler()),
    );
    let roles = Roles {
        manager: Some(manager),
        worker: Some(worker.clone()),
        storage: Some(storage),
    };
    serve_admin(&inv, roles, metrics).await?;
    tracing::info!(config = %inv.loaded.source_name, "siptg up: manager, worker, storage running");
    stop.await;
    worker.stop_outbound(UNREGISTER_LIMIT).await;
    dataplane.stop_child();
    Ok(())
}

/// The Manager alone: dials the configured Workers and Storages over mutual TLS.
pub async fn manager(inv: Invocation) -> Result<(), RunError> {
    prepare_state_dir(&inv)?;
    let metrics = Arc::new(Metrics::default());
    let mcfg: ManagerConfig = inv.loaded.config.manager.clone().ok_or_else(|| {
        RunError::Setup(
            "the manager role needs a [manager] section listing its workers and storages".into(),
        )
    })?;
    let client = tls::client_config(&node_tls(&inv, Role::Manager)?)?;
    let manager = Manager::with_gateways(
        mcfg.name.clone(),
        mcfg.clone(),
        inv.loaded.config.connection.clone(),
        inv.loaded.config.gateway.clone(),
        metrics.clone(),
    );
    // Gateways made through the control API live in the Manager's database. Without it (an
    // embedded redb file another process holds, an unreachable PostgreSQL) the Manager still
    // routes the config file's gateways; the API answers `Database error`.
    // An embedded database belongs to one process: a Manager on its own keeps its own file
    // (`manager.redb` in its state directory) rather than a Storage's on the same host.
    let mut db = inv.loaded.config.database.clone();
    if db.backend == crate::config::DatabaseBackend::Redb {
        db.path = inv.loaded.state_dir().join("manager.redb");
    }
    match Store::open(&db, &inv.loaded.base).await {
        Ok(store) => {
            if let Err(e) = manager.attach_store(store).await {
                tracing::warn!(error = %e, "cannot load gateways from the database");
            }
        }
        Err(e) => tracing::warn!(error = %e, "no database for API-managed gateways"),
    }
    for (role, peers) in [
        (Role::Worker, &mcfg.workers),
        (Role::Storage, &mcfg.storages),
    ] {
        for p in peers {
            manager.add_peer(
                role,
                p.name.clone(),
                p.address.clone(),
                tls_connector(p.address.clone(), p.name.clone(), client.clone()),
            );
        }
    }
    let roles = Roles {
        manager: Some(manager),
        worker: None,
        storage: None,
    };
    serve_admin(&inv, roles, metrics).await?;
    wait_for_shutdown().await;
    Ok(())
}

/// A Worker alone: SIP, the dataplane, and a mutual-TLS listener for its Manager.
pub async fn worker(inv: Invocation) -> Result<(), RunError> {
    prepare_state_dir(&inv)?;
    let metrics = Arc::new(Metrics::default());
    let server = tls::server_config(&node_tls(&inv, Role::Worker)?)?;
    let wcfg: WorkerConfig = inv.loaded.config.worker.clone().unwrap_or_default();
    let worker = start_worker(&inv, &metrics);
    let dataplane = worker.dataplane().clone();
    worker.start_sip(&inv.loaded.config.sip).await?;
    let links = worker.links().clone();
    let handler = worker.handler();
    let listen = wcfg.link_listen;
    tokio::spawn(async move {
        if let Err(e) = links.listen_tls(listen, server, handler).await {
            tracing::error!(error = %e, "worker link listener failed");
        }
    });
    let roles = Roles {
        manager: None,
        worker: Some(worker.clone()),
        storage: None,
    };
    serve_admin(&inv, roles, metrics).await?;
    wait_for_shutdown().await;
    worker.stop_outbound(UNREGISTER_LIMIT).await;
    dataplane.stop_child();
    Ok(())
}

/// A Session Storage alone: the database and a mutual-TLS listener for its Manager.
pub async fn storage(inv: Invocation) -> Result<(), RunError> {
    prepare_state_dir(&inv)?;
    let metrics = Arc::new(Metrics::default());
    let server = tls::server_config(&node_tls(&inv, Role::Storage)?)?;
    let scfg = inv.loaded.config.storage.clone().unwrap_or_default();
    let listen = scfg.link_listen;
    let storage = start_storage(&inv, scfg).await?;
    let links = storage.links().clone();
    let handler = storage.handler();
    tokio::spawn(async move {
        if let Err(e) = links.listen_tls(listen, server, handler).await {
            tracing::error!(error = %e, "storage link listener failed");
        }
    });
    let roles = Roles {
        manager: None,
        worker: None,
        storage: Some(storage),
    };
    serve_admin(&inv, roles, metrics).await?;
    wait_for_shutdown().await;
    Ok(())
}
