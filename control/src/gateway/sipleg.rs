//! The SIP half of a gateway call, sans-IO: one dialog with the PBX, as UAS (the PBX calls
//! Telegram) or as UAC (a Telegram user calls the PBX). The other half is a Telegram call
//! ([`super::tgcall`]); the runtime joins them.
//!
//! The Telegram side speaks Opus and the dataplane's bridge transcodes G.711 to it, so the SIP
//! side is offered and answered PCMA/PCMU (in the connection's order) with telephone-event.

use super::auth::{self, Credentials};
use crate::sip::call::{branch, strip_brackets, tag};
use crate::sip::msg::{Method, SipRequest, SipResponse};
use crate::sip::sdp::{
    self, AudioCodec, CodecPrefs, Direction, LocalMedia, NegotiatedMedia, SessionDescription,
};
use siptg_proto::{LegSpec, MediaDirection};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The methods we accept in a gateway call.
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, MESSAGE";

/// What the runtime must do for the SIP half.
#[derive(Debug, Clone, PartialEq)]
pub enum LegAction {
    /// UAS: a response to the PBX's INVITE.
    RespondInvite(SipResponse),
    /// A response to an in-dialog request (matched by method).
    Respond(SipResponse),
    /// A request in a new client transaction.
    Send { req: SipRequest, dest: SocketAddr },
    /// UAC: cancel our INVITE (the dialog's Call-ID tells the forks of a hunt apart).
    CancelInvite { call_id: String },
    /// The ACK of a 2xx (no transaction).
    SendAck { req: SipRequest, dest: SocketAddr },
    /// New parameters for the SIP media leg.
    UpdateLeg(LegSpec),
    /// UAC: the PBX rings.
    Ringing,
    /// UAC: the PBX answered.
    Answered,
    /// A DTMF digit from the PBX by SIP INFO.
    Dtmf(char),
    /// The PBX put the call on hold (`true`: its offer said sendonly, inactive or
    /// `c=0.0.0.0`) or took it off hold (`false`); the Telegram user is told.
    Hold(bool),
    /// The dialog is over; `code`/`reason` say how (the PBX's final response for a UAC call that
    /// failed, or 200 for a normal end).
    Ended { code: u16, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// UAS: not answered; UAC: INVITE out.
    Early,
    /// 2xx sent (UAS) or received (UAC).
    Confirmed,
    Ended,
}

#[derive(Debug, Clone)]
struct Dialog {
    call_id: String,
    local: String,
    remote: String,
    remote_target: String,
    route_set: Vec<String>,
    cseq: u32,
    address: SocketAddr,
}

impl Dialog {
    fn request(&mut self, method: Method, via: SocketAddr) -> SipRequest {
        if method != Method::Ack {
            self.cseq += 1;
        }
        let mut req = SipRequest::new(method.clone(), self.remote_target.clone());
        let h = req.headers_mut();
        h.add(
            "Via",
            format!("SIP/2.0/UDP {via};branch={};rport", branch()),
        );
        h.add("Max-Forwards", "70");
        for r in &self.route_set {
            h.add("Route", r.clone());
        }
        h.add("From", self.local.clone());
        h.add("To", self.remote.clone());
        h.add("Call-ID", self.call_id.clone());
        h.add("CSeq", format!("{} {}", self.cseq, method.as_str()));
        req
    }
}

/// The dataplane leg for what offer/answer settled, with its direction: a held leg gets no
/// audio from Telegram unless we may send, and no RTP timeout.
fn leg_spec(neg: &NegotiatedMedia) -> LegSpec {
    let mut spec = neg.to_leg_spec(true);
    spec.direction = match neg.direction {
        Direction::SendRecv => MediaDirection::SendRecv,
        Direction::SendOnly => MediaDirection::SendOnly,
        Direction::RecvOnly => MediaDirection::RecvOnly,
        Direction::Inactive => MediaDirection::Inactive,
    };
    spec
}

/// The codecs of a gateway call's SIP leg, in the connection's order: Opus passes through to
/// Telegram; G.711 and G.722 are transcoded by the bridge.
pub fn gateway_prefs(names: &[String]) -> CodecPrefs {
    let codecs: Vec<AudioCodec> = names
        .iter()
        .filter_map(|n| AudioCodec::from_name(n))
        .collect();
    CodecPrefs::new(codecs, true)
        .or_else(|_| CodecPrefs::new([AudioCodec::Pcma, AudioCodec::Pcmu], true))
        .unwrap_or_default()
}

/// A DTMF digit from an INFO body (`application/dtmf-relay`: `Signal=5`, or
/// `application/dtmf`: `5`).
pub fn info_digit(req: &SipRequest) -> Option<char> {
    let body = String::from_utf8_lossy(&req.body);
    let ctype = req
        .header("Content-Type")
        .unwrap_or("")
        .to_ascii_lowercase();
    let raw = if ctype.contains("dtmf-relay") {
        body.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("signal")
                .then(|| v.trim().to_string())
        })?
    } else if ctype.contains("application/dtmf") {
        body.trim().to_string()
    } else {
        return None;
    };
    let c = raw.chars().next()?.to_ascii_uppercase();
    matches!(c, '0'..='9' | '*' | '#' | 'A'..='D').then_some(c)
}

/// One gateway call's SIP dialog.
pub struct SipLeg {
    uas: bool,
    state: State,
    dialog: Dialog,
    local: SocketAddr,
    /// UAS: the PBX's INVITE; UAC: ours.
    invite: SipRequest,
    /// Our SDP (answer as UAS, offer as UAC).
    ours: SessionDescription,
    prefs: CodecPrefs,
    media: LocalMedia,
    /// UAS: our 2xx until the ACK: (response, next resend, interval, give up).
    ok: Option<(SipResponse, Instant, Duration, Instant)>,
    /// UAC: our BYE is out (after a hang-up, or for a 2xx that crossed our CANCEL): a
    /// retransmitted 2xx is only ACKed.
    late_bye: bool,
    /// The PBX holds the call (its last SDP wants none of our media).
    held: bool,
    /// Our offer in the 2xx to an offerless re-INVITE: the ACK brings the answer.
    offered: Option<SessionDescription>,
    /// UAC: our login at the PBX, to answer one digest challenge to the INVITE.
    credentials: Option<Credentials>,
    /// UAC: the INVITE went out again with credentials; a second challenge fails the call.
    challenged: bool,
    out: VecDeque<LegAction>,
}

/// Why the PBX's INVITE cannot become a gateway call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegRefusal {
    pub code: u16,
    pub reason: String,
}

impl SipLeg {
    /// UAS: the PBX's `invite` from `source`; our media leg is at `leg`. Returns the leg and
    /// the dataplane spec for the SIP media leg, or the refusal (`488` when no codec in common).
    pub fn uas(
        invite: SipRequest,
        source: SocketAddr,
        prefs: CodecPrefs,
        leg: SocketAddr,
        local: SocketAddr,
    ) -> Result<(Self, LegSpec), LegRefusal> {
        let refuse = |(code, reason): (u16, &str)| LegRefusal {
            code,
            reason: reason.to_string(),
        };
        let offer = SessionDescription::parse(&invite.body).map_err(|e| refuse(e.status()))?;
        let media = LocalMedia::new(leg.ip(), leg.port(), rand::random::<u32>() as u64);
        let (answer, neg) = sdp::answer(&offer, &prefs, &media).map_err(|e| refuse(e.status()))?;
        let dialog = Dialog {
            call_id: invite.call_id().unwrap_or_default().to_string(),
            local: format!(
                "{};tag={}",
                invite.header("To").unwrap_or("<sip:siptg>"),
                tag()
            ),
            remote: invite.header("From").unwrap_or_default().to_string(),
            remote_target: invite
                .header("Contact")
                .map(|c| strip_brackets(c.split(',').next().unwrap_or(c)))
                .unwrap_or_else(|| invite.uri.clone()),
            route_set: invite
                .headers()
                .get_all("Record-Route")
                .map(str::to_string)
                .collect(),
            cseq: 0,
            address: source,
        };
        let spec = leg_spec(&neg);
        let held = neg.remote_hold;
        Ok((
            Self {
                uas: true,
                state: State::Early,
                dialog,
                local,
                invite,
                ours: answer,
                prefs,
                media,
                ok: None,
                late_bye: false,
                held,
                offered: None,
                credentials: None,
                challenged: false,
                out: VecDeque::new(),
            },
            spec,
        ))
    }

    /// UAC: a call to the PBX at `address` (`request_uri`), from `from_user`/`from_name`, with
    /// extra `headers`; our media leg is at `leg`.
    #[allow(clippy::too_many_arguments)]
    pub fn uac(
        request_uri: &str,
        address: SocketAddr,
        from_user: &str,
        from_name: Option<&str>,
        headers: &[(String, String)],
        prefs: CodecPrefs,
        leg: SocketAddr,
        local: SocketAddr,
    ) -> Self {
        let media = LocalMedia::new(leg.ip(), leg.port(), rand::random::<u32>() as u64);
        let offer = sdp::offer(&prefs, &media, false);
        let user: String = from_user
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "+-_.!~*'()&=$,;?/".contains(*c))
            .collect();
        let name = from_name
            .map(|n| format!("\"{}\" ", n.replace(['"', '\\'], "")))
            .unwrap_or_default();
        let mut dialog = Dialog {
            call_id: format!("{:032x}@siptg", rand::random::<u128>()),
            local: format!("{name}<sip:{user}@{}>;tag={}", local.ip(), tag()),
            remote: format!("<{request_uri}>"),
            remote_target: request_uri.to_string(),
            route_set: Vec::new(),
            cseq: 0,
            address,
        };
        let mut invite = dialog.request(Method::Invite, local);
        {
            let h = invite.headers_mut();
            h.add("Contact", format!("<sip:{user}@{local}>"));
            h.add("Allow", ALLOW);
            for (n, v) in headers {
                h.add(n, v.clone());
            }
            h.add("Content-Type", "application/sdp");
        }
        invite.body = offer.to_string().into_bytes();
        let mut leg = Self {
            uas: false,
            state: State::Early,
            dialog,
            local,
            invite: invite.clone(),
            ours: offer,
            prefs,
            media,
            ok: None,
            late_bye: false,
            held: false,
            offered: None,
            credentials: None,
            challenged: false,
            out: VecDeque::new(),
        };
        leg.out.push_back(LegAction::Send {
            req: invite,
            dest: address,
        });
        leg
    }

    /// The dialog's Call-ID (the runtime's index).
    pub fn call_id(&self) -> &str {
        &self.dialog.call_id
    }

    /// Is the dialog over?
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// UAC: our login and password at the PBX (a `register_to_pbx` connection's), to answer
    /// its digest challenge to the INVITE once.
    pub fn set_credentials(&mut self, credentials: Option<Credentials>) {
        self.credentials = credentials;
    }

    /// Does the PBX hold the call?
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Has the call been answered (2xx)?
    pub fn is_confirmed(&self) -> bool {
        self.state == State::Confirmed
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<LegAction> {
        self.out.pop_front()
    }

    fn response(&self, req: &SipRequest, code: u16, reason: &str, sdp: bool) -> SipResponse {
        let to_tag = self
            .dialog
            .local
            .rsplit_once(";tag=")
            .map(|(_, t)| t.to_string());
        let mut resp = SipResponse::to(req, code, reason, to_tag.as_deref());
        resp.headers_mut()
            .add("Contact", format!("<sip:siptg@{}>", self.local));
        if (101..300).contains(&code) {
            resp.headers_mut().add("Allow", ALLOW);
        }
        if sdp {
            resp.headers_mut().add("Content-Type", "application/sdp");
            resp.body = self.ours.to_string().into_bytes();
        }
        resp
    }

    /// UAS: the Telegram side rings.
    pub fn ringing(&mut self) {
        if self.uas && self.state == State::Early {
            let r = self.response(&self.invite, 180, "Ringing", false);
            self.out.push_back(LegAction::RespondInvite(r));
        }
    }

    /// UAS: the Telegram side answered and media flows: 200 with our answer.
    pub fn answer(&mut self, now: Instant) {
        if !self.uas || self.state != State::Early {
            return;
        }
        let ok = self.response(&self.invite, 200, "OK", true);
        self.out.push_back(LegAction::RespondInvite(ok.clone()));
        self.state = State::Confirmed;
        self.ok = Some((
            ok,
            now + Duration::from_millis(500),
            Duration::from_millis(500),
            now + Duration::from_secs(32),
        ));
    }

    /// UAS: refuse the PBX's call with SIP.TG's status and text.
    pub fn reject(&mut self, code: u16, reason: &str) {
        if !self.uas || self.state != State::Early {
            return;
        }
        let r = self.response(&self.invite, code, reason, false);
        self.out.push_back(LegAction::RespondInvite(r));
        self.end(code, reason);
    }

    /// The Telegram side ended: BYE after an answer, else CANCEL (UAC) or a final error (UAS,
    /// with `code`/`reason`).
    pub fn hang_up(&mut self, code: u16, reason: &str) {
        match self.state {
            State::Ended => {}
            State::Early if self.uas => self.reject(code, reason),
            State::Early => {
                self.out.push_back(LegAction::CancelInvite {
                    call_id: self.dialog.call_id.clone(),
                });
                self.end(487, "Request Terminated");
            }
            State::Confirmed => {
                let bye = self.dialog.request(Method::Bye, self.local);
                self.out.push_back(LegAction::Send {
                    req: bye,
                    dest: self.dialog.address,
                });
                self.late_bye = true; // a retransmitted 2xx needs no second BYE
                self.end(200, "BYE");
            }
        }
    }

    fn end(&mut self, code: u16, reason: &str) {
        if self.state != State::Ended {
            self.state = State::Ended;
            self.ok = None;
            self.out.push_back(LegAction::Ended {
                code,
                reason: reason.to_string(),
            });
        }
    }

    /// DTMF towards the PBX by SIP INFO (`application/dtmf-relay`), once the call is answered.
    pub fn send_info(&mut self, digit: char) {
        if self.state != State::Confirmed {
            return;
        }
        let mut info = self.dialog.request(Method::Info, self.local);
        info.headers_mut()
            .add("Content-Type", "application/dtmf-relay");
        info.body = format!("Signal={digit}\r\nDuration=160\r\n").into_bytes();
        self.out.push_back(LegAction::Send {
            req: info,
            dest: self.dialog.address,
        });
    }

    /// A request from the PBX in this dialog (or the CANCEL of its INVITE).
    pub fn on_request(&mut self, req: SipRequest) {
        match req.method {
            Method::Ack => {
                self.ok = None;
                if let Some(offer) = self.offered.take() {
                    // The answer to our offer in the 2xx of an offerless re-INVITE.
                    match SessionDescription::parse(&req.body)
                        .ok()
                        .and_then(|answer| sdp::apply_answer(&offer, &answer).ok())
                    {
                        Some(neg) => self.negotiated(&neg),
                        None => {
                            tracing::debug!(call_id = %self.dialog.call_id, "ACK without a usable answer to our offer")
                        }
                    }
                }
            }
            Method::Cancel => {
                if self.uas && self.state == State::Early {
                    let r = self.response(&self.invite, 487, "Request Terminated", false);
                    self.out.push_back(LegAction::RespondInvite(r));
                    self.end(487, "CANCEL");
                }
            }
            Method::Bye => {
                let r = self.response(&req, 200, "OK", false);
                self.out.push_back(LegAction::Respond(r));
                self.end(200, "BYE from the PBX");
            }
            Method::Invite | Method::Update => {
                // A re-INVITE (hold, a new address): answer from our side's codecs and follow
                // the PBX's new address and direction. RFC 3264 §6.1: the answer mirrors the
                // offer's direction (sendonly → recvonly, inactive → inactive), so a changed
                // answer gets a new `o=` version (§8).
                if req.body.is_empty() {
                    let offer = req.method == Method::Invite;
                    if offer {
                        // RFC 3264 §8: we offer in the 2xx, sendrecv (a PBX resumes this way
                        // too); the answer comes in the ACK.
                        let srtp = self
                            .ours
                            .media
                            .iter()
                            .any(|m| m.proto.to_ascii_uppercase().starts_with("RTP/SAVP"));
                        self.media.session_version += 1;
                        self.ours = sdp::offer(&self.prefs, &self.media, srtp);
                        self.offered = Some(self.ours.clone());
                    }
                    let r = self.response(&req, 200, "OK", offer);
                    self.out.push_back(LegAction::Respond(r));
                    return;
                }
                match SessionDescription::parse(&req.body)
                    .ok()
                    .and_then(|offer| sdp::answer(&offer, &self.prefs, &self.media).ok())
                {
                    Some((mut answer, neg)) => {
                        if answer.media != self.ours.media {
                            self.media.session_version += 1;
                            answer.origin.session_version = self.media.session_version.to_string();
                        }
                        self.ours = answer;
                        self.offered = None;
                        let r = self.response(&req, 200, "OK", true);
                        self.negotiated(&neg);
                        self.out.push_back(LegAction::Respond(r));
                    }
                    None => {
                        let r = self.response(&req, 488, "Not Acceptable Here", false);
                        self.out.push_back(LegAction::Respond(r));
                    }
                }
            }
            Method::Info => {
                let digit = info_digit(&req);
                let r = self.response(&req, 200, "OK", false);
                self.out.push_back(LegAction::Respond(r));
                if let Some(d) = digit {
                    self.out.push_back(LegAction::Dtmf(d));
                }
            }
            _ => {
                let r = self.response(&req, 200, "OK", false);
                self.out.push_back(LegAction::Respond(r));
            }
        }
    }

    /// A new offer/answer outcome: the media leg follows it, and a change of the PBX's hold
    /// is news for the Telegram side.
    fn negotiated(&mut self, neg: &NegotiatedMedia) {
        self.out.push_back(LegAction::UpdateLeg(leg_spec(neg)));
        if neg.remote_hold != self.held {
            self.held = neg.remote_hold;
            self.out.push_back(LegAction::Hold(self.held));
        }
    }

    /// UAC: a response to our INVITE (or BYE).
    pub fn on_response(&mut self, resp: SipResponse) {
        let Some((_, method)) = resp.cseq() else {
            return;
        };
        if method != Method::Invite || self.uas {
            return;
        }
        let code = resp.code;
        if (180..=183).contains(&code) && self.state == State::Early {
            self.out.push_back(LegAction::Ringing);
        } else if (200..300).contains(&code) {
            // Our dialog with the PBX: its tag, Contact, Record-Route (reversed).
            if let Some(to) = resp.header("To") {
                self.dialog.remote = to.to_string();
            }
            if let Some(c) = resp.header("Contact") {
                self.dialog.remote_target = strip_brackets(c.split(',').next().unwrap_or(c));
            }
            let mut rr: Vec<String> = resp
                .headers()
                .get_all("Record-Route")
                .map(str::to_string)
                .collect();
            rr.reverse();
            self.dialog.route_set = rr;
            let ack = self.dialog.request(Method::Ack, self.local);
            let mut ack = ack;
            // The ACK carries the INVITE's CSeq number.
            let n = self.invite.cseq().map(|c| c.0).unwrap_or(1);
            ack.headers_mut().set("CSeq", format!("{n} ACK"));
            self.out.push_back(LegAction::SendAck {
                req: ack,
                dest: self.dialog.address,
            });
            if self.state == State::Early {
                self.state = State::Confirmed;
                if let Some((_, neg)) = SessionDescription::parse(&resp.body)
                    .ok()
                    .and_then(|answer| sdp::answer(&answer, &self.prefs, &self.media).ok())
                {
                    self.held = neg.remote_hold;
                    self.out.push_back(LegAction::UpdateLeg(leg_spec(&neg)));
                }
                self.out.push_back(LegAction::Answered);
                if self.held {
                    self.out.push_back(LegAction::Hold(true));
                }
            } else if self.state == State::Ended && !self.late_bye {
                // Answered although we cancelled (or lost a hunt): ACK, then end it at once.
                self.late_bye = true;
                let bye = self.dialog.request(Method::Bye, self.local);
                self.out.push_back(LegAction::Send {
                    req: bye,
                    dest: self.dialog.address,
                });
            }
        } else if code >= 300 && self.state == State::Early {
            if auth::is_challenge(code) && !self.challenged {
                if let Some(creds) = &self.credentials {
                    match auth::authorize(&self.invite, &resp, creds) {
                        Ok(again) => {
                            tracing::debug!(call_id = %self.dialog.call_id, code, "INVITE challenged: answering");
                            self.challenged = true;
                            if let Some((n, _)) = again.cseq() {
                                self.dialog.cseq = n;
                            }
                            self.invite = again.clone();
                            self.out.push_back(LegAction::Send {
                                req: again,
                                dest: self.dialog.address,
                            });
                            return;
                        }
                        Err(e) => {
                            tracing::info!(call_id = %self.dialog.call_id, error = %e, "cannot answer the PBX's challenge")
                        }
                    }
                }
            }
            self.end(code, &resp.reason);
        }
    }

    /// When our 2xx must be resent.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.ok.as_ref().map(|(_, at, _, _)| *at)
    }

    /// Resends the 2xx (T1 doubling to T2) until the ACK; no ACK in 32 s ends the call.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some((ok, at, interval, give_up)) = self.ok.take() else {
            return;
        };
        if now < at {
            self.ok = Some((ok, at, interval, give_up));
            return;
        }
        if now >= give_up {
            let bye = self.dialog.request(Method::Bye, self.local);
            self.out.push_back(LegAction::Send {
                req: bye,
                dest: self.dialog.address,
            });
            self.end(408, "no ACK");
            return;
        }
        self.out.push_back(LegAction::RespondInvite(ok.clone()));
        let next = (interval * 2).min(Duration::from_secs(4));
        self.ok = Some((ok, now + next, next, give_up));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(direction: &str, addr: &str) -> Vec<u8> {
        format!(
            "v=0\r\no=- 7 {v} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\n\
             m=audio 4000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\n{direction}",
            v = direction.len()
        )
        .into_bytes()
    }

    fn request(method: Method, cseq: u32, body: Vec<u8>) -> SipRequest {
        let mut r = SipRequest::new(method.clone(), "sip:gw@127.0.0.1:5060".to_string());
        let h = r.headers_mut();
        h.add("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx");
        h.add("From", "<sip:pbx@127.0.0.1>;tag=p");
        h.add("To", "<sip:gw@127.0.0.1>");
        h.add("Call-ID", "hold@test");
        h.add("CSeq", format!("{cseq} {}", method.as_str()));
        h.add("Contact", "<sip:pbx@127.0.0.1:5070>");
        h.add("Content-Type", "application/sdp");
        r.body = body;
        r
    }

    fn answered_leg() -> SipLeg {
        let (mut leg, spec) = SipLeg::uas(
            request(Method::Invite, 1, offer("a=sendrecv\r\n", "127.0.0.1")),
            "127.0.0.1:5070".parse().unwrap(),
            gateway_prefs(&["PCMA".into()]),
            "127.0.0.1:30000".parse().unwrap(),
            "127.0.0.1:5060".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(spec.direction, MediaDirection::SendRecv);
        leg.answer(Instant::now());
        std::iter::from_fn(|| leg.poll_action()).for_each(drop);
        leg
    }

    /// The answer to a re-INVITE: its direction attribute, `o=` version, the leg's direction
    /// and the hold news.
    fn reinvite(
        leg: &mut SipLeg,
        cseq: u32,
        dir: &str,
        addr: &str,
    ) -> (String, String, MediaDirection, Option<bool>) {
        leg.on_request(request(Method::Invite, cseq, offer(dir, addr)));
        let acts: Vec<LegAction> = std::iter::from_fn(|| leg.poll_action()).collect();
        let mut out = (String::new(), String::new(), MediaDirection::SendRecv, None);
        for a in acts {
            match a {
                LegAction::Respond(r) => {
                    assert_eq!(r.code, 200);
                    let sd = SessionDescription::parse(&r.body).unwrap();
                    out.1 = sd.origin.session_version.clone();
                    out.0 = String::from_utf8_lossy(&r.body)
                        .lines()
                        .find(|l| {
                            ["a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"].contains(l)
                        })
                        .unwrap_or_default()
                        .to_string();
                }
                LegAction::UpdateLeg(spec) => out.2 = spec.direction,
                LegAction::Hold(h) => out.3 = Some(h),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[test]
    fn a_challenged_invite_is_answered_once() {
        let mut leg = SipLeg::uac(
            "sip:100@127.0.0.1:5070",
            "127.0.0.1:5070".parse().unwrap(),
            "+1000",
            None,
            &[],
            gateway_prefs(&["PCMA".into()]),
            "127.0.0.1:30000".parse().unwrap(),
            "127.0.0.1:5060".parse().unwrap(),
        );
        leg.set_credentials(Some(Credentials {
            login: "gw".into(),
            password: "pw".into(),
        }));
        let sent = |leg: &mut SipLeg| -> Vec<LegAction> {
            std::iter::from_fn(|| leg.poll_action()).collect()
        };
        let Some(LegAction::Send { req: first, .. }) = sent(&mut leg).pop() else {
            panic!("no INVITE")
        };
        let challenge = |req: &SipRequest| {
            let mut r = SipResponse::to(req, 401, "Unauthorized", Some("t"));
            r.headers_mut().add(
                "WWW-Authenticate",
                "Digest realm=\"pbx\", nonce=\"n1\", algorithm=MD5, qop=\"auth\"",
            );
            r
        };
        leg.on_response(challenge(&first));
        let acts = sent(&mut leg);
        let [LegAction::Send { req: again, .. }] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(again.cseq(), Some((2, Method::Invite)));
        assert_eq!(again.call_id(), first.call_id());
        assert!(again
            .header("Authorization")
            .is_some_and(|a| a.contains("username=\"gw\"")));
        assert!(!leg.is_ended());
        // A second challenge: the call fails with it.
        leg.on_response(challenge(again));
        assert!(matches!(
            sent(&mut leg).as_slice(),
            [LegAction::Ended { code: 401, .. }]
        ));
    }

    #[test]
    fn hold_and_resume_are_mirrored_and_reported() {
        let mut leg = answered_leg();
        let (dir, v1, spec, hold) = reinvite(&mut leg, 2, "a=sendonly\r\n", "127.0.0.1");
        assert_eq!(dir, "a=recvonly");
        assert_eq!(spec, MediaDirection::RecvOnly);
        assert_eq!(hold, Some(true));
        assert!(leg.is_held());
        let (dir, v2, spec, hold) = reinvite(&mut leg, 3, "a=inactive\r\n", "127.0.0.1");
        assert_eq!(dir, "a=inactive");
        assert_eq!(spec, MediaDirection::Inactive);
        assert_eq!(hold, None, "still held: no second hold news");
        assert_ne!(v1, v2, "a changed answer has a new o= version");
        // Unchanged offer (a refresh): same answer, same version.
        let (_, v3, _, hold) = reinvite(&mut leg, 4, "a=inactive\r\n", "127.0.0.1");
        assert_eq!((v3.as_str(), hold), (v2.as_str(), None));
        let (dir, _, spec, hold) = reinvite(&mut leg, 5, "a=sendrecv\r\n", "127.0.0.1");
        assert_eq!(dir, "a=sendrecv");
        assert_eq!(spec, MediaDirection::SendRecv);
        assert_eq!(hold, Some(false));
        assert!(!leg.is_held());
        // RFC 2543 hold: c=0.0.0.0.
        let (_, _, spec, hold) = reinvite(&mut leg, 6, "", "0.0.0.0");
        assert_eq!((spec, hold), (MediaDirection::RecvOnly, Some(true)));
        // Resumed by an offerless re-INVITE: we offer sendrecv in the 200, the ACK answers.
        leg.on_request(request(Method::Invite, 7, Vec::new()));
        let acts: Vec<LegAction> = std::iter::from_fn(|| leg.poll_action()).collect();
        let [LegAction::Respond(ok)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert!(String::from_utf8_lossy(&ok.body).contains("a=sendrecv"));
        let offer = SessionDescription::parse(&ok.body).unwrap();
        let (answer, _) = sdp::answer(
            &offer,
            &gateway_prefs(&["PCMA".into()]),
            &LocalMedia::new("127.0.0.1".parse().unwrap(), 4000, 7),
        )
        .unwrap();
        leg.on_request(request(Method::Ack, 7, answer.to_string().into_bytes()));
        let acts: Vec<LegAction> = std::iter::from_fn(|| leg.poll_action()).collect();
        assert!(
            matches!(
                acts.as_slice(),
                [LegAction::UpdateLeg(spec), LegAction::Hold(false)]
                    if spec.direction == MediaDirection::SendRecv
                        && spec.remote == Some("127.0.0.1:4000".parse().unwrap())
            ),
            "{acts:?}"
        );
    }
}
