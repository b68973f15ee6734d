//! The in-call keypad, sans-IO: what SIP.TG shows the Telegram user during a call so that they
//! can send DTMF by pressing buttons instead of typing digits.
//!
//! A user account cannot attach an inline keyboard to its own messages, so the keypad is made
//! the Telegram way, with an inline bot (the gateway's `keypad_bot`, a bot account held by the
//! same Session Storage): once a call is answered the gateway's account asks the bot
//! (`messages.getInlineBotResults`, the query an opaque per-call token), the bot answers one
//! article with the keypad ([`inline_results`]), the account sends it into the chat
//! (`messages.sendInlineBotResult`) and deletes it when the call ends. A press reaches the bot
//! as `updateInlineBotCallbackQuery` with the [`callback_data`] of the button; the Worker that
//! owns the token answers it and sends the digit to the PBX like a typed one.
//!
//! [`Keypads`] is the Worker's registry of tokens: which call a live token belongs to, and the
//! tokens of ended calls for a while (a late press on an old keypad is answered "the call has
//! ended" and never becomes DTMF in another call).

use grammers_tl_types as tl;
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The keypad's rows, as on a phone.
pub const KEYS: [[char; 3]; 4] = [
    ['1', '2', '3'],
    ['4', '5', '6'],
    ['7', '8', '9'],
    ['*', '0', '#'],
];

/// Characters of a token (lowercase letters and digits: safe in a query and in callback data).
const TOKEN_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Length of a token: 16 characters of 36 (82 bits), unguessable for another user.
pub const TOKEN_LEN: usize = 16;
/// Prefix of the keypad's callback data (`k:<token>:<digit>`, 20 bytes, well under Telegram's
/// 64).
const DATA_PREFIX: &str = "k:";
/// The article's text above the buttons.
pub const KEYPAD_TEXT: &str = "☎️ Keypad: press digits to send them to the call";
/// How long the tokens of ended calls are remembered.
pub const ENDED_MEMORY: Duration = Duration::from_secs(600);
/// How many ended tokens are remembered at most.
const ENDED_MAX: usize = 1024;

/// A new opaque per-call token.
pub fn new_token() -> String {
    let mut rng = rand::thread_rng();
    (0..TOKEN_LEN)
        .map(|_| char::from(TOKEN_CHARS[rng.gen_range(0..TOKEN_CHARS.len())]))
        .collect()
}

/// Is `s` shaped like one of our tokens (an inline query to the bot that is not ours is not)?
pub fn is_token(s: &str) -> bool {
    s.len() == TOKEN_LEN && s.bytes().all(|b| TOKEN_CHARS.contains(&b))
}

/// The callback data of the button for `digit` on the keypad of `token`.
pub fn callback_data(token: &str, digit: char) -> Vec<u8> {
    format!("{DATA_PREFIX}{token}:{digit}").into_bytes()
}

/// The token and digit of a keypad button's callback data; `None` for anything else.
pub fn parse_callback(data: &[u8]) -> Option<(&str, char)> {
    let s = std::str::from_utf8(data).ok()?;
    let (token, digit) = s.strip_prefix(DATA_PREFIX)?.split_once(':')?;
    let mut chars = digit.chars();
    let d = chars.next()?;
    let on_keypad = KEYS.iter().flatten().any(|k| *k == d);
    (chars.next().is_none() && on_keypad && is_token(token)).then_some((token, d))
}

/// The inline keyboard of `token`'s keypad: 1 2 3 / 4 5 6 / 7 8 9 / * 0 #.
pub fn markup(token: &str) -> tl::enums::ReplyMarkup {
    let rows = KEYS
        .iter()
        .map(|row| {
            tl::enums::KeyboardInlineButtonRow::Row(tl::types::KeyboardInlineButtonRow {
                buttons: row
                    .iter()
                    .map(|d| {
                        tl::enums::KeyboardInlineButton::Button(tl::types::KeyboardInlineButton {
                            style: None,
                            text: d.to_string(),
                            r#type: tl::enums::InlineButtonType::Callback(
                                tl::types::InlineButtonTypeCallback {
                                    requires_password: false,
                                    data: callback_data(token, *d),
                                },
                            ),
                        })
                    })
                    .collect(),
            })
        })
        .collect();
    tl::enums::ReplyMarkup::ReplyInlineMarkup(tl::types::ReplyInlineMarkup {
        force_reply: false,
        rows,
    })
}

/// The bot's answer to the inline query `query_id` for `token`: one article, the keypad,
/// private to the asking account and never cached (every call has its own token).
pub fn inline_results(query_id: i64, token: &str) -> tl::functions::messages::SetInlineBotResults {
    let article = tl::enums::InputBotInlineResult::Result(tl::types::InputBotInlineResult {
        id: "keypad".into(),
        r#type: "article".into(),
        title: Some("Keypad".into()),
        description: Some("DTMF for the call".into()),
        url: None,
        thumb: None,
        content: None,
        send_message: tl::enums::InputBotInlineMessage::Text(
            tl::types::InputBotInlineMessageText {
                no_webpage: true,
                invert_media: false,
                message: KEYPAD_TEXT.into(),
                entities: None,
                reply_markup: Some(markup(token)),
            },
        ),
    });
    tl::functions::messages::SetInlineBotResults {
        gallery: false,
        private: true,
        query_id,
        results: vec![article],
        cache_time: 0,
        next_offset: None,
        switch_pm: None,
        switch_webview: None,
    }
}

/// The bot's answer to a press: the digit sent, or that the call has ended.
pub fn press_answer(query_id: i64, text: &str) -> tl::functions::messages::SetBotCallbackAnswer {
    tl::functions::messages::SetBotCallbackAnswer {
        alert: false,
        query_id,
        message: Some(text.to_string()),
        url: None,
        cache_time: 0,
    }
}

/// Why a call has no keypad (logged; the call goes on without one).
#[derive(Debug, thiserror::Error)]
pub enum KeypadError {
    #[error("keypad bot {bot:?} is not an account of session storage {storage:?}")]
    NoBot { bot: String, storage: String },
    #[error("keypad bot {bot:?} is not logged in as a bot with a username (siptg account login {bot} --bot-token …)")]
    BotNotLoggedIn { bot: String },
    #[error("the keypad bot answered the inline query with no result")]
    NoResult,
    #[error("Telegram did not say which message the keypad became")]
    NoMessageId,
    #[error("keypad: cannot {step}: {source}")]
    Telegram {
        step: &'static str,
        #[source]
        source: crate::telegram::TgError,
    },
}

/// The id of the message `messages.sendInlineBotResult` (with `random_id`) made.
pub fn sent_message_id(updates: &tl::enums::Updates, random_id: i64) -> Option<i32> {
    let list: &[tl::enums::Update] = match updates {
        tl::enums::Updates::UpdateShortSentMessage(m) => return Some(m.id),
        tl::enums::Updates::Updates(u) => &u.updates,
        tl::enums::Updates::Combined(u) => &u.updates,
        tl::enums::Updates::UpdateShort(u) => std::slice::from_ref(&u.update),
        _ => &[],
    };
    let by_random = list.iter().find_map(|u| match u {
        tl::enums::Update::MessageId(m) if m.random_id == random_id => Some(m.id),
        _ => None,
    });
    by_random.or_else(|| {
        list.iter().find_map(|u| match u {
            tl::enums::Update::NewMessage(n) => match &n.message {
                tl::enums::Message::Message(m) if m.out => Some(m.id),
                _ => None,
            },
            _ => None,
        })
    })
}

/// What a press on a keypad means to this Worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Press {
    /// A live call's keypad: send the digit.
    Live { call: u64, digit: char },
    /// The keypad of a call that has ended here: answer so (through the bot of `storage`),
    /// send nothing.
    Ended { storage: String },
    /// Not a keypad of ours (another Worker's, or not a keypad at all): leave it alone.
    Unknown,
}

/// The Worker's keypad tokens.
#[derive(Debug, Default)]
pub struct Keypads {
    /// Token → (call, the Session Storage of its accounts).
    live: HashMap<String, (u64, String)>,
    ended: VecDeque<(String, Instant, String)>,
}

impl Keypads {
    /// A keypad for `call`, whose accounts are in Session Storage `storage`: its new token.
    pub fn start(&mut self, call: u64, storage: &str) -> String {
        loop {
            let t = new_token();
            if !self.live.contains_key(&t) {
                self.live.insert(t.clone(), (call, storage.to_string()));
                return t;
            }
        }
    }

    /// The live call of `token`.
    pub fn call_of(&self, token: &str) -> Option<u64> {
        self.live.get(token).map(|(c, _)| *c)
    }

    /// `token`'s call ended at `now`: its presses are refused from now on.
    pub fn end(&mut self, token: &str, now: Instant) {
        if let Some((_, storage)) = self.live.remove(token) {
            self.ended.push_back((token.to_string(), now, storage));
        }
        self.forget(now);
    }

    /// What a press with `data` means.
    pub fn press(&mut self, data: &[u8], now: Instant) -> Press {
        self.forget(now);
        let Some((token, digit)) = parse_callback(data) else {
            return Press::Unknown;
        };
        if let Some(call) = self.call_of(token) {
            return Press::Live { call, digit };
        }
        if let Some((_, _, storage)) = self.ended.iter().find(|(t, _, _)| t == token) {
            return Press::Ended {
                storage: storage.clone(),
            };
        }
        Press::Unknown
    }

    fn forget(&mut self, now: Instant) {
        while self.ended.len() > ENDED_MAX
            || self
                .ended
                .front()
                .is_some_and(|(_, at, _)| now.saturating_duration_since(*at) >= ENDED_MEMORY)
        {
            self.ended.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_button_carries_its_token_and_digit_in_at_most_64_bytes() {
        let token = new_token();
        assert!(is_token(&token));
        let tl::enums::ReplyMarkup::ReplyInlineMarkup(m) = markup(&token) else {
            panic!("not an inline keyboard");
        };
        let mut seen = String::new();
        for tl::enums::KeyboardInlineButtonRow::Row(row) in &m.rows {
            assert_eq!(row.buttons.len(), 3);
            for tl::enums::KeyboardInlineButton::Button(b) in &row.buttons {
                let tl::enums::InlineButtonType::Callback(c) = &b.r#type else {
                    panic!("not a callback button");
                };
                assert!(c.data.len() <= 64, "{} bytes", c.data.len());
                let (t, d) = parse_callback(&c.data).expect("our data parses");
                assert_eq!(t, token);
                assert_eq!(b.text, d.to_string());
                seen.push(d);
            }
        }
        assert_eq!(seen, "123456789*0#");
    }

    #[test]
    fn foreign_or_malformed_data_is_not_a_keypad_press() {
        let t = new_token();
        for bad in [
            b"".to_vec(),
            b"k:".to_vec(),
            format!("k:{t}:").into_bytes(),
            format!("k:{t}:55").into_bytes(),
            format!("k:{t}:A").into_bytes(),
            format!("x:{t}:5").into_bytes(),
            b"k:short:5".to_vec(),
            vec![0xff, 0xfe],
        ] {
            assert_eq!(parse_callback(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_press_finds_its_live_call_and_an_ended_calls_press_sends_nothing() {
        let now = Instant::now();
        let mut k = Keypads::default();
        let a = k.start(1, "st");
        let b = k.start(2, "st");
        assert_ne!(a, b);
        assert_eq!(
            k.press(&callback_data(&a, '5'), now),
            Press::Live {
                call: 1,
                digit: '5'
            }
        );
        k.end(&a, now);
        assert_eq!(
            k.press(&callback_data(&a, '#'), now),
            Press::Ended {
                storage: "st".into()
            }
        );
        assert_eq!(
            k.press(&callback_data(&b, '#'), now),
            Press::Live {
                call: 2,
                digit: '#'
            }
        );
        // Another Worker's token.
        assert_eq!(
            k.press(&callback_data(&new_token(), '1'), now),
            Press::Unknown
        );
        // Ended tokens are forgotten after a while (then they are just unknown).
        let later = now + ENDED_MEMORY;
        assert_eq!(k.press(&callback_data(&a, '1'), later), Press::Unknown);
    }
}
