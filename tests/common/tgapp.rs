//! A Telegram user's app on the simulated cloud embedded in a test's `siptg up`: logs in by
//! phone (the cloud's code is `12345`) and resolves other users, as the gateway tests need.
#![allow(dead_code)]

use super::{SimUp, TestNode};
use siptg_control::telegram::account::{Account, AccountOptions, LoginStep};
use siptg_control::telegram::resolve::Peer;
use siptg_control::telegram::simclient::SimClient;
use siptg_control::telegram::tl;
use siptg_control::telegram::transport::UpdateRx;
use std::sync::Arc;

/// The app of the user with `phone`, logged in to `node`'s simulated cloud, and its updates.
pub async fn app(node: &TestNode, phone: &str) -> (Account, UpdateRx) {
    let (client, updates) = SimClient::connect(SimUp::sim_address(node), None)
        .await
        .unwrap();
    let a = Account::new("user-app", Arc::new(client), AccountOptions::default());
    let sent = a.send_code(phone).await.unwrap();
    assert!(matches!(
        a.sign_in(&sent, "12345").await.unwrap(),
        LoginStep::Done(_)
    ));
    (a, updates)
}

/// The user with `phone`, as app `a` sees them.
pub async fn user(a: &Account, phone: &str) -> Peer {
    let tl::enums::contacts::ResolvedPeer::Peer(r) = a
        .invoke(&tl::functions::contacts::ResolvePhone {
            phone: phone.into(),
        })
        .await
        .unwrap();
    r.users.iter().find_map(Peer::from_user).unwrap()
}
