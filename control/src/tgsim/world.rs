//! The simulated cloud's state and rules, sans-IO: a TL request from a connection's auth key at
//! a given time in, the TL answer (or Telegram's RPC error) and the updates to deliver out.
//!
//! What it models is what the gateway depends on: login (code, 2FA by SRP, QR tokens), users
//! with phones, usernames, contacts, blocks and privacy, online state, authorizations (for
//! "calls disabled on other devices"), the DH config, 1:1 call states with the signalling relay,
//! a 15 s ring timeout for offline callees, and flood limits.

use super::srp::SrpRound;
use grammers_tl_types::{self as tl, Deserializable, Identifiable, Serializable};
use rand::{Rng, RngCore};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// An RPC error as Telegram sends it.
pub type RpcErr = (i32, String);

fn err(code: i32, msg: impl Into<String>) -> RpcErr {
    (code, msg.into())
}

/// Who may do something (calls, P2P, adding to groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Privacy {
    #[default]
    Everybody,
    Contacts,
    Nobody,
}

/// A simulated Telegram user.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimUser {
    pub id: i64,
    /// Digits only, no `+`.
    pub phone: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: String,
    /// The login code the cloud "sends" (default 12345).
    #[serde(default = "default_code")]
    pub code: String,
    /// The 2FA password, if the account has one.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub contacts: HashSet<i64>,
    #[serde(default)]
    pub blocked: HashSet<i64>,
    #[serde(default)]
    pub calls: Privacy,
    #[serde(default)]
    pub p2p: Privacy,
    #[serde(default)]
    pub chat_invite: Privacy,
    /// Who may write to the user first: Telegram's "new chats from non-contacts require
    /// Premium" (`contacts`), refused with `PRIVACY_PREMIUM_REQUIRED`.
    #[serde(default)]
    pub messages: Privacy,
    /// Forced offline (no pushes arrive, calls to it ring out after the offline timeout).
    #[serde(default)]
    pub offline: bool,
    /// Shown to others without an access hash (a "min" user): they cannot call it.
    #[serde(default)]
    pub anonymous: bool,
    /// A bot account (made with @BotFather): it logs in with `bot_token`
    /// (`auth.importBotAuthorization`), not a code, answers inline queries and button presses,
    /// and cannot use the methods of user accounts.
    #[serde(default)]
    pub bot: bool,
    /// A bot's token, `<id>:<secret>` as @BotFather gives it.
    #[serde(default)]
    pub bot_token: Option<String>,
}

/// The simulated cloud's access hash of user `id` (the same for every viewer, stable).
fn sim_access_hash(id: i64) -> i64 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64)) ^ 0x5bd1_e995
}

fn default_code() -> String {
    "12345".into()
}

impl SimUser {
    /// A user with defaults (everybody may call, code 12345, no password).
    pub fn new(id: i64, phone: &str, username: Option<&str>, first_name: &str) -> Self {
        Self {
            id,
            phone: phone.trim_start_matches('+').to_string(),
            username: username.map(|u| u.trim_start_matches('@').to_string()),
            first_name: first_name.into(),
            last_name: String::new(),
            code: default_code(),
            password: None,
            contacts: HashSet::new(),
            blocked: HashSet::new(),
            calls: Privacy::Everybody,
            p2p: Privacy::Everybody,
            chat_invite: Privacy::Everybody,
            messages: Privacy::Everybody,
            offline: false,
            anonymous: false,
            bot: false,
            bot_token: None,
        }
    }

    /// A bot with an inline mode, logging in with `token`.
    pub fn new_bot(id: i64, username: &str, token: &str) -> Self {
        let mut b = Self::new(id, &format!("42{id}"), Some(username), username);
        b.bot = true;
        b.bot_token = Some(token.to_string());
        b
    }

    fn access_hash(&self) -> i64 {
        sim_access_hash(self.id)
    }
}

/// Limits that make the cloud answer FLOOD_WAIT and PEER_FLOOD.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloodRules {
    /// phone.requestCall per caller per minute before FLOOD_WAIT.
    pub calls_per_minute: u32,
    /// Calls to users who do not have the caller as a contact before PEER_FLOOD.
    pub stranger_calls: u32,
}

impl Default for FloodRules {
    fn default() -> Self {
        Self {
            calls_per_minute: 20,
            stranger_calls: 50,
        }
    }
}

/// A TURN server the cloud hands out in `phoneConnectionWebrtc`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnServer {
    pub ip: String,
    pub port: u16,
    pub username: String,
    pub password: String,
}

/// How the simulated cloud behaves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldConfig {
    pub users: Vec<SimUser>,
    #[serde(default)]
    pub flood: FloodRules,
    #[serde(default)]
    pub turn: Option<TurnServer>,
    /// How long a call to an offline user rings before it is missed (Telegram: 15 s).
    #[serde(default = "default_offline_ring", with = "secs")]
    pub offline_ring_timeout: Duration,
    /// How long a call to an online user rings before it is missed (Telegram: 90 s).
    #[serde(default = "default_ring", with = "secs")]
    pub ring_timeout: Duration,
    /// Methods the cloud never answers (to test RPC timeouts), e.g. `["phone.requestCall"]`.
    #[serde(default)]
    pub unanswered: Vec<String>,
    /// How long an inline query or a button press waits for the bot's answer before the
    /// asking user gets `BOT_RESPONSE_TIMEOUT` (Telegram gives bots a few seconds).
    #[serde(default = "default_bot_timeout", with = "secs")]
    pub bot_answer_timeout: Duration,
}

fn default_bot_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_offline_ring() -> Duration {
    Duration::from_secs(15)
}
fn default_ring() -> Duration {
    Duration::from_secs(90)
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            users: Vec::new(),
            flood: FloodRules::default(),
            turn: None,
            offline_ring_timeout: default_offline_ring(),
            ring_timeout: default_ring(),
            unanswered: Vec::new(),
            bot_answer_timeout: default_bot_timeout(),
        }
    }
}

/// One auth key's session (an "authorization" once logged in).
#[derive(Debug, Clone)]
struct AuthSession {
    user: Option<i64>,
    hash: i64,
    created: i32,
    call_requests_disabled: bool,
    /// The login in progress: phone and its phone_code_hash.
    pending_code: Option<(String, String)>,
    /// The user whose 2FA password is being asked for, and the SRP round.
    pending_password: Option<(i64, i64)>,
    /// The QR token this key exported, if any.
    qr_token: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    Requested,
    Waiting { received: Option<i32> },
    Accepted,
    Active { start: i32 },
    Discarded,
}

#[derive(Debug, Clone)]
struct SimCall {
    id: i64,
    access_hash: i64,
    date: i32,
    admin: i64,
    participant: i64,
    g_a_hash: Vec<u8>,
    g_a: Vec<u8>,
    g_b: Vec<u8>,
    fingerprint: i64,
    admin_protocol: tl::types::PhoneCallProtocol,
    participant_protocol: Option<tl::types::PhoneCallProtocol>,
    state: CallState,
    ring_deadline: Instant,
}

/// Whom an update is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// Every connection logged in as this user.
    User(i64),
    /// The connections of one auth key (a QR login waiting for its token to be accepted).
    Key([u8; 32]),
}

/// An update for every connection of a user (except those that disabled calls, for call
/// updates), or of one key.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub to: To,
    pub update: tl::enums::Update,
    /// Call updates skip authorizations with calls disabled.
    pub is_call: bool,
}

/// A request whose answer comes later (an inline query or a button press waiting for its bot):
/// the runtime keeps which connection and request it was, and sends what
/// [`World::take_answers`] gives for it.
pub type Ticket = u64;

/// The answer to one request.
#[derive(Debug)]
pub enum Reply {
    /// Answered now.
    Now(Result<Vec<u8>, RpcErr>),
    /// Answered later (the bot's answer, or `BOT_RESPONSE_TIMEOUT`), through
    /// [`World::take_answers`].
    Later(Ticket),
}

impl Reply {
    /// The answer if it came now; a parked request is `(0, "ANSWER_PENDING")`.
    pub fn now(self) -> Result<Vec<u8>, RpcErr> {
        match self {
            Reply::Now(r) => r,
            Reply::Later(_) => Err(err(0, "ANSWER_PENDING")),
        }
    }

    /// Is it an error answered now?
    pub fn is_err(&self) -> bool {
        matches!(self, Reply::Now(Err(_)))
    }
}

/// What one request produced.
#[derive(Debug)]
pub struct Outcome {
    pub reply: Reply,
    pub deliveries: Vec<Delivery>,
}

/// An inline query from a user to a bot (`messages.getInlineBotResults`).
#[derive(Debug, Clone)]
struct InlineQuery {
    bot: i64,
    user: i64,
    /// The user's request, while the bot has not answered.
    waiting: Option<Ticket>,
    deadline: Instant,
    /// The bot's results (`messages.setInlineBotResults`), usable by `sendInlineBotResult`.
    results: Vec<tl::types::BotInlineResult>,
    asked: Instant,
}

/// A press of an inline button (`messages.getBotCallbackAnswer`) waiting for the bot.
#[derive(Debug, Clone)]
struct CallbackQuery {
    bot: i64,
    ticket: Ticket,
    deadline: Instant,
}

/// A private message the cloud keeps (for deleting it and pressing its buttons).
#[derive(Debug, Clone)]
struct StoredMessage {
    from: i64,
    to: i64,
    via_bot: Option<i64>,
    markup: Option<tl::enums::ReplyMarkup>,
    /// Users for whom it is deleted.
    deleted_for: HashSet<i64>,
}

/// Longest callback data of an inline button (Telegram: 1–64 bytes).
pub const MAX_CALLBACK_DATA: usize = 64;
/// Longest text a bot may show for a button press.
pub const MAX_CALLBACK_ANSWER: usize = 200;

/// The simulated cloud.
pub struct World {
    cfg: WorldConfig,
    users: BTreeMap<i64, SimUser>,
    sessions: HashMap<[u8; 32], AuthSession>,
    srp: HashMap<i64, SrpRound>,
    /// QR token → (exporting key, accepted by user).
    qr: HashMap<Vec<u8>, ([u8; 32], Option<i64>)>,
    calls: HashMap<i64, SimCall>,
    /// Recent requestCall times per caller; strangers called per caller.
    call_times: HashMap<i64, Vec<Instant>>,
    strangers: HashMap<i64, HashSet<i64>>,
    /// Connected keys (online presence).
    connected: HashMap<[u8; 32], usize>,
    dh_prime: Vec<u8>,
    next_message: i32,
    epoch: (Instant, i32),
    /// Inline queries by query id (kept a while after the answer: their results can be sent).
    inline: HashMap<i64, InlineQuery>,
    /// Button presses waiting for their bot, by query id.
    callbacks: HashMap<i64, CallbackQuery>,
    /// Private messages by id.
    messages: HashMap<i32, StoredMessage>,
    next_ticket: Ticket,
    /// Late answers to parked requests, for the runtime.
    answers: Vec<(Ticket, Result<Vec<u8>, RpcErr>)>,
    /// Every refused request, for tests: (method, error).
    pub log: Vec<(String, String)>,
}

const SRP_SALT1: [u8; 8] = *b"siptgsa1";
const SRP_SALT2: [u8; 16] = *b"siptg-sim-salt-2";

impl World {
    /// A cloud with `cfg`'s users.
    pub fn new(cfg: WorldConfig, now: Instant, unix_now: i32) -> Self {
        let users = cfg.users.iter().map(|u| (u.id, u.clone())).collect();
        let dh_prime = hex_bytes(crate::tgcall::dh::KNOWN_PRIME_HEX);
        Self {
            cfg,
            users,
            sessions: HashMap::new(),
            srp: HashMap::new(),
            qr: HashMap::new(),
            calls: HashMap::new(),
            call_times: HashMap::new(),
            strangers: HashMap::new(),
            connected: HashMap::new(),
            dh_prime,
            next_message: 0,
            epoch: (now, unix_now),
            inline: HashMap::new(),
            callbacks: HashMap::new(),
            messages: HashMap::new(),
            next_ticket: 0,
            answers: Vec::new(),
            log: Vec::new(),
        }
    }

    fn unix(&self, now: Instant) -> i32 {
        let secs = now.saturating_duration_since(self.epoch.0).as_secs();
        self.epoch
            .1
            .saturating_add(i32::try_from(secs).unwrap_or(i32::MAX))
    }

    /// Adds or replaces a user.
    pub fn upsert_user(&mut self, user: SimUser) {
        self.users.insert(user.id, user);
    }

    /// A user, for tests and the admin view.
    pub fn user(&self, id: i64) -> Option<&SimUser> {
        self.users.get(&id)
    }

    /// Changes a user (privacy, blocks, contacts, offline).
    pub fn user_mut(&mut self, id: i64) -> Option<&mut SimUser> {
        self.users.get_mut(&id)
    }

    /// A connection presents `key` (or none): the key it is bound to from now on.
    pub fn hello(&mut self, key: Option<[u8; 32]>, now: Instant) -> [u8; 32] {
        let key = match key {
            Some(k) if self.sessions.contains_key(&k) => k,
            _ => {
                let mut k = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                let created = self.unix(now);
                self.sessions.insert(
                    k,
                    AuthSession {
                        user: None,
                        hash: rand::thread_rng().gen(),
                        created,
                        call_requests_disabled: false,
                        pending_code: None,
                        pending_password: None,
                        qr_token: None,
                    },
                );
                k
            }
        };
        *self.connected.entry(key).or_default() += 1;
        key
    }

    /// A connection with `key` went away.
    pub fn bye(&mut self, key: &[u8; 32]) {
        if let Some(n) = self.connected.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.connected.remove(key);
            }
        }
    }

    /// The user an auth key is logged in as.
    pub fn user_of(&self, key: &[u8; 32]) -> Option<i64> {
        self.sessions.get(key).and_then(|s| s.user)
    }

    /// Keys logged in as `user`, with whether calls are disabled on each.
    pub fn keys_of(&self, user: i64) -> Vec<([u8; 32], bool)> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.user == Some(user))
            .map(|(k, s)| (*k, s.call_requests_disabled))
            .collect()
    }

    /// Logs `key` in as `user` without a code (another device of a test user).
    pub fn authorize(&mut self, key: &[u8; 32], user: i64) {
        if let Some(s) = self.sessions.get_mut(key) {
            s.user = Some(user);
        }
    }

    fn online(&self, user: i64) -> bool {
        if self.users.get(&user).is_none_or(|u| u.offline) {
            return false;
        }
        self.sessions
            .iter()
            .any(|(k, s)| s.user == Some(user) && self.connected.contains_key(k))
    }

    /// Accepts a QR login token as `user` (what scanning the code in the app does).
    pub fn accept_qr(&mut self, token: &[u8], user: i64) -> Result<Delivery, RpcErr> {
        let Some((key, accepted)) = self.qr.get_mut(token) else {
            return Err(err(400, "AUTH_TOKEN_INVALID"));
        };
        *accepted = Some(user);
        Ok(Delivery {
            to: To::Key(*key),
            update: tl::enums::Update::LoginToken,
            is_call: false,
        })
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    let clean: Vec<u8> = hex.bytes().filter(u8::is_ascii_hexdigit).collect();
    clean
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap_or("00"), 16).unwrap_or(0))
        .collect()
}

/// Decodes a function body (after its constructor id) or answers 400 like Telegram does.
fn decode<R: Deserializable>(body: &[u8]) -> Result<R, RpcErr> {
    R::from_bytes(body.get(4..).unwrap_or_default()).map_err(|_| err(400, "INPUT_REQUEST_INVALID"))
}

/// What a request handler decided: an answer body now, or a parked request.
enum Answer {
    Body(Vec<u8>),
    /// Answered later (the bot's answer or its timeout) through [`World::take_answers`].
    Parked,
}

fn ok<T: Serializable>(value: T) -> Result<Answer, RpcErr> {
    Ok(Answer::Body(value.to_bytes()))
}

/// A late answer's body.
fn late<T: Serializable>(value: T) -> Result<Vec<u8>, RpcErr> {
    Ok(value.to_bytes())
}

fn allowed(rule: Privacy, owner: &SimUser, who: i64) -> bool {
    match rule {
        Privacy::Everybody => true,
        Privacy::Contacts => owner.contacts.contains(&who),
        Privacy::Nobody => false,
    }
}

impl World {
    /// The TL `user` as `viewer` sees it (for the runtime's update envelopes).
    pub fn user_tl_for(&self, id: i64, viewer: i64) -> Option<tl::enums::User> {
        self.user_tl(id, viewer)
    }

    /// The TL `user` as `viewer` sees it.
    fn user_tl(&self, id: i64, viewer: i64) -> Option<tl::enums::User> {
        let u = self.users.get(&id)?;
        let now_status = if self.online(id) {
            tl::enums::UserStatus::Online(tl::types::UserStatusOnline { expires: i32::MAX })
        } else {
            tl::enums::UserStatus::Recently(tl::types::UserStatusRecently { by_me: false })
        };
        Some(tl::enums::User::User(tl::types::User {
            is_self: id == viewer,
            contact: self
                .users
                .get(&viewer)
                .is_some_and(|v| v.contacts.contains(&id)),
            mutual_contact: false,
            deleted: false,
            bot: u.bot,
            bot_chat_history: false,
            bot_nochats: u.bot,
            verified: false,
            restricted: false,
            min: u.anonymous && id != viewer,
            bot_inline_geo: false,
            support: false,
            scam: false,
            apply_min_photo: false,
            fake: false,
            bot_attach_menu: false,
            premium: false,
            attach_menu_enabled: false,
            bot_can_edit: false,
            close_friend: false,
            stories_hidden: false,
            stories_unavailable: false,
            contact_require_premium: false,
            bot_business: false,
            bot_has_main_app: false,
            bot_forum_view: false,
            bot_forum_can_manage_topics: false,
            bot_can_manage_bots: false,
            bot_guestchat: false,
            bot_guard: false,
            id,
            access_hash: (!u.anonymous || id == viewer).then(|| u.access_hash()),
            first_name: Some(u.first_name.clone()),
            last_name: (!u.last_name.is_empty()).then(|| u.last_name.clone()),
            username: u.username.clone(),
            phone: (!u.bot).then(|| u.phone.clone()),
            photo: None,
            status: Some(now_status),
            bot_info_version: u.bot.then_some(1),
            restriction_reason: None,
            bot_inline_placeholder: u.bot.then(|| "keypad".to_string()),
            lang_code: None,
            emoji_status: None,
            usernames: None,
            stories_max_id: None,
            color: None,
            profile_color: None,
            bot_active_users: None,
            bot_verification_icon: None,
            send_paid_messages_stars: None,
            linked_community_id: None,
        }))
    }

    fn authorization(&self, user: i64) -> tl::enums::auth::Authorization {
        tl::enums::auth::Authorization::Authorization(tl::types::auth::Authorization {
            setup_password_required: false,
            otherwise_relogin_days: None,
            tmp_sessions: None,
            future_auth_token: None,
            user: self
                .user_tl(user, user)
                .unwrap_or(tl::enums::User::Empty(tl::types::UserEmpty { id: user })),
        })
    }

    /// Resolves an `InputUser` as `me` names it; a wrong access hash is Telegram's
    /// USER_ID_INVALID.
    fn input_user(&self, me: i64, input: &tl::enums::InputUser) -> Result<i64, RpcErr> {
        match input {
            tl::enums::InputUser::UserSelf => Ok(me),
            tl::enums::InputUser::User(u) => match self.users.get(&u.user_id) {
                Some(found) if found.access_hash() == u.access_hash => Ok(u.user_id),
                _ => Err(err(400, "USER_ID_INVALID")),
            },
            _ => Err(err(400, "USER_ID_INVALID")),
        }
    }

    fn phone_call_of(&self, me: i64, input: &tl::enums::InputPhoneCall) -> Result<i64, RpcErr> {
        let tl::enums::InputPhoneCall::Call(c) = input;
        match self.calls.get(&c.id) {
            Some(call)
                if call.access_hash == c.access_hash
                    && (call.admin == me || call.participant == me) =>
            {
                Ok(c.id)
            }
            _ => Err(err(400, "CALL_PEER_INVALID")),
        }
    }

    /// Does the cloud stay silent on this request (configured for timeout tests)?
    pub fn unanswered(&self, body: &[u8]) -> bool {
        let id = body
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        let name = tl::name_for_id(id);
        self.cfg.unanswered.iter().any(|m| m == name)
    }

    /// Handles one TL request from a connection bound to `key`.
    pub fn handle(&mut self, key: [u8; 32], body: &[u8], now: Instant) -> Outcome {
        let id = body
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        let mut deliveries = Vec::new();
        let ticket = self.next_ticket + 1;
        let reply = self.dispatch(key, id, body, now, &mut deliveries, ticket);
        if let Err((code, msg)) = &reply {
            self.log
                .push((tl::name_for_id(id).to_string(), format!("{code} {msg}")));
        }
        let reply = match reply {
            Ok(Answer::Parked) => {
                self.next_ticket = ticket;
                Reply::Later(ticket)
            }
            Ok(Answer::Body(b)) => Reply::Now(Ok(b)),
            Err(e) => Reply::Now(Err(e)),
        };
        Outcome { reply, deliveries }
    }

    /// Answers to parked requests (bots' answers and timeouts) since the last call.
    pub fn take_answers(&mut self) -> Vec<(Ticket, Result<Vec<u8>, RpcErr>)> {
        std::mem::take(&mut self.answers)
    }

    fn answer_later(&mut self, ticket: Ticket, answer: Result<Vec<u8>, RpcErr>) {
        if let Err((code, msg)) = &answer {
            self.log
                .push(("(answer)".to_string(), format!("{code} {msg}")));
        }
        self.answers.push((ticket, answer));
    }

    fn me_user(&self, key: &[u8; 32]) -> Result<i64, RpcErr> {
        let me = self.me(key)?;
        if self.users.get(&me).is_some_and(|u| u.bot) {
            return Err(err(400, "BOT_METHOD_INVALID"));
        }
        Ok(me)
    }

    fn me_bot(&self, key: &[u8; 32]) -> Result<i64, RpcErr> {
        let me = self.me(key)?;
        if !self.users.get(&me).is_some_and(|u| u.bot) {
            return Err(err(400, "USER_BOT_REQUIRED"));
        }
        Ok(me)
    }

    /// The user an `InputPeer` of a private chat names.
    fn input_peer_user(&self, me: i64, peer: &tl::enums::InputPeer) -> Result<i64, RpcErr> {
        match peer {
            tl::enums::InputPeer::User(u) => self
                .input_user(
                    me,
                    &tl::enums::InputUser::User(tl::types::InputUser {
                        user_id: u.user_id,
                        access_hash: u.access_hash,
                    }),
                )
                .map_err(|_| err(400, "PEER_ID_INVALID")),
            tl::enums::InputPeer::PeerSelf => Ok(me),
            _ => Err(err(400, "PEER_ID_INVALID")),
        }
    }

    /// Telegram's checks before `me` writes to `to` (blocks, "new chats from contacts only").
    fn may_write(&self, me: i64, to: i64) -> Result<(), RpcErr> {
        if self.users.get(&to).is_some_and(|u| u.blocked.contains(&me)) {
            return Err(err(400, "USER_IS_BLOCKED"));
        }
        if to != me
            && self
                .users
                .get(&to)
                .is_some_and(|u| !allowed(u.messages, u, me))
        {
            return Err(err(403, "PRIVACY_PREMIUM_REQUIRED"));
        }
        Ok(())
    }

    fn me(&self, key: &[u8; 32]) -> Result<i64, RpcErr> {
        self.user_of(key)
            .ok_or_else(|| err(401, "AUTH_KEY_UNREGISTERED"))
    }

    fn dispatch(
        &mut self,
        key: [u8; 32],
        id: u32,
        body: &[u8],
        now: Instant,
        out: &mut Vec<Delivery>,
        ticket: Ticket,
    ) -> Result<Answer, RpcErr> {
        use tl::functions as f;
        let unix = self.unix(now);
        // Bots have no calls, devices, privacy settings or contacts.
        let is_bot = self
            .user_of(&key)
            .and_then(|u| self.users.get(&u))
            .is_some_and(|u| u.bot);
        let name = tl::name_for_id(id);
        if is_bot
            && (name.starts_with("phone.")
                || name.starts_with("account.")
                || name == "contacts.importContacts"
                || name == "messages.getDhConfig")
        {
            return Err(err(400, "BOT_METHOD_INVALID"));
        }
        match id {
            f::auth::ImportBotAuthorization::CONSTRUCTOR_ID => {
                let r: f::auth::ImportBotAuthorization = decode(body)?;
                let bot = self
                    .users
                    .values()
                    .find(|u| u.bot && u.bot_token.as_deref() == Some(r.bot_auth_token.as_str()))
                    .map(|u| u.id)
                    .ok_or_else(|| err(400, "ACCESS_TOKEN_INVALID"))?;
                self.authorize(&key, bot);
                ok(self.authorization(bot))
            }
            f::messages::GetInlineBotResults::CONSTRUCTOR_ID => {
                let r: f::messages::GetInlineBotResults = decode(body)?;
                let me = self.me_user(&key)?;
                let bot = self
                    .input_user(me, &r.bot)
                    .map_err(|_| err(400, "BOT_INVALID"))?;
                if !self.users.get(&bot).is_some_and(|u| u.bot) {
                    return Err(err(400, "BOT_INVALID"));
                }
                let peer = self.input_peer_user(me, &r.peer)?;
                if r.query.len() > 512 {
                    return Err(err(400, "QUERY_TOO_SHORT"));
                }
                let query_id = self.fresh_query_id();
                self.inline.insert(
                    query_id,
                    InlineQuery {
                        bot,
                        user: me,
                        waiting: Some(ticket),
                        deadline: now + self.cfg.bot_answer_timeout,
                        results: Vec::new(),
                        asked: now,
                    },
                );
                let peer_type = if peer == bot {
                    tl::enums::InlineQueryPeerType::SameBotPm
                } else if self.users.get(&peer).is_some_and(|u| u.bot) {
                    tl::enums::InlineQueryPeerType::BotPm
                } else {
                    tl::enums::InlineQueryPeerType::Pm
                };
                out.push(Delivery {
                    to: To::User(bot),
                    update: tl::enums::Update::BotInlineQuery(tl::types::UpdateBotInlineQuery {
                        query_id,
                        user_id: me,
                        query: r.query,
                        geo: None,
                        peer_type: Some(peer_type),
                        offset: r.offset,
                    }),
                    is_call: false,
                });
                Ok(Answer::Parked)
            }
            f::messages::SetInlineBotResults::CONSTRUCTOR_ID => {
                let r: f::messages::SetInlineBotResults = decode(body)?;
                let me = self.me_bot(&key)?;
                let q = self
                    .inline
                    .get(&r.query_id)
                    .filter(|q| q.bot == me && q.waiting.is_some())
                    .ok_or_else(|| err(400, "QUERY_ID_INVALID"))?;
                let user = q.user;
                let results = inline_results(&r.results)?;
                let bot_user = self.user_tl(me, user);
                let answer =
                    tl::enums::messages::BotResults::Results(tl::types::messages::BotResults {
                        gallery: r.gallery,
                        query_id: r.query_id,
                        next_offset: r.next_offset,
                        switch_pm: None,
                        switch_webview: None,
                        results: results
                            .iter()
                            .cloned()
                            .map(tl::enums::BotInlineResult::Result)
                            .collect(),
                        cache_time: r.cache_time,
                        users: bot_user.into_iter().collect(),
                    });
                if let Some(q) = self.inline.get_mut(&r.query_id) {
                    q.results = results;
                    if let Some(t) = q.waiting.take() {
                        self.answer_later(t, late(answer));
                    }
                }
                ok(true)
            }
            f::messages::SendInlineBotResult::CONSTRUCTOR_ID => {
                let r: f::messages::SendInlineBotResult = decode(body)?;
                let me = self.me_user(&key)?;
                let to = self.input_peer_user(me, &r.peer)?;
                let q = self
                    .inline
                    .get(&r.query_id)
                    .filter(|q| q.user == me && q.waiting.is_none())
                    .ok_or_else(|| err(400, "QUERY_ID_INVALID"))?;
                let bot = q.bot;
                let result = q
                    .results
                    .iter()
                    .find(|x| x.id == r.id)
                    .cloned()
                    .ok_or_else(|| err(400, "RESULT_ID_INVALID"))?;
                self.may_write(me, to)?;
                let tl::enums::BotInlineMessage::Text(content) = result.send_message else {
                    return Err(err(400, "RESULT_TYPE_INVALID"));
                };
                self.next_message += 1;
                let id = self.next_message;
                self.messages.insert(
                    id,
                    StoredMessage {
                        from: me,
                        to,
                        via_bot: Some(bot),
                        markup: content.reply_markup.clone(),
                        deleted_for: HashSet::new(),
                    },
                );
                let message = |out: bool| {
                    let mut m = text_message(id, me, to, unix, &content.message);
                    if let tl::enums::Message::Message(m) = &mut m {
                        m.out = out;
                        m.via_bot_id = Some(bot);
                        m.reply_markup = content.reply_markup.clone();
                        if out {
                            m.peer_id = tl::enums::Peer::User(tl::types::PeerUser { user_id: to });
                        }
                    }
                    m
                };
                out.push(Delivery {
                    to: To::User(to),
                    update: tl::enums::Update::NewMessage(tl::types::UpdateNewMessage {
                        message: message(false),
                        pts: id,
                        pts_count: 1,
                    }),
                    is_call: false,
                });
                let users = [bot, to]
                    .iter()
                    .filter_map(|u| self.user_tl(*u, me))
                    .collect();
                ok(tl::enums::Updates::Updates(tl::types::Updates {
                    updates: vec![
                        tl::enums::Update::MessageId(tl::types::UpdateMessageId {
                            id,
                            random_id: r.random_id,
                        }),
                        tl::enums::Update::NewMessage(tl::types::UpdateNewMessage {
                            message: message(true),
                            pts: id,
                            pts_count: 1,
                        }),
                    ],
                    users,
                    chats: vec![],
                    date: unix,
                    seq: 0,
                }))
            }
            f::messages::GetBotCallbackAnswer::CONSTRUCTOR_ID => {
                let r: f::messages::GetBotCallbackAnswer = decode(body)?;
                let me = self.me_user(&key)?;
                let other = self.input_peer_user(me, &r.peer)?;
                let m = self
                    .messages
                    .get(&r.msg_id)
                    .filter(|m| {
                        ((m.from == me && m.to == other) || (m.from == other && m.to == me))
                            && !m.deleted_for.contains(&me)
                    })
                    .ok_or_else(|| err(400, "MESSAGE_ID_INVALID"))?;
                let data = r.data.ok_or_else(|| err(400, "DATA_INVALID"))?;
                let has_button = callback_data(m.markup.as_ref()).any(|d| d == data.as_slice());
                let Some(bot) = m.via_bot.filter(|_| has_button) else {
                    return Err(err(400, "DATA_INVALID"));
                };
                let query_id = self.fresh_query_id();
                self.callbacks.insert(
                    query_id,
                    CallbackQuery {
                        bot,
                        ticket,
                        deadline: now + self.cfg.bot_answer_timeout,
                    },
                );
                let chat_instance = sim_access_hash(me.min(other) ^ other.max(me).rotate_left(17));
                out.push(Delivery {
                    to: To::User(bot),
                    update: tl::enums::Update::InlineBotCallbackQuery(
                        tl::types::UpdateInlineBotCallbackQuery {
                            query_id,
                            user_id: me,
                            msg_id: tl::enums::InputBotInlineMessageId::Id(
                                tl::types::InputBotInlineMessageId {
                                    dc_id: 1,
                                    id: i64::from(r.msg_id),
                                    access_hash: sim_access_hash(i64::from(r.msg_id)),
                                },
                            ),
                            chat_instance,
                            data: Some(data),
                            game_short_name: None,
                        },
                    ),
                    is_call: false,
                });
                Ok(Answer::Parked)
            }
            f::messages::SetBotCallbackAnswer::CONSTRUCTOR_ID => {
                let r: f::messages::SetBotCallbackAnswer = decode(body)?;
                let me = self.me_bot(&key)?;
                if self.callbacks.get(&r.query_id).is_none_or(|q| q.bot != me) {
                    return Err(err(400, "QUERY_ID_INVALID"));
                }
                if r.message
                    .as_ref()
                    .is_some_and(|m| m.chars().count() > MAX_CALLBACK_ANSWER)
                {
                    return Err(err(400, "MESSAGE_TOO_LONG"));
                }
                if let Some(q) = self.callbacks.remove(&r.query_id) {
                    let answer = tl::enums::messages::BotCallbackAnswer::Answer(
                        tl::types::messages::BotCallbackAnswer {
                            alert: r.alert,
                            has_url: r.url.is_some(),
                            native_ui: false,
                            message: r.message,
                            url: r.url,
                            cache_time: r.cache_time,
                        },
                    );
                    self.answer_later(q.ticket, late(answer));
                }
                ok(true)
            }
            f::messages::DeleteMessages::CONSTRUCTOR_ID => {
                let r: f::messages::DeleteMessages = decode(body)?;
                let me = self.me(&key)?;
                let mut deleted: HashMap<i64, Vec<i32>> = HashMap::new();
                for id in &r.id {
                    let Some(m) = self.messages.get_mut(id) else {
                        continue;
                    };
                    if (m.from != me && m.to != me) || m.deleted_for.contains(&me) {
                        continue;
                    }
                    let other = if m.from == me { m.to } else { m.from };
                    let mut whom = vec![me];
                    if r.revoke && other != me {
                        whom.push(other);
                    }
                    for u in whom {
                        if m.deleted_for.insert(u) {
                            deleted.entry(u).or_default().push(*id);
                        }
                    }
                }
                let mine = deleted.get(&me).map_or(0, Vec::len);
                self.next_message += 1;
                let pts = self.next_message;
                for (user, ids) in deleted {
                    let n = i32::try_from(ids.len()).unwrap_or(i32::MAX);
                    out.push(Delivery {
                        to: To::User(user),
                        update: tl::enums::Update::DeleteMessages(
                            tl::types::UpdateDeleteMessages {
                                messages: ids,
                                pts,
                                pts_count: n,
                            },
                        ),
                        is_call: false,
                    });
                }
                ok(tl::enums::messages::AffectedMessages::Messages(
                    tl::types::messages::AffectedMessages {
                        pts,
                        pts_count: i32::try_from(mine).unwrap_or(i32::MAX),
                    },
                ))
            }
            f::auth::SendCode::CONSTRUCTOR_ID => {
                let r: f::auth::SendCode = decode(body)?;
                let phone: String = r
                    .phone_number
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect();
                if phone.is_empty() {
                    return Err(err(400, "PHONE_NUMBER_INVALID"));
                }
                if !self.users.values().any(|u| u.phone == phone) {
                    // Sign-up is not simulated.
                    return Err(err(400, "PHONE_NUMBER_UNOCCUPIED"));
                }
                let hash = format!("{:016x}", rand::thread_rng().gen::<u64>());
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.pending_code = Some((phone, hash.clone()));
                }
                ok(tl::enums::auth::SentCode::Code(tl::types::auth::SentCode {
                    r#type: tl::enums::auth::SentCodeType::App(tl::types::auth::SentCodeTypeApp {
                        length: 5,
                    }),
                    phone_code_hash: hash,
                    next_type: None,
                    timeout: None,
                }))
            }
            f::auth::SignIn::CONSTRUCTOR_ID => {
                let r: f::auth::SignIn = decode(body)?;
                let pending = self.sessions.get(&key).and_then(|s| s.pending_code.clone());
                let phone: String = r
                    .phone_number
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect();
                match pending {
                    Some((p, h)) if p == phone && h == r.phone_code_hash => {}
                    _ => return Err(err(400, "PHONE_CODE_EXPIRED")),
                }
                let user = self
                    .users
                    .values()
                    .find(|u| u.phone == phone)
                    .cloned()
                    .ok_or_else(|| err(400, "PHONE_NUMBER_UNOCCUPIED"))?;
                if r.phone_code.as_deref() != Some(user.code.as_str()) {
                    return Err(err(400, "PHONE_CODE_INVALID"));
                }
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.pending_code = None;
                }
                if user.password.is_some() {
                    if let Some(s) = self.sessions.get_mut(&key) {
                        s.pending_password = Some((user.id, 0));
                    }
                    return Err(err(401, "SESSION_PASSWORD_NEEDED"));
                }
                self.authorize(&key, user.id);
                ok(self.authorization(user.id))
            }
            f::account::GetPassword::CONSTRUCTOR_ID => {
                let pending = self.sessions.get(&key).and_then(|s| s.pending_password);
                let user = match (pending, self.user_of(&key)) {
                    (Some((u, _)), _) | (None, Some(u)) => u,
                    _ => return Err(err(401, "AUTH_KEY_UNREGISTERED")),
                };
                let password = self.users.get(&user).and_then(|u| u.password.clone());
                let Some(password) = password else {
                    return ok(self.password_info(None, None, false));
                };
                let mut b = [0u8; 256];
                rand::thread_rng().fill_bytes(&mut b);
                let round = SrpRound::new(
                    &self.dh_prime,
                    3,
                    &SRP_SALT1,
                    &SRP_SALT2,
                    password.as_bytes(),
                    b,
                );
                let srp_id: i64 = rand::thread_rng().gen();
                let g_b = round.g_b.to_vec();
                self.srp.insert(srp_id, round);
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.pending_password = Some((user, srp_id));
                }
                ok(self.password_info(Some(g_b), Some(srp_id), true))
            }
            f::auth::CheckPassword::CONSTRUCTOR_ID => {
                let r: f::auth::CheckPassword = decode(body)?;
                let tl::enums::InputCheckPasswordSrp::Srp(srp) = r.password else {
                    return Err(err(400, "PASSWORD_HASH_INVALID"));
                };
                let pending = self.sessions.get(&key).and_then(|s| s.pending_password);
                let Some((user, srp_id)) = pending else {
                    return Err(err(400, "PASSWORD_HASH_INVALID"));
                };
                if srp_id != srp.srp_id {
                    return Err(err(400, "SRP_ID_INVALID"));
                }
                let good = self
                    .srp
                    .remove(&srp_id)
                    .is_some_and(|round| round.verify(&srp.a, &srp.m1));
                if !good {
                    return Err(err(400, "PASSWORD_HASH_INVALID"));
                }
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.pending_password = None;
                }
                self.authorize(&key, user);
                ok(self.authorization(user))
            }
            f::auth::ExportLoginToken::CONSTRUCTOR_ID => {
                let _r: f::auth::ExportLoginToken = decode(body)?;
                let previous = self.sessions.get(&key).and_then(|s| s.qr_token.clone());
                if let Some(tok) = previous {
                    if let Some((_, Some(user))) = self.qr.get(&tok).cloned() {
                        self.qr.remove(&tok);
                        if let Some(s) = self.sessions.get_mut(&key) {
                            s.qr_token = None;
                        }
                        if self.users.get(&user).is_some_and(|u| u.password.is_some()) {
                            if let Some(s) = self.sessions.get_mut(&key) {
                                s.pending_password = Some((user, 0));
                            }
                            return Err(err(401, "SESSION_PASSWORD_NEEDED"));
                        }
                        self.authorize(&key, user);
                        return ok(tl::enums::auth::LoginToken::Success(
                            tl::types::auth::LoginTokenSuccess {
                                authorization: self.authorization(user),
                            },
                        ));
                    }
                    self.qr.remove(&tok);
                }
                let mut token = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut token);
                self.qr.insert(token.clone(), (key, None));
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.qr_token = Some(token.clone());
                }
                ok(tl::enums::auth::LoginToken::Token(
                    tl::types::auth::LoginToken {
                        expires: unix + 30,
                        token,
                    },
                ))
            }
            f::auth::AcceptLoginToken::CONSTRUCTOR_ID => {
                let r: f::auth::AcceptLoginToken = decode(body)?;
                let me = self.me(&key)?;
                let d = self.accept_qr(&r.token, me)?;
                out.push(d);
                let auth = self.authorization_tl(&key, false);
                ok(auth)
            }
            f::auth::LogOut::CONSTRUCTOR_ID => {
                self.me(&key)?;
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.user = None;
                }
                ok(tl::enums::auth::LoggedOut::Out(
                    tl::types::auth::LoggedOut {
                        future_auth_token: None,
                    },
                ))
            }
            f::users::GetUsers::CONSTRUCTOR_ID => {
                let r: f::users::GetUsers = decode(body)?;
                let me = self.me(&key)?;
                let mut v = Vec::new();
                for u in &r.id {
                    if let Ok(uid) = self.input_user(me, u) {
                        if let Some(t) = self.user_tl(uid, me) {
                            v.push(t);
                        }
                    }
                }
                ok(v)
            }
            f::contacts::ResolveUsername::CONSTRUCTOR_ID => {
                let r: f::contacts::ResolveUsername = decode(body)?;
                let me = self.me(&key)?;
                let name = r.username.trim_start_matches('@').to_ascii_lowercase();
                if name.len() < 4 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(err(400, "USERNAME_INVALID"));
                }
                let found = self
                    .users
                    .values()
                    .find(|u| {
                        u.username.as_deref().map(str::to_ascii_lowercase) == Some(name.clone())
                    })
                    .map(|u| u.id)
                    .ok_or_else(|| err(400, "USERNAME_NOT_OCCUPIED"))?;
                self.resolved(found, me)
            }
            f::contacts::ResolvePhone::CONSTRUCTOR_ID => {
                let r: f::contacts::ResolvePhone = decode(body)?;
                let me = self.me(&key)?;
                let phone: String = r.phone.chars().filter(char::is_ascii_digit).collect();
                let found = self
                    .users
                    .values()
                    .find(|u| u.phone == phone)
                    .map(|u| u.id)
                    .ok_or_else(|| err(400, "PHONE_NOT_OCCUPIED"))?;
                self.resolved(found, me)
            }
            f::contacts::ImportContacts::CONSTRUCTOR_ID => {
                let r: f::contacts::ImportContacts = decode(body)?;
                let me = self.me(&key)?;
                let mut imported = Vec::new();
                let mut users = Vec::new();
                for c in &r.contacts {
                    let tl::enums::InputContact::InputPhoneContact(c) = c;
                    let phone: String = c.phone.chars().filter(char::is_ascii_digit).collect();
                    let found = self.users.values().find(|u| u.phone == phone).map(|u| u.id);
                    if let Some(uid) = found {
                        if let Some(m) = self.users.get_mut(&me) {
                            m.contacts.insert(uid);
                        }
                        imported.push(tl::enums::ImportedContact::Contact(
                            tl::types::ImportedContact {
                                user_id: uid,
                                client_id: c.client_id,
                            },
                        ));
                        users.extend(self.user_tl(uid, me));
                    }
                }
                ok(tl::enums::contacts::ImportedContacts::Contacts(
                    tl::types::contacts::ImportedContacts {
                        imported,
                        popular_invites: vec![],
                        retry_contacts: vec![],
                        users,
                    },
                ))
            }
            f::account::SetPrivacy::CONSTRUCTOR_ID => {
                let r: f::account::SetPrivacy = decode(body)?;
                let me = self.me(&key)?;
                let rule = privacy_of(&r.rules);
                let (rules_out, u) = (r.rules.clone(), self.users.get_mut(&me));
                if let Some(u) = u {
                    match r.key {
                        tl::enums::InputPrivacyKey::PhoneCall => u.calls = rule,
                        tl::enums::InputPrivacyKey::PhoneP2P => u.p2p = rule,
                        tl::enums::InputPrivacyKey::ChatInvite => u.chat_invite = rule,
                        _ => {}
                    }
                }
                let rules = rules_out
                    .iter()
                    .filter_map(|r| match r {
                        tl::enums::InputPrivacyRule::InputPrivacyValueAllowAll => {
                            Some(tl::enums::PrivacyRule::PrivacyValueAllowAll)
                        }
                        tl::enums::InputPrivacyRule::InputPrivacyValueDisallowAll => {
                            Some(tl::enums::PrivacyRule::PrivacyValueDisallowAll)
                        }
                        tl::enums::InputPrivacyRule::InputPrivacyValueAllowContacts => {
                            Some(tl::enums::PrivacyRule::PrivacyValueAllowContacts)
                        }
                        _ => None,
                    })
                    .collect();
                ok(tl::enums::account::PrivacyRules::Rules(
                    tl::types::account::PrivacyRules {
                        rules,
                        chats: vec![],
                        users: vec![],
                    },
                ))
            }
            f::account::GetPrivacy::CONSTRUCTOR_ID => {
                // The account's own setting, as its apps show it (the gateway checks that
                // incoming calls are allowed: SIP.TG's "380 Callback is restricted").
                let r: f::account::GetPrivacy = decode(body)?;
                let me = self.me(&key)?;
                let u = self
                    .users
                    .get(&me)
                    .ok_or_else(|| err(400, "USER_ID_INVALID"))?;
                let rule = match r.key {
                    tl::enums::InputPrivacyKey::PhoneCall => u.calls,
                    tl::enums::InputPrivacyKey::PhoneP2P => u.p2p,
                    tl::enums::InputPrivacyKey::ChatInvite => u.chat_invite,
                    _ => Privacy::Everybody,
                };
                ok(tl::enums::account::PrivacyRules::Rules(
                    tl::types::account::PrivacyRules {
                        rules: privacy_rules(rule),
                        chats: vec![],
                        users: vec![],
                    },
                ))
            }
            f::account::GetAuthorizations::CONSTRUCTOR_ID => {
                let me = self.me(&key)?;
                let keys: Vec<_> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.user == Some(me))
                    .map(|(k, _)| *k)
                    .collect();
                let authorizations = keys
                    .iter()
                    .map(|k| self.authorization_tl(k, *k == key))
                    .collect();
                ok(tl::enums::account::Authorizations::Authorizations(
                    tl::types::account::Authorizations {
                        authorization_ttl_days: 180,
                        authorizations,
                    },
                ))
            }
            f::account::ChangeAuthorizationSettings::CONSTRUCTOR_ID => {
                let r: f::account::ChangeAuthorizationSettings = decode(body)?;
                let me = self.me(&key)?;
                // Hash 0 is the current authorization.
                let target = if r.hash == 0 {
                    self.sessions.get_mut(&key)
                } else {
                    self.sessions
                        .values_mut()
                        .find(|s| s.user == Some(me) && s.hash == r.hash)
                }
                .ok_or_else(|| err(400, "HASH_INVALID"))?;
                if let Some(v) = r.call_requests_disabled {
                    target.call_requests_disabled = v;
                }
                ok(true)
            }
            f::messages::GetDhConfig::CONSTRUCTOR_ID => {
                let r: f::messages::GetDhConfig = decode(body)?;
                self.me(&key)?;
                let len = usize::try_from(r.random_length.clamp(0, 1024)).unwrap_or(0);
                let mut random = vec![0u8; len];
                rand::thread_rng().fill_bytes(&mut random);
                if r.version == 1 {
                    return ok(tl::enums::messages::DhConfig::NotModified(
                        tl::types::messages::DhConfigNotModified { random },
                    ));
                }
                ok(tl::enums::messages::DhConfig::Config(
                    tl::types::messages::DhConfig {
                        g: 3,
                        p: self.dh_prime.clone(),
                        version: 1,
                        random,
                    },
                ))
            }
            f::phone::GetCallConfig::CONSTRUCTOR_ID => {
                self.me(&key)?;
                ok(tl::enums::DataJson::Json(tl::types::DataJson {
                    data: format!(
                        "{{\"call_ring_timeout_ms\":{},\"call_connect_timeout_ms\":30000}}",
                        self.cfg.ring_timeout.as_millis()
                    ),
                }))
            }
            f::phone::RequestCall::CONSTRUCTOR_ID => {
                let r: f::phone::RequestCall = decode(body)?;
                let me = self.me(&key)?;
                let callee = self.input_user(me, &r.user_id)?;
                self.request_call(me, callee, r, now, out)
            }
            f::phone::ReceivedCall::CONSTRUCTOR_ID => {
                let r: f::phone::ReceivedCall = decode(body)?;
                let me = self.me(&key)?;
                let id = self.phone_call_of(me, &r.peer)?;
                let unix_now = unix;
                if let Some(call) = self.calls.get_mut(&id) {
                    if call.participant == me && call.state == CallState::Requested {
                        call.state = CallState::Waiting {
                            received: Some(unix_now),
                        };
                        let admin = call.admin;
                        let pc = self.call_tl(id, admin);
                        out.push(call_update(admin, pc));
                    }
                }
                ok(true)
            }
            f::phone::AcceptCall::CONSTRUCTOR_ID => {
                let r: f::phone::AcceptCall = decode(body)?;
                let me = self.me(&key)?;
                let id = self.phone_call_of(me, &r.peer)?;
                let call = self
                    .calls
                    .get_mut(&id)
                    .ok_or_else(|| err(400, "CALL_PEER_INVALID"))?;
                if call.participant != me {
                    return Err(err(400, "CALL_PEER_INVALID"));
                }
                match call.state {
                    CallState::Requested | CallState::Waiting { .. } => {}
                    CallState::Discarded => return Err(err(400, "CALL_ALREADY_DECLINED")),
                    _ => return Err(err(400, "CALL_ALREADY_ACCEPTED")),
                }
                if r.g_b.len() != 256 {
                    return Err(err(400, "G_B_INVALID"));
                }
                let tl::enums::PhoneCallProtocol::Protocol(p) = r.protocol;
                call.g_b = r.g_b;
                call.participant_protocol = Some(p);
                call.state = CallState::Accepted;
                let admin = call.admin;
                // The other devices of the callee stop ringing.
                let pc_admin = self.call_tl(id, admin);
                out.push(call_update(admin, pc_admin));
                let pc = self.call_tl(id, me);
                ok(tl::enums::phone::PhoneCall::Call(
                    tl::types::phone::PhoneCall {
                        phone_call: pc,
                        users: self.call_users(id, me),
                    },
                ))
            }
            f::phone::ConfirmCall::CONSTRUCTOR_ID => {
                let r: f::phone::ConfirmCall = decode(body)?;
                let me = self.me(&key)?;
                let id = self.phone_call_of(me, &r.peer)?;
                let call = self
                    .calls
                    .get_mut(&id)
                    .ok_or_else(|| err(400, "CALL_PEER_INVALID"))?;
                if call.admin != me || call.state != CallState::Accepted {
                    return Err(err(400, "CALL_PEER_INVALID"));
                }
                let hash = crate::tgcall::dh::g_a_hash(&r.g_a);
                if hash[..] != call.g_a_hash[..] {
                    return Err(err(400, "G_A_INVALID"));
                }
                call.state = CallState::Active { start: unix };
                call.g_a = r.g_a;
                call.fingerprint = r.key_fingerprint;
                let participant = call.participant;
                let pc_p = self.active_tl(id, participant);
                out.push(call_update(participant, pc_p));
                let pc = self.active_tl(id, me);
                ok(tl::enums::phone::PhoneCall::Call(
                    tl::types::phone::PhoneCall {
                        phone_call: pc,
                        users: self.call_users(id, me),
                    },
                ))
            }
            f::phone::DiscardCall::CONSTRUCTOR_ID => {
                let r: f::phone::DiscardCall = decode(body)?;
                let me = self.me(&key)?;
                let id = self.phone_call_of(me, &r.peer)?;
                let reason = match (&r.reason, self.calls.get(&id).map(|c| c.state)) {
                    // Declining an incoming call tells the caller "busy".
                    (tl::enums::PhoneCallDiscardReason::Hangup, Some(CallState::Requested))
                    | (
                        tl::enums::PhoneCallDiscardReason::Hangup,
                        Some(CallState::Waiting { .. }),
                    ) if self.calls.get(&id).is_some_and(|c| c.participant == me) => {
                        tl::enums::PhoneCallDiscardReason::Busy
                    }
                    (reason, _) => reason.clone(),
                };
                let updates = self.discard(id, reason, Some(r.duration), out);
                ok(updates)
            }
            f::phone::SendSignalingData::CONSTRUCTOR_ID => {
                let r: f::phone::SendSignalingData = decode(body)?;
                let me = self.me(&key)?;
                let id = self.phone_call_of(me, &r.peer)?;
                let call = &self.calls[&id];
                if call.state == CallState::Discarded {
                    return Err(err(400, "CALL_ALREADY_DECLINED"));
                }
                let other = if call.admin == me {
                    call.participant
                } else {
                    call.admin
                };
                out.push(Delivery {
                    to: To::User(other),
                    update: tl::enums::Update::PhoneCallSignalingData(
                        tl::types::UpdatePhoneCallSignalingData {
                            phone_call_id: id,
                            data: r.data,
                        },
                    ),
                    is_call: true,
                });
                ok(true)
            }
            f::phone::SetCallRating::CONSTRUCTOR_ID => {
                let _r: f::phone::SetCallRating = decode(body)?;
                self.me(&key)?;
                ok(empty_updates(unix))
            }
            f::phone::SaveCallDebug::CONSTRUCTOR_ID => {
                let _r: f::phone::SaveCallDebug = decode(body)?;
                self.me(&key)?;
                ok(true)
            }
            f::messages::SendMessage::CONSTRUCTOR_ID => {
                let r: f::messages::SendMessage = decode(body)?;
                let me = self.me(&key)?;
                let to = match &r.peer {
                    tl::enums::InputPeer::User(u) => self.input_user(
                        me,
                        &tl::enums::InputUser::User(tl::types::InputUser {
                            user_id: u.user_id,
                            access_hash: u.access_hash,
                        }),
                    )?,
                    tl::enums::InputPeer::PeerSelf => me,
                    _ => return Err(err(400, "PEER_ID_INVALID")),
                };
                if r.message.is_empty() {
                    return Err(err(400, "MESSAGE_EMPTY"));
                }
                if r.message.chars().count() > 4096 {
                    return Err(err(400, "MESSAGE_TOO_LONG"));
                }
                self.may_write(me, to)?;
                self.next_message += 1;
                let id = self.next_message;
                self.messages.insert(
                    id,
                    StoredMessage {
                        from: me,
                        to,
                        via_bot: None,
                        markup: None,
                        deleted_for: HashSet::new(),
                    },
                );
                out.push(Delivery {
                    to: To::User(to),
                    update: tl::enums::Update::NewMessage(tl::types::UpdateNewMessage {
                        message: text_message(id, me, to, unix, &r.message),
                        pts: id,
                        pts_count: 1,
                    }),
                    is_call: false,
                });
                ok(tl::enums::Updates::UpdateShortSentMessage(
                    tl::types::UpdateShortSentMessage {
                        out: true,
                        id,
                        pts: id,
                        pts_count: 1,
                        date: unix,
                        media: None,
                        entities: None,
                        ttl_period: None,
                    },
                ))
            }
            f::updates::GetState::CONSTRUCTOR_ID => {
                self.me(&key)?;
                ok(tl::enums::updates::State::State(
                    tl::types::updates::State {
                        pts: 1,
                        qts: 0,
                        date: unix,
                        seq: 0,
                        unread_count: 0,
                    },
                ))
            }
            _ => Err(err(400, "METHOD_NOT_SIMULATED")),
        }
    }

    fn password_info(
        &self,
        srp_b: Option<Vec<u8>>,
        srp_id: Option<i64>,
        has: bool,
    ) -> tl::enums::account::Password {
        let algo = tl::enums::PasswordKdfAlgo::Sha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow(
            tl::types::PasswordKdfAlgoSha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow {
                salt1: SRP_SALT1.to_vec(),
                salt2: SRP_SALT2.to_vec(),
                g: 3,
                p: self.dh_prime.clone(),
            },
        );
        tl::enums::account::Password::Password(tl::types::account::Password {
            has_recovery: false,
            has_secure_values: false,
            has_password: has,
            current_algo: has.then(|| algo.clone()),
            srp_b,
            srp_id,
            hint: None,
            email_unconfirmed_pattern: None,
            new_algo: algo,
            new_secure_algo: tl::enums::SecurePasswordKdfAlgo::Unknown,
            secure_random: vec![0; 32],
            pending_reset_date: None,
            login_email_pattern: None,
        })
    }

    fn authorization_tl(&self, key: &[u8; 32], current: bool) -> tl::enums::Authorization {
        let s = self.sessions.get(key);
        tl::enums::Authorization::Authorization(tl::types::Authorization {
            current,
            official_app: false,
            password_pending: false,
            encrypted_requests_disabled: false,
            call_requests_disabled: s.is_some_and(|s| s.call_requests_disabled),
            unconfirmed: false,
            hash: if current { 0 } else { s.map_or(0, |s| s.hash) },
            device_model: "tgsim".into(),
            platform: "sim".into(),
            system_version: "1".into(),
            api_id: 1,
            app_name: "tgsim".into(),
            app_version: env!("CARGO_PKG_VERSION").into(),
            date_created: s.map_or(0, |s| s.created),
            date_active: s.map_or(0, |s| s.created),
            ip: "127.0.0.1".into(),
            country: "Simland".into(),
            region: String::new(),
        })
    }

    fn resolved(&self, user: i64, me: i64) -> Result<Answer, RpcErr> {
        ok(tl::enums::contacts::ResolvedPeer::Peer(
            tl::types::contacts::ResolvedPeer {
                peer: tl::enums::Peer::User(tl::types::PeerUser { user_id: user }),
                chats: vec![],
                users: self.user_tl(user, me).into_iter().collect(),
            },
        ))
    }

    fn request_call(
        &mut self,
        me: i64,
        callee: i64,
        r: tl::functions::phone::RequestCall,
        now: Instant,
        out: &mut Vec<Delivery>,
    ) -> Result<Answer, RpcErr> {
        if callee == me {
            return Err(err(400, "USER_ID_INVALID"));
        }
        if r.g_a_hash.len() != 32 {
            return Err(err(400, "G_A_HASH_INVALID"));
        }
        // Flood limits first, as Telegram counts attempts.
        let times = self.call_times.entry(me).or_default();
        times.retain(|t| now.saturating_duration_since(*t) < Duration::from_secs(60));
        if times.len() >= self.cfg.flood.calls_per_minute as usize {
            let oldest = times.first().copied().unwrap_or(now);
            let wait = 60u64.saturating_sub(now.saturating_duration_since(oldest).as_secs());
            return Err(err(420, format!("FLOOD_WAIT_{}", wait.max(1))));
        }
        times.push(now);
        let target = self
            .users
            .get(&callee)
            .cloned()
            .ok_or_else(|| err(400, "USER_ID_INVALID"))?;
        if !target.contacts.contains(&me) {
            let s = self.strangers.entry(me).or_default();
            s.insert(callee);
            if s.len() > self.cfg.flood.stranger_calls as usize {
                return Err(err(400, "PEER_FLOOD"));
            }
        }
        if target.blocked.contains(&me) {
            return Err(err(400, "USER_IS_BLOCKED"));
        }
        if !allowed(target.calls, &target, me) {
            return Err(err(403, "USER_PRIVACY_RESTRICTED"));
        }
        let tl::enums::PhoneCallProtocol::Protocol(protocol) = r.protocol;
        let mut rng = rand::thread_rng();
        let id: i64 = rng.gen_range(1..i64::MAX);
        let online = self.online(callee);
        let ring = if online {
            self.cfg.ring_timeout
        } else {
            self.cfg.offline_ring_timeout
        };
        let call = SimCall {
            id,
            access_hash: rng.gen(),
            date: self.unix(now),
            admin: me,
            participant: callee,
            g_a_hash: r.g_a_hash,
            g_a: Vec::new(),
            g_b: Vec::new(),
            fingerprint: 0,
            admin_protocol: protocol,
            participant_protocol: None,
            state: CallState::Requested,
            ring_deadline: now + ring,
        };
        self.calls.insert(id, call);
        if online {
            let pc = self.call_tl(id, callee);
            out.push(call_update(callee, pc));
        }
        let pc = self.call_tl(id, me);
        ok(tl::enums::phone::PhoneCall::Call(
            tl::types::phone::PhoneCall {
                phone_call: pc,
                users: self.call_users(id, me),
            },
        ))
    }

    fn call_users(&self, id: i64, me: i64) -> Vec<tl::enums::User> {
        let Some(c) = self.calls.get(&id) else {
            return vec![];
        };
        [c.admin, c.participant]
            .iter()
            .filter_map(|u| self.user_tl(*u, me))
            .collect()
    }

    fn protocol_for(&self, c: &SimCall) -> tl::enums::PhoneCallProtocol {
        // The server picks the versions both sides have, in the caller's order.
        let mut p = c.admin_protocol.clone();
        if let Some(theirs) = &c.participant_protocol {
            p.library_versions
                .retain(|v| theirs.library_versions.contains(v));
            p.udp_p2p &= theirs.udp_p2p;
            p.min_layer = p.min_layer.max(theirs.min_layer);
            p.max_layer = p.max_layer.min(theirs.max_layer);
        }
        tl::enums::PhoneCallProtocol::Protocol(p)
    }

    /// The call as `viewer` sees it now.
    fn call_tl(&self, id: i64, viewer: i64) -> tl::enums::PhoneCall {
        let Some(c) = self.calls.get(&id) else {
            return tl::enums::PhoneCall::Empty(tl::types::PhoneCallEmpty { id });
        };
        match c.state {
            CallState::Requested | CallState::Waiting { .. } if viewer == c.participant => {
                tl::enums::PhoneCall::Requested(tl::types::PhoneCallRequested {
                    video: false,
                    id,
                    access_hash: c.access_hash,
                    date: c.date,
                    admin_id: c.admin,
                    participant_id: c.participant,
                    g_a_hash: c.g_a_hash.clone(),
                    protocol: self.protocol_for(c),
                })
            }
            CallState::Requested => tl::enums::PhoneCall::Waiting(tl::types::PhoneCallWaiting {
                video: false,
                id,
                access_hash: c.access_hash,
                date: c.date,
                admin_id: c.admin,
                participant_id: c.participant,
                protocol: self.protocol_for(c),
                receive_date: None,
            }),
            CallState::Waiting { received } => {
                tl::enums::PhoneCall::Waiting(tl::types::PhoneCallWaiting {
                    video: false,
                    id,
                    access_hash: c.access_hash,
                    date: c.date,
                    admin_id: c.admin,
                    participant_id: c.participant,
                    protocol: self.protocol_for(c),
                    receive_date: received,
                })
            }
            CallState::Accepted if viewer == c.admin => {
                tl::enums::PhoneCall::Accepted(tl::types::PhoneCallAccepted {
                    video: false,
                    id,
                    access_hash: c.access_hash,
                    date: c.date,
                    admin_id: c.admin,
                    participant_id: c.participant,
                    g_b: c.g_b.clone(),
                    protocol: self.protocol_for(c),
                })
            }
            CallState::Accepted => tl::enums::PhoneCall::Waiting(tl::types::PhoneCallWaiting {
                video: false,
                id,
                access_hash: c.access_hash,
                date: c.date,
                admin_id: c.admin,
                participant_id: c.participant,
                protocol: self.protocol_for(c),
                receive_date: Some(c.date),
            }),
            CallState::Active { .. } => self.active_tl(id, viewer),
            CallState::Discarded => {
                tl::enums::PhoneCall::Discarded(tl::types::PhoneCallDiscarded {
                    need_rating: false,
                    need_debug: false,
                    video: false,
                    id,
                    reason: None,
                    duration: None,
                })
            }
        }
    }

    /// An active call: the caller sees g_b, the callee g_a.
    fn active_tl(&self, id: i64, viewer: i64) -> tl::enums::PhoneCall {
        let Some(c) = self.calls.get(&id) else {
            return tl::enums::PhoneCall::Empty(tl::types::PhoneCallEmpty { id });
        };
        let start = match c.state {
            CallState::Active { start } => start,
            _ => c.date,
        };
        let p2p = self
            .users
            .get(&c.admin)
            .is_some_and(|a| allowed(a.p2p, a, c.participant))
            && self
                .users
                .get(&c.participant)
                .is_some_and(|p| allowed(p.p2p, p, c.admin));
        let connections = self
            .cfg
            .turn
            .iter()
            .map(|t| {
                tl::enums::PhoneConnection::Webrtc(tl::types::PhoneConnectionWebrtc {
                    turn: true,
                    stun: true,
                    id: 1,
                    ip: t.ip.clone(),
                    ipv6: String::new(),
                    port: i32::from(t.port),
                    username: t.username.clone(),
                    password: t.password.clone(),
                })
            })
            .collect();
        let g_a_or_b = if viewer == c.admin {
            c.g_b.clone()
        } else {
            c.g_a.clone()
        };
        tl::enums::PhoneCall::Call(tl::types::PhoneCall {
            p2p_allowed: p2p,
            video: false,
            conference_supported: false,
            id,
            access_hash: c.access_hash,
            date: c.date,
            admin_id: c.admin,
            participant_id: c.participant,
            g_a_or_b,
            key_fingerprint: c.fingerprint,
            protocol: self.protocol_for(c),
            connections,
            start_date: start,
            custom_parameters: None,
        })
    }

    /// Ends a call for both sides; returns the `Updates` answer for the one who hung up.
    fn discard(
        &mut self,
        id: i64,
        reason: tl::enums::PhoneCallDiscardReason,
        duration: Option<i32>,
        out: &mut Vec<Delivery>,
    ) -> tl::enums::Updates {
        let Some(c) = self.calls.get_mut(&id) else {
            return tl::enums::Updates::TooLong;
        };
        let was = c.state;
        c.state = CallState::Discarded;
        let discarded = tl::enums::PhoneCall::Discarded(tl::types::PhoneCallDiscarded {
            need_rating: matches!(was, CallState::Active { .. }),
            need_debug: false,
            video: false,
            id,
            reason: Some(reason),
            duration,
        });
        let (admin, participant) = (c.admin, c.participant);
        let date = c.date;
        if was != CallState::Discarded {
            out.push(call_update(admin, discarded.clone()));
            out.push(call_update(participant, discarded.clone()));
        }
        tl::enums::Updates::Updates(tl::types::Updates {
            updates: vec![tl::enums::Update::PhoneCall(tl::types::UpdatePhoneCall {
                phone_call: discarded,
            })],
            users: vec![],
            chats: vec![],
            date,
            seq: 0,
        })
    }

    /// Time passes: calls that rang out are missed.
    pub fn tick(&mut self, now: Instant) -> Vec<Delivery> {
        let expired: Vec<i64> = self
            .calls
            .values()
            .filter(|c| {
                matches!(c.state, CallState::Requested | CallState::Waiting { .. })
                    && now >= c.ring_deadline
            })
            .map(|c| c.id)
            .collect();
        let mut out = Vec::new();
        for id in expired {
            self.discard(
                id,
                tl::enums::PhoneCallDiscardReason::Missed,
                Some(0),
                &mut out,
            );
        }
        self.calls.retain(|_, c| {
            c.state != CallState::Discarded || now < c.ring_deadline + Duration::from_secs(600)
        });
        // Bots that did not answer in time: the asking user hears BOT_RESPONSE_TIMEOUT.
        let mut late = Vec::new();
        for q in self.inline.values_mut() {
            if q.waiting.is_some() && now >= q.deadline {
                late.extend(q.waiting.take());
            }
        }
        self.callbacks.retain(|_, q| {
            if now >= q.deadline {
                late.push(q.ticket);
                false
            } else {
                true
            }
        });
        for t in late {
            self.answer_later(t, Err(err(400, "BOT_RESPONSE_TIMEOUT")));
        }
        // Results stay sendable for a while after the query, as Telegram caches them.
        self.inline
            .retain(|_, q| now.saturating_duration_since(q.asked) < Duration::from_secs(600));
        out
    }

    /// The earliest ring deadline or bot answer deadline, for the runtime's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        let rings = self
            .calls
            .values()
            .filter(|c| matches!(c.state, CallState::Requested | CallState::Waiting { .. }))
            .map(|c| c.ring_deadline);
        let inline = self
            .inline
            .values()
            .filter(|q| q.waiting.is_some())
            .map(|q| q.deadline);
        let presses = self.callbacks.values().map(|q| q.deadline);
        rings.chain(inline).chain(presses).min()
    }

    fn fresh_query_id(&self) -> i64 {
        loop {
            let id: i64 = rand::thread_rng().gen_range(1..i64::MAX);
            if !self.inline.contains_key(&id) && !self.callbacks.contains_key(&id) {
                return id;
            }
        }
    }

    /// A newly connected device: it gets the calls that still ring for its user (what a push
    /// on wake-up does).
    pub fn pending_for(&self, user: i64) -> Vec<Delivery> {
        self.calls
            .values()
            .filter(|c| {
                c.participant == user
                    && matches!(c.state, CallState::Requested | CallState::Waiting { .. })
            })
            .map(|c| call_update(user, self.call_tl(c.id, user)))
            .collect()
    }
}

/// A plain text message from `from` to `to`, as the recipient sees it.
pub(crate) fn text_message(
    id: i32,
    from: i64,
    to: i64,
    date: i32,
    text: &str,
) -> tl::enums::Message {
    let _ = to;
    tl::enums::Message::Message(tl::types::Message {
        out: false,
        mentioned: false,
        media_unread: false,
        silent: false,
        post: false,
        from_scheduled: false,
        legacy: false,
        edit_hide: false,
        pinned: false,
        noforwards: false,
        invert_media: false,
        offline: false,
        video_processing_pending: false,
        paid_suggested_post_stars: false,
        paid_suggested_post_ton: false,
        id,
        from_id: Some(tl::enums::Peer::User(tl::types::PeerUser { user_id: from })),
        from_boosts_applied: None,
        from_rank: None,
        // In a private chat the recipient sees the chat as the sender.
        peer_id: tl::enums::Peer::User(tl::types::PeerUser { user_id: from }),
        saved_peer_id: None,
        fwd_from: None,
        via_bot_id: None,
        via_business_bot_id: None,
        guestchat_via_from: None,
        reply_to: None,
        date,
        message: text.to_string(),
        media: None,
        reply_markup: None,
        entities: None,
        views: None,
        forwards: None,
        replies: None,
        edit_date: None,
        post_author: None,
        grouped_id: None,
        reactions: None,
        restriction_reason: None,
        ttl_period: None,
        quick_reply_shortcut_id: None,
        effect: None,
        factcheck: None,
        report_delivery_until_date: None,
        paid_message_stars: None,
        suggested_post: None,
        schedule_repeat_period: None,
        summary_from_language: None,
        rich_message: None,
    })
}

fn call_update(user: i64, phone_call: tl::enums::PhoneCall) -> Delivery {
    Delivery {
        to: To::User(user),
        update: tl::enums::Update::PhoneCall(tl::types::UpdatePhoneCall { phone_call }),
        is_call: true,
    }
}

fn empty_updates(date: i32) -> tl::enums::Updates {
    tl::enums::Updates::Updates(tl::types::Updates {
        updates: vec![],
        users: vec![],
        chats: vec![],
        date,
        seq: 0,
    })
}

/// A setting as Telegram reports it (`account.getPrivacy`): contacts-only is "allow contacts,
/// disallow the rest".
fn privacy_rules(p: Privacy) -> Vec<tl::enums::PrivacyRule> {
    use tl::enums::PrivacyRule as R;
    match p {
        Privacy::Everybody => vec![R::PrivacyValueAllowAll],
        Privacy::Contacts => vec![R::PrivacyValueAllowContacts, R::PrivacyValueDisallowAll],
        Privacy::Nobody => vec![R::PrivacyValueDisallowAll],
    }
}

fn privacy_of(rules: &[tl::enums::InputPrivacyRule]) -> Privacy {
    use tl::enums::InputPrivacyRule as R;
    for r in rules {
        match r {
            R::InputPrivacyValueAllowAll => return Privacy::Everybody,
            R::InputPrivacyValueAllowContacts => return Privacy::Contacts,
            R::InputPrivacyValueDisallowAll => return Privacy::Nobody,
            _ => {}
        }
    }
    Privacy::Nobody
}

/// Every callback button's data in a reply markup.
fn callback_data(markup: Option<&tl::enums::ReplyMarkup>) -> impl Iterator<Item = &[u8]> {
    let rows = match markup {
        Some(tl::enums::ReplyMarkup::ReplyInlineMarkup(m)) => m.rows.as_slice(),
        _ => &[],
    };
    rows.iter()
        .flat_map(|tl::enums::KeyboardInlineButtonRow::Row(r)| r.buttons.iter())
        .filter_map(
            |tl::enums::KeyboardInlineButton::Button(b)| match &b.r#type {
                tl::enums::InlineButtonType::Callback(c) => Some(c.data.as_slice()),
                _ => None,
            },
        )
}

/// A bot's inline results as the cloud checks and keeps them: text articles whose keyboard
/// (inline only) has buttons with text and callback data of 1–64 bytes.
fn inline_results(
    results: &[tl::enums::InputBotInlineResult],
) -> Result<Vec<tl::types::BotInlineResult>, RpcErr> {
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for r in results {
        let tl::enums::InputBotInlineResult::Result(r) = r else {
            return Err(err(400, "RESULT_TYPE_INVALID"));
        };
        if r.id.is_empty() || r.id.len() > 64 {
            return Err(err(400, "RESULT_ID_INVALID"));
        }
        if !ids.insert(r.id.clone()) {
            return Err(err(400, "RESULT_ID_DUPLICATE"));
        }
        let tl::enums::InputBotInlineMessage::Text(m) = &r.send_message else {
            return Err(err(400, "RESULT_TYPE_INVALID"));
        };
        if m.message.trim().is_empty() {
            return Err(err(400, "MESSAGE_EMPTY"));
        }
        match &m.reply_markup {
            None => {}
            Some(tl::enums::ReplyMarkup::ReplyInlineMarkup(k)) => {
                for tl::enums::KeyboardInlineButtonRow::Row(row) in &k.rows {
                    for tl::enums::KeyboardInlineButton::Button(b) in &row.buttons {
                        if b.text.is_empty() {
                            return Err(err(400, "BUTTON_TEXT_INVALID"));
                        }
                        if let tl::enums::InlineButtonType::Callback(c) = &b.r#type {
                            if c.data.is_empty() || c.data.len() > MAX_CALLBACK_DATA {
                                return Err(err(400, "BUTTON_DATA_INVALID"));
                            }
                        }
                    }
                }
            }
            Some(_) => return Err(err(400, "REPLY_MARKUP_INVALID")),
        }
        out.push(tl::types::BotInlineResult {
            id: r.id.clone(),
            r#type: r.r#type.clone(),
            title: r.title.clone(),
            description: r.description.clone(),
            url: r.url.clone(),
            thumb: None,
            content: None,
            send_message: tl::enums::BotInlineMessage::Text(tl::types::BotInlineMessageText {
                no_webpage: m.no_webpage,
                invert_media: m.invert_media,
                message: m.message.clone(),
                entities: m.entities.clone(),
                reply_markup: m.reply_markup.clone(),
            }),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(w: &mut World, key: [u8; 32], body: Vec<u8>, now: Instant) -> Outcome {
        w.handle(key, &body, now)
    }

    #[test]
    fn active_calls_list_the_configured_turn_server_and_p2p_follows_privacy() {
        let now = Instant::now();
        let mut b = SimUser::new(2, "2000", Some("bbbb"), "B");
        b.p2p = Privacy::Nobody;
        let cfg = WorldConfig {
            users: vec![SimUser::new(1, "1000", Some("aaaa"), "A"), b],
            turn: Some(TurnServer {
                ip: "10.0.0.1".into(),
                port: 3478,
                username: "u".into(),
                password: "p".into(),
            }),
            ..Default::default()
        };
        let mut w = World::new(cfg, now, 1_000_000);
        let ka = w.hello(None, now);
        let kb = w.hello(None, now);
        w.authorize(&ka, 1);
        w.authorize(&kb, 2);
        let hash = w.user(2).unwrap().access_hash();
        let g_a = vec![5u8; 256];
        let proto = tl::enums::PhoneCallProtocol::Protocol(tl::types::PhoneCallProtocol {
            udp_p2p: true,
            udp_reflector: true,
            min_layer: 65,
            max_layer: 92,
            library_versions: vec!["8.0.0".into()],
        });
        let o = call(
            &mut w,
            ka,
            tl::functions::phone::RequestCall {
                video: false,
                user_id: tl::enums::InputUser::User(tl::types::InputUser {
                    user_id: 2,
                    access_hash: hash,
                }),
                random_id: 1,
                g_a_hash: crate::tgcall::dh::g_a_hash(&g_a).to_vec(),
                protocol: proto.clone(),
            }
            .to_bytes(),
            now,
        );
        let tl::enums::phone::PhoneCall::Call(pc) =
            tl::enums::phone::PhoneCall::from_bytes(&o.reply.now().unwrap()).unwrap();
        let tl::enums::PhoneCall::Waiting(wt) = pc.phone_call else {
            panic!()
        };
        let peer = tl::enums::InputPhoneCall::Call(tl::types::InputPhoneCall {
            id: wt.id,
            access_hash: wt.access_hash,
        });
        call(
            &mut w,
            kb,
            tl::functions::phone::AcceptCall {
                peer: peer.clone(),
                g_b: vec![6; 256],
                protocol: proto.clone(),
            }
            .to_bytes(),
            now,
        )
        .reply
        .now()
        .unwrap();
        let o = call(
            &mut w,
            ka,
            tl::functions::phone::ConfirmCall {
                peer,
                g_a,
                key_fingerprint: 42,
                protocol: proto,
            }
            .to_bytes(),
            now,
        );
        let tl::enums::phone::PhoneCall::Call(pc) =
            tl::enums::phone::PhoneCall::from_bytes(&o.reply.now().unwrap()).unwrap();
        let tl::enums::PhoneCall::Call(c) = pc.phone_call else {
            panic!()
        };
        assert!(!c.p2p_allowed, "B allows P2P from nobody");
        assert_eq!(c.key_fingerprint, 42);
        assert_eq!(c.g_a_or_b, vec![6; 256], "the caller sees g_b");
        let [tl::enums::PhoneConnection::Webrtc(t)] = &c.connections[..] else {
            panic!("{:?}", c.connections)
        };
        assert!(t.turn && t.stun);
        assert_eq!(
            (t.ip.as_str(), t.port, t.username.as_str()),
            ("10.0.0.1", 3478, "u")
        );
        // The callee got the active call with g_a.
        let d = o.deliveries.iter().find(|d| d.to == To::User(2)).unwrap();
        let tl::enums::Update::PhoneCall(u) = &d.update else {
            panic!()
        };
        let tl::enums::PhoneCall::Call(cb) = &u.phone_call else {
            panic!()
        };
        assert_eq!(cb.g_a_or_b, vec![5; 256]);
    }

    /// What the gateway reads to tell whether its account may receive calls: the phone-call
    /// privacy it set (or a world file gave it) and its own authorization's call setting.
    #[test]
    fn an_account_reads_its_call_privacy_and_its_authorizations_call_setting() {
        let now = Instant::now();
        let mut a = SimUser::new(1, "1000", Some("aaaa"), "A");
        a.calls = Privacy::Nobody;
        let cfg = WorldConfig {
            users: vec![a],
            ..Default::default()
        };
        let mut w = World::new(cfg, now, 1_000_000);
        let k = w.hello(None, now);
        w.authorize(&k, 1);
        let privacy = |w: &mut World| {
            let o = call(
                w,
                k,
                tl::functions::account::GetPrivacy {
                    key: tl::enums::InputPrivacyKey::PhoneCall,
                }
                .to_bytes(),
                now,
            );
            let tl::enums::account::PrivacyRules::Rules(r) =
                tl::enums::account::PrivacyRules::from_bytes(&o.reply.now().unwrap()).unwrap();
            r.rules
        };
        assert_eq!(
            privacy(&mut w),
            vec![tl::enums::PrivacyRule::PrivacyValueDisallowAll]
        );
        call(
            &mut w,
            k,
            tl::functions::account::SetPrivacy {
                key: tl::enums::InputPrivacyKey::PhoneCall,
                rules: vec![tl::enums::InputPrivacyRule::InputPrivacyValueAllowAll],
            }
            .to_bytes(),
            now,
        )
        .reply
        .now()
        .unwrap();
        assert_eq!(
            privacy(&mut w),
            vec![tl::enums::PrivacyRule::PrivacyValueAllowAll]
        );
        // Hash 0 is the current authorization: disabling calls there shows in the list.
        call(
            &mut w,
            k,
            tl::functions::account::ChangeAuthorizationSettings {
                confirmed: false,
                hash: 0,
                encrypted_requests_disabled: None,
                call_requests_disabled: Some(true),
            }
            .to_bytes(),
            now,
        )
        .reply
        .now()
        .unwrap();
        let o = call(
            &mut w,
            k,
            tl::functions::account::GetAuthorizations {}.to_bytes(),
            now,
        );
        let tl::enums::account::Authorizations::Authorizations(list) =
            tl::enums::account::Authorizations::from_bytes(&o.reply.now().unwrap()).unwrap();
        let tl::enums::Authorization::Authorization(me) = &list.authorizations[0];
        assert!(me.current && me.call_requests_disabled);
    }

    #[test]
    fn garbage_requests_are_errors_not_panics() {
        let now = Instant::now();
        let mut w = World::new(WorldConfig::default(), now, 0);
        let k = w.hello(None, now);
        for body in [
            vec![],
            vec![1, 2, 3],
            vec![0xff; 64],
            tl::functions::phone::RequestCall::CONSTRUCTOR_ID
                .to_le_bytes()
                .to_vec(),
        ] {
            assert!(w.handle(k, &body, now).reply.is_err());
        }
    }

    // --- Inline bots: the keypad ---

    const GW: i64 = 1;
    const ALICE: i64 = 2;
    const BOT: i64 = 77;
    const TOKEN: &str = "77:keypad-secret";

    /// A world with the gateway account, Alice and the keypad bot, each logged in.
    fn bot_world(now: Instant) -> (World, [u8; 32], [u8; 32], [u8; 32]) {
        let cfg = WorldConfig {
            users: vec![
                SimUser::new(GW, "10000000001", Some("gw"), "Gateway"),
                SimUser::new(ALICE, "10000000002", Some("alice"), "Alice"),
                SimUser::new_bot(BOT, "keypad_bot", TOKEN),
            ],
            ..WorldConfig::default()
        };
        let mut w = World::new(cfg, now, 1_000);
        let (kg, ka, kb) = (w.hello(None, now), w.hello(None, now), w.hello(None, now));
        w.authorize(&kg, GW);
        w.authorize(&ka, ALICE);
        let o = call(&mut w, kb, bot_login(TOKEN), now);
        assert!(!o.reply.is_err(), "{:?}", o.reply);
        (w, kg, ka, kb)
    }

    fn bot_login(token: &str) -> Vec<u8> {
        tl::functions::auth::ImportBotAuthorization {
            flags: 0,
            api_id: 1,
            api_hash: "x".into(),
            bot_auth_token: token.into(),
        }
        .to_bytes()
    }

    fn input_user(id: i64) -> tl::enums::InputUser {
        tl::enums::InputUser::User(tl::types::InputUser {
            user_id: id,
            access_hash: sim_access_hash(id),
        })
    }

    fn input_peer(id: i64) -> tl::enums::InputPeer {
        tl::enums::InputPeer::User(tl::types::InputPeerUser {
            user_id: id,
            access_hash: sim_access_hash(id),
        })
    }

    fn ask(bot: i64, query: &str) -> Vec<u8> {
        tl::functions::messages::GetInlineBotResults {
            bot: input_user(bot),
            peer: input_peer(ALICE),
            geo_point: None,
            query: query.into(),
            offset: String::new(),
        }
        .to_bytes()
    }

    fn press(msg_id: i32, data: &[u8]) -> Vec<u8> {
        tl::functions::messages::GetBotCallbackAnswer {
            game: false,
            peer: input_peer(GW),
            msg_id,
            data: Some(data.to_vec()),
            password: None,
        }
        .to_bytes()
    }

    fn rpc_error(o: Outcome) -> String {
        match o.reply {
            Reply::Now(Err((_, name))) => name,
            other => panic!("expected an RPC error, got {other:?}"),
        }
    }

    /// The gateway asks the bot; returns the ticket and the query as the bot got it.
    fn inline_query(w: &mut World, kg: [u8; 32], token: &str, now: Instant) -> (Ticket, i64) {
        let o = call(w, kg, ask(BOT, token), now);
        let Reply::Later(ticket) = o.reply else {
            panic!("an inline query waits for the bot: {:?}", o.reply);
        };
        let [d] = o.deliveries.as_slice() else {
            panic!("one update for the bot: {:?}", o.deliveries);
        };
        assert_eq!(d.to, To::User(BOT));
        let tl::enums::Update::BotInlineQuery(q) = &d.update else {
            panic!("{:?}", d.update);
        };
        assert_eq!((q.user_id, q.query.as_str()), (GW, token));
        (ticket, q.query_id)
    }

    /// The whole keypad: query, the bot's answer, the message sent via the bot; returns its id.
    fn sent_keypad(w: &mut World, kg: [u8; 32], kb: [u8; 32], token: &str, now: Instant) -> i32 {
        let (ticket, query_id) = inline_query(w, kg, token, now);
        let o = call(
            w,
            kb,
            crate::gateway::keypad::inline_results(query_id, token).to_bytes(),
            now,
        );
        assert!(!o.reply.is_err(), "{:?}", o.reply);
        let answers = w.take_answers();
        let [(t, Ok(body))] = answers.as_slice() else {
            panic!("the gateway gets the bot's results: {answers:?}");
        };
        assert_eq!(*t, ticket);
        let tl::enums::messages::BotResults::Results(r) =
            tl::enums::messages::BotResults::from_bytes(body).unwrap();
        assert_eq!(r.query_id, query_id);
        assert_eq!(r.results.len(), 1);
        let o = call(
            w,
            kg,
            tl::functions::messages::SendInlineBotResult {
                silent: false,
                background: false,
                clear_draft: false,
                hide_via: false,
                peer: input_peer(ALICE),
                reply_to: None,
                random_id: 99,
                query_id,
                id: r.results[0].id(),
                schedule_date: None,
                send_as: None,
                quick_reply_shortcut: None,
                allow_paid_stars: None,
            }
            .to_bytes(),
            now,
        );
        let Ok(tl::enums::Updates::Updates(u)) =
            tl::enums::Updates::from_bytes(&o.reply.now().unwrap())
        else {
            panic!("sendInlineBotResult answers Updates");
        };
        let id = u
            .updates
            .iter()
            .find_map(|x| match x {
                tl::enums::Update::MessageId(m) if m.random_id == 99 => Some(m.id),
                _ => None,
            })
            .expect("updateMessageID with our random_id");
        // Alice gets it via the bot, with the keyboard.
        let [d] = o.deliveries.as_slice() else {
            panic!("{:?}", o.deliveries);
        };
        assert_eq!(d.to, To::User(ALICE));
        let tl::enums::Update::NewMessage(m) = &d.update else {
            panic!("{:?}", d.update);
        };
        let tl::enums::Message::Message(m) = &m.message else {
            panic!()
        };
        assert_eq!(m.id, id);
        assert_eq!(m.via_bot_id, Some(BOT));
        assert!(matches!(
            m.reply_markup,
            Some(tl::enums::ReplyMarkup::ReplyInlineMarkup(_))
        ));
        id
    }

    #[test]
    fn a_bot_logs_in_by_its_token_and_a_wrong_token_is_access_token_invalid() {
        let now = Instant::now();
        let (mut w, _, _, kb) = bot_world(now);
        assert_eq!(w.user_of(&kb), Some(BOT));
        let k = w.hello(None, now);
        assert_eq!(
            rpc_error(call(&mut w, k, bot_login("77:wrong"), now)),
            "ACCESS_TOKEN_INVALID"
        );
        // A user's phone is no bot token.
        assert_eq!(
            rpc_error(call(&mut w, k, bot_login("10000000002"), now)),
            "ACCESS_TOKEN_INVALID"
        );
        // A bot has no privacy settings or calls.
        let privacy = tl::functions::account::GetPrivacy {
            key: tl::enums::InputPrivacyKey::PhoneCall,
        }
        .to_bytes();
        assert_eq!(
            rpc_error(call(&mut w, kb, privacy, now)),
            "BOT_METHOD_INVALID"
        );
        // Others see it as a bot.
        let Some(tl::enums::User::User(u)) = w.user_tl_for(BOT, ALICE) else {
            panic!()
        };
        assert!(u.bot && u.bot_inline_placeholder.is_some());
    }

    #[test]
    fn the_keypad_goes_via_the_bot_and_a_press_reaches_the_bot_and_its_answer_the_user() {
        let now = Instant::now();
        let (mut w, kg, ka, kb) = bot_world(now);
        let token = crate::gateway::keypad::new_token();
        let msg = sent_keypad(&mut w, kg, kb, &token, now);
        let data = crate::gateway::keypad::callback_data(&token, '5');
        let o = call(&mut w, ka, press(msg, &data), now);
        let Reply::Later(ticket) = o.reply else {
            panic!("a press waits for the bot: {:?}", o.reply);
        };
        let [d] = o.deliveries.as_slice() else {
            panic!("{:?}", o.deliveries);
        };
        assert_eq!(d.to, To::User(BOT));
        let tl::enums::Update::InlineBotCallbackQuery(q) = &d.update else {
            panic!("{:?}", d.update);
        };
        assert_eq!(q.user_id, ALICE);
        assert_eq!(q.data.as_deref(), Some(data.as_slice()));
        // The gateway account cannot answer for the bot.
        let answer = crate::gateway::keypad::press_answer(q.query_id, "5").to_bytes();
        assert_eq!(
            rpc_error(call(&mut w, kg, answer.clone(), now)),
            "USER_BOT_REQUIRED"
        );
        assert!(!call(&mut w, kb, answer.clone(), now).reply.is_err());
        let answers = w.take_answers();
        let [(t, Ok(body))] = answers.as_slice() else {
            panic!("{answers:?}");
        };
        assert_eq!(*t, ticket);
        let tl::enums::messages::BotCallbackAnswer::Answer(a) =
            tl::enums::messages::BotCallbackAnswer::from_bytes(body).unwrap();
        assert_eq!(a.message.as_deref(), Some("5"));
        // Answered once: the query id is spent.
        assert_eq!(rpc_error(call(&mut w, kb, answer, now)), "QUERY_ID_INVALID");
        // The gateway deletes the keypad for both; then a press is on no message.
        let o = call(
            &mut w,
            kg,
            tl::functions::messages::DeleteMessages {
                revoke: true,
                id: vec![msg],
            }
            .to_bytes(),
            now,
        );
        let tl::enums::messages::AffectedMessages::Messages(am) =
            tl::enums::messages::AffectedMessages::from_bytes(&o.reply.now().unwrap()).unwrap();
        assert_eq!(am.pts_count, 1);
        let to_alice = o.deliveries.iter().any(|d| {
            d.to == To::User(ALICE)
                && matches!(&d.update, tl::enums::Update::DeleteMessages(u) if u.messages == vec![msg])
        });
        assert!(to_alice, "{:?}", o.deliveries);
        assert_eq!(
            rpc_error(call(&mut w, ka, press(msg, &data), now)),
            "MESSAGE_ID_INVALID"
        );
    }

    #[test]
    fn bot_methods_refuse_wrong_callers_unknown_queries_and_bad_buttons() {
        let now = Instant::now();
        let (mut w, kg, ka, kb) = bot_world(now);
        // Inline queries go to bots only, and only users ask them.
        assert_eq!(
            rpc_error(call(&mut w, kg, ask(ALICE, "x"), now)),
            "BOT_INVALID"
        );
        assert_eq!(
            rpc_error(call(&mut w, kb, ask(BOT, "x"), now)),
            "BOT_METHOD_INVALID"
        );
        // A query id nobody asked.
        let results = crate::gateway::keypad::inline_results(12345, "abc").to_bytes();
        assert_eq!(
            rpc_error(call(&mut w, kb, results, now)),
            "QUERY_ID_INVALID"
        );
        let press_answer = crate::gateway::keypad::press_answer(12345, "5").to_bytes();
        assert_eq!(
            rpc_error(call(&mut w, kb, press_answer, now)),
            "QUERY_ID_INVALID"
        );
        // Callback data over 64 bytes.
        let (_, query_id) = inline_query(&mut w, kg, "long", now);
        let mut r = crate::gateway::keypad::inline_results(query_id, "long");
        if let tl::enums::InputBotInlineResult::Result(x) = &mut r.results[0] {
            if let tl::enums::InputBotInlineMessage::Text(t) = &mut x.send_message {
                t.reply_markup = Some(crate::gateway::keypad::markup(&"x".repeat(70)));
            }
        }
        assert_eq!(
            rpc_error(call(&mut w, kb, r.to_bytes(), now)),
            "BUTTON_DATA_INVALID"
        );
        // Users cannot answer inline queries.
        let r = crate::gateway::keypad::inline_results(query_id, "long").to_bytes();
        assert_eq!(rpc_error(call(&mut w, ka, r, now)), "USER_BOT_REQUIRED");
        // A result that was never offered, and data that is on no button.
        let token = crate::gateway::keypad::new_token();
        let msg = sent_keypad(&mut w, kg, kb, &token, now);
        assert_eq!(
            rpc_error(call(&mut w, ka, press(msg, b"k:forged:5"), now)),
            "DATA_INVALID"
        );
        // Only the chat's members press its buttons.
        let data = crate::gateway::keypad::callback_data(&token, '1');
        assert_eq!(
            rpc_error(call(&mut w, kg, press(msg, &data), now)),
            "MESSAGE_ID_INVALID"
        );
    }

    #[test]
    fn a_bot_that_does_not_answer_times_the_query_and_the_press_out() {
        let now = Instant::now();
        let (mut w, kg, ka, kb) = bot_world(now);
        let (ticket, _) = inline_query(&mut w, kg, "silent", now);
        let deadline = w.next_deadline().expect("the bot's answer is awaited");
        assert_eq!(deadline, now + Duration::from_secs(5));
        assert!(w.tick(deadline - Duration::from_millis(1)).is_empty());
        assert!(w.take_answers().is_empty());
        w.tick(deadline);
        assert_eq!(
            w.take_answers(),
            vec![(ticket, Err((400, "BOT_RESPONSE_TIMEOUT".to_string())))]
        );
        // The same for a press.
        let token = crate::gateway::keypad::new_token();
        let msg = sent_keypad(&mut w, kg, kb, &token, deadline);
        let data = crate::gateway::keypad::callback_data(&token, '#');
        let Reply::Later(t) = call(&mut w, ka, press(msg, &data), deadline).reply else {
            panic!()
        };
        let later = deadline + Duration::from_secs(5);
        assert_eq!(w.next_deadline(), Some(later));
        w.tick(later);
        assert_eq!(
            w.take_answers(),
            vec![(t, Err((400, "BOT_RESPONSE_TIMEOUT".to_string())))]
        );
        assert_eq!(w.next_deadline(), None);
    }
}
