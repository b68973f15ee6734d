//! The Manager's side of gateway errors, in process with a real Session Storage and the
//! simulated cloud: a Telegram user's call refused with SIP.TG's texts (the user reads them in
//! the chat and hears busy), routing refusals, and the SIP status of Telegram failures
//! (a dropped Telegram session, a failing database).

use siptg_control::config::{
    ConnectionConfig, GatewayConfig, ManagerConfig, StorageConfig, TelegramConfig,
};
use siptg_control::gateway::runtime::sip_status;
use siptg_control::link::{Response as LinkResponse, Role, RouteQuery, TelegramOp};
use siptg_control::linkserver::LinkServer;
use siptg_control::manager::{Connector, LinkStream, Manager, Routing};
use siptg_control::metrics::Metrics;
use siptg_control::storage::Storage;
use siptg_control::store::{BoxFuture, Entries, Store, StoreBackend, StoreError, Table};
use siptg_control::telegram::account::{Account, AccountOptions, Hygiene, LoginStep};
use siptg_control::telegram::accounts::{Accounts, Cloud};
use siptg_control::telegram::resolve::{Peer, PeerQuery};
use siptg_control::telegram::sealed::StorageKey;
use siptg_control::telegram::simclient::SimClient;
use siptg_control::telegram::tl;
use siptg_control::telegram::TgError;
use siptg_control::tgsim::{SimUser, TgSim, WorldConfig};
use std::sync::Arc;
use std::time::Duration;

fn conn(text: &str) -> ConnectionConfig {
    toml::from_str(text).unwrap()
}

fn gateway(text: &str) -> GatewayConfig {
    toml::from_str(text).unwrap()
}

struct World {
    sim: TgSim,
    accounts: Arc<Accounts>,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let cfg = WorldConfig {
        users: vec![
            SimUser::new(1, "+10000000001", Some("gateway_tg"), "Gateway"),
            SimUser::new(2, "+10000000002", Some("alice_tg"), "Alice"),
            SimUser::new(6, "+10000000006", Some("second_tg"), "Second"),
        ],
        ..Default::default()
    };
    let sim = TgSim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &siptg_control::config::DatabaseConfig {
            backend: siptg_control::config::DatabaseBackend::Redb,
            path: "s.redb".into(),
            url: None,
        },
        dir.path(),
    )
    .await
    .unwrap();
    let accounts = Accounts::new(
        store,
        StorageKey::from_bytes(&[9; 32]).unwrap(),
        Cloud::Sim(sim.addr()),
        AccountOptions::default(),
        Hygiene::default(),
    );
    for (name, phone) in [("gateway", "+10000000001"), ("second", "+10000000006")] {
        let sent = accounts.begin_phone_login(name, phone).await.unwrap();
        let step = accounts
            .get(name)
            .unwrap()
            .sign_in(&sent, "12345")
            .await
            .unwrap();
        accounts.finish_step(name, &step).await.unwrap();
    }
    World {
        sim,
        accounts,
        _dir: dir,
    }
}

/// A Manager linked (in process) to a Storage over `accounts`, with `connections` and
/// `gateways`, and no Worker.
async fn manager(
    accounts: Arc<Accounts>,
    connections: Vec<ConnectionConfig>,
    gateways: Vec<GatewayConfig>,
) -> Arc<Manager> {
    let links = LinkServer::new(Role::Storage, "storage-1".into(), vec![]);
    let store = accounts.store().clone();
    let storage = Storage::start(
        StorageConfig::default(),
        TelegramConfig::default(),
        links.clone(),
        store,
        accounts,
    );
    let handler = storage.handler();
    let connect: Connector = Arc::new(move || {
        let (links, handler) = (links.clone(), handler.clone());
        Box::pin(async move {
            let (ours, theirs) = tokio::io::duplex(256 * 1024);
            tokio::spawn(async move {
                let _ = links.accept(theirs, None, handler).await;
            });
            Ok(Box::new(ours) as Box<dyn LinkStream>)
        })
    });
    let m = Manager::with_gateways(
        "m".into(),
        ManagerConfig::default(),
        connections,
        gateways,
        Arc::new(Metrics::default()),
    );
    m.add_peer(
        Role::Storage,
        "storage-1".into(),
        "in-process".into(),
        connect,
    );
    for _ in 0..100 {
        if m.peer_status().iter().any(|p| p.state == "up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m
}

/// A Telegram user's app (another device of `phone`) on the simulated cloud.
async fn app(sim: &TgSim, phone: &str) -> (Account, siptg_control::telegram::transport::UpdateRx) {
    let (client, updates) = SimClient::connect(sim.addr(), None).await.unwrap();
    let a = Account::new("app", Arc::new(client), AccountOptions::default());
    let sent = a.send_code(phone).await.unwrap();
    assert!(matches!(
        a.sign_in(&sent, "12345").await.unwrap(),
        LoginStep::Done(_)
    ));
    (a, updates)
}

/// Calls `to` from `a`; returns the discard reason and the texts the caller got.
async fn call_and_wait(
    a: &Account,
    updates: &mut siptg_control::telegram::transport::UpdateRx,
    to: &str,
) -> (Option<tl::enums::PhoneCallDiscardReason>, Vec<String>) {
    let tl::enums::contacts::ResolvedPeer::Peer(r) = a
        .invoke(&tl::functions::contacts::ResolvePhone {
            phone: to.trim_start_matches('+').into(),
        })
        .await
        .unwrap();
    let peer = r.users.iter().find_map(Peer::from_user).unwrap();
    a.invoke(&tl::functions::phone::RequestCall {
        video: false,
        user_id: peer.input_user(),
        random_id: 7,
        g_a_hash: vec![3; 32],
        protocol: siptg_control::gateway::tgcall::protocol(),
    })
    .await
    .unwrap();
    let mut texts = Vec::new();
    let mut reason = None;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while reason.is_none() || texts.is_empty() {
        let Ok(Some(u)) = tokio::time::timeout_at(end, updates.recv()).await else {
            break;
        };
        match u.update {
            tl::enums::Update::PhoneCall(pc) => {
                if let tl::enums::PhoneCall::Discarded(d) = pc.phone_call {
                    reason = d.reason;
                }
            }
            tl::enums::Update::NewMessage(m) => {
                if let tl::enums::Message::Message(m) = m.message {
                    texts.push(m.message);
                }
            }
            _ => {}
        }
    }
    (reason, texts)
}

#[tokio::test]
async fn telegram_calls_the_gateway_cannot_take_are_refused_with_siptg_texts() {
    let w = world().await;
    let connections = vec![
        conn("name = 'office'\ntype = 'pbx_registers'\nlogin = 'office'\npassword = 'office-password-1'"),
        conn("name = 'trunk'\ntype = 'ip'\nserver = '127.0.0.1:9'"),
    ];
    let gateways = vec![
        // Its PBX must register first: nobody did.
        gateway("name = 'reg'\naccount = 'second'\nconnections = ['office']\npbx_number = '100'"),
        // Reachable PBX, but this Manager has no Worker.
        gateway("name = 'gw'\naccount = 'gateway'\nconnections = ['trunk']\npbx_number = '100'"),
    ];
    let _m = manager(w.accounts.clone(), connections, gateways).await;

    // Alice calls the gateway whose PBX is not registered.
    let (alice, mut alice_updates) = app(&w.sim, "+10000000002").await;
    let (reason, texts) = call_and_wait(&alice, &mut alice_updates, "+10000000006").await;
    assert_eq!(reason, Some(tl::enums::PhoneCallDiscardReason::Busy));
    assert_eq!(texts, vec!["503 SIP account is unavailable".to_string()]);

    // Alice calls the gateway that has a PBX but no Worker to place the call.
    let (reason, texts) = call_and_wait(&alice, &mut alice_updates, "+10000000001").await;
    assert_eq!(reason, Some(tl::enums::PhoneCallDiscardReason::Busy));
    assert_eq!(texts, vec!["503 Worker is unavailable".to_string()]);

    // A gateway account (the `second` gateway's, from another device) calls a gateway.
    let (second, mut second_updates) = app(&w.sim, "+10000000006").await;
    let (reason, texts) = call_and_wait(&second, &mut second_updates, "+10000000001").await;
    assert_eq!(reason, Some(tl::enums::PhoneCallDiscardReason::Busy));
    assert_eq!(
        texts,
        vec!["482 Caller has active gateway accounts".to_string()]
    );
}

fn invite(source: &str, headers: Vec<(String, String)>) -> RouteQuery {
    RouteQuery {
        method: "INVITE".into(),
        request_uri: "sip:+10000000002@127.0.0.1".into(),
        from_user: Some("pbx".into()),
        to_user: Some("+10000000002".into()),
        source: source.parse().unwrap(),
        authorization: None,
        contact: None,
        expires: None,
        headers,
    }
}

#[test]
fn routing_refusals_name_the_worker_and_the_storage() {
    let connections = vec![conn(
        "name = 'trunk'\ntype = 'ip'\nserver = '127.0.0.1:9'\nworker = 'worker-2'",
    )];
    let gateways = vec![gateway(
        "name = 'gw'\naccount = 'gateway'\nconnections = ['trunk']",
    )];
    let r = Routing::new(connections, "siptg").with_gateways(gateways);
    // The connection belongs to worker-2, which is up, but the INVITE reached worker-1.
    r.set_live("worker-2", true);
    let got = r.route(&invite("127.0.0.1:5070", vec![]), "worker-1");
    assert_eq!(
        got,
        LinkResponse::Route {
            code: 403,
            reason: "Worker address is not set".into(),
            headers: vec![]
        }
    );
    // On its own Worker, but no Session Storage is configured at all.
    let got = r.route(&invite("127.0.0.1:5070", vec![]), "worker-2");
    assert_eq!(
        got,
        LinkResponse::Route {
            code: 503,
            reason: "Telegram storage is unavailable".into(),
            headers: vec![]
        }
    );
}

#[test]
fn a_plan_that_does_not_allow_the_calls_worker_refuses_with_402() {
    let connections = vec![conn("name = 'trunk'\ntype = 'ip'\nserver = '127.0.0.1:9'")];
    let gateways = vec![gateway(
        "name = 'gw'\naccount = 'gateway'\nconnections = ['trunk']\nallowed_workers = ['worker-2']",
    )];
    let r = Routing::new(connections, "siptg").with_gateways(gateways);
    // The unpinned connection's INVITE reached worker-1, which the plan does not include.
    let got = r.route(&invite("127.0.0.1:5070", vec![]), "worker-1");
    assert_eq!(
        got,
        LinkResponse::Route {
            code: 402,
            reason: "SIP account has disallowed settings".into(),
            headers: vec![]
        }
    );
    // On an allowed Worker the call goes on (and fails later: no Storage here).
    let got = r.route(&invite("127.0.0.1:5070", vec![]), "worker-2");
    assert!(
        matches!(&got, LinkResponse::Route { code: 503, .. }),
        "{got:?}"
    );
}

#[tokio::test]
async fn an_account_whose_own_authorization_refuses_calls_is_callback_restricted() {
    let w = world().await;
    let m = manager(w.accounts.clone(), vec![], vec![]).await;
    assert!(!m.callback_restricted("storage-1", "second").await);
    assert!(!m.callback_restricted("storage-1", "gateway").await);
    // `second` disables calls on its own (current, hash 0) authorization.
    let set = |disabled: bool| tl::functions::account::ChangeAuthorizationSettings {
        confirmed: false,
        hash: 0,
        encrypted_requests_disabled: None,
        call_requests_disabled: Some(disabled),
    };
    m.invoke("storage-1", "second", &set(true)).await.unwrap();
    // A fresh Manager (the first remembers the allowed answer for a minute).
    let m = manager(w.accounts.clone(), vec![], vec![]).await;
    assert!(m.callback_restricted("storage-1", "second").await);
    assert!(!m.callback_restricted("storage-1", "gateway").await);
    // A restricted account is asked again every time: allowing calls takes effect at once.
    m.invoke("storage-1", "second", &set(false)).await.unwrap();
    assert!(!m.callback_restricted("storage-1", "second").await);
}

/// A database whose every operation fails.
struct BrokenDisk;

impl StoreBackend for BrokenDisk {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn put<'a>(
        &'a self,
        _: Table,
        _: &'a str,
        _: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async {
            Err(StoreError::Redb {
                op: "insert",
                message: "I/O error: disk failed".into(),
            })
        })
    }
    fn get<'a>(
        &'a self,
        _: Table,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async {
            Err(StoreError::Redb {
                op: "get",
                message: "I/O error: disk failed".into(),
            })
        })
    }
    fn delete<'a>(&'a self, _: Table, _: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async {
            Err(StoreError::Redb {
                op: "remove",
                message: "I/O error: disk failed".into(),
            })
        })
    }
    fn list<'a>(&'a self, _: Table, _: &'a str) -> BoxFuture<'a, Result<Entries, StoreError>> {
        Box::pin(async {
            Err(StoreError::Redb {
                op: "range",
                message: "I/O error: disk failed".into(),
            })
        })
    }
}

#[tokio::test]
async fn a_dropped_telegram_session_and_a_failing_database_have_their_statuses() {
    let w = world().await;
    let m = manager(w.accounts.clone(), vec![], vec![]).await;
    // Telegram (the cloud) goes away under a running account.
    w.sim.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = m
        .telegram(
            "storage-1",
            "gateway",
            TelegramOp::Resolve {
                query: PeerQuery::parse("@alice_tg").unwrap(),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, TgError::Transport { .. }), "{e}");
    assert_eq!(sip_status(&e), (503, "Session is not running".to_string()));

    // Resolution needs the database (the cache): it fails.
    let broken = Store::from_backend(Arc::new(BrokenDisk));
    let w2 = world().await;
    let a = w2.accounts.get("gateway").unwrap();
    let e = siptg_control::telegram::resolve::resolve(
        &a,
        &broken,
        &PeerQuery::parse("@alice_tg").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, TgError::Store { .. }), "{e}");
    assert_eq!(sip_status(&e), (500, "Database error".to_string()));
}
