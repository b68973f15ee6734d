//! The Session Storage against the simulated Telegram cloud over its real TCP wire: login flows,
//! sealing at rest, restart, allow-list, resolution and its cache, flood control, hygiene, and
//! call flows in both roles between two accounts.

use grammers_tl_types as tl;
use siptg_control::config::{DatabaseBackend, DatabaseConfig};
use siptg_control::store::Store;
use siptg_control::telegram::account::{AccountOptions, Hygiene, LoginStep};
use siptg_control::telegram::accounts::{AccountState, Accounts, Cloud};
use siptg_control::telegram::resolve::{resolve, PeerQuery, Source};
use siptg_control::telegram::sealed::StorageKey;
use siptg_control::telegram::TgError;
use siptg_control::tgcall::dh;
use siptg_control::tgsim::{Privacy, SimUser, TgSim, WorldConfig};
use std::sync::Arc;
use std::time::Duration;

const ALICE: i64 = 1001;
const BOB: i64 = 1002;
const CAROL: i64 = 1003;
const DAVE: i64 = 1004;
const ERIN: i64 = 1005;

fn users() -> Vec<SimUser> {
    let mut bob = SimUser::new(BOB, "+10000000002", Some("bob_tg"), "Bob");
    bob.password = Some("hunter2".into());
    let mut dave = SimUser::new(DAVE, "+10000000004", Some("dave_tg"), "Dave");
    dave.calls = Privacy::Nobody;
    let mut erin = SimUser::new(ERIN, "+10000000005", Some("erin_tg"), "Erin");
    erin.offline = true;
    vec![
        SimUser::new(ALICE, "+10000000001", Some("alice_tg"), "Alice"),
        bob,
        SimUser::new(CAROL, "+10000000003", Some("carol_tg"), "Carol"),
        dave,
        erin,
    ]
}

/// One test's cloud and database. The database is redb, or a fresh PostgreSQL database when
/// `SIPTG_TEST_POSTGRES_URL` is set (`tests/interop/run storage` runs this suite both ways).
struct Env {
    sim: TgSim,
    dir: tempfile::TempDir,
    key: StorageKey,
    db: DatabaseConfig,
    opts: AccountOptions,
}

impl Env {
    async fn new(cfg: WorldConfig) -> Self {
        let sim = TgSim::start(cfg, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let db = match std::env::var("SIPTG_TEST_POSTGRES_URL") {
            Ok(url) => {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let name = format!("siptg_t{:016x}", rand::random::<u64>());
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
                DatabaseConfig {
                    backend: DatabaseBackend::Postgres,
                    path: Default::default(),
                    url: Some(format!("{base}/{name}")),
                }
            }
            Err(_) => DatabaseConfig {
                backend: DatabaseBackend::Redb,
                path: "db/storage.redb".into(),
                url: None,
            },
        };
        Env {
            sim,
            dir: tempfile::tempdir().unwrap(),
            key: StorageKey::from_bytes(&[0x42; 32]).unwrap(),
            db,
            opts: AccountOptions {
                rpc_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        }
    }

    /// Do the database's files on disk contain `needle` anywhere? (redb: its file; PostgreSQL:
    /// every file of the cluster after a checkpoint, when `SIPTG_TEST_PGDATA` names it.)
    async fn files_contain(&self, needle: &[u8]) -> bool {
        let mut roots = Vec::new();
        match self.db.backend {
            DatabaseBackend::Redb => roots.push(self.dir.path().join("db")),
            DatabaseBackend::Postgres => {
                let (client, conn) =
                    tokio_postgres::connect(self.db.url.as_deref().unwrap(), tokio_postgres::NoTls)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                client.batch_execute("CHECKPOINT").await.unwrap();
                match std::env::var("SIPTG_TEST_PGDATA") {
                    Ok(d) => roots.push(d.into()),
                    Err(_) => eprintln!("SIPTG_TEST_PGDATA not set: PostgreSQL files not scanned"),
                }
            }
        }
        let mut stack = roots;
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    stack.push(e.path());
                }
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
        false
    }

    async fn accounts(&self) -> Arc<Accounts> {
        self.accounts_with(self.key.clone()).await
    }

    async fn accounts_with(&self, key: StorageKey) -> Arc<Accounts> {
        let store = Store::open(&self.db, self.dir.path()).await.unwrap();
        Accounts::new(
            store,
            key,
            Cloud::Sim(self.sim.addr()),
            self.opts.clone(),
            Hygiene::default(),
        )
    }
}

fn world() -> WorldConfig {
    WorldConfig {
        users: users(),
        ..Default::default()
    }
}

async fn login(accounts: &Arc<Accounts>, name: &str, phone: &str) -> i64 {
    let sent = accounts.begin_phone_login(name, phone).await.unwrap();
    let a = accounts.get(name).unwrap();
    let step = a.sign_in(&sent, "12345").await.unwrap();
    accounts.finish_step(name, &step).await.unwrap();
    match step {
        LoginStep::Done(me) => me.user_id,
        other => panic!("login of {name}: {other:?}"),
    }
}

#[tokio::test]
async fn phone_login_wrong_code_then_right_and_hygiene() {
    let env = Env::new(world()).await;
    // Alice already has a phone app logged in: hygiene must turn calls off there.
    let other_device = env.sim.with_world(|w| {
        let k = w.hello(None, std::time::Instant::now());
        w.authorize(&k, ALICE);
        k
    });
    let accounts = env.accounts().await;
    let sent = accounts
        .begin_phone_login("gw", "+1 000 000 0001")
        .await
        .unwrap();
    let a = accounts.get("gw").unwrap();
    let wrong = a.sign_in(&sent, "99999").await.unwrap_err();
    assert!(wrong.is("PHONE_CODE_INVALID"), "{wrong}");
    let step = a.sign_in(&sent, "12345").await.unwrap();
    let LoginStep::Done(me) = &step else {
        panic!("{step:?}")
    };
    assert_eq!(me.user_id, ALICE);
    assert_eq!(me.username.as_deref(), Some("alice_tg"));
    let report = accounts.finish_step("gw", &step).await.unwrap().unwrap();
    assert_eq!(report.devices_calls_disabled, 1);
    assert_eq!(
        report.privacy_set,
        vec!["phone_call", "phone_p2p", "chat_invite"]
    );
    let keys = env.sim.with_world(|w| w.keys_of(ALICE));
    let other = keys.iter().find(|(k, _)| *k == other_device).unwrap();
    assert!(other.1, "calls disabled on the other device");
    let alice = env.sim.with_world(|w| w.user(ALICE).cloned()).unwrap();
    assert_eq!(
        (alice.calls, alice.p2p, alice.chat_invite),
        (Privacy::Everybody, Privacy::Everybody, Privacy::Nobody)
    );
    assert_eq!(
        accounts.record("gw").await.unwrap().unwrap().state,
        AccountState::Active
    );
    // Bad phone input is refused before Telegram sees it.
    assert!(matches!(
        accounts.begin_phone_login("gw2", "call me").await,
        Err(TgError::Invalid { .. })
    ));
    assert!(matches!(
        accounts
            .begin_phone_login("bad name!", "+10000000001")
            .await,
        Err(TgError::Invalid { .. })
    ));
}

#[tokio::test]
async fn two_factor_password_wrong_then_right() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    let sent = accounts
        .begin_phone_login("bob", "+10000000002")
        .await
        .unwrap();
    let a = accounts.get("bob").unwrap();
    let step = a.sign_in(&sent, "12345").await.unwrap();
    assert!(matches!(step, LoginStep::PasswordNeeded { .. }), "{step:?}");
    let wrong = a.check_password("letmein").await.unwrap_err();
    assert!(wrong.is("PASSWORD_HASH_INVALID"), "{wrong}");
    let step = a.check_password("hunter2").await.unwrap();
    let LoginStep::Done(me) = &step else {
        panic!("{step:?}")
    };
    assert_eq!(me.user_id, BOB);
    accounts.finish_step("bob", &step).await.unwrap();
}

#[tokio::test]
async fn qr_login_completes_when_the_app_accepts_the_token() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    let mut updates = accounts.subscribe();
    let a = accounts.connect("qr").await.unwrap();
    let LoginStep::QrToken { token, expires } = a.qr_login().await.unwrap() else {
        panic!("no token")
    };
    assert!(expires > 0 && token.len() >= 16);
    // Before anyone accepts it, polling gives a token again.
    assert!(matches!(
        a.qr_login().await.unwrap(),
        LoginStep::QrToken { .. }
    ));
    let LoginStep::QrToken { token, .. } = a.qr_login().await.unwrap() else {
        panic!()
    };
    env.sim.accept_qr(&token, CAROL).unwrap();
    let u = tokio::time::timeout(Duration::from_secs(5), updates.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(u.update, tl::enums::Update::LoginToken));
    let step = a.qr_login().await.unwrap();
    let LoginStep::Done(me) = &step else {
        panic!("{step:?}")
    };
    assert_eq!(me.user_id, CAROL);
    assert!(env.sim.accept_qr(b"forged token", CAROL).is_err());
}

#[tokio::test]
async fn sessions_are_sealed_at_rest_and_survive_a_restart() {
    let env = Env::new(world()).await;
    {
        let accounts = env.accounts().await;
        login(&accounts, "gw", "+10000000001").await;
        accounts.disconnect("gw");
    }
    // The sim's auth key for Alice's gateway session never appears in the database file.
    let keys = env.sim.with_world(|w| w.keys_of(ALICE));
    assert_eq!(keys.len(), 1);
    assert!(
        !env.files_contain(&keys[0].0).await,
        "auth key stored in the clear"
    );
    // (The check can see: the account's name is in the files, unsealed.)
    assert!(env.db.backend != DatabaseBackend::Redb || env.files_contain(b"alice_tg").await);
    // A restarted Storage (new store handle, new connections) is still logged in.
    let accounts = env.accounts().await;
    let records = accounts.start_all().await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].state, AccountState::Active);
    assert_eq!(
        accounts.get("gw").unwrap().me().await.unwrap().user_id,
        ALICE
    );
    accounts.disconnect("gw");
    drop(accounts);
    // The wrong storage key cannot open it.
    let wrong = env
        .accounts_with(StorageKey::from_bytes(&[1; 32]).unwrap())
        .await;
    assert!(matches!(
        wrong.connect("gw").await,
        Err(TgError::Store { .. })
    ));
}

#[tokio::test]
async fn log_out_forgets_the_session() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    accounts.log_out("gw").await.unwrap();
    assert_eq!(
        accounts.record("gw").await.unwrap().unwrap().state,
        AccountState::LoggedOut
    );
    assert!(accounts.store().get_session("gw").await.unwrap().is_none());
    assert!(env.sim.with_world(|w| w.keys_of(ALICE)).is_empty());
}

#[tokio::test]
async fn requests_outside_the_allow_list_are_refused() {
    use tl::Serializable;
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let a = accounts.get("gw").unwrap();
    let refused = a
        .invoke_allowed(tl::functions::auth::LogOut {}.to_bytes())
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        TgError::NotAllowed {
            method: "auth.logOut".into()
        }
    );
    let dh = a
        .invoke_allowed(
            tl::functions::messages::GetDhConfig {
                version: 0,
                random_length: 256,
            }
            .to_bytes(),
        )
        .await
        .unwrap();
    let tl::enums::messages::DhConfig::Config(c) =
        <tl::enums::messages::DhConfig as tl::Deserializable>::from_bytes(&dh).unwrap()
    else {
        panic!()
    };
    dh::DhParams::check(c.g, &c.p, &mut rand::thread_rng()).expect("a real safe-prime DH config");
    // Still logged in: the refused logOut never reached Telegram.
    assert_eq!(a.me().await.unwrap().user_id, ALICE);
    assert!(matches!(
        a.invoke_allowed(vec![1, 2]).await,
        Err(TgError::NotAllowed { method: _ })
    ));
}

#[tokio::test]
async fn resolution_by_username_phone_and_id_with_cache() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let a = accounts.get("gw").unwrap();
    let store = accounts.store();
    let (bob, src) = resolve(&a, store, &PeerQuery::parse("@Bob_TG").unwrap())
        .await
        .unwrap();
    assert_eq!((bob.user_id, src), (BOB, Source::Telegram));
    let (again, src) = resolve(&a, store, &PeerQuery::parse("@bob_tg").unwrap())
        .await
        .unwrap();
    assert_eq!((again, src), (bob.clone(), Source::Cache));
    // The id and phone of a resolved user are cached too.
    let (by_id, src) = resolve(&a, store, &PeerQuery::UserId(BOB)).await.unwrap();
    assert_eq!((by_id.user_id, src), (BOB, Source::Cache));
    let (carol, src) = resolve(&a, store, &PeerQuery::parse("+10000000003").unwrap())
        .await
        .unwrap();
    assert_eq!((carol.user_id, src), (CAROL, Source::Telegram));
    let e = resolve(&a, store, &PeerQuery::parse("@nobody_here").unwrap())
        .await
        .unwrap_err();
    assert!(e.is("USERNAME_NOT_OCCUPIED"), "{e}");
    let e = resolve(&a, store, &PeerQuery::UserId(4242))
        .await
        .unwrap_err();
    assert_eq!(e, TgError::UnknownUser { user_id: 4242 });
    assert!(e.to_string().contains("Chat not found"));
    // The cache is persistent: a new Storage over the same database still knows Bob.
    accounts.disconnect("gw");
    drop(accounts);
    let accounts = env.accounts().await;
    accounts.start_all().await.unwrap();
    let a = accounts.get("gw").unwrap();
    let (b, src) = resolve(&a, accounts.store(), &PeerQuery::UserId(BOB))
        .await
        .unwrap();
    assert_eq!((b.user_id, src), (BOB, Source::Cache));
}

fn rand256() -> [u8; 256] {
    let mut b = [0u8; 256];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b
}

fn protocol(versions: &[&str]) -> tl::enums::PhoneCallProtocol {
    tl::enums::PhoneCallProtocol::Protocol(tl::types::PhoneCallProtocol {
        udp_p2p: true,
        udp_reflector: true,
        min_layer: 92,
        max_layer: 92,
        library_versions: versions.iter().map(|s| s.to_string()).collect(),
    })
}

async fn request_call(
    a: &siptg_control::telegram::account::Account,
    peer: &siptg_control::telegram::resolve::Peer,
) -> Result<tl::types::PhoneCallWaiting, TgError> {
    let r = a
        .invoke(&tl::functions::phone::RequestCall {
            video: false,
            user_id: peer.input_user(),
            random_id: 1,
            g_a_hash: vec![7; 32],
            protocol: protocol(&["8.0.0"]),
        })
        .await?;
    let tl::enums::phone::PhoneCall::Call(pc) = r;
    match pc.phone_call {
        tl::enums::PhoneCall::Waiting(w) => Ok(w),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn flood_wait_and_peer_flood_hold_requests_back() {
    let mut cfg = world();
    cfg.flood.calls_per_minute = 2;
    cfg.flood.stranger_calls = 100;
    let env = Env::new(cfg).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let a = accounts.get("gw").unwrap();
    let (bob, _) = resolve(&a, accounts.store(), &PeerQuery::parse("@bob_tg").unwrap())
        .await
        .unwrap();
    request_call(&a, &bob).await.unwrap();
    request_call(&a, &bob).await.unwrap();
    let e = request_call(&a, &bob).await.unwrap_err();
    let TgError::FloodWait { seconds } = e else {
        panic!("{e}")
    };
    assert!((1..=60).contains(&seconds));
    assert_eq!(
        e.to_string(),
        format!("Too Many Requests: retry after {seconds}")
    );
    // Held back locally: the cloud does not see the next attempt.
    let seen = env.sim.with_world(|w| w.log.len());
    assert!(matches!(
        request_call(&a, &bob).await,
        Err(TgError::FloodWait { .. })
    ));
    assert_eq!(env.sim.with_world(|w| w.log.len()), seen);
    assert_eq!(a.flood_waits()[0].0, "phone.requestCall");
    // Other requests still go through.
    assert_eq!(a.me().await.unwrap().user_id, ALICE);

    // PEER_FLOOD: too many strangers.
    let mut cfg = world();
    cfg.flood.stranger_calls = 1;
    let env = Env::new(cfg).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let a = accounts.get("gw").unwrap();
    let (bob, _) = resolve(&a, accounts.store(), &PeerQuery::parse("@bob_tg").unwrap())
        .await
        .unwrap();
    let (carol, _) = resolve(
        &a,
        accounts.store(),
        &PeerQuery::parse("@carol_tg").unwrap(),
    )
    .await
    .unwrap();
    request_call(&a, &bob).await.unwrap();
    let e = request_call(&a, &carol).await.unwrap_err();
    assert!(matches!(e, TgError::PeerFlood { .. }), "{e}");
    assert!(e.is("PEER_FLOOD"));
    assert!(matches!(
        request_call(&a, &bob).await,
        Err(TgError::PeerFlood { .. })
    ));
}

#[tokio::test]
async fn privacy_and_blocks_are_telegrams_errors() {
    let env = Env::new(world()).await;
    env.sim.with_world(|w| {
        w.user_mut(CAROL).unwrap().blocked.insert(ALICE);
    });
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let a = accounts.get("gw").unwrap();
    let (dave, _) = resolve(&a, accounts.store(), &PeerQuery::parse("@dave_tg").unwrap())
        .await
        .unwrap();
    let e = request_call(&a, &dave).await.unwrap_err();
    assert!(e.is("USER_PRIVACY_RESTRICTED"), "{e}");
    let (carol, _) = resolve(
        &a,
        accounts.store(),
        &PeerQuery::parse("@carol_tg").unwrap(),
    )
    .await
    .unwrap();
    let e = request_call(&a, &carol).await.unwrap_err();
    assert!(e.is("USER_IS_BLOCKED"), "{e}");
}

async fn next_call_update(
    rx: &mut tokio::sync::broadcast::Receiver<siptg_control::telegram::accounts::AccountUpdate>,
    account: &str,
) -> tl::enums::Update {
    loop {
        let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update in time")
            .unwrap();
        if u.account == account {
            return u.update;
        }
    }
}

/// One full call: `caller` account calls `callee`'s user; DH keys must agree.
async fn full_call(accounts: &Arc<Accounts>, caller: &str, callee: &str, callee_query: &str) {
    let mut rx = accounts.subscribe();
    let a = accounts.get(caller).unwrap();
    let b = accounts.get(callee).unwrap();
    let mut rng = rand::thread_rng();
    let dh_conf = |c: tl::enums::messages::DhConfig| match c {
        tl::enums::messages::DhConfig::Config(c) => c,
        _ => panic!(),
    };
    let ca = dh_conf(
        a.invoke(&tl::functions::messages::GetDhConfig {
            version: 0,
            random_length: 256,
        })
        .await
        .unwrap(),
    );
    let pa = dh::DhParams::check(ca.g, &ca.p, &mut rng).unwrap();
    let sa = pa.secret(&ca.random, rand256).unwrap();
    let (peer, _) = resolve(
        &a,
        accounts.store(),
        &PeerQuery::parse(callee_query).unwrap(),
    )
    .await
    .unwrap();
    let r = a
        .invoke(&tl::functions::phone::RequestCall {
            video: false,
            user_id: peer.input_user(),
            random_id: 9,
            g_a_hash: dh::g_a_hash(&sa.public).to_vec(),
            protocol: protocol(&["13.0.0", "8.0.0"]),
        })
        .await
        .unwrap();
    let tl::enums::phone::PhoneCall::Call(pc) = r;
    let tl::enums::PhoneCall::Waiting(w) = pc.phone_call else {
        panic!()
    };
    let input = tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
        id: w.id,
        access_hash: w.access_hash,
    });
    // The callee's device rings.
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, callee).await else {
        panic!()
    };
    let tl::enums::PhoneCall::Requested(req) = u.phone_call else {
        panic!("{:?}", u.phone_call)
    };
    assert_eq!(req.id, w.id);
    let b_input = tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
        id: req.id,
        access_hash: req.access_hash,
    });
    assert!(b
        .invoke(&tl::functions::phone::ReceivedCall {
            peer: b_input.clone()
        })
        .await
        .unwrap());
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, caller).await else {
        panic!()
    };
    let tl::enums::PhoneCall::Waiting(w2) = u.phone_call else {
        panic!()
    };
    assert!(
        w2.receive_date.is_some(),
        "caller learns the call is ringing"
    );
    // Callee accepts with g_b.
    let cb = dh_conf(
        b.invoke(&tl::functions::messages::GetDhConfig {
            version: 0,
            random_length: 256,
        })
        .await
        .unwrap(),
    );
    let pb = dh::DhParams::check(cb.g, &cb.p, &mut rng).unwrap();
    let sb = pb.secret(&cb.random, rand256).unwrap();
    b.invoke(&tl::functions::phone::AcceptCall {
        peer: b_input.clone(),
        g_b: sb.public.to_vec(),
        protocol: protocol(&["8.0.0"]),
    })
    .await
    .unwrap();
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, caller).await else {
        panic!()
    };
    let tl::enums::PhoneCall::Accepted(acc) = u.phone_call else {
        panic!()
    };
    let key_a = pa.shared_key(&sa, &acc.g_b).unwrap();
    let fp = dh::key_fingerprint(&key_a);
    let r = a
        .invoke(&tl::functions::phone::ConfirmCall {
            peer: input.clone(),
            g_a: sa.public.to_vec(),
            key_fingerprint: fp,
            protocol: protocol(&["13.0.0", "8.0.0"]),
        })
        .await
        .unwrap();
    let tl::enums::phone::PhoneCall::Call(pc) = r;
    let tl::enums::PhoneCall::Call(active_a) = pc.phone_call else {
        panic!()
    };
    // The server chose the version both have.
    let tl::enums::PhoneCallProtocol::Protocol(p) = &active_a.protocol;
    assert_eq!(p.library_versions, vec!["8.0.0".to_string()]);
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, callee).await else {
        panic!()
    };
    let tl::enums::PhoneCall::Call(active_b) = u.phone_call else {
        panic!()
    };
    dh::verify_g_a(&active_b.g_a_or_b, &req.g_a_hash).unwrap();
    let key_b = pb.shared_key(&sb, &active_b.g_a_or_b).unwrap();
    assert_eq!(key_a, key_b);
    dh::verify_fingerprint(&key_b, active_b.key_fingerprint).unwrap();
    // Signalling is relayed both ways, bytes intact.
    assert!(a
        .invoke(&tl::functions::phone::SendSignalingData {
            peer: input.clone(),
            data: vec![1, 2, 3]
        })
        .await
        .unwrap());
    let tl::enums::Update::PhoneCallSignalingData(s) = next_call_update(&mut rx, callee).await
    else {
        panic!()
    };
    assert_eq!((s.phone_call_id, s.data), (w.id, vec![1, 2, 3]));
    assert!(b
        .invoke(&tl::functions::phone::SendSignalingData {
            peer: b_input.clone(),
            data: vec![9; 300]
        })
        .await
        .unwrap());
    let tl::enums::Update::PhoneCallSignalingData(s) = next_call_update(&mut rx, caller).await
    else {
        panic!()
    };
    assert_eq!(s.data, vec![9; 300]);
    // The callee hangs up: both hear Discarded (hangup).
    b.invoke(&tl::functions::phone::DiscardCall {
        video: false,
        peer: b_input,
        duration: 5,
        reason: tl::enums::PhoneCallDiscardReason::Hangup,
        connection_id: 0,
    })
    .await
    .unwrap();
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, caller).await else {
        panic!()
    };
    let tl::enums::PhoneCall::Discarded(d) = u.phone_call else {
        panic!()
    };
    assert_eq!(d.reason, Some(tl::enums::PhoneCallDiscardReason::Hangup));
    let e = a
        .invoke(&tl::functions::phone::SendSignalingData {
            peer: input,
            data: vec![1],
        })
        .await
        .unwrap_err();
    assert!(e.is("CALL_ALREADY_DECLINED"), "{e}");
}

#[tokio::test]
async fn calls_in_both_roles_between_two_accounts() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    login(&accounts, "carol", "+10000000003").await;
    full_call(&accounts, "gw", "carol", "@carol_tg").await;
    full_call(&accounts, "carol", "gw", "+10000000001").await;
}

#[tokio::test]
async fn offline_callee_rings_out_after_the_offline_timeout() {
    let mut cfg = world();
    cfg.offline_ring_timeout = Duration::from_millis(300);
    let env = Env::new(cfg).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let mut rx = accounts.subscribe();
    let a = accounts.get("gw").unwrap();
    let (erin, _) = resolve(&a, accounts.store(), &PeerQuery::parse("@erin_tg").unwrap())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    request_call(&a, &erin).await.unwrap();
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, "gw").await else {
        panic!()
    };
    let tl::enums::PhoneCall::Discarded(d) = u.phone_call else {
        panic!("{:?}", u.phone_call)
    };
    assert_eq!(d.reason, Some(tl::enums::PhoneCallDiscardReason::Missed));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn declining_an_incoming_call_tells_the_caller_busy() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    login(&accounts, "carol", "+10000000003").await;
    let mut rx = accounts.subscribe();
    let a = accounts.get("gw").unwrap();
    let b = accounts.get("carol").unwrap();
    let (carol, _) = resolve(
        &a,
        accounts.store(),
        &PeerQuery::parse("@carol_tg").unwrap(),
    )
    .await
    .unwrap();
    request_call(&a, &carol).await.unwrap();
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, "carol").await else {
        panic!()
    };
    let tl::enums::PhoneCall::Requested(req) = u.phone_call else {
        panic!()
    };
    b.invoke(&tl::functions::phone::DiscardCall {
        video: false,
        peer: tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
            id: req.id,
            access_hash: req.access_hash,
        }),
        duration: 0,
        reason: tl::enums::PhoneCallDiscardReason::Hangup,
        connection_id: 0,
    })
    .await
    .unwrap();
    let tl::enums::Update::PhoneCall(u) = next_call_update(&mut rx, "gw").await else {
        panic!()
    };
    let tl::enums::PhoneCall::Discarded(d) = u.phone_call else {
        panic!()
    };
    assert_eq!(d.reason, Some(tl::enums::PhoneCallDiscardReason::Busy));
}

#[tokio::test]
async fn an_unanswered_request_is_the_rpc_timeout() {
    let mut cfg = world();
    cfg.unanswered = vec!["phone.requestCall".into()];
    let mut env = Env::new(cfg).await;
    env.opts.rpc_timeout = Duration::from_millis(300);
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    let a = accounts.get("gw").unwrap();
    let (bob, _) = resolve(&a, accounts.store(), &PeerQuery::parse("@bob_tg").unwrap())
        .await
        .unwrap();
    let e = request_call(&a, &bob).await.unwrap_err();
    assert_eq!(e, TgError::Timeout);
    assert_eq!(e.to_string(), "Timeout of waiting RPC result");
    // The account keeps working.
    assert_eq!(a.me().await.unwrap().user_id, ALICE);
}

#[tokio::test]
async fn text_messages_both_ways() {
    let env = Env::new(world()).await;
    let accounts = env.accounts().await;
    login(&accounts, "gw", "+10000000001").await;
    login(&accounts, "carol", "+10000000003").await;
    let mut rx = accounts.subscribe();
    let a = accounts.get("gw").unwrap();
    let (carol, _) = resolve(
        &a,
        accounts.store(),
        &PeerQuery::parse("@carol_tg").unwrap(),
    )
    .await
    .unwrap();
    let send = |to: &siptg_control::telegram::resolve::Peer, text: &str| {
        tl::functions::messages::SendMessage {
            no_webpage: true,
            silent: false,
            background: false,
            clear_draft: false,
            noforwards: false,
            update_stickersets_order: false,
            invert_media: false,
            allow_paid_floodskip: false,
            peer: tl::enums::InputPeer::User(tl::types::InputPeerUser {
                user_id: to.user_id,
                access_hash: to.access_hash,
            }),
            reply_to: None,
            message: text.into(),
            random_id: rand::random(),
            reply_markup: None,
            entities: None,
            schedule_date: None,
            schedule_repeat_period: None,
            send_as: None,
            quick_reply_shortcut: None,
            effect: None,
            allow_paid_stars: None,
            suggested_post: None,
            rich_message: None,
        }
    };
    a.invoke_allowed(tl::Serializable::to_bytes(&send(&carol, "123#")))
        .await
        .unwrap();
    let tl::enums::Update::NewMessage(m) = next_call_update(&mut rx, "carol").await else {
        panic!()
    };
    let tl::enums::Message::Message(m) = m.message else {
        panic!()
    };
    assert_eq!(m.message, "123#");
    assert_eq!(
        m.from_id,
        Some(tl::enums::Peer::User(tl::types::PeerUser {
            user_id: ALICE
        }))
    );
    let b = accounts.get("carol").unwrap();
    // The message came with its sender (as Telegram's do): Carol's account can now reach Alice
    // by id, from the cache, without ever resolving her.
    let (alice, src) = resolve(&b, accounts.store(), &PeerQuery::UserId(ALICE))
        .await
        .unwrap();
    assert_eq!((alice.user_id, src), (ALICE, Source::Cache));
    b.invoke(&send(&alice, "hello gateway")).await.unwrap();
    let tl::enums::Update::NewMessage(m) = next_call_update(&mut rx, "gw").await else {
        panic!()
    };
    let tl::enums::Message::Message(m) = m.message else {
        panic!()
    };
    assert_eq!(m.message, "hello gateway");
    let e = b.invoke(&send(&alice, "")).await.unwrap_err();
    assert!(e.is("MESSAGE_EMPTY"), "{e}");
    // Carol takes new chats from contacts only: Telegram asks a stranger for Premium; once
    // Alice is her contact the text goes through.
    env.sim.with_world(|w| {
        w.user_mut(CAROL).unwrap().messages = siptg_control::tgsim::world::Privacy::Contacts;
    });
    let e = a.invoke(&send(&carol, "hi")).await.unwrap_err();
    assert!(e.is("PRIVACY_PREMIUM_REQUIRED"), "{e}");
    env.sim.with_world(|w| {
        w.user_mut(CAROL).unwrap().contacts.insert(ALICE);
    });
    a.invoke(&send(&carol, "hi")).await.unwrap();
}

/// A keypad bot in the Storage: it logs in by its token (a wrong one is Telegram's
/// ACCESS_TOKEN_INVALID), is recorded as a bot, comes back after a restart without account
/// hygiene (a bot has no calls or privacy), and its inline queries reach the Storage's update
/// stream, answered through the allow-list.
#[tokio::test]
async fn a_bot_logs_in_by_token_and_hears_inline_queries() {
    use siptg_control::telegram::account::ALLOWED;
    let mut cfg = world();
    cfg.users
        .push(SimUser::new_bot(77, "keypad_bot", "77:keypad-secret"));
    let env = Env::new(cfg).await;
    let accounts = env.accounts().await;
    let wrong = accounts.bot_login("keypad", "77:nope").await.unwrap_err();
    assert_eq!(wrong.rpc_name(), Some("ACCESS_TOKEN_INVALID"), "{wrong}");
    let malformed = accounts.bot_login("keypad", "no-token").await.unwrap_err();
    assert!(malformed.to_string().contains("@BotFather"), "{malformed}");
    let me = accounts
        .bot_login("keypad", "77:keypad-secret")
        .await
        .unwrap();
    assert!(me.bot && me.user_id == 77);
    assert_eq!(me.username.as_deref(), Some("keypad_bot"));
    let rec = accounts.record("keypad").await.unwrap().unwrap();
    assert_eq!(rec.state, AccountState::Active);
    assert!(rec.me.is_some_and(|m| m.bot));
    drop(accounts);

    // After a restart: connected again, no hygiene attempted (the cloud refuses a bot's
    // account.* as BOT_METHOD_INVALID, and its log would show it).
    let accounts = env.accounts().await;
    let list = accounts.start_all().await.unwrap();
    let bot = list.iter().find(|r| r.name == "keypad").unwrap();
    assert_eq!(bot.state, AccountState::Active);
    let refused = env.sim.with_world(|w| w.log.clone());
    assert!(
        !refused.iter().any(|(m, _)| m.starts_with("account.")),
        "{refused:?}"
    );

    // A user's inline query reaches the bot through the Storage's updates.
    let mut updates = accounts.subscribe();
    login(&accounts, "gw", "+10000000001").await;
    let gw = accounts.get("gw").unwrap();
    let ask = tl::functions::messages::GetInlineBotResults {
        bot: tl::enums::InputUser::User(tl::types::InputUser {
            user_id: 77,
            access_hash: match env.sim.with_world(|w| w.user_tl_for(77, ALICE)) {
                Some(tl::enums::User::User(u)) => u.access_hash.unwrap(),
                other => panic!("{other:?}"),
            },
        }),
        peer: tl::enums::InputPeer::PeerSelf,
        geo_point: None,
        query: "abc".into(),
        offset: String::new(),
    };
    let asking = tokio::spawn(async move {
        use tl::Serializable;
        gw.invoke_allowed(ask.to_bytes()).await
    });
    let q = loop {
        let u = tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .expect("the bot hears the query")
            .unwrap();
        if let tl::enums::Update::BotInlineQuery(q) = u.update {
            assert_eq!(u.account, "keypad");
            break q;
        }
    };
    assert_eq!(q.query, "abc");
    let bot = accounts.get("keypad").unwrap();
    let answer = siptg_control::gateway::keypad::inline_results(q.query_id, "abc");
    {
        use tl::Serializable;
        bot.invoke_allowed(answer.to_bytes()).await.unwrap();
    }
    let results = asking.await.unwrap().unwrap();
    let tl::enums::messages::BotResults::Results(r) = {
        use tl::Deserializable;
        tl::enums::messages::BotResults::from_bytes(&results).unwrap()
    };
    assert_eq!(r.results.len(), 1);
    for m in [
        "messages.getInlineBotResults",
        "messages.sendInlineBotResult",
        "messages.deleteMessages",
        "messages.setInlineBotResults",
        "messages.setBotCallbackAnswer",
    ] {
        assert!(ALLOWED.contains(&m), "{m}");
    }
}
