//! The Manager uses a Session Storage over a link (the same frames as mutual TLS, in-process
//! here): allow-listed requests pass with typed answers, others are refused with a typed error,
//! resolution goes through the Storage's cache, and account updates reach the Manager.

use grammers_tl_types as tl;
use siptg_control::config::{
    DatabaseBackend, DatabaseConfig, ManagerConfig, StorageConfig, TelegramConfig,
};
use siptg_control::link::{Role, TelegramAnswer, TelegramOp};
use siptg_control::linkserver::LinkServer;
use siptg_control::manager::{Connector, LinkStream, Manager};
use siptg_control::metrics::Metrics;
use siptg_control::storage::Storage;
use siptg_control::store::Store;
use siptg_control::telegram::account::{AccountOptions, Hygiene, LoginStep};
use siptg_control::telegram::accounts::{Accounts, Cloud};
use siptg_control::telegram::resolve::PeerQuery;
use siptg_control::telegram::sealed::StorageKey;
use siptg_control::telegram::TgError;
use siptg_control::tgsim::{SimUser, TgSim, WorldConfig};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn manager_uses_the_storage_over_a_link() {
    let world = WorldConfig {
        users: vec![
            SimUser::new(1, "+10000000001", Some("gateway_tg"), "Gateway"),
            SimUser::new(2, "+10000000002", Some("alice_tg"), "Alice"),
        ],
        ..Default::default()
    };
    let sim = TgSim::start(world, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &DatabaseConfig {
            backend: DatabaseBackend::Redb,
            path: "s.redb".into(),
            url: None,
        },
        dir.path(),
    )
    .await
    .unwrap();
    let accounts = Accounts::new(
        store.clone(),
        StorageKey::from_bytes(&[3; 32]).unwrap(),
        Cloud::Sim(sim.addr()),
        AccountOptions::default(),
        Hygiene::default(),
    );
    for (name, phone) in [("gw", "+10000000001"), ("alice", "+10000000002")] {
        let sent = accounts.begin_phone_login(name, phone).await.unwrap();
        let step = accounts
            .get(name)
            .unwrap()
            .sign_in(&sent, "12345")
            .await
            .unwrap();
        assert!(matches!(step, LoginStep::Done(_)));
        accounts.finish_step(name, &step).await.unwrap();
    }
    let links = LinkServer::new(Role::Storage, "storage-1".into(), vec![]);
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
    let manager = Manager::new(
        "m".into(),
        ManagerConfig::default(),
        vec![],
        Arc::new(Metrics::default()),
    );
    let mut updates = manager.telegram_updates();
    manager.add_peer(
        Role::Storage,
        "storage-1".into(),
        "in-process".into(),
        connect,
    );
    // Wait for the link.
    let mut up = false;
    for _ in 0..100 {
        if manager.peer_status().iter().any(|p| p.state == "up") {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "{:?}", manager.peer_status());

    // Allowed: the DH config comes back typed.
    let dh: tl::enums::messages::DhConfig = manager
        .invoke(
            "storage-1",
            "gw",
            &tl::functions::messages::GetDhConfig {
                version: 0,
                random_length: 256,
            },
        )
        .await
        .unwrap();
    assert!(matches!(dh, tl::enums::messages::DhConfig::Config(ref c) if c.p.len() == 256));
    // Not allowed: refused by the Storage, typed across the link.
    let e = manager
        .invoke("storage-1", "gw", &tl::functions::auth::LogOut {})
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TgError::NotAllowed {
            method: "auth.logOut".into()
        }
    );
    // Unknown account.
    let e = manager
        .invoke(
            "storage-1",
            "nobody",
            &tl::functions::messages::GetDhConfig {
                version: 0,
                random_length: 0,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TgError::UnknownAccount {
            account: "nobody".into()
        }
    );
    // Resolution with the cache; Telegram's error names survive the link.
    let first = manager
        .telegram(
            "storage-1",
            "gw",
            TelegramOp::Resolve {
                query: PeerQuery::parse("@alice_tg").unwrap(),
            },
        )
        .await
        .unwrap();
    let TelegramAnswer::Peer { peer, cached } = first else {
        panic!()
    };
    assert_eq!((peer.user_id, cached), (2, false));
    let again = manager
        .telegram(
            "storage-1",
            "gw",
            TelegramOp::Resolve {
                query: PeerQuery::UserId(2),
            },
        )
        .await
        .unwrap();
    assert!(matches!(again, TelegramAnswer::Peer { cached: true, .. }));
    let e = manager
        .telegram(
            "storage-1",
            "gw",
            TelegramOp::Resolve {
                query: PeerQuery::parse("@nobody_here").unwrap(),
            },
        )
        .await
        .unwrap_err();
    assert!(e.is("USERNAME_NOT_OCCUPIED"), "{e}");
    let TelegramAnswer::Accounts { accounts } = manager
        .telegram("storage-1", "", TelegramOp::Accounts)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(accounts.len(), 2);
    // An update for an account reaches the Manager: the gateway calls Alice, Alice's account
    // (also in this Storage) hears phoneCallRequested.
    manager
        .invoke(
            "storage-1",
            "gw",
            &tl::functions::phone::RequestCall {
                video: false,
                user_id: peer.input_user(),
                random_id: 5,
                g_a_hash: vec![1; 32],
                protocol: tl::enums::PhoneCallProtocol::Protocol(tl::types::PhoneCallProtocol {
                    udp_p2p: true,
                    udp_reflector: true,
                    min_layer: 92,
                    max_layer: 92,
                    library_versions: vec!["8.0.0".into()],
                }),
            },
        )
        .await
        .unwrap();
    let u = loop {
        let u = tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .unwrap()
            .unwrap();
        if u.account == "alice" {
            break u;
        }
    };
    assert_eq!(u.storage, "storage-1");
    let tl::enums::Update::PhoneCall(pc) = u.update else {
        panic!()
    };
    assert!(matches!(pc.phone_call, tl::enums::PhoneCall::Requested(_)));
    // A Storage the Manager has no link to is a typed error.
    let e = manager
        .telegram("storage-2", "gw", TelegramOp::Accounts)
        .await
        .unwrap_err();
    assert!(matches!(e, TgError::Transport { .. }));
}
