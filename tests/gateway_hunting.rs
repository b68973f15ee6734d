//! Priority hunting for a Telegram user's call to the PBX against a real `siptg up`: the PBXs
//! of one priority ring in parallel (the first 2xx wins, the others get CANCEL), and the next
//! priority is tried only when every PBX of the previous one failed; and such a call is cut
//! when the gateway's monthly talk time runs out. The PBXs are fake UAs on 127.0.0.1 (IP
//! trunks); the Telegram user is an app on the embedded simulated cloud.

mod common;

use common::pbx::{Msg, Pbx};
use common::tgapp::app;
use common::{wait_for, Proc, SimUp, TestNode};
use siptg_control::telegram::account::Account;
use siptg_control::telegram::resolve::Peer;
use siptg_control::telegram::tl;
use std::time::Duration;

const WORLD: &str = r#"
[[users]]
id = 1
phone = "10000000001"
username = "gateway_tg"
first_name = "Gateway"
[[users]]
id = 2
phone = "10000000002"
username = "alice_tg"
first_name = "Alice"
"#;

/// `siptg up` with a gateway whose connections are IP trunks to `pbxs` with their priorities;
/// `extra` are more gateway settings.
fn start(node: &TestNode, pbxs: &[(&Pbx, u32)], extra: &str) -> Proc {
    let mut conns = String::new();
    let mut names = Vec::new();
    for (i, (pbx, priority)) in pbxs.iter().enumerate() {
        conns.push_str(&format!(
            "[[connection]]\nname = \"pbx{i}\"\ntype = \"ip\"\nserver = \"{}\"\nkeepalive = \"0s\"\n\
             codecs = [\"PCMA\"]\npriority = {priority}\n",
            pbx.addr
        ));
        names.push(format!("\"pbx{i}\""));
    }
    SimUp {
        world: WORLD,
        autologin: r#"gateway = "+10000000001""#,
        setup: &format!(
            "{conns}[[gateway]]\nname = \"gw\"\naccount = \"gateway\"\nconnections = [{}]\n\
             pbx_number = \"100\"\n{extra}\n",
            names.join(", ")
        ),
        ..Default::default()
    }
    .start(node)
}

/// Alice's app on the simulated cloud.
async fn alice(node: &TestNode) -> Account {
    app(node, "+10000000002").await.0
}

/// Alice calls the gateway's account until `first` gets an INVITE (the Manager and Worker may
/// still be linking when the first call is placed).
async fn call_until_invited(a: &Account, first: &Pbx) -> Msg {
    let tl::enums::contacts::ResolvedPeer::Peer(r) = a
        .invoke(&tl::functions::contacts::ResolvePhone {
            phone: "10000000001".into(),
        })
        .await
        .unwrap();
    let gw = r.users.iter().find_map(Peer::from_user).unwrap();
    for attempt in 0..10 {
        a.invoke(&tl::functions::phone::RequestCall {
            video: false,
            user_id: gw.input_user(),
            random_id: 100 + attempt,
            g_a_hash: vec![3; 32],
            protocol: siptg_control::gateway::tgcall::protocol(),
        })
        .await
        .unwrap();
        if let Some(inv) = first.request("INVITE", Duration::from_secs(3)).await {
            return inv;
        }
    }
    panic!("no INVITE reached the PBX");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rung_rings_every_pbx_and_the_first_answer_cancels_the_other() {
    let (a, b) = (Pbx::new().await, Pbx::new().await);
    let node = TestNode::new();
    let up = start(&node, &[(&a, 1), (&b, 1)], "");
    let app = alice(&node).await;
    let inv_a = call_until_invited(&app, &a).await;
    let inv_b = b
        .request("INVITE", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the same rung's other PBX rings too:\n{}", up.log()));
    assert_ne!(
        inv_a.header("Call-ID"),
        inv_b.header("Call-ID"),
        "each fork is its own dialog"
    );
    assert!(inv_a.first_line().starts_with("INVITE sip:100@"));
    assert_eq!(inv_a.header("X-TG-ID"), Some("2"));
    // Both ring; A answers.
    a.respond(&inv_a, 180, "Ringing").await;
    b.respond(&inv_b, 180, "Ringing").await;
    a.respond(&inv_a, 200, "OK").await;
    let ack = a
        .request("ACK", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the answer is ACKed:\n{}", up.log()));
    assert_eq!(ack.header("Call-ID"), inv_a.header("Call-ID"));
    // B is cancelled: its INVITE's Call-ID and branch.
    let cancel = b
        .request("CANCEL", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the other fork gets CANCEL:\n{}", up.log()));
    assert_eq!(cancel.header("Call-ID"), inv_b.header("Call-ID"));
    assert_eq!(cancel.header("Via"), inv_b.header("Via"));
    b.respond(&cancel, 200, "OK").await;
    b.respond(&inv_b, 487, "Request Terminated").await;
    let ack = b
        .request("ACK", Duration::from_secs(3))
        .await
        .expect("the 487 is ACKed");
    assert_eq!(ack.header("Call-ID"), inv_b.header("Call-ID"));
    assert!(
        up.log().contains("hunt: answered"),
        "the Worker logs the winner:\n{}",
        up.log()
    );
    // The winner's dialog is the call's: its BYE is answered.
    assert_eq!(a.bye(&inv_a).await.as_deref(), Some("SIP/2.0 200 OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_priority_rings_only_after_the_first_failed() {
    let (a, b) = (Pbx::new().await, Pbx::new().await);
    let node = TestNode::new();
    let up = start(&node, &[(&a, 1), (&b, 2)], "");
    let app = alice(&node).await;
    let inv_a = call_until_invited(&app, &a).await;
    // Priority 2 waits while priority 1 rings.
    assert!(
        b.request("INVITE", Duration::from_millis(800))
            .await
            .is_none(),
        "the second rung rang before the first failed"
    );
    a.respond(&inv_a, 486, "Busy Here").await;
    a.request("ACK", Duration::from_secs(3))
        .await
        .expect("the 486 is ACKed");
    let inv_b = b
        .request("INVITE", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the second rung rings after the first failed:\n{}",
                up.log()
            )
        });
    assert_ne!(inv_a.header("Call-ID"), inv_b.header("Call-ID"));
    b.respond(&inv_b, 200, "OK").await;
    let ack = b
        .request("ACK", Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the answer is ACKed:\n{}", up.log()));
    assert_eq!(ack.header("Call-ID"), inv_b.header("Call-ID"));
}

/// The month's talk time counts Telegram users' calls too: the PBX's answered call gets BYE when
/// it runs out, and the call is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telegram_users_call_ends_when_the_months_talk_time_runs_out() {
    let a = Pbx::new().await;
    let node = TestNode::new();
    let up = start(&node, &[(&a, 1)], "monthly_duration = \"2s\"");
    let app = alice(&node).await;
    let inv = call_until_invited(&app, &a).await;
    a.respond(&inv, 200, "OK").await;
    a.request("ACK", Duration::from_secs(3))
        .await
        .expect("the answer is ACKed");
    let answered = std::time::Instant::now();
    let bye = a
        .request("BYE", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no BYE:\n{}", up.log()));
    let talked = answered.elapsed();
    a.respond(&bye, 200, "OK").await;
    assert!(
        talked >= Duration::from_millis(1500) && talked < Duration::from_secs(6),
        "BYE {talked:?} after the answer"
    );
    assert_eq!(bye.header("Call-ID"), inv.header("Call-ID"));
    wait_for("the call counted", Duration::from_secs(5), || {
        let log = up.log();
        (log.contains("the month's call duration is used up")
            && log.contains("gateway call counted")
            && log.contains("FromTelegram"))
        .then_some(())
    });
}
