//! One Telegram account as the Session Storage runs it: its transport, flood gate, RPC timeout
//! and the allow-list, the login flows (phone → code → 2FA password, QR token), log-out and the
//! account hygiene applied on connect. The same code runs over grammers and over `tgsim`.

use super::error::TgError;
use super::flood::FloodGate;
use super::transport::Transport;
use grammers_tl_types::{self as tl, Deserializable, RemoteCall};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The requests the Manager and Workers may send through the Storage (SIP.TG's Storage has the
/// same idea with TDLib request names). Anything else is refused and logged.
pub const ALLOWED: &[&str] = &[
    "messages.getDhConfig",
    "phone.requestCall",
    "phone.acceptCall",
    "phone.confirmCall",
    "phone.receivedCall",
    "phone.discardCall",
    "phone.sendSignalingData",
    "phone.setCallRating",
    "phone.saveCallDebug",
    "phone.getCallConfig",
    "messages.sendMessage",
    "messages.readHistory",
    "users.getUsers",
    "contacts.resolveUsername",
    "contacts.resolvePhone",
    "contacts.importContacts",
    "account.getPrivacy",
    "account.setPrivacy",
    "account.getAuthorizations",
    "account.changeAuthorizationSettings",
    // The in-call keypad (`gateway::keypad`): the gateway's account asks its bot, sends the
    // keypad into the chat and deletes it at the end; the bot answers the query and presses.
    "messages.getInlineBotResults",
    "messages.sendInlineBotResult",
    "messages.deleteMessages",
    "messages.setInlineBotResults",
    "messages.setBotCallbackAnswer",
];

/// Requests that reach other users, held back by PEER_FLOOD.
const TO_PEER: &[&str] = &[
    "phone.requestCall",
    "messages.sendMessage",
    "messages.sendInlineBotResult",
    "contacts.importContacts",
];

/// The TL name of a serialized function (`phone.requestCall`), from its constructor id.
pub fn method_name(body: &[u8]) -> &'static str {
    body.get(..4)
        .map(|b| tl::name_for_id(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .unwrap_or("(empty)")
}

/// Which account-hygiene settings to apply on connect (SIP.TG's "recommended settings").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hygiene {
    /// Other devices of the account stop ringing for calls (the gateway answers them).
    pub disable_calls_on_other_devices: bool,
    /// Everybody may call the account.
    pub allow_calls_from_everybody: bool,
    /// Everybody may use peer-to-peer media with it.
    pub allow_p2p_from_everybody: bool,
    /// Nobody may add it to groups.
    pub disallow_group_invites: bool,
}

impl Default for Hygiene {
    fn default() -> Self {
        Self {
            disable_calls_on_other_devices: true,
            allow_calls_from_everybody: true,
            allow_p2p_from_everybody: true,
            disallow_group_invites: true,
        }
    }
}

/// What [`Account::apply_hygiene`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HygieneReport {
    /// Other devices on which calls were turned off.
    pub devices_calls_disabled: usize,
    /// Privacy keys set (`phone_call`, `phone_p2p`, `chat_invite`).
    pub privacy_set: Vec<&'static str>,
}

/// Who the account is logged in as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Me {
    pub user_id: i64,
    pub phone: Option<String>,
    pub username: Option<String>,
    pub first_name: String,
    /// A bot account (logged in by token): no calls, no account hygiene; it serves a
    /// gateway's inline keypad (`keypad_bot`).
    #[serde(default)]
    pub bot: bool,
}

impl Me {
    fn from_user(u: &tl::enums::User) -> Option<Self> {
        match u {
            tl::enums::User::User(u) => Some(Me {
                user_id: u.id,
                phone: u.phone.clone(),
                username: u.username.clone(),
                first_name: u.first_name.clone().unwrap_or_default(),
                bot: u.bot,
            }),
            tl::enums::User::Empty(_) => None,
        }
    }
}

/// A login code was sent; sign in with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodeSent {
    pub phone: String,
    pub phone_code_hash: String,
}

/// How a login step ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum LoginStep {
    /// Logged in.
    Done(Me),
    /// The account has a 2FA password: call `check_password`.
    PasswordNeeded { hint: Option<String> },
    /// QR login: show this token (as `tg://login?token=<base64url>`), then poll again.
    QrToken { token: Vec<u8>, expires: i32 },
}

/// Knobs of an account's request handling.
#[derive(Debug, Clone)]
pub struct AccountOptions {
    pub api_id: i32,
    pub api_hash: String,
    /// A request with no answer after this is `408 Timeout of waiting RPC result`.
    pub rpc_timeout: Duration,
    /// How long PEER_FLOOD holds back calls and messages.
    pub peer_flood_hold: Duration,
}

impl Default for AccountOptions {
    fn default() -> Self {
        Self {
            api_id: 0,
            api_hash: String::new(),
            rpc_timeout: Duration::from_secs(10),
            peer_flood_hold: Duration::from_secs(86_400),
        }
    }
}

/// One connected Telegram account.
pub struct Account {
    name: String,
    transport: Arc<dyn Transport>,
    flood: Mutex<FloodGate>,
    opts: AccountOptions,
}

impl Account {
    /// Wraps a connected transport.
    pub fn new(name: &str, transport: Arc<dyn Transport>, opts: AccountOptions) -> Self {
        Self {
            name: name.into(),
            flood: Mutex::new(FloodGate::new(opts.peer_flood_hold)),
            transport,
            opts,
        }
    }

    /// The account's name in this Storage.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transport (to persist its session).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Running flood waits: (scope, seconds left).
    pub fn flood_waits(&self) -> Vec<(String, u32)> {
        self.gate().waits(Instant::now())
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, FloodGate> {
        self.flood
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends a serialized function through flood control and the timeout (no allow-list:
    /// the Storage's own flows use this).
    pub async fn invoke_raw(&self, body: Vec<u8>) -> Result<Vec<u8>, TgError> {
        let method = method_name(&body);
        let to_peer = TO_PEER.contains(&method);
        self.gate().check(method, to_peer, Instant::now())?;
        let result = tokio::time::timeout(self.opts.rpc_timeout, self.transport.invoke_raw(body))
            .await
            .map_err(|_| {
                tracing::warn!(account = %self.name, method, "no answer from Telegram in time");
                TgError::Timeout
            })?;
        result.map_err(|e| {
            let e = self.gate().observe(method, e, Instant::now());
            if matches!(e, TgError::FloodWait { .. } | TgError::PeerFlood { .. }) {
                tracing::warn!(account = %self.name, method, error = %e, "Telegram flood limit");
            }
            e
        })
    }

    /// A request from the Manager or a Worker: refused unless on the allow-list.
    pub async fn invoke_allowed(&self, body: Vec<u8>) -> Result<Vec<u8>, TgError> {
        let method = method_name(&body);
        if !ALLOWED.contains(&method) {
            tracing::warn!(account = %self.name, method, "refused a request outside the allow-list");
            return Err(TgError::NotAllowed {
                method: method.to_string(),
            });
        }
        self.invoke_raw(body).await
    }

    /// A typed request through [`invoke_raw`](Self::invoke_raw).
    pub async fn invoke<R: RemoteCall>(&self, request: &R) -> Result<R::Return, TgError> {
        let body = request.to_bytes();
        let method = method_name(&body);
        let answer = self.invoke_raw(body).await?;
        R::Return::from_bytes(&answer).map_err(|e| TgError::Decode {
            request: method.into(),
            why: e.to_string(),
        })
    }

    /// Who the account is logged in as; `NotAuthorized` when it is not.
    pub async fn me(&self) -> Result<Me, TgError> {
        let users = self
            .invoke(&tl::functions::users::GetUsers {
                id: vec![tl::enums::InputUser::UserSelf],
            })
            .await
            .map_err(|e| self.unauthorized(e))?;
        users
            .first()
            .and_then(Me::from_user)
            .ok_or_else(|| TgError::NotAuthorized {
                account: self.name.clone(),
            })
    }

    fn unauthorized(&self, e: TgError) -> TgError {
        match &e {
            TgError::Rpc { code: 401, .. } => TgError::NotAuthorized {
                account: self.name.clone(),
            },
            _ => e,
        }
    }

    /// Login step 1: Telegram sends a code to the phone's apps (or SMS).
    pub async fn send_code(&self, phone: &str) -> Result<CodeSent, TgError> {
        let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
        if digits.len() < 5 || digits.len() > 15 {
            return Err(TgError::Invalid {
                what: "phone number".into(),
                why: format!("{phone:?} is not an international number"),
            });
        }
        let sent = self
            .invoke(&tl::functions::auth::SendCode {
                phone_number: digits.clone(),
                api_id: self.opts.api_id,
                api_hash: self.opts.api_hash.clone(),
                settings: tl::enums::CodeSettings::Settings(tl::types::CodeSettings {
                    allow_flashcall: false,
                    current_number: false,
                    allow_app_hash: false,
                    allow_missed_call: false,
                    allow_firebase: false,
                    unknown_number: false,
                    logout_tokens: None,
                    token: None,
                    app_sandbox: None,
                }),
            })
            .await?;
        match sent {
            tl::enums::auth::SentCode::Code(c) => Ok(CodeSent {
                phone: digits,
                phone_code_hash: c.phone_code_hash,
            }),
            tl::enums::auth::SentCode::Success(s) => Err(TgError::Invalid {
                what: "login".into(),
                why: format!("already authorized: {:?}", s.authorization),
            }),
            tl::enums::auth::SentCode::PaymentRequired(_) => Err(TgError::Invalid {
                what: "login".into(),
                why: "Telegram asks for a payment to send the code".into(),
            }),
        }
    }

    /// Login step 2: the code. A wrong code is Telegram's PHONE_CODE_INVALID.
    pub async fn sign_in(&self, sent: &CodeSent, code: &str) -> Result<LoginStep, TgError> {
        let r = self
            .invoke(&tl::functions::auth::SignIn {
                phone_number: sent.phone.clone(),
                phone_code_hash: sent.phone_code_hash.clone(),
                phone_code: Some(code.trim().to_string()),
                email_verification: None,
            })
            .await;
        self.after_authorization(r).await
    }

    async fn after_authorization(
        &self,
        r: Result<tl::enums::auth::Authorization, TgError>,
    ) -> Result<LoginStep, TgError> {
        match r {
            Ok(tl::enums::auth::Authorization::Authorization(a)) => Me::from_user(&a.user)
                .map(LoginStep::Done)
                .ok_or_else(|| TgError::NotAuthorized {
                    account: self.name.clone(),
                }),
            Ok(tl::enums::auth::Authorization::SignUpRequired(_)) => Err(TgError::Invalid {
                what: "login".into(),
                why: "this phone has no Telegram account (sign up in an app first)".into(),
            }),
            Err(e) if e.is("SESSION_PASSWORD_NEEDED") => {
                let hint = match self.invoke(&tl::functions::account::GetPassword {}).await? {
                    tl::enums::account::Password::Password(p) => p.hint,
                };
                Ok(LoginStep::PasswordNeeded { hint })
            }
            Err(e) => Err(e),
        }
    }

    /// A bot's login by the token @BotFather gave (`auth.importBotAuthorization`). A wrong
    /// token is Telegram's ACCESS_TOKEN_INVALID.
    pub async fn bot_sign_in(&self, token: &str) -> Result<LoginStep, TgError> {
        let token = token.trim();
        let well_formed = token.split_once(':').is_some_and(|(id, secret)| {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !secret.is_empty()
        });
        if !well_formed {
            return Err(TgError::Invalid {
                what: "bot token".into(),
                why: "expected <bot id>:<secret>, as @BotFather gives it".into(),
            });
        }
        let r = self
            .invoke(&tl::functions::auth::ImportBotAuthorization {
                flags: 0,
                api_id: self.opts.api_id,
                api_hash: self.opts.api_hash.clone(),
                bot_auth_token: token.to_string(),
            })
            .await;
        self.after_authorization(r).await
    }

    /// Login step 3, for accounts with 2FA: the password, proven by SRP (it is never sent).
    /// A wrong one is Telegram's PASSWORD_HASH_INVALID.
    pub async fn check_password(&self, password: &str) -> Result<LoginStep, TgError> {
        let tl::enums::account::Password::Password(info) =
            self.invoke(&tl::functions::account::GetPassword {}).await?;
        let (Some(algo), Some(srp_b), Some(srp_id)) = (info.current_algo, info.srp_b, info.srp_id)
        else {
            return Err(TgError::Invalid {
                what: "password".into(),
                why: "the account has no 2FA password".into(),
            });
        };
        let tl::enums::PasswordKdfAlgo::Sha256Sha256Pbkdf2Hmacsha512iter100000Sha256ModPow(p) =
            algo
        else {
            return Err(TgError::Invalid {
                what: "password".into(),
                why: "unknown password KDF (update siptg)".into(),
            });
        };
        let mut a = vec![0u8; 256];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut a);
        // PBKDF2 with 100,000 rounds: keep it off the async workers.
        let (m1, g_a) = tokio::task::spawn_blocking({
            let password = password.to_string();
            move || {
                grammers_crypto::two_factor_auth::calculate_2fa(
                    &p.salt1, &p.salt2, &p.p, &p.g, srp_b, a, password,
                )
            }
        })
        .await
        .map_err(|e| TgError::transport(format!("2FA computation: {e}")))?;
        let r = self
            .invoke(&tl::functions::auth::CheckPassword {
                password: tl::enums::InputCheckPasswordSrp::Srp(tl::types::InputCheckPasswordSrp {
                    srp_id,
                    a: g_a.to_vec(),
                    m1: m1.to_vec(),
                }),
            })
            .await;
        self.after_authorization(r).await
    }

    /// QR login: a token to show, or `Done` once an app has scanned it (call again after
    /// `updateLoginToken` or every few seconds).
    pub async fn qr_login(&self) -> Result<LoginStep, TgError> {
        let r = self
            .invoke(&tl::functions::auth::ExportLoginToken {
                api_id: self.opts.api_id,
                api_hash: self.opts.api_hash.clone(),
                except_ids: vec![],
            })
            .await;
        match r {
            Ok(tl::enums::auth::LoginToken::Token(t)) => Ok(LoginStep::QrToken {
                token: t.token,
                expires: t.expires,
            }),
            Ok(tl::enums::auth::LoginToken::Success(s)) => {
                self.after_authorization(Ok(s.authorization)).await
            }
            Ok(tl::enums::auth::LoginToken::MigrateTo(m)) => Err(TgError::Rpc {
                code: 303,
                name: "LOGIN_TOKEN_MIGRATE".into(),
                value: u32::try_from(m.dc_id).ok(),
            }),
            Err(e) => self.after_authorization(Err(e)).await,
        }
    }

    /// Logs the account out at Telegram (its auth key stops working).
    pub async fn log_out(&self) -> Result<(), TgError> {
        self.invoke(&tl::functions::auth::LogOut {}).await.map(drop)
    }

    /// Applies the account hygiene settings.
    pub async fn apply_hygiene(&self, h: &Hygiene) -> Result<HygieneReport, TgError> {
        let mut report = HygieneReport::default();
        if h.disable_calls_on_other_devices {
            let tl::enums::account::Authorizations::Authorizations(list) = self
                .invoke(&tl::functions::account::GetAuthorizations {})
                .await?;
            for a in list.authorizations {
                let tl::enums::Authorization::Authorization(a) = a;
                if a.current || a.call_requests_disabled {
                    continue;
                }
                self.invoke(&tl::functions::account::ChangeAuthorizationSettings {
                    confirmed: false,
                    hash: a.hash,
                    encrypted_requests_disabled: None,
                    call_requests_disabled: Some(true),
                })
                .await?;
                report.devices_calls_disabled += 1;
            }
        }
        use tl::enums::InputPrivacyKey as K;
        use tl::enums::InputPrivacyRule as R;
        let set = |key: K, rule: R, label: &'static str| (key, rule, label);
        let mut wanted = Vec::new();
        if h.allow_calls_from_everybody {
            wanted.push(set(
                K::PhoneCall,
                R::InputPrivacyValueAllowAll,
                "phone_call",
            ));
        }
        if h.allow_p2p_from_everybody {
            wanted.push(set(K::PhoneP2P, R::InputPrivacyValueAllowAll, "phone_p2p"));
        }
        if h.disallow_group_invites {
            wanted.push(set(
                K::ChatInvite,
                R::InputPrivacyValueDisallowAll,
                "chat_invite",
            ));
        }
        for (key, rule, label) in wanted {
            self.invoke(&tl::functions::account::SetPrivacy {
                key,
                rules: vec![rule],
            })
            .await?;
            report.privacy_set.push(label);
        }
        Ok(report)
    }
}
