//! The Worker's gateway calls: a SIP dialog with the PBX ([`SipLeg`]) joined to a Telegram call
//! ([`TgCall`]) and a dataplane session holding the SIP media leg and the Telegram leg, bridged
//! (G.711 ⇄ Opus in the shard). Runs inside the SIP core task: the core hands it SIP events and
//! executes the SIP actions it returns through its transaction layer; Telegram requests (through
//! the Manager to the Session Storage) and dataplane commands run in spawned tasks whose results
//! come back as [`GwMsg`]s.

use super::hunt::{Caller, Hunt};
use super::sipleg::{gateway_prefs, LegAction, SipLeg};
use super::tgcall::{protocol, Hangup, TgAction, TgCall, TgCallEvent, TgEnd, TgRequest};
use crate::dataplane::{latching_leg, telegram_leg};
use crate::link::{
    CallDirection, CallReport, GatewayMessage, GatewayRoute, IncomingCall, TelegramAnswer,
    TelegramOp,
};
use crate::sip::msg::{Method, SipRequest, SipResponse};
use crate::sip::reasons;
use crate::sip::transaction::{ClientKey, ServerKey, TransactionLayer, Transport};
use crate::telegram::resolve::Peer;
use crate::telegram::TgError;
use crate::tgcall::session::LocalMedia;
use crate::worker::Worker;
use base64::Engine;
use grammers_tl_types::{self as tl, Deserializable, Serializable};
use siptg_proto::{Codec, Event, LegId, SessionId, TelegramLegSpec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What reaches the gateway calls from outside the core.
#[derive(Debug)]
pub enum GwMsg {
    /// An account's update (from the Manager).
    Update {
        account: String,
        update: Box<tl::enums::Update>,
    },
    /// A Telegram user's call to place to a PBX (from the Manager).
    Incoming(Box<IncomingCall>),
    /// A Telegram user's text to send to a PBX as a `MESSAGE` (from the Manager).
    Message(Box<GatewayMessage>),
    /// The answer to a `MESSAGE` the PBX sent in a call's dialog (once Telegram answered).
    MessageAnswered {
        key: ServerKey,
        resp: Box<SipResponse>,
    },
    /// A dataplane event.
    Dataplane(Event),
    /// The answer to a Telegram request of call `id`.
    Tg {
        id: u64,
        what: TgWhat,
        result: Result<Vec<u8>, TgError>,
    },
    /// The callee resolved (SIP → Telegram).
    Resolved {
        id: u64,
        result: Result<Peer, TgError>,
    },
    /// The Telegram media leg exists (or could not be made).
    TgLeg {
        id: u64,
        result: Result<(LegId, LocalMedia), String>,
    },
    /// The Manager's new deadline for an answered call: its share of the month's talk time.
    TalkBudget { call: u64, remaining_ms: u64 },
    /// The keypad of call `id` is in the chat (its message id), or could not be shown.
    Keypad {
        id: u64,
        storage: String,
        account: String,
        token: String,
        result: Result<i32, super::keypad::KeypadError>,
    },
    /// The media session and SIP leg of an incoming Telegram call exist.
    IncomingReady {
        call: Box<IncomingCall>,
        session: SessionId,
        leg: (LegId, SocketAddr),
    },
}

/// Which request an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TgWhat {
    Dh,
    Request,
    Accept,
    Confirm,
    Other,
}

/// SIP.TG's answer for a Telegram failure.
pub fn sip_status(e: &TgError) -> (u16, String) {
    let r = |code: u16, reason: &str| (code, reason.to_string());
    match e {
        TgError::FloodWait { seconds } => {
            (503, format!("{} {seconds}", reasons::TOO_MANY_REQUESTS))
        }
        TgError::PeerFlood { .. } => r(503, reasons::PEER_FLOOD),
        TgError::Timeout => r(408, reasons::RPC_TIMEOUT),
        TgError::NotAuthorized { .. } => r(403, reasons::TELEGRAM_SESSION_INACTIVE),
        TgError::UnknownAccount { .. } => r(503, reasons::ACCOUNT_NOT_RUNNING),
        TgError::UnknownUser { .. } => r(404, reasons::CHAT_NOT_FOUND),
        TgError::Transport { message } if message.contains("not linked") => {
            r(503, reasons::STORAGE_UNAVAILABLE)
        }
        TgError::Transport { message } if message.contains("Manager") => {
            r(503, reasons::NO_RESPONSE_FROM_MANAGER)
        }
        TgError::Transport { .. } => r(503, reasons::SESSION_NOT_RUNNING),
        TgError::Store { .. } => r(500, reasons::DATABASE_ERROR),
        TgError::Rpc { name, .. } => match name.as_str() {
            "USER_PRIVACY_RESTRICTED" => r(403, reasons::USER_PRIVACY_RESTRICTED),
            "USERNAME_NOT_OCCUPIED" | "USERNAME_INVALID" => r(404, reasons::USERNAME_NOT_OCCUPIED),
            "PHONE_NOT_OCCUPIED"
            | "PHONE_NUMBER_INVALID"
            | "USER_ID_INVALID"
            | "PEER_ID_INVALID" => r(404, reasons::NOT_FOUND),
            "ANONYMOUS_USER" => r(470, reasons::ANONYMOUS_USER),
            "AUTH_KEY_UNREGISTERED" | "SESSION_REVOKED" | "USER_DEACTIVATED" => {
                r(403, reasons::TELEGRAM_SESSION_INACTIVE)
            }
            "USER_IS_BLOCKED" => r(403, "USER_IS_BLOCKED"),
            // Text messages: the user takes new chats from contacts only (Premium setting).
            "PRIVACY_PREMIUM_REQUIRED" => r(403, "PRIVACY_PREMIUM_REQUIRED"),
            "MESSAGE_TOO_LONG" => r(413, "Request Entity Too Large"),
            "MESSAGE_EMPTY" => r(400, "Empty message body"),
            "CALL_PROTOCOL_FLAGS_INVALID" | "PARTICIPANT_VERSION_OUTDATED" => {
                r(488, "Not Acceptable Here")
            }
            other => (500, other.to_string()),
        },
        TgError::NotAllowed { method } => (500, format!("{method} not allowed")),
        TgError::Invalid { .. } | TgError::Decode { .. } => r(500, "Server Internal Error"),
    }
}

/// A PBX's text (a `MESSAGE` the Manager routed to `route`'s gateway) sent to the Telegram
/// user it names through the gateway's account: the SIP answer, `200 OK` when Telegram took
/// it, else the Telegram failure mapped as for calls ([`sip_status`]).
pub async fn message_to_telegram(
    worker: &Worker,
    route: &GatewayRoute,
    text: &str,
) -> (u16, String) {
    text_to_user(
        worker,
        &route.gateway,
        &route.storage,
        &route.account,
        &route.query,
        text,
    )
    .await
}

/// `text` to the Telegram user `query` names, through `account` in `storage`: the SIP answer
/// for the `MESSAGE` that carried it.
async fn text_to_user(
    worker: &Worker,
    gateway: &str,
    storage: &str,
    account: &str,
    query: &crate::telegram::resolve::PeerQuery,
    text: &str,
) -> (u16, String) {
    let peer = match worker
        .telegram(
            storage,
            account,
            TelegramOp::Resolve {
                query: query.clone(),
            },
        )
        .await
    {
        Ok(TelegramAnswer::Peer { peer, .. }) => peer,
        Ok(other) => {
            return sip_status(&TgError::transport(format!("unexpected answer {other:?}")))
        }
        Err(e) => {
            let (code, reason) = sip_status(&e);
            tracing::info!(%gateway, ?query, error = %e, code, %reason, "text message: recipient not resolved");
            return (code, reason);
        }
    };
    let body = super::text_message(&peer, text).to_bytes();
    let result = worker
        .telegram(
            storage,
            account,
            TelegramOp::Invoke {
                body: b64().encode(body),
            },
        )
        .await;
    match result {
        Ok(TelegramAnswer::Invoked { .. }) => {
            tracing::info!(%gateway, user = peer.user_id, "text message: SIP → Telegram delivered");
            (200, "OK".to_string())
        }
        Ok(other) => sip_status(&TgError::transport(format!("unexpected answer {other:?}"))),
        Err(e) => {
            let (code, reason) = sip_status(&e);
            tracing::info!(%gateway, user = peer.user_id, error = %e, code, %reason, "text message: Telegram refused it");
            (code, reason)
        }
    }
}

/// A gateway call's SIP side: the PBX's dialog (we are its UAS), or the hunt over the PBXs a
/// Telegram user's call rings (one UAC fork per target).
enum SipSide {
    Uas(Box<SipLeg>),
    Hunt(Box<Hunt>),
}

impl SipSide {
    fn ringing(&mut self) {
        if let SipSide::Uas(l) = self {
            l.ringing();
        }
    }
    fn answer(&mut self, now: Instant) {
        if let SipSide::Uas(l) = self {
            l.answer(now);
        }
    }
    fn reject(&mut self, code: u16, reason: &str) {
        match self {
            SipSide::Uas(l) => l.reject(code, reason),
            SipSide::Hunt(h) => h.hang_up(code, reason),
        }
    }
    fn hang_up(&mut self, code: u16, reason: &str) {
        match self {
            SipSide::Uas(l) => l.hang_up(code, reason),
            SipSide::Hunt(h) => h.hang_up(code, reason),
        }
    }
    fn send_info(&mut self, digit: char) {
        match self {
            SipSide::Uas(l) => l.send_info(digit),
            SipSide::Hunt(h) => h.send_info(digit),
        }
    }
    fn on_request(&mut self, req: SipRequest) {
        match self {
            SipSide::Uas(l) => l.on_request(req),
            SipSide::Hunt(h) => h.on_request(req),
        }
    }
    fn on_response(&mut self, resp: SipResponse) {
        match self {
            SipSide::Uas(l) => l.on_response(resp),
            SipSide::Hunt(h) => h.on_response(resp),
        }
    }
    fn poll_action(&mut self) -> Option<LegAction> {
        match self {
            SipSide::Uas(l) => l.poll_action(),
            SipSide::Hunt(h) => h.poll_action(),
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            SipSide::Uas(l) => l.poll_timeout(),
            SipSide::Hunt(h) => h.poll_timeout(),
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        match self {
            SipSide::Uas(l) => l.handle_timeout(now),
            SipSide::Hunt(h) => h.handle_timeout(now),
        }
    }
    fn is_ended(&self) -> bool {
        match self {
            SipSide::Uas(l) => l.is_ended(),
            SipSide::Hunt(h) => h.is_ended(),
        }
    }
    fn is_confirmed(&self) -> bool {
        match self {
            SipSide::Uas(l) => l.is_confirmed(),
            SipSide::Hunt(h) => h.is_confirmed(),
        }
    }
    fn is_held(&self) -> bool {
        match self {
            SipSide::Uas(l) => l.is_held(),
            SipSide::Hunt(h) => h.is_held(),
        }
    }
}

struct GwCall {
    gateway: String,
    storage: String,
    account: String,
    sip: SipSide,
    tg: TgCall,
    session: SessionId,
    sip_leg: LegId,
    tg_leg: Option<LegId>,
    transport: Transport,
    peer: Option<Peer>,
    /// The Telegram user of the call (the caller, or the callee once resolved): their keypad
    /// texts during the call are DTMF.
    tg_user: Option<i64>,
    /// The gateway's text messages are on (a `MESSAGE` in the dialog goes to the user).
    messages: bool,
    phone: Option<tl::enums::InputPhoneCall>,
    invite: Option<ServerKey>,
    /// In-dialog requests from the PBX awaiting our answer, with their Call-ID (a hunt's
    /// forks are dialogs of their own).
    pending: Vec<(Method, String, ServerKey)>,
    max_until: Option<Instant>,
    /// requestCall, held until the callee is resolved.
    held: Option<TgRequest>,
    direction: CallDirection,
    /// When both sides were connected.
    answered_at: Option<Instant>,
    /// Talk time left of the gateway's monthly duration (`None` = unlimited), and when it
    /// runs out once the call is answered.
    talk_budget: Option<Duration>,
    budget_until: Option<Instant>,
    /// The PBX cancelled before the answer.
    cancelled_by_pbx: bool,
    /// The first final status of the SIP side.
    end: Option<(u16, String)>,
    /// The connection's DTMF methods towards the PBX, in order (`rfc2833`, `info`).
    dtmf: Vec<String>,
    /// The SIP leg negotiated telephone-event (RFC 4733 digits can go in its RTP).
    sip_events: bool,
    /// The gateway's keypad bot (an account of `storage`), if it has one.
    keypad_bot: Option<String>,
    /// The call's keypad: its token, and its message once in the chat.
    keypad: Option<(String, Option<i32>)>,
    /// The last update of the SIP media leg still on its way to the dataplane.
    leg_update: Option<tokio::task::JoinHandle<()>>,
}

impl GwCall {
    /// Both sides are connected: the talk time (and its monthly budget) starts. True the
    /// first time.
    fn answered(&mut self, now: Instant) -> bool {
        if self.answered_at.is_some() {
            return false;
        }
        self.answered_at = Some(now);
        self.budget_until = self.talk_budget.map(|b| now + b);
        true
    }

    /// What the Manager's limits need to know about the finished call `id`.
    fn report(&self, id: u64, now: Instant) -> CallReport {
        let (code, reason) = self.end.clone().unwrap_or((200, String::new()));
        CallReport {
            gateway: self.gateway.clone(),
            call: id,
            direction: self.direction,
            answered: self.answered_at.is_some(),
            talk_ms: self
                .answered_at
                .map(|t| u64::try_from(now.duration_since(t).as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            cancelled_by_pbx: self.cancelled_by_pbx,
            code,
            reason,
        }
    }
}

/// A Telegram user's text on its way to the PBX.
struct OutMessage {
    msg: GatewayMessage,
    /// The next target to try.
    next: usize,
    /// The last failure (what the user reads when no target takes the text).
    last: (u16, String),
    /// The `MESSAGE` out to the current target, and whether it already answered a challenge.
    sent: Option<(SipRequest, bool)>,
    /// The same `MESSAGE` with our credentials, to send when the core next drives us.
    retry: Option<SipRequest>,
}

/// The gateway calls of one SIP core.
pub struct GatewayCalls {
    worker: Arc<Worker>,
    tx: mpsc::Sender<GwMsg>,
    local: SocketAddr,
    calls: HashMap<u64, GwCall>,
    by_call_id: HashMap<String, u64>,
    /// Our client transactions: the call and the Call-ID of the dialog (a hunt's fork) each
    /// belongs to.
    by_client: HashMap<ClientKey, (u64, String)>,
    by_phone: HashMap<i64, u64>,
    by_session: HashMap<SessionId, u64>,
    /// Telegram users' texts on their way to the PBX, by our id for them.
    messages: HashMap<u64, OutMessage>,
    /// The `MESSAGE` client transactions and the text each carries.
    msg_clients: HashMap<ClientKey, u64>,
    /// Texts whose next PBX is to be tried when the core next drives us (with its
    /// transaction layer).
    msg_queue: Vec<u64>,
    /// Answers to in-dialog `MESSAGE`s, sent when the core next drives us.
    msg_answers: Vec<(ServerKey, SipResponse)>,
    /// Failure notices to Telegram users, rate-limited.
    notices: super::messages::NoticeGate,
    /// News for the Manager (answers, ends), sent in order by one task: an end never
    /// overtakes its call's answer.
    to_manager: mpsc::UnboundedSender<crate::link::Request>,
    /// The answered calls' keypad tokens.
    keypads: super::keypad::Keypads,
    /// TCP and TLS connections PBXs opened to this core (peer → transport, our listener):
    /// INVITEs and MESSAGEs to a PBX registered over one go over it, not over UDP.
    reliable: HashMap<SocketAddr, (Transport, SocketAddr)>,
}

/// The transport a request to `dest` leaves on — the PBX's own TCP or TLS connection when it
/// has one, else `fixed` (the call's) — with its Via and Contact readied for it.
fn outbound(
    reliable: &HashMap<SocketAddr, (Transport, SocketAddr)>,
    ours: SocketAddr,
    mut req: SipRequest,
    dest: SocketAddr,
    fixed: Transport,
) -> (SipRequest, Transport) {
    let (transport, local) = match reliable.get(&dest) {
        Some(&(t, local)) => (t, Some(local)),
        None => (fixed, None),
    };
    crate::sip::core::for_connection(req.headers_mut(), transport, local, ours);
    (req, transport)
}

/// A gateway call's id, unique in the process (every SIP core has its own `GatewayCalls`; the
/// Manager tells calls apart by Worker and this id).
fn next_call_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl GatewayCalls {
    /// The gateway calls of a core whose SIP address is `local`; `tx` feeds [`GwMsg`]s back to
    /// the core.
    pub fn new(worker: Arc<Worker>, tx: mpsc::Sender<GwMsg>, local: SocketAddr) -> Self {
        let (to_manager, mut news) = mpsc::unbounded_channel();
        let w = worker.clone();
        tokio::spawn(async move {
            while let Some(n) = news.recv().await {
                w.tell_manager(n).await;
            }
        });
        Self {
            to_manager,
            worker,
            tx,
            local,
            calls: HashMap::new(),
            by_call_id: HashMap::new(),
            by_client: HashMap::new(),
            by_phone: HashMap::new(),
            by_session: HashMap::new(),
            messages: HashMap::new(),
            msg_clients: HashMap::new(),
            msg_queue: Vec::new(),
            msg_answers: Vec::new(),
            reliable: HashMap::new(),
            notices: Default::default(),
            keypads: Default::default(),
        }
    }

    /// Active calls of `gateway`.
    fn lines_in_use(&self, gateway: &str) -> usize {
        self.calls.values().filter(|c| c.gateway == gateway).count()
    }

    /// Does this Call-ID belong to a gateway call?
    pub fn owns_call_id(&self, call_id: &str) -> bool {
        self.by_call_id.contains_key(call_id)
    }

    /// Does this client transaction belong to a gateway call?
    pub fn owns_client(&self, key: &ClientKey) -> bool {
        self.by_client.contains_key(key) || self.msg_clients.contains_key(key)
    }

    /// The earliest timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.calls
            .values()
            .flat_map(|c| {
                [
                    c.sip.poll_timeout(),
                    c.tg.poll_timeout(),
                    c.max_until,
                    c.budget_until,
                ]
            })
            .flatten()
            .min()
    }

    /// A PBX's INVITE routed to Telegram, with its media session and SIP leg ready.
    #[allow(clippy::too_many_arguments)]
    pub fn start_outgoing(
        &mut self,
        tx: &mut TransactionLayer,
        key: ServerKey,
        req: SipRequest,
        source: SocketAddr,
        transport: Transport,
        route: GatewayRoute,
        session: SessionId,
        leg: (LegId, SocketAddr),
    ) {
        let now = Instant::now();
        let refuse = |tx: &mut TransactionLayer, code: u16, reason: &str| {
            let resp = SipResponse::to(
                &req,
                code,
                reason,
                Some(&format!("{:08x}", rand::random::<u32>())),
            );
            let _ = tx.respond(now, &key, resp);
        };
        if self.lines_in_use(&route.gateway) >= route.lines as usize {
            tracing::info!(gateway = %route.gateway, lines = route.lines, "all lines busy");
            refuse(tx, 486, "Busy Here");
            self.delete_session(session);
            return;
        }
        let (sip, spec) = match SipLeg::uas(
            req.clone(),
            source,
            gateway_prefs(&route.codecs),
            leg.1,
            self.local,
        ) {
            Ok(x) => x,
            Err(r) => {
                refuse(tx, r.code, &r.reason);
                self.delete_session(session);
                return;
            }
        };
        let id = next_call_id();
        self.by_call_id.insert(sip.call_id().to_string(), id);
        self.by_session.insert(session, id);
        // The leg was made with rtcp-mux (RTCP on the RTP port); that cannot change live.
        let mut spec = spec;
        spec.rtcp_mux = true;
        let sip_events = spec.codec.telephone_event.is_some();
        let leg_update = self.spawn_update_leg(session, leg.0, spec, None);
        let mut tg = TgCall::outgoing();
        // A call offered on hold: the Telegram user sees us muted from the start.
        tg.set_muted(sip.is_held());
        let call = GwCall {
            dtmf: route.dtmf.clone(),
            sip_events,
            keypad_bot: route.keypad_bot.clone(),
            keypad: None,
            leg_update,
            gateway: route.gateway.clone(),
            storage: route.storage.clone(),
            account: route.account.clone(),
            sip: SipSide::Uas(Box::new(sip)),
            tg,
            session,
            sip_leg: leg.0,
            tg_leg: None,
            transport,
            peer: None,
            tg_user: None,
            messages: route.messages,
            phone: None,
            invite: Some(key),
            pending: Vec::new(),
            max_until: (route.max_call_secs > 0)
                .then(|| now + Duration::from_secs(route.max_call_secs)),
            held: None,
            direction: CallDirection::ToTelegram,
            answered_at: None,
            talk_budget: route.talk_budget_ms.map(Duration::from_millis),
            budget_until: None,
            cancelled_by_pbx: false,
            end: None,
        };
        tracing::info!(call = id, gateway = %route.gateway, query = ?route.query, "gateway call: SIP → Telegram");
        // Resolve first: requestCall needs the user.
        let (worker, txc, storage, account, query) = (
            self.worker.clone(),
            self.tx.clone(),
            route.storage.clone(),
            route.account.clone(),
            route.query.clone(),
        );
        tokio::spawn(async move {
            let result = match worker
                .telegram(&storage, &account, TelegramOp::Resolve { query })
                .await
            {
                Ok(TelegramAnswer::Peer { peer, .. }) => Ok(peer),
                Ok(other) => Err(TgError::transport(format!("unexpected answer {other:?}"))),
                Err(e) => Err(e),
            };
            let _ = txc.send(GwMsg::Resolved { id, result }).await;
        });
        self.calls.insert(id, call);
        // The Telegram call waits for the peer: keep its first request (the DH config) queued.
    }

    /// A Telegram user's call: create its media, then the INVITE to the PBX.
    pub fn incoming(&mut self, call: Box<IncomingCall>) {
        let (worker, txc) = (self.worker.clone(), self.tx.clone());
        tokio::spawn(async move {
            let Some(dp) = worker.dataplane().client() else {
                tracing::warn!("Telegram call while the dataplane is down");
                return;
            };
            let made = async {
                let session = dp.create_session(&format!("tg-{}", call.account)).await?;
                let leg = dp
                    .add_leg(session, latching_leg(Codec::pcma(), None))
                    .await?;
                Ok::<_, crate::dataplane::DpError>((session, (leg.leg, leg.local)))
            }
            .await;
            match made {
                Ok((session, leg)) => {
                    let _ = txc.send(GwMsg::IncomingReady { call, session, leg }).await;
                }
                Err(e) => tracing::warn!(error = %e, "no media for a Telegram call"),
            }
        });
    }

    fn start_incoming(
        &mut self,
        call: Box<IncomingCall>,
        session: SessionId,
        leg: (LegId, SocketAddr),
    ) {
        let Some(requested) = b64()
            .decode(call.call.as_bytes())
            .ok()
            .and_then(|b| tl::types::PhoneCallRequested::from_bytes(&b).ok())
        else {
            self.delete_session(session);
            return;
        };
        // The forks' Call-IDs are indexed as their INVITEs go out.
        let sip = Hunt::new(
            call.rungs.clone(),
            Caller {
                from_user: call.from_user.clone(),
                from_name: call.from_name.clone(),
                headers: call.headers.clone(),
            },
            leg.1,
            self.local,
            call.rungs
                .iter()
                .flatten()
                .filter_map(|t| {
                    let c = self.worker.pbx_credentials(&t.connection)?;
                    Some((t.connection.clone(), c))
                })
                .collect(),
        );
        let id = next_call_id();
        self.by_session.insert(session, id);
        self.by_phone.insert(requested.id, id);
        let rungs: Vec<Vec<&str>> = call
            .rungs
            .iter()
            .map(|r| r.iter().map(|t| t.connection.as_str()).collect())
            .collect();
        tracing::info!(call = id, gateway = %call.gateway, caller = requested.admin_id, ?rungs, "gateway call: Telegram → SIP");
        self.calls.insert(
            id,
            GwCall {
                dtmf: call.dtmf.clone(),
                sip_events: false,
                keypad_bot: call.keypad_bot.clone(),
                keypad: None,
                leg_update: None,
                gateway: call.gateway.clone(),
                storage: call.storage.clone(),
                account: call.account.clone(),
                sip: SipSide::Hunt(Box::new(sip)),
                tg: TgCall::incoming(requested.g_a_hash.clone()),
                session,
                sip_leg: leg.0,
                tg_leg: None,
                transport: Transport::Udp,
                peer: None,
                tg_user: Some(requested.admin_id),
                messages: call.messages,
                phone: Some(tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
                    id: requested.id,
                    access_hash: requested.access_hash,
                })),
                invite: None,
                pending: Vec::new(),
                max_until: None,
                held: None,
                direction: CallDirection::FromTelegram,
                answered_at: None,
                talk_budget: call.talk_budget_ms.map(Duration::from_millis),
                budget_until: None,
                cancelled_by_pbx: false,
                end: None,
            },
        );
    }

    /// A PBX's TCP or TLS connection to this core carried a message (it may be new).
    pub fn connection_up(&mut self, peer: SocketAddr, transport: Transport, local: SocketAddr) {
        self.reliable.insert(peer, (transport, local));
    }

    /// A PBX's TCP or TLS connection to this core closed.
    pub fn connection_down(&mut self, peer: SocketAddr) {
        self.reliable.remove(&peer);
    }

    /// A message for the gateway calls.
    pub fn on_msg(&mut self, msg: GwMsg) {
        let now = Instant::now();
        match msg {
            GwMsg::Incoming(c) => self.incoming(c),
            GwMsg::Message(m) => self.message(*m),
            GwMsg::MessageAnswered { key, resp } => self.msg_answers.push((key, *resp)),
            GwMsg::IncomingReady { call, session, leg } => self.start_incoming(call, session, leg),
            GwMsg::Keypad {
                id,
                storage,
                account,
                token,
                result,
            } => self.keypad_shown(id, &storage, &account, &token, result, now),
            GwMsg::TalkBudget { call, remaining_ms } => {
                if let Some(c) = self.calls.get_mut(&call) {
                    if c.answered_at.is_some() && c.talk_budget.is_some() {
                        tracing::debug!(call, remaining_ms, "talk time share from the Manager");
                        c.budget_until = Some(now + Duration::from_millis(remaining_ms));
                    }
                }
            }
            GwMsg::Update {
                update,
                account: update_account,
            } => match *update {
                tl::enums::Update::PhoneCall(u) => {
                    let id = phone_call_id(&u.phone_call);
                    if let Some(c) = self.by_phone.get(&id).and_then(|i| self.calls.get_mut(i)) {
                        c.tg.on_phone_call(&u.phone_call);
                    }
                }
                tl::enums::Update::PhoneCallSignalingData(s) => {
                    if let Some(c) = self
                        .by_phone
                        .get(&s.phone_call_id)
                        .and_then(|i| self.calls.get_mut(i))
                    {
                        c.tg.on_signaling(&s.data, now);
                    }
                }
                tl::enums::Update::NewMessage(m) => {
                    // Digits the Telegram user types in the chat during a call: DTMF to the PBX.
                    let tl::enums::Message::Message(m) = m.message else {
                        return;
                    };
                    let Some(tl::enums::Peer::User(from)) = &m.from_id else {
                        return;
                    };
                    let text = m.message.trim();
                    if !super::messages::is_keypad(text) {
                        return;
                    }
                    let call = self
                        .calls
                        .iter()
                        .find(|(_, c)| {
                            c.account == update_account && c.tg_user == Some(from.user_id)
                        })
                        .map(|(id, _)| *id);
                    if let Some(id) = call {
                        self.dtmf_to_pbx(id, text);
                    }
                }
                tl::enums::Update::BotInlineQuery(q) => self.keypad_query(&update_account, &q),
                tl::enums::Update::InlineBotCallbackQuery(q) => {
                    self.keypad_press(&update_account, &q, now)
                }
                _ => {}
            },
            GwMsg::Dataplane(ev) => match ev {
                Event::Telegram { session, event, .. } => {
                    if let Some(c) = self
                        .by_session
                        .get(&session)
                        .and_then(|i| self.calls.get_mut(i))
                    {
                        c.tg.on_media_event(event, now);
                    }
                }
                Event::RtpTimeout {
                    session,
                    leg,
                    idle_ms,
                } => {
                    if let Some(c) = self
                        .by_session
                        .get(&session)
                        .and_then(|i| self.calls.get_mut(i))
                    {
                        if c.sip.is_held() {
                            // The dataplane stops timing a held call; this one crossed the hold.
                            tracing::debug!(
                                session,
                                leg,
                                idle_ms,
                                "RTP timeout of a held call ignored"
                            );
                            return;
                        }
                        tracing::info!(session, idle_ms, "RTP timeout: ending the gateway call");
                        c.sip.hang_up(408, "RTP timeout");
                        c.tg.hang_up(Hangup::Disconnect, now);
                    }
                }
                Event::Dtmf {
                    session,
                    leg,
                    digit,
                    ..
                } => {
                    if let Some(c) = self
                        .by_session
                        .get(&session)
                        .and_then(|i| self.calls.get(i))
                    {
                        if leg == c.sip_leg {
                            self.send_digits(session, &digit.to_string());
                        }
                    }
                }
                _ => {}
            },
            GwMsg::Resolved { id, result } => {
                let Some(c) = self.calls.get_mut(&id) else {
                    return;
                };
                match result {
                    Ok(peer) => {
                        tracing::debug!(call = id, user = peer.user_id, "callee resolved");
                        c.tg_user = Some(peer.user_id);
                        c.peer = Some(peer);
                        if let Some(r) = c.held.take() {
                            self.send_tg(id, r);
                        }
                    }
                    Err(e) => {
                        let (code, reason) = sip_status(&e);
                        tracing::info!(call = id, error = %e, code, %reason, "callee not resolved");
                        c.sip.reject(code, &reason);
                        c.tg.hang_up(Hangup::Hangup, now);
                        c.phone = None; // nothing to discard at Telegram
                    }
                }
            }
            GwMsg::Tg { id, what, result } => {
                let Some(c) = self.calls.get_mut(&id) else {
                    return;
                };
                match (what, result) {
                    (TgWhat::Dh, Ok(body)) => {
                        match tl::enums::messages::DhConfig::from_bytes(&body) {
                            Ok(tl::enums::messages::DhConfig::Config(d)) => {
                                c.tg.on_dh_config(d.g, &d.p, &d.random)
                            }
                            _ => {
                                c.sip.hang_up(500, "Server Internal Error");
                                c.tg.hang_up(Hangup::Disconnect, now);
                            }
                        }
                    }
                    (TgWhat::Request | TgWhat::Accept | TgWhat::Confirm, Ok(body)) => {
                        if let Ok(tl::enums::phone::PhoneCall::Call(pc)) =
                            tl::enums::phone::PhoneCall::from_bytes(&body)
                        {
                            if what == TgWhat::Request {
                                let pid = phone_call_id(&pc.phone_call);
                                if let Some((id2, hash)) = input_of(&pc.phone_call) {
                                    c.phone = Some(tl::enums::InputPhoneCall::Call(
                                        tl::types::InputPhoneCall {
                                            id: id2,
                                            access_hash: hash,
                                        },
                                    ));
                                }
                                self.by_phone.insert(pid, id);
                            }
                            c.tg.on_phone_call(&pc.phone_call);
                        }
                    }
                    (TgWhat::Request, Err(e)) | (TgWhat::Dh, Err(e)) => {
                        let (code, reason) = sip_status(&e);
                        tracing::info!(call = id, error = %e, code, %reason, "Telegram refused the call");
                        c.sip.hang_up(code, &reason);
                        c.phone = None;
                        c.tg.hang_up(Hangup::Hangup, now);
                    }
                    (TgWhat::Accept | TgWhat::Confirm, Err(e)) => {
                        let (code, reason) = sip_status(&e);
                        tracing::info!(call = id, error = %e, "Telegram call failed");
                        c.sip.hang_up(code, &reason);
                        c.tg.hang_up(Hangup::Disconnect, now);
                    }
                    (TgWhat::Other, Err(e)) => {
                        tracing::debug!(call = id, error = %e, "Telegram request failed")
                    }
                    (TgWhat::Other, Ok(_)) => {}
                }
            }
            GwMsg::TgLeg { id, result } => {
                let Some(c) = self.calls.get_mut(&id) else {
                    return;
                };
                match result {
                    Ok((leg, local)) => {
                        c.tg_leg = Some(leg);
                        c.tg.media_ready(local, now);
                    }
                    Err(e) => {
                        tracing::warn!(call = id, error = %e, "no Telegram media leg");
                        c.sip.hang_up(503, reasons::WORKER_NOT_READY);
                        c.tg.hang_up(Hangup::Disconnect, now);
                    }
                }
            }
        }
    }

    /// A request from the PBX in a gateway call's dialog (ACK, BYE, CANCEL, re-INVITE, INFO…).
    pub fn on_request(&mut self, key: Option<ServerKey>, req: SipRequest) {
        let Some(&id) = req.call_id().and_then(|c| self.by_call_id.get(c)) else {
            return;
        };
        if req.method == Method::Message {
            if let Some(k) = key {
                self.in_dialog_message(id, k, req);
            }
            return;
        }
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        if let Some(k) = key {
            if !matches!(req.method, Method::Ack | Method::Cancel) {
                let call_id = req.call_id().unwrap_or_default().to_string();
                c.pending.push((req.method.clone(), call_id, k));
            }
        }
        if req.method == Method::Cancel && c.answered_at.is_none() && !c.sip.is_ended() {
            c.cancelled_by_pbx = true;
        }
        c.sip.on_request(req);
    }

    /// A response to one of our requests.
    pub fn on_response(&mut self, key: &ClientKey, resp: SipResponse) {
        if let Some(&id) = self.msg_clients.get(key) {
            if resp.code >= 200 {
                self.msg_clients.remove(key);
                if super::auth::is_challenge(resp.code) && self.answer_message_challenge(id, &resp)
                {
                    return;
                }
                self.message_answered(id, resp.code, &resp.reason);
            }
            return;
        }
        let Some(id) = self.by_client.get(key).map(|(id, _)| *id) else {
            return;
        };
        if key.method == Method::Invite && resp.code >= 300 {
            // That INVITE transaction is over (a challenged INVITE goes out again as a new
            // one, which a CANCEL must find instead).
            self.by_client.remove(key);
        }
        if let Some(c) = self.calls.get_mut(&id) {
            c.sip.on_response(resp);
        }
    }

    /// A client transaction timed out: our INVITE as a 408 from the PBX.
    pub fn on_client_timeout(&mut self, key: &ClientKey) {
        if let Some(id) = self.msg_clients.remove(key) {
            self.message_answered(id, 408, "Request Timeout");
            return;
        }
        let Some((id, call_id)) = self.by_client.remove(key) else {
            return;
        };
        if key.method == Method::Invite {
            if let Some(c) = self.calls.get_mut(&id) {
                let mut resp = SipResponse::new(408, "Request Timeout");
                resp.headers_mut().add("Call-ID", call_id);
                resp.headers_mut().add("CSeq", "1 INVITE");
                c.sip.on_response(resp);
            }
        }
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for c in self.calls.values_mut() {
            c.sip.handle_timeout(now);
            c.tg.handle_timeout(now);
            if c.budget_until.is_some_and(|t| t <= now) {
                c.budget_until = None;
                tracing::info!(gateway = %c.gateway, "the month's call duration is used up: ending the call");
                c.sip.hang_up(200, reasons::DURATION_EXCEEDED);
                c.tg.hang_up(Hangup::Hangup, now);
            }
            if c.max_until.is_some_and(|t| t <= now) {
                c.max_until = None;
                tracing::info!(gateway = %c.gateway, "longest call duration reached");
                c.sip.hang_up(200, "max duration");
                c.tg.hang_up(Hangup::Hangup, now);
            }
        }
    }

    /// Runs every call's actions: SIP through `tx`, the rest in spawned tasks.
    pub fn drive(&mut self, tx: &mut TransactionLayer) {
        let now = Instant::now();
        for id in std::mem::take(&mut self.msg_queue) {
            self.send_message(tx, id, now);
        }
        for (key, resp) in std::mem::take(&mut self.msg_answers) {
            let _ = tx.respond(now, &key, resp);
        }
        let ids: Vec<u64> = self.calls.keys().copied().collect();
        for id in ids {
            loop {
                let mut progressed = false;
                // Telegram first: its events move the SIP side.
                while let Some(a) = self.calls.get_mut(&id).and_then(|c| c.tg.poll_action()) {
                    progressed = true;
                    self.tg_action(id, a, now);
                }
                while let Some(a) = self.calls.get_mut(&id).and_then(|c| c.sip.poll_action()) {
                    progressed = true;
                    self.sip_action(tx, id, a, now);
                }
                if !progressed {
                    break;
                }
            }
            self.start_keypad(id);
            let finished = self
                .calls
                .get(&id)
                .is_some_and(|c| c.sip.is_ended() && c.tg.is_ended());
            if finished {
                if let Some(c) = self.calls.remove(&id) {
                    tracing::info!(call = id, gateway = %c.gateway, "gateway call ended");
                    let _ = self
                        .to_manager
                        .send(crate::link::Request::CallEnded(Box::new(c.report(id, now))));
                    self.by_call_id.retain(|_, v| *v != id);
                    self.by_client.retain(|_, (v, _)| *v != id);
                    self.by_phone.retain(|_, v| *v != id);
                    self.by_session.remove(&c.session);
                    self.delete_session(c.session);
                    if let Some((token, msg)) = &c.keypad {
                        self.keypads.end(token, now);
                        if let Some(m) = msg {
                            self.delete_keypad(&c.storage, &c.account, *m);
                        }
                    }
                }
            }
        }
    }

    fn tg_action(&mut self, id: u64, a: TgAction, now: Instant) {
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        match a {
            TgAction::Request(r) => {
                // requestCall waits for the resolved peer.
                if let TgRequest::RequestCall { .. } = r {
                    if c.peer.is_none() {
                        // Sent once the callee is resolved.
                        c.held = Some(r);
                        return;
                    }
                }
                self.send_tg(id, r);
            }
            TgAction::StartMedia {
                caller,
                relay_only,
                turn,
            } => {
                let (worker, txc, session, sip_leg) =
                    (self.worker.clone(), self.tx.clone(), c.session, c.sip_leg);
                tokio::spawn(async move {
                    let result = async {
                        let dp = worker.dataplane().client().ok_or("dataplane down")?;
                        let info = dp
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
                        dp.bridge(session, info.leg, sip_leg)
                            .await
                            .map_err(|e| e.to_string())?;
                        let t = info
                            .telegram
                            .ok_or("no Telegram setup from the dataplane")?;
                        Ok::<_, String>((
                            info.leg,
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
                    let _ = txc
                        .send(GwMsg::TgLeg {
                            id,
                            result: result.map_err(|e| e.to_string()),
                        })
                        .await;
                });
            }
            TgAction::Media(op) => {
                if let (Some(leg), Some(dp)) = (c.tg_leg, self.worker.dataplane().client()) {
                    let session = c.session;
                    tokio::spawn(async move {
                        if let Err(e) = dp.telegram(session, leg, op).await {
                            tracing::debug!(session, error = %e, "Telegram media command refused");
                        }
                    });
                }
            }
            TgAction::Event(ev) => match ev {
                TgCallEvent::Ringing => c.sip.ringing(),
                TgCallEvent::RemoteMuted(muted) => {
                    tracing::info!(call = id, muted, "the Telegram user's microphone");
                }
                TgCallEvent::Keyed { emoji, .. } => {
                    tracing::info!(call = id, emoji = %emoji.join(" "), "Telegram call keys agreed");
                }
                TgCallEvent::Connected => {
                    tracing::info!(call = id, "Telegram media connected");
                    c.sip.answer(now);
                    if c.sip.is_confirmed() && c.answered(now) {
                        let _ = self.to_manager.send(crate::link::Request::CallAnswered {
                            gateway: c.gateway.clone(),
                            call: id,
                        });
                    }
                }
                TgCallEvent::Ended(end) => {
                    let (code, reason) = match &end {
                        TgEnd::Discarded(Some(Hangup::Busy)) => (486, "Busy Here".to_string()),
                        TgEnd::Discarded(Some(Hangup::Missed)) => {
                            (480, "Temporarily Unavailable".to_string())
                        }
                        TgEnd::Discarded(_) => (603, "Declined".to_string()),
                        TgEnd::Local(_) => (487, "Request Terminated".to_string()),
                        TgEnd::Failed(why) => {
                            tracing::warn!(call = id, %why, "Telegram call failed");
                            (500, "Server Internal Error".to_string())
                        }
                    };
                    tracing::info!(call = id, ?end, "Telegram side ended");
                    c.sip.hang_up(code, &reason);
                }
            },
        }
    }

    fn sip_action(&mut self, tx: &mut TransactionLayer, id: u64, a: LegAction, now: Instant) {
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        match a {
            LegAction::RespondInvite(resp) => {
                if let Some(k) = &c.invite {
                    let _ = tx.respond(now, k, resp);
                }
            }
            LegAction::Respond(resp) => {
                let method = resp.cseq().map(|x| x.1);
                let call_id = resp.call_id().unwrap_or_default();
                if let Some(i) = c
                    .pending
                    .iter()
                    .position(|(m, cid, _)| Some(m) == method.as_ref() && cid == call_id)
                {
                    let (_, _, k) = c.pending.remove(i);
                    let _ = tx.respond(now, &k, resp);
                }
            }
            LegAction::Send { req, dest } => {
                let call_id = req.call_id().unwrap_or_default().to_string();
                // A hunt's forks each have their own dialog: requests from those PBXs (a BYE,
                // a re-INVITE) find the call by it.
                self.by_call_id.entry(call_id.clone()).or_insert(id);
                let (req, transport) = outbound(&self.reliable, self.local, req, dest, c.transport);
                if let Ok(k) = tx.send_request(now, req, dest, transport) {
                    self.by_client.insert(k, (id, call_id));
                }
            }
            LegAction::CancelInvite { call_id } => {
                let invite = self
                    .by_client
                    .iter()
                    .find(|(k, (v, cid))| *v == id && *cid == call_id && k.method == Method::Invite)
                    .map(|(k, _)| k.clone());
                if let Some(k) = invite {
                    match tx.cancel(now, &k) {
                        Ok(ck) => {
                            self.by_client.insert(ck, (id, call_id));
                        }
                        Err(e) => tracing::debug!(call = id, error = ?e, "INVITE not cancellable"),
                    }
                }
            }
            LegAction::SendAck { req, dest } => {
                let (req, transport) = outbound(&self.reliable, self.local, req, dest, c.transport);
                tx.send_stateless(dest, transport, req)
            }
            LegAction::UpdateLeg(mut spec) => {
                spec.rtcp_mux = true;
                c.sip_events = spec.codec.telephone_event.is_some();
                let (session, leg, previous) = (c.session, c.sip_leg, c.leg_update.take());
                let update = self.spawn_update_leg(session, leg, spec, previous);
                if let Some(c) = self.calls.get_mut(&id) {
                    c.leg_update = update;
                }
            }
            LegAction::Ringing => {}
            LegAction::Answered => {
                if c.answered(now) {
                    let _ = self.to_manager.send(crate::link::Request::CallAnswered {
                        gateway: c.gateway.clone(),
                        call: id,
                    });
                }
                c.tg.accept();
            }
            LegAction::Dtmf(d) => {
                let session = c.session;
                self.send_digits(session, &d.to_string());
            }
            LegAction::Hold(held) => {
                tracing::info!(
                    call = id,
                    held,
                    "the PBX {} the call",
                    if held { "holds" } else { "resumed" }
                );
                c.tg.set_muted(held);
            }
            LegAction::Ended { code, reason } => {
                tracing::info!(call = id, code, %reason, "SIP side ended");
                if c.end.is_none() {
                    c.end = Some((code, reason.clone()));
                }
                let hangup = if c.sip.is_confirmed() || code == 200 {
                    Hangup::Hangup
                } else {
                    Hangup::Busy
                };
                c.tg.hang_up(hangup, now);
            }
        }
    }

    /// A `MESSAGE` the PBX sent in call `id`'s dialog: its text goes to the call's Telegram
    /// user (answered once Telegram took it or refused it, as outside a dialog).
    fn in_dialog_message(&mut self, id: u64, key: ServerKey, req: SipRequest) {
        let Some(c) = self.calls.get(&id) else {
            return;
        };
        let answer = |code: u16, reason: &str, headers: Vec<(String, String)>| {
            let mut resp = SipResponse::to(&req, code, reason, None);
            for (n, v) in headers {
                resp.headers_mut().add(&n, v);
            }
            resp
        };
        if !c.messages {
            let resp = answer(403, reasons::MESSAGES_DISABLED, Vec::new());
            self.msg_answers.push((key, resp));
            return;
        }
        let text = match super::messages::text_of(req.header("Content-Type"), &req.body) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(call = id, error = %e, "in-dialog MESSAGE body refused");
                let (code, reason, headers) = e.response();
                self.msg_answers.push((key, answer(code, reason, headers)));
                return;
            }
        };
        let Some(user) = c.tg_user else {
            // The callee is still being resolved.
            let resp = answer(480, "Temporarily Unavailable", Vec::new());
            self.msg_answers.push((key, resp));
            return;
        };
        let (worker, txc) = (self.worker.clone(), self.tx.clone());
        let (gateway, storage, account) = (c.gateway.clone(), c.storage.clone(), c.account.clone());
        let resp_for = answer(200, "OK", Vec::new());
        tokio::spawn(async move {
            let query = crate::telegram::resolve::PeerQuery::UserId(user);
            let (code, reason) =
                text_to_user(&worker, &gateway, &storage, &account, &query, &text).await;
            worker.metrics().inc(
                "siptg_gateway_messages_total",
                &[("direction", "to_telegram"), ("code", &code.to_string())],
            );
            let mut resp = resp_for;
            resp.code = code;
            resp.reason = reason;
            let _ = txc
                .send(GwMsg::MessageAnswered {
                    key,
                    resp: Box::new(resp),
                })
                .await;
        });
    }

    /// A Telegram user's text for the PBX. Keypad digits from a user in a call with this
    /// account are that call's DTMF (the update path sends them as INFO), not a message.
    fn message(&mut self, m: GatewayMessage) {
        let in_call = self
            .calls
            .values()
            .any(|c| c.account == m.account && c.tg_user == Some(m.user_id));
        if in_call && super::messages::is_keypad(&m.text) {
            tracing::info!(gateway = %m.gateway, user = m.user_id, "keypad digits during a call: DTMF, not a MESSAGE");
            return;
        }
        let id = next_call_id();
        tracing::info!(text = id, gateway = %m.gateway, user = m.user_id, targets = m.targets.len(), "text message: Telegram → SIP");
        self.messages.insert(
            id,
            OutMessage {
                msg: m,
                next: 0,
                last: (503, reasons::SIP_ACCOUNT_UNAVAILABLE.to_string()),
                sent: None,
                retry: None,
            },
        );
        self.msg_queue.push(id);
    }

    /// Sends text `id` to its next PBX; when none is left, tells the user it was not
    /// delivered.
    fn send_message(&mut self, tx: &mut TransactionLayer, id: u64, now: Instant) {
        let local = self.local;
        let Some(om) = self.messages.get_mut(&id) else {
            return;
        };
        loop {
            // The current target's challenge answered, else the next target.
            let retry = om.retry.take().zip(
                om.next
                    .checked_sub(1)
                    .and_then(|i| om.msg.targets.get(i))
                    .cloned(),
            );
            let (req, target, authorized) = match retry {
                Some((req, target)) => (req, target, true),
                None => {
                    let Some(target) = om.msg.targets.get(om.next).cloned() else {
                        break;
                    };
                    om.next += 1;
                    let sender = super::messages::Sender {
                        user: &om.msg.from_user,
                        name: om.msg.from_name.as_deref(),
                        headers: &om.msg.headers,
                    };
                    let req = super::messages::request(&target, &sender, &om.msg.text, local);
                    (req, target, false)
                }
            };
            let (req, transport) =
                outbound(&self.reliable, local, req, target.address, Transport::Udp);
            match tx.send_request(now, req.clone(), target.address, transport) {
                Ok(k) => {
                    tracing::debug!(text = id, connection = %target.connection, uri = %target.request_uri, authorized, "MESSAGE sent");
                    om.sent = Some((req, authorized));
                    self.msg_clients.insert(k, id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(text = id, connection = %target.connection, error = ?e, "MESSAGE not sent");
                    om.last = (503, "Service Unavailable".to_string());
                }
            }
        }
        if let Some(om) = self.messages.remove(&id) {
            self.message_failed(id, om);
        }
    }

    /// A 401/407 to text `id`'s `MESSAGE`: true when it goes out again with our credentials
    /// for that connection (once per target; a second challenge is a failure).
    fn answer_message_challenge(&mut self, id: u64, resp: &SipResponse) -> bool {
        let Some(om) = self.messages.get_mut(&id) else {
            return false;
        };
        let Some(target) = om.next.checked_sub(1).and_then(|i| om.msg.targets.get(i)) else {
            return false;
        };
        let Some((sent, false)) = &om.sent else {
            return false;
        };
        let Some(creds) = self.worker.pbx_credentials(&target.connection) else {
            return false;
        };
        match super::auth::authorize(sent, resp, &creds) {
            Ok(again) => {
                tracing::debug!(text = id, connection = %target.connection, code = resp.code, "MESSAGE challenged: answering");
                om.retry = Some(again);
                self.msg_queue.push(id);
                true
            }
            Err(e) => {
                tracing::info!(text = id, connection = %target.connection, error = %e, "cannot answer the PBX's challenge");
                false
            }
        }
    }

    /// The PBX's final answer (or our timeout) to text `id`'s `MESSAGE`: delivered on a 2xx,
    /// else the next PBX is tried.
    fn message_answered(&mut self, id: u64, code: u16, reason: &str) {
        if (200..300).contains(&code) {
            if let Some(om) = self.messages.remove(&id) {
                tracing::info!(text = id, gateway = %om.msg.gateway, code, "text message delivered to the PBX");
                self.count_message(code);
            }
            return;
        }
        if let Some(om) = self.messages.get_mut(&id) {
            tracing::info!(text = id, gateway = %om.msg.gateway, code, reason, "the PBX did not take a text message");
            om.last = (code, reason.to_string());
            self.msg_queue.push(id);
        }
    }

    /// No PBX took text `om`: the sender reads why in the chat.
    fn message_failed(&mut self, id: u64, om: OutMessage) {
        let (code, reason) = &om.last;
        self.count_message(*code);
        tracing::info!(text = id, gateway = %om.msg.gateway, user = om.msg.user_id, code, %reason, "text message not delivered");
        if !self
            .notices
            .allow(&om.msg.account, om.msg.user_id, Instant::now())
        {
            tracing::debug!(
                text = id,
                user = om.msg.user_id,
                "a notice went to the user within the minute: none now"
            );
            return;
        }
        match &om.msg.peer {
            Some(peer) => {
                let notice = super::messages::not_delivered(*code, reason);
                let req = super::text_message(peer, &notice);
                self.spawn_invoke(om.msg.storage, om.msg.account, req.to_bytes(), None);
            }
            None => {
                tracing::warn!(
                    text = id,
                    user = om.msg.user_id,
                    "the sender is not resolvable: no chat notice"
                );
            }
        }
    }

    /// `siptg_gateway_messages_total{direction="to_pbx", code}`: a text's outcome at the PBX
    /// (the 2xx that took it, or the last failure).
    fn count_message(&self, code: u16) {
        self.worker.metrics().inc(
            "siptg_gateway_messages_total",
            &[("direction", "to_pbx"), ("code", &code.to_string())],
        );
    }

    /// Digits for the PBX from call `id`'s Telegram user (typed in the chat or pressed on the
    /// keypad): RFC 4733 in the call's RTP or SIP INFO, by the connection's `dtmf`.
    fn dtmf_to_pbx(&mut self, id: u64, digits: &str) {
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        let method = dtmf_method(&c.dtmf, c.sip_events);
        tracing::info!(call = id, %digits, ?method, "DTMF from the Telegram user");
        for d in digits.chars().map(|d| d.to_ascii_uppercase()) {
            match method {
                DtmfMethod::Rfc4733 => {
                    if let (Some(leg), Some(dp)) = (c.tg_leg, self.worker.dataplane().client()) {
                        let session = c.session;
                        tokio::spawn(async move {
                            if let Err(e) = dp
                                .telegram(
                                    session,
                                    leg,
                                    siptg_proto::TelegramOp::SendDtmf { digit: d },
                                )
                                .await
                            {
                                tracing::warn!(session, error = %e, "RFC 4733 digit refused");
                            }
                        });
                    }
                }
                DtmfMethod::Info => c.sip.send_info(d),
            }
        }
    }

    /// Once call `id` is answered and its gateway has a keypad bot: a token for the call, and
    /// a task that puts the bot's keypad into the chat.
    fn start_keypad(&mut self, id: u64) {
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        let (Some(bot), Some(user), None, Some(_)) =
            (c.keypad_bot.clone(), c.tg_user, &c.keypad, c.answered_at)
        else {
            return;
        };
        if c.sip.is_ended() || c.tg.is_ended() {
            return;
        }
        let token = self.keypads.start(id, &c.storage);
        c.keypad = Some((token.clone(), None));
        let (worker, txc) = (self.worker.clone(), self.tx.clone());
        let (storage, account) = (c.storage.clone(), c.account.clone());
        tokio::spawn(async move {
            let result = show_keypad(&worker, &storage, &account, &bot, user, &token).await;
            let _ = txc
                .send(GwMsg::Keypad {
                    id,
                    storage,
                    account,
                    token,
                    result,
                })
                .await;
        });
    }

    /// The keypad task's outcome: remember the message (or delete it at once when the call
    /// ended meanwhile); a keypad that could not be shown only costs the buttons.
    fn keypad_shown(
        &mut self,
        id: u64,
        storage: &str,
        account: &str,
        token: &str,
        result: Result<i32, super::keypad::KeypadError>,
        now: Instant,
    ) {
        let call = self
            .calls
            .get_mut(&id)
            .filter(|c| c.keypad.as_ref().is_some_and(|(t, _)| t == token));
        match (result, call) {
            (Ok(msg), Some(c)) => {
                tracing::info!(call = id, msg, "keypad shown in the chat");
                c.keypad = Some((token.to_string(), Some(msg)));
            }
            (Ok(msg), None) => {
                tracing::debug!(call = id, msg, "keypad arrived after the call: deleted");
                self.keypads.end(token, now);
                self.delete_keypad(storage, account, msg);
            }
            (Err(e), _) => {
                tracing::warn!(call = id, error = %e, "no keypad for the call; it goes on without one");
            }
        }
    }

    /// The keypad message `msg` leaves the chat (for both sides).
    fn delete_keypad(&self, storage: &str, account: &str, msg: i32) {
        let req = tl::functions::messages::DeleteMessages {
            revoke: true,
            id: vec![msg],
        };
        self.spawn_invoke(storage.into(), account.into(), req.to_bytes(), None);
    }

    /// An inline query to a keypad bot: answered with the keypad when its token is one of our
    /// calls' (any other query is another Worker's or not a keypad's).
    fn keypad_query(&mut self, bot: &str, q: &tl::types::UpdateBotInlineQuery) {
        if !super::keypad::is_token(&q.query) {
            return;
        }
        let Some(c) = self
            .keypads
            .call_of(&q.query)
            .and_then(|id| self.calls.get(&id))
        else {
            return;
        };
        if c.keypad_bot.as_deref() != Some(bot) {
            return;
        }
        let answer = super::keypad::inline_results(q.query_id, &q.query);
        self.spawn_invoke(c.storage.clone(), bot.into(), answer.to_bytes(), None);
    }

    /// A press on a keypad: the bot answers it, and a live call's user's digit goes to the PBX.
    /// A press on the keypad of an ended call (or by somebody else) sends nothing.
    fn keypad_press(
        &mut self,
        bot: &str,
        q: &tl::types::UpdateInlineBotCallbackQuery,
        now: Instant,
    ) {
        use super::keypad::{press_answer, Press};
        let data = q.data.as_deref().unwrap_or_default();
        let (storage, text, dtmf) = match self.keypads.press(data, now) {
            Press::Unknown => return,
            Press::Ended { storage } => {
                tracing::info!(
                    user = q.user_id,
                    "keypad press after the call ended: no DTMF"
                );
                (storage, "The call has ended".to_string(), None)
            }
            Press::Live { call, digit } => {
                let Some(c) = self.calls.get(&call) else {
                    return;
                };
                if c.keypad_bot.as_deref() != Some(bot) {
                    return;
                }
                if c.tg_user != Some(q.user_id) {
                    tracing::info!(
                        call,
                        user = q.user_id,
                        "keypad press by another user: no DTMF"
                    );
                    (c.storage.clone(), "Not your call".to_string(), None)
                } else {
                    (
                        c.storage.clone(),
                        format!("Sent: {digit}"),
                        Some((call, digit)),
                    )
                }
            }
        };
        let answer = press_answer(q.query_id, &text);
        self.spawn_invoke(storage, bot.into(), answer.to_bytes(), None);
        if let Some((call, digit)) = dtmf {
            self.dtmf_to_pbx(call, &digit.to_string());
        }
    }

    /// DTMF from the PBX → a keypad message to the Telegram user.
    fn send_digits(&mut self, session: SessionId, digits: &str) {
        let Some(c) = self
            .by_session
            .get(&session)
            .and_then(|i| self.calls.get(i))
        else {
            return;
        };
        let Some(peer) = c.peer.clone() else { return };
        let req = super::text_message(&peer, digits);
        self.spawn_invoke(c.storage.clone(), c.account.clone(), req.to_bytes(), None);
    }

    fn send_tg(&mut self, id: u64, r: TgRequest) {
        let Some(c) = self.calls.get(&id) else { return };
        let (what, body) = match r {
            TgRequest::GetDhConfig => (
                TgWhat::Dh,
                tl::functions::messages::GetDhConfig {
                    version: 0,
                    random_length: 256,
                }
                .to_bytes(),
            ),
            TgRequest::RequestCall { g_a_hash } => {
                let Some(peer) = &c.peer else { return };
                (
                    TgWhat::Request,
                    tl::functions::phone::RequestCall {
                        video: false,
                        user_id: peer.input_user(),
                        random_id: rand::random::<i32>().abs(),
                        g_a_hash,
                        protocol: protocol(),
                    }
                    .to_bytes(),
                )
            }
            TgRequest::ReceivedCall => {
                let Some(p) = c.phone.clone() else { return };
                (
                    TgWhat::Other,
                    tl::functions::phone::ReceivedCall { peer: p }.to_bytes(),
                )
            }
            TgRequest::AcceptCall { g_b } => {
                let Some(p) = c.phone.clone() else { return };
                (
                    TgWhat::Accept,
                    tl::functions::phone::AcceptCall {
                        peer: p,
                        g_b,
                        protocol: protocol(),
                    }
                    .to_bytes(),
                )
            }
            TgRequest::ConfirmCall { g_a, fingerprint } => {
                let Some(p) = c.phone.clone() else { return };
                (
                    TgWhat::Confirm,
                    tl::functions::phone::ConfirmCall {
                        peer: p,
                        g_a,
                        key_fingerprint: fingerprint,
                        protocol: protocol(),
                    }
                    .to_bytes(),
                )
            }
            TgRequest::SendSignaling(data) => {
                let Some(p) = c.phone.clone() else { return };
                (
                    TgWhat::Other,
                    tl::functions::phone::SendSignalingData { peer: p, data }.to_bytes(),
                )
            }
            TgRequest::DiscardCall { reason, duration } => {
                let Some(p) = c.phone.clone() else { return };
                (
                    TgWhat::Other,
                    tl::functions::phone::DiscardCall {
                        video: false,
                        peer: p,
                        duration,
                        reason: reason.to_tl(),
                        connection_id: 0,
                    }
                    .to_bytes(),
                )
            }
        };
        self.spawn_invoke(c.storage.clone(), c.account.clone(), body, Some((id, what)));
    }

    fn spawn_invoke(
        &self,
        storage: String,
        account: String,
        body: Vec<u8>,
        reply: Option<(u64, TgWhat)>,
    ) {
        let (worker, txc) = (self.worker.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = match worker
                .telegram(
                    &storage,
                    &account,
                    TelegramOp::Invoke {
                        body: b64().encode(body),
                    },
                )
                .await
            {
                Ok(TelegramAnswer::Invoked { body }) => b64()
                    .decode(body.as_bytes())
                    .map_err(|e| TgError::transport(e.to_string())),
                Ok(other) => Err(TgError::transport(format!("unexpected answer {other:?}"))),
                Err(e) => Err(e),
            };
            match reply {
                Some((id, what)) => {
                    let _ = txc.send(GwMsg::Tg { id, what, result }).await;
                }
                None => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "Telegram request failed");
                    }
                }
            }
        });
    }

    /// Updates the SIP media leg in a task that waits for the call's previous update first:
    /// a hold and its resume must reach the dataplane in the order the PBX sent them.
    fn spawn_update_leg(
        &self,
        session: SessionId,
        leg: LegId,
        spec: siptg_proto::LegSpec,
        previous: Option<tokio::task::JoinHandle<()>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let dp = self.worker.dataplane().client()?;
        Some(tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            if let Err(e) = dp.update_leg(session, leg, spec).await {
                tracing::warn!(session, leg, error = %e, "media leg update refused");
            }
        }))
    }

    fn delete_session(&self, session: SessionId) {
        if let Some(dp) = self.worker.dataplane().client() {
            tokio::spawn(async move {
                let _ = dp.delete_session(session).await;
            });
        }
    }
}

/// A typed request of `account` through the Manager to Storage `storage`.
async fn invoke_as<R: tl::RemoteCall>(
    worker: &Worker,
    storage: &str,
    account: &str,
    request: &R,
) -> Result<R::Return, TgError> {
    let body = request.to_bytes();
    let method = crate::telegram::account::method_name(&body);
    match worker
        .telegram(
            storage,
            account,
            TelegramOp::Invoke {
                body: b64().encode(&body),
            },
        )
        .await?
    {
        TelegramAnswer::Invoked { body } => {
            let bytes = b64()
                .decode(body.as_bytes())
                .map_err(|e| TgError::transport(format!("storage answer: {e}")))?;
            R::Return::from_bytes(&bytes).map_err(|e| TgError::Decode {
                request: method.into(),
                why: e.to_string(),
            })
        }
        other => Err(TgError::transport(format!("unexpected answer {other:?}"))),
    }
}

/// A user (or bot) as `account` sees it, by the Storage's resolution.
async fn resolve_as(
    worker: &Worker,
    storage: &str,
    account: &str,
    query: crate::telegram::resolve::PeerQuery,
) -> Result<Peer, TgError> {
    match worker
        .telegram(storage, account, TelegramOp::Resolve { query })
        .await?
    {
        TelegramAnswer::Peer { peer, .. } => Ok(peer),
        other => Err(TgError::transport(format!("unexpected answer {other:?}"))),
    }
}

/// Puts bot `bot`'s keypad for `token` into the chat of `account` with `user`: the inline
/// query, then the result sent via the bot. Returns the message's id.
async fn show_keypad(
    worker: &Worker,
    storage: &str,
    account: &str,
    bot: &str,
    user: i64,
    token: &str,
) -> Result<i32, super::keypad::KeypadError> {
    use super::keypad::KeypadError;
    use crate::telegram::resolve::PeerQuery;
    let tg = |step: &'static str| move |source: TgError| KeypadError::Telegram { step, source };
    // The bot is an account of the same Storage; the gateway's account finds it by username.
    let accounts = match worker
        .telegram(storage, account, TelegramOp::Accounts)
        .await
        .map_err(tg("list the storage's accounts"))?
    {
        TelegramAnswer::Accounts { accounts } => accounts,
        other => {
            return Err(tg("list the storage's accounts")(TgError::transport(
                format!("unexpected answer {other:?}"),
            )))
        }
    };
    let record = accounts
        .iter()
        .find(|r| r.name == bot)
        .ok_or_else(|| KeypadError::NoBot {
            bot: bot.into(),
            storage: storage.into(),
        })?;
    let username = record
        .me
        .as_ref()
        .filter(|m| m.bot && record.state == crate::telegram::accounts::AccountState::Active)
        .and_then(|m| m.username.clone())
        .ok_or_else(|| KeypadError::BotNotLoggedIn { bot: bot.into() })?;
    let bot_peer = resolve_as(worker, storage, account, PeerQuery::Username(username))
        .await
        .map_err(tg("resolve the bot"))?;
    let user_peer = resolve_as(worker, storage, account, PeerQuery::UserId(user))
        .await
        .map_err(tg("resolve the user"))?;
    let peer = tl::enums::InputPeer::User(tl::types::InputPeerUser {
        user_id: user_peer.user_id,
        access_hash: user_peer.access_hash,
    });
    let tl::enums::messages::BotResults::Results(results) = invoke_as(
        worker,
        storage,
        account,
        &tl::functions::messages::GetInlineBotResults {
            bot: bot_peer.input_user(),
            peer: peer.clone(),
            geo_point: None,
            query: token.into(),
            offset: String::new(),
        },
    )
    .await
    .map_err(tg("ask the bot (messages.getInlineBotResults)"))?;
    let result = results.results.first().ok_or(KeypadError::NoResult)?;
    let random_id: i64 = rand::random();
    let sent = invoke_as(
        worker,
        storage,
        account,
        &tl::functions::messages::SendInlineBotResult {
            silent: true,
            background: false,
            clear_draft: false,
            hide_via: false,
            peer,
            reply_to: None,
            random_id,
            query_id: results.query_id,
            id: result.id(),
            schedule_date: None,
            send_as: None,
            quick_reply_shortcut: None,
            allow_paid_stars: None,
        },
    )
    .await
    .map_err(tg("send the keypad (messages.sendInlineBotResult)"))?;
    super::keypad::sent_message_id(&sent, random_id).ok_or(KeypadError::NoMessageId)
}

/// How digits go to the PBX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DtmfMethod {
    /// RFC 4733 telephone-events in the call's RTP.
    Rfc4733,
    /// SIP INFO (`application/dtmf-relay`).
    Info,
}

/// The first of the connection's `methods` this call can use: `rfc2833` only when the SIP leg
/// negotiated telephone-event; INFO otherwise (always possible in a dialog).
fn dtmf_method(methods: &[String], sip_events: bool) -> DtmfMethod {
    for m in methods {
        match m.as_str() {
            "rfc2833" | "rfc4733" if sip_events => return DtmfMethod::Rfc4733,
            "info" => return DtmfMethod::Info,
            _ => {}
        }
    }
    DtmfMethod::Info
}

fn phone_call_id(pc: &tl::enums::PhoneCall) -> i64 {
    match pc {
        tl::enums::PhoneCall::Empty(x) => x.id,
        tl::enums::PhoneCall::Waiting(x) => x.id,
        tl::enums::PhoneCall::Requested(x) => x.id,
        tl::enums::PhoneCall::Accepted(x) => x.id,
        tl::enums::PhoneCall::Call(x) => x.id,
        tl::enums::PhoneCall::Discarded(x) => x.id,
    }
}

fn input_of(pc: &tl::enums::PhoneCall) -> Option<(i64, i64)> {
    match pc {
        tl::enums::PhoneCall::Waiting(x) => Some((x.id, x.access_hash)),
        tl::enums::PhoneCall::Requested(x) => Some((x.id, x.access_hash)),
        tl::enums::PhoneCall::Accepted(x) => Some((x.id, x.access_hash)),
        tl::enums::PhoneCall::Call(x) => Some((x.id, x.access_hash)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtmf_goes_by_the_first_method_the_call_can_use() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            dtmf_method(&m(&["rfc2833", "info"]), true),
            DtmfMethod::Rfc4733
        );
        // No telephone-event on the SIP leg: the next method.
        assert_eq!(
            dtmf_method(&m(&["rfc2833", "info"]), false),
            DtmfMethod::Info
        );
        assert_eq!(
            dtmf_method(&m(&["info", "rfc2833"]), true),
            DtmfMethod::Info
        );
        assert_eq!(dtmf_method(&m(&["rfc4733"]), true), DtmfMethod::Rfc4733);
        // Nothing usable: INFO works in any dialog.
        assert_eq!(dtmf_method(&m(&["rfc2833"]), false), DtmfMethod::Info);
    }
}
