//! The gateway: SIP calls joined to Telegram calls. `tgcall` is one Telegram call's state
//! machine (sans-IO).

pub mod auth;
pub mod dialrules;
pub mod echo;
pub mod hunt;
pub mod incoming;
pub mod keypad;
pub mod limits;
pub mod messages;
pub mod runtime;
pub mod sipleg;
pub mod tgcall;

use crate::telegram::resolve::Peer;
use grammers_tl_types as tl;

/// `messages.sendMessage` of plain `text` to `peer`.
pub fn text_message(peer: &Peer, text: &str) -> tl::functions::messages::SendMessage {
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
            user_id: peer.user_id,
            access_hash: peer.access_hash,
        }),
        reply_to: None,
        message: text.to_string(),
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
}
