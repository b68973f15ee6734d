//! `siptg tgsim-app` (hidden): the Telegram app of a simulated user, for conformance tests.
//! It logs in to `tgsim` as that user with the Storage's own client code and turns the call
//! API into JSON lines on stdin/stdout, so a media peer written in anything (ntgcalls in
//! Python, `siptg tgcall-peer`) can place and answer calls through the simulated cloud.
//!
//! Commands: `dh`, `call {peer, g_a_hash, versions}`, `accept {g_b, versions}`,
//! `confirm {g_a, fingerprint, versions}`, `signal {data}`, `discard {reason}` (bytes in hex),
//! `send {peer, text}` (a text message; `sent` when the cloud took it), `press {key, previous}` (presses
//! the button labelled `key` on the last message with an inline keyboard, e.g. the gateway's
//! keypad, or on the one before with `previous: true`; `pressed {key, answer}` with the bot's
//! answer).
//! Events: `ready`, `dh`, `calling`, `incoming`, `ringing`, `accepted`, `active`, `signal`,
//! `discarded`, `message {from, text}` (a text received), `keypad {from, via_bot, id, keys}` (a
//! message with an inline keyboard received), `deleted {ids}` (messages deleted from the
//! chat), `sent`, `pressed`, `error`.

use crate::tgcall_peer::{hex, unhex};
use serde_json::{json, Value};
use siptg_control::telegram::account::{Account, AccountOptions, LoginStep};
use siptg_control::telegram::resolve::{Peer, PeerQuery};
use siptg_control::telegram::simclient::SimClient;
use siptg_control::telegram::tl;
use siptg_control::telegram::TgError;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, BufReader};

fn emit(v: Value) {
    println!("{v}");
}

fn protocol(versions: &[String]) -> tl::enums::PhoneCallProtocol {
    tl::enums::PhoneCallProtocol::Protocol(tl::types::PhoneCallProtocol {
        udp_p2p: true,
        udp_reflector: true,
        min_layer: 65,
        max_layer: 92,
        library_versions: versions.to_vec(),
    })
}

fn reason_name(r: &Option<tl::enums::PhoneCallDiscardReason>) -> &'static str {
    match r {
        Some(tl::enums::PhoneCallDiscardReason::Busy) => "busy",
        Some(tl::enums::PhoneCallDiscardReason::Missed) => "missed",
        Some(tl::enums::PhoneCallDiscardReason::Disconnect) => "disconnect",
        Some(tl::enums::PhoneCallDiscardReason::Hangup) => "hangup",
        _ => "unknown",
    }
}

fn active_event(c: &tl::types::PhoneCall) -> Value {
    let tl::enums::PhoneCallProtocol::Protocol(p) = &c.protocol;
    let servers: Vec<Value> = c
        .connections
        .iter()
        .filter_map(|conn| match conn {
            tl::enums::PhoneConnection::Webrtc(w) => Some(json!({
                "ip": w.ip, "port": w.port, "username": w.username, "password": w.password,
                "turn": w.turn, "stun": w.stun,
            })),
            _ => None,
        })
        .collect();
    json!({"event": "active", "g_a_or_b": hex(&c.g_a_or_b), "fingerprint": c.key_fingerprint,
           "versions": p.library_versions, "p2p": c.p2p_allowed, "servers": servers})
}

type Current = Arc<Mutex<Option<tl::enums::InputPhoneCall>>>;

/// The last message with an inline keyboard: its chat (the sender), id, and buttons
/// (label, callback data).
#[derive(Clone)]
struct Keyboard {
    chat: Peer,
    id: i32,
    buttons: Vec<(String, Vec<u8>)>,
}

/// The last two messages with an inline keyboard: (the one before, the last).
type LastKeyboard = Arc<Mutex<(Option<Keyboard>, Option<Keyboard>)>>;

/// The callback buttons of an inline keyboard, in order.
fn callback_buttons(markup: &Option<tl::enums::ReplyMarkup>) -> Vec<(String, Vec<u8>)> {
    let Some(tl::enums::ReplyMarkup::ReplyInlineMarkup(m)) = markup else {
        return Vec::new();
    };
    m.rows
        .iter()
        .flat_map(|tl::enums::KeyboardInlineButtonRow::Row(r)| r.buttons.iter())
        .filter_map(
            |tl::enums::KeyboardInlineButton::Button(b)| match &b.r#type {
                tl::enums::InlineButtonType::Callback(c) => Some((b.text.clone(), c.data.clone())),
                _ => None,
            },
        )
        .collect()
}

fn set_current(cur: &Current, id: i64, access_hash: i64) {
    *cur.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        Some(tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
            id,
            access_hash,
        }));
}

fn current(cur: &Current) -> Result<tl::enums::InputPhoneCall, String> {
    cur.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .ok_or_else(|| "no call".to_string())
}

/// Runs the app until stdin closes.
pub async fn run(
    sim: SocketAddr,
    phone: String,
    code: String,
    password: Option<String>,
) -> Result<(), String> {
    let (client, mut updates) = SimClient::connect(sim, None)
        .await
        .map_err(|e| e.to_string())?;
    let account = Arc::new(Account::new(
        "app",
        Arc::new(client),
        AccountOptions::default(),
    ));
    let sent = account.send_code(&phone).await.map_err(|e| e.to_string())?;
    let mut step = account
        .sign_in(&sent, &code)
        .await
        .map_err(|e| e.to_string())?;
    if let LoginStep::PasswordNeeded { .. } = step {
        let pw = password.ok_or("the user has a 2FA password: pass --password")?;
        step = account
            .check_password(&pw)
            .await
            .map_err(|e| e.to_string())?;
    }
    let LoginStep::Done(me) = step else {
        return Err(format!("login did not finish: {step:?}"));
    };
    emit(json!({"event": "ready", "user_id": me.user_id}));
    let cur: Current = Arc::default();
    let keyboard: LastKeyboard = Arc::default();

    let (acc2, cur2, kb2) = (account.clone(), cur.clone(), keyboard.clone());
    tokio::spawn(async move {
        while let Some(u) = updates.recv().await {
            match u.update {
                tl::enums::Update::PhoneCall(pc) => match pc.phone_call {
                    tl::enums::PhoneCall::Requested(r) => {
                        set_current(&cur2, r.id, r.access_hash);
                        let tl::enums::PhoneCallProtocol::Protocol(p) = &r.protocol;
                        emit(
                            json!({"event": "incoming", "from": r.admin_id, "g_a_hash": hex(&r.g_a_hash),
                                    "versions": p.library_versions}),
                        );
                        if let Ok(peer) = current(&cur2) {
                            let _ = acc2
                                .invoke(&tl::functions::phone::ReceivedCall { peer })
                                .await;
                        }
                    }
                    tl::enums::PhoneCall::Waiting(w) if w.receive_date.is_some() => {
                        emit(json!({"event": "ringing"}))
                    }
                    tl::enums::PhoneCall::Accepted(a) => {
                        emit(json!({"event": "accepted", "g_b": hex(&a.g_b)}))
                    }
                    tl::enums::PhoneCall::Call(c) => emit(active_event(&c)),
                    tl::enums::PhoneCall::Discarded(d) => {
                        emit(json!({"event": "discarded", "reason": reason_name(&d.reason)}))
                    }
                    _ => {}
                },
                tl::enums::Update::PhoneCallSignalingData(s) => {
                    emit(json!({"event": "signal", "data": hex(&s.data)}))
                }
                tl::enums::Update::NewMessage(m) => {
                    if let tl::enums::Message::Message(m) = m.message {
                        if m.out {
                            continue; // this user's own message
                        }
                        let from = match m.from_id {
                            Some(tl::enums::Peer::User(u)) => u.user_id,
                            _ => match m.peer_id {
                                tl::enums::Peer::User(u) => u.user_id,
                                _ => 0,
                            },
                        };
                        let buttons = callback_buttons(&m.reply_markup);
                        let chat = u
                            .users
                            .iter()
                            .filter_map(Peer::from_user)
                            .find(|p| p.user_id == from);
                        match chat {
                            Some(chat) if !buttons.is_empty() => {
                                let keys: Vec<String> =
                                    buttons.iter().map(|(label, _)| label.clone()).collect();
                                // Kept before it is told: a `press` may follow at once.
                                {
                                    let mut kb = kb2
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                                    kb.0 = kb.1.take();
                                    kb.1 = Some(Keyboard {
                                        chat,
                                        id: m.id,
                                        buttons,
                                    });
                                }
                                emit(
                                    json!({"event": "keypad", "from": from, "via_bot": m.via_bot_id,
                                            "id": m.id, "text": m.message, "keys": keys}),
                                );
                            }
                            _ => emit(json!({"event": "message", "from": from, "text": m.message})),
                        }
                    }
                }
                tl::enums::Update::DeleteMessages(d) => {
                    emit(json!({"event": "deleted", "ids": d.messages}))
                }
                _ => {}
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let cmd: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                emit(json!({"event": "error", "error": format!("bad command: {e}")}));
                continue;
            }
        };
        if let Err(e) = command(&account, &cur, &keyboard, &cmd).await {
            emit(json!({"event": "error", "op": cmd["op"], "error": e}));
        }
    }
    Ok(())
}

/// The user `who` names (`@username`, `tg#username` or `+phone`), with its access hash.
async fn resolve(account: &Account, who: &str) -> Result<Peer, String> {
    let err = |e: TgError| {
        e.rpc_name()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string())
    };
    let users = match PeerQuery::parse(who).map_err(|e| e.to_string())? {
        PeerQuery::Username(u) => {
            let tl::enums::contacts::ResolvedPeer::Peer(r) = account
                .invoke(&tl::functions::contacts::ResolveUsername {
                    username: u,
                    referer: None,
                })
                .await
                .map_err(err)?;
            r.users
        }
        PeerQuery::Phone(p) => {
            let tl::enums::contacts::ResolvedPeer::Peer(r) = account
                .invoke(&tl::functions::contacts::ResolvePhone { phone: p })
                .await
                .map_err(err)?;
            r.users
        }
        PeerQuery::UserId(_) => return Err("by username or phone".into()),
    };
    users
        .iter()
        .find_map(Peer::from_user)
        .ok_or_else(|| "no such user".to_string())
}

fn versions(cmd: &Value) -> Vec<String> {
    cmd["versions"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_else(|| vec!["8.0.0".to_string()])
}

fn field<'a>(cmd: &'a Value, name: &str) -> Result<&'a str, String> {
    cmd[name].as_str().ok_or_else(|| format!("missing {name}"))
}

async fn command(
    account: &Account,
    cur: &Current,
    keyboard: &LastKeyboard,
    cmd: &Value,
) -> Result<(), String> {
    let err = |e: TgError| {
        e.rpc_name()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string())
    };
    match cmd["op"].as_str().unwrap_or("") {
        "dh" => {
            let c = account
                .invoke(&tl::functions::messages::GetDhConfig {
                    version: 0,
                    random_length: 256,
                })
                .await
                .map_err(err)?;
            let tl::enums::messages::DhConfig::Config(c) = c else {
                return Err("DH config not modified".into());
            };
            emit(json!({"event": "dh", "g": c.g, "p": hex(&c.p), "random": hex(&c.random)}));
        }
        "send" => {
            let peer = resolve(account, field(cmd, "peer")?).await?;
            account
                .invoke(&siptg_control::gateway::text_message(
                    &peer,
                    field(cmd, "text")?,
                ))
                .await
                .map_err(err)?;
            emit(json!({"event": "sent", "to": peer.user_id}));
        }
        "press" => {
            let key = field(cmd, "key")?;
            let kb = {
                let both = keyboard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cmd["previous"].as_bool().unwrap_or(false) {
                    both.0.clone()
                } else {
                    both.1.clone()
                }
            }
            .ok_or("no such message with an inline keyboard")?;
            let data = kb
                .buttons
                .iter()
                .find(|(label, _)| label == key)
                .map(|(_, data)| data.clone())
                .ok_or_else(|| format!("no button {key:?} on message {}", kb.id))?;
            let tl::enums::messages::BotCallbackAnswer::Answer(a) = account
                .invoke(&tl::functions::messages::GetBotCallbackAnswer {
                    game: false,
                    peer: tl::enums::InputPeer::User(tl::types::InputPeerUser {
                        user_id: kb.chat.user_id,
                        access_hash: kb.chat.access_hash,
                    }),
                    msg_id: kb.id,
                    data: Some(data),
                    password: None,
                })
                .await
                .map_err(err)?;
            emit(json!({"event": "pressed", "key": key, "id": kb.id, "answer": a.message}));
        }
        "call" => {
            let peer = resolve(account, field(cmd, "peer")?).await?;
            let r = account
                .invoke(&tl::functions::phone::RequestCall {
                    video: false,
                    user_id: peer.input_user(),
                    random_id: rand::random(),
                    g_a_hash: unhex(field(cmd, "g_a_hash")?)?,
                    protocol: protocol(&versions(cmd)),
                })
                .await
                .map_err(err)?;
            let tl::enums::phone::PhoneCall::Call(pc) = r;
            if let tl::enums::PhoneCall::Waiting(w) = pc.phone_call {
                set_current(cur, w.id, w.access_hash);
                emit(json!({"event": "calling", "id": w.id}));
            }
        }
        "accept" => {
            account
                .invoke(&tl::functions::phone::AcceptCall {
                    peer: current(cur)?,
                    g_b: unhex(field(cmd, "g_b")?)?,
                    protocol: protocol(&versions(cmd)),
                })
                .await
                .map_err(err)?;
        }
        "confirm" => {
            let r = account
                .invoke(&tl::functions::phone::ConfirmCall {
                    peer: current(cur)?,
                    g_a: unhex(field(cmd, "g_a")?)?,
                    key_fingerprint: cmd["fingerprint"].as_i64().ok_or("missing fingerprint")?,
                    protocol: protocol(&versions(cmd)),
                })
                .await
                .map_err(err)?;
            let tl::enums::phone::PhoneCall::Call(pc) = r;
            if let tl::enums::PhoneCall::Call(c) = pc.phone_call {
                emit(active_event(&c));
            }
        }
        "signal" => {
            account
                .invoke(&tl::functions::phone::SendSignalingData {
                    peer: current(cur)?,
                    data: unhex(field(cmd, "data")?)?,
                })
                .await
                .map_err(err)?;
        }
        "discard" => {
            let reason = match cmd["reason"].as_str().unwrap_or("hangup") {
                "busy" => tl::enums::PhoneCallDiscardReason::Busy,
                "missed" => tl::enums::PhoneCallDiscardReason::Missed,
                "disconnect" => tl::enums::PhoneCallDiscardReason::Disconnect,
                _ => tl::enums::PhoneCallDiscardReason::Hangup,
            };
            account
                .invoke(&tl::functions::phone::DiscardCall {
                    video: false,
                    peer: current(cur)?,
                    duration: cmd["duration"].as_i64().unwrap_or(0) as i32,
                    reason,
                    connection_id: 0,
                })
                .await
                .map_err(err)?;
        }
        other => return Err(format!("unknown op {other:?}")),
    }
    Ok(())
}
