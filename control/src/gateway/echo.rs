//! A simulated Telegram user's app for the demo and the self-test: logs in to the simulated
//! cloud, answers every call and echoes its audio back (through its own Telegram media leg in
//! the dataplane, bridged to a G.711 leg whose far end reflects every packet), and answers
//! every text message (keypad digits included) with the same text.

use super::tgcall::{protocol, TgAction, TgCall, TgCallEvent, TgRequest};
use crate::dataplane::{latching_leg, telegram_leg, Supervisor};
use crate::telegram::account::{Account, AccountOptions, LoginStep};
use crate::telegram::resolve::Peer;
use crate::telegram::simclient::SimClient;
use crate::tgcall::session::LocalMedia;
use grammers_tl_types as tl;
use siptg_proto::{Codec, Event, LegId, SessionId, TelegramLegSpec};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct EchoCall {
    tg: TgCall,
    phone: tl::enums::InputPhoneCall,
    session: Option<SessionId>,
    tg_leg: Option<LegId>,
    reflector: Option<tokio::task::JoinHandle<()>>,
}

/// Runs the echo user `phone` on the simulated cloud at `sim` until the process ends
/// (reconnecting when the cloud goes away).
pub async fn run(sim: SocketAddr, phone: String, dataplane: Arc<Supervisor>, media_ip: IpAddr) {
    loop {
        if let Err(e) = serve(sim, &phone, &dataplane, media_ip).await {
            tracing::debug!(%phone, error = %e, "echo user disconnected");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn serve(
    sim: SocketAddr,
    phone: &str,
    dataplane: &Arc<Supervisor>,
    media_ip: IpAddr,
) -> Result<(), String> {
    let (client, mut updates) = SimClient::connect(sim, None)
        .await
        .map_err(|e| e.to_string())?;
    let account = Arc::new(Account::new(
        "echo",
        Arc::new(client),
        AccountOptions::default(),
    ));
    let sent = account.send_code(phone).await.map_err(|e| e.to_string())?;
    match account
        .sign_in(&sent, "12345")
        .await
        .map_err(|e| e.to_string())?
    {
        LoginStep::Done(me) => tracing::info!(user = me.user_id, "demo echo user online"),
        other => return Err(format!("echo user login: {other:?}")),
    }
    let mut calls: HashMap<i64, EchoCall> = HashMap::new();
    let mut dp_events = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        if dp_events.is_none() {
            dp_events = dataplane.client().map(|d| d.events());
        }
        tokio::select! {
            u = updates.recv() => {
                let Some(u) = u else { return Err("cloud gone".into()) };
                let now = Instant::now();
                let users = u.users;
                match u.update {
                    tl::enums::Update::PhoneCall(pc) => match &pc.phone_call {
                        tl::enums::PhoneCall::Requested(r) => {
                            let mut tg = TgCall::incoming(r.g_a_hash.clone());
                            tg.accept();
                            calls.insert(r.id, EchoCall {
                                tg,
                                phone: tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall { id: r.id, access_hash: r.access_hash }),
                                session: None,
                                tg_leg: None,
                                reflector: None,
                            });
                        }
                        other => {
                            let id = match other {
                                tl::enums::PhoneCall::Call(c) => c.id,
                                tl::enums::PhoneCall::Discarded(d) => d.id,
                                tl::enums::PhoneCall::Waiting(w) => w.id,
                                _ => 0,
                            };
                            if let Some(c) = calls.get_mut(&id) {
                                c.tg.on_phone_call(other);
                            }
                        }
                    },
                    tl::enums::Update::PhoneCallSignalingData(s) => {
                        if let Some(c) = calls.get_mut(&s.phone_call_id) {
                            c.tg.on_signaling(&s.data, now);
                        }
                    }
                    tl::enums::Update::NewMessage(m) => {
                        if let tl::enums::Message::Message(m) = m.message {
                            // A keypad (sent via a bot) is buttons, not a text to echo.
                            if m.via_bot_id.is_some() {
                                continue;
                            }
                            if let Some(tl::enums::Peer::User(from)) = &m.from_id {
                                // The sender comes with the message (with its access hash).
                                let peer = users.iter().filter_map(Peer::from_user).find(|p| p.user_id == from.user_id);
                                if let Some(peer) = peer {
                                    let _ = account.invoke(&super::text_message(&peer, &m.message)).await;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            ev = async { match dp_events.as_mut() { Some(e) => e.recv().await.ok(), None => std::future::pending().await } } => {
                if let Some(Event::Telegram { session, event, .. }) = ev {
                    let now = Instant::now();
                    if let Some(c) = calls.values_mut().find(|c| c.session == Some(session)) {
                        c.tg.on_media_event(event, now);
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                for c in calls.values_mut() {
                    c.tg.handle_timeout(now);
                }
            }
        }
        // Run the calls' actions.
        let ids: Vec<i64> = calls.keys().copied().collect();
        for id in ids {
            while let Some(a) = calls.get_mut(&id).and_then(|c| c.tg.poll_action()) {
                let Some(c) = calls.get_mut(&id) else { break };
                act(&account, dataplane, media_ip, c, a).await;
            }
            if calls.get(&id).is_some_and(|c| c.tg.is_ended()) {
                if let Some(c) = calls.remove(&id) {
                    if let (Some(s), Some(dp)) = (c.session, dataplane.client()) {
                        let _ = dp.delete_session(s).await;
                    }
                    if let Some(r) = c.reflector {
                        r.abort();
                    }
                }
            }
        }
    }
}

async fn act(
    account: &Account,
    dataplane: &Arc<Supervisor>,
    media_ip: IpAddr,
    c: &mut EchoCall,
    a: TgAction,
) {
    let now = Instant::now();
    match a {
        TgAction::Request(r) => {
            let phone = c.phone.clone();
            let result: Result<Option<tl::enums::PhoneCall>, String> = match r {
                TgRequest::GetDhConfig => {
                    match account
                        .invoke(&tl::functions::messages::GetDhConfig {
                            version: 0,
                            random_length: 256,
                        })
                        .await
                    {
                        Ok(tl::enums::messages::DhConfig::Config(d)) => {
                            c.tg.on_dh_config(d.g, &d.p, &d.random);
                            Ok(None)
                        }
                        Ok(_) => Err("DH config not modified".into()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                TgRequest::ReceivedCall => account
                    .invoke(&tl::functions::phone::ReceivedCall { peer: phone })
                    .await
                    .map(|_| None)
                    .map_err(|e| e.to_string()),
                TgRequest::AcceptCall { g_b } => account
                    .invoke(&tl::functions::phone::AcceptCall {
                        peer: phone,
                        g_b,
                        protocol: protocol(),
                    })
                    .await
                    .map(|tl::enums::phone::PhoneCall::Call(pc)| Some(pc.phone_call))
                    .map_err(|e| e.to_string()),
                TgRequest::SendSignaling(data) => account
                    .invoke(&tl::functions::phone::SendSignalingData { peer: phone, data })
                    .await
                    .map(|_| None)
                    .map_err(|e| e.to_string()),
                TgRequest::DiscardCall { reason, duration } => account
                    .invoke(&tl::functions::phone::DiscardCall {
                        video: false,
                        peer: phone,
                        duration,
                        reason: reason.to_tl(),
                        connection_id: 0,
                    })
                    .await
                    .map(|_| None)
                    .map_err(|e| e.to_string()),
                TgRequest::RequestCall { .. } | TgRequest::ConfirmCall { .. } => Ok(None),
            };
            match result {
                Ok(Some(pc)) => c.tg.on_phone_call(&pc),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "echo user: request failed"),
            }
        }
        TgAction::StartMedia {
            caller,
            relay_only,
            turn,
        } => {
            let made = async {
                let dp = dataplane.client().ok_or("dataplane down")?;
                let session = dp
                    .create_session("demo-echo")
                    .await
                    .map_err(|e| e.to_string())?;
                let tg = dp
                    .add_leg(
                        session,
                        telegram_leg(TelegramLegSpec {
                            caller,
                            relay_only,
                            turn,
                            connect_timeout_ms: 20_000,
                        }),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                // The "phone" of the echo user: every packet it gets goes straight back.
                let sock = tokio::net::UdpSocket::bind((media_ip, 0))
                    .await
                    .map_err(|e| e.to_string())?;
                let refl = sock.local_addr().map_err(|e| e.to_string())?;
                let pcm = dp
                    .add_leg(session, latching_leg(Codec::pcma(), Some(refl)))
                    .await
                    .map_err(|e| e.to_string())?;
                dp.bridge(session, tg.leg, pcm.leg)
                    .await
                    .map_err(|e| e.to_string())?;
                let task = tokio::spawn(async move {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                        let _ = sock.send_to(&buf[..n], from).await;
                    }
                });
                let t = tg.telegram.ok_or("no Telegram setup")?;
                Ok::<_, String>((
                    session,
                    tg.leg,
                    task,
                    LocalMedia {
                        ufrag: t.ufrag,
                        pwd: t.pwd,
                        hash: t.hash,
                        fingerprint: t.fingerprint,
                        candidates: t.candidates,
                        ssrc: t.ssrc,
                    },
                ))
            }
            .await;
            match made {
                Ok((session, leg, task, local)) => {
                    c.session = Some(session);
                    c.tg_leg = Some(leg);
                    c.reflector = Some(task);
                    c.tg.media_ready(local, now);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "echo user: no media");
                    c.tg.hang_up(super::tgcall::Hangup::Disconnect, now);
                }
            }
        }
        TgAction::Media(op) => {
            if let (Some(s), Some(l), Some(dp)) = (c.session, c.tg_leg, dataplane.client()) {
                let _ = dp.telegram(s, l, op).await;
            }
        }
        TgAction::Event(TgCallEvent::Connected) => {
            tracing::info!("demo echo user: call connected, echoing")
        }
        TgAction::Event(TgCallEvent::RemoteMuted(muted)) => {
            // Tests read this line to see what the other side's MediaState said.
            tracing::info!("demo echo user: the caller's MediaState says muted={muted}");
        }
        TgAction::Event(_) => {}
    }
}
