//! One call through the B2BUA, sans-IO: the caller's dialog (A, we are its UAS) and the callee's
//! (B, we are its UAC), joined through two dataplane legs that relay RTP between them.
//!
//! The runtime feeds it the caller's INVITE, the routing decision and the two legs' local
//! addresses; then every request and response of either dialog. It answers with
//! [`CallAction`]s: responses to send, requests to start in client transactions, ACKs for 2xx
//! (sent outside transactions, RFC 3261 §13.2.2.4), leg updates for the dataplane, and the end.
//!
//! The media is relayed, not transcoded: B is offered exactly the codec A's offer was answered
//! with, so both legs carry the same payload. Hold and resume (re-INVITE with a direction or
//! `c=0.0.0.0`) are answered to the side that asked and mirrored to the other side.

use std::collections::VecDeque;
use std::net::SocketAddr;

use siptg_proto::LegSpec;

use super::msg::{Method, SipRequest, SipResponse};
use super::sdp::{self, AudioCodec, CodecPrefs, Direction, LocalMedia, SessionDescription};

/// Which dialog of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The caller; we are its UAS.
    A,
    /// The callee; we are its UAC.
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// What the runtime must do for the call.
#[derive(Debug, Clone, PartialEq)]
pub enum CallAction {
    /// A response to the caller's INVITE (its server transaction).
    RespondInvite(SipResponse),
    /// A response to another request `side` sent (BYE, CANCEL, re-INVITE, INFO…), matched to
    /// its server transaction by the runtime.
    Respond { side: Side, resp: SipResponse },
    /// A request to send in a new client transaction.
    Send {
        side: Side,
        req: SipRequest,
        dest: SocketAddr,
    },
    /// An ACK for a 2xx, sent directly (it has no transaction).
    SendAck {
        side: Side,
        req: SipRequest,
        dest: SocketAddr,
    },
    /// New parameters for a side's dataplane leg (remote address, codec, direction).
    UpdateLeg { side: Side, spec: LegSpec },
    /// The call is over: release its media session. `reason` is for the logs.
    Ended { reason: String },
}

/// Why a call cannot start; the caller's INVITE gets this status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}")]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

/// Where the call goes, from the Manager's routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The callee's Contact URI (the B-leg's Request-URI), brackets allowed.
    pub contact: String,
    /// Where its requests go (the address it registered from).
    pub address: SocketAddr,
}

/// One side's dialog state (RFC 3261 §12).
#[derive(Debug, Clone)]
struct Dialog {
    call_id: String,
    /// Our From/To value (with our tag).
    local: String,
    /// Theirs (with their tag once known).
    remote: String,
    remote_target: String,
    route_set: Vec<String>,
    local_cseq: u32,
    address: SocketAddr,
}

impl Dialog {
    /// A new in-dialog request (BYE, re-INVITE) from us.
    fn request(&mut self, method: Method, via_host: SocketAddr) -> SipRequest {
        self.local_cseq += 1;
        let mut req = SipRequest::new(method.clone(), strip_brackets(&self.remote_target));
        let h = req.headers_mut();
        h.add(
            "Via",
            format!("SIP/2.0/UDP {via_host};branch={};rport", branch()),
        );
        h.add("Max-Forwards", "70");
        for r in &self.route_set {
            h.add("Route", r.clone());
        }
        h.add("From", self.local.clone());
        h.add("To", self.remote.clone());
        h.add("Call-ID", self.call_id.clone());
        h.add("CSeq", format!("{} {}", self.local_cseq, method.as_str()));
        req
    }
}

/// The state of the whole call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// B's INVITE is out; nothing final yet.
    Calling,
    /// B answered and A got its 200.
    Confirmed,
    /// Over (BYE, CANCEL, or a failure).
    Ended,
}

/// One bridged call.
pub struct Call {
    state: CallState,
    local: SocketAddr,
    a: Dialog,
    b: Dialog,
    a_invite: SipRequest,
    b_invite: SipRequest,
    a_answer: SessionDescription,
    b_offer: SessionDescription,
    prefs_b: CodecPrefs,
    leg_a_media: LocalMedia,
    leg_b_media: LocalMedia,
    out: VecDeque<CallAction>,
}

fn branch() -> String {
    format!("z9hG4bK{:016x}", rand::random::<u64>())
}

fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn strip_brackets(uri: &str) -> String {
    let u = uri.trim();
    match (u.find('<'), u.find('>')) {
        (Some(a), Some(b)) if a < b => u[a + 1..b].to_string(),
        _ => u.split(';').next().unwrap_or(u).to_string(),
    }
}

fn contact_of(headers: &super::msg::Headers) -> Option<String> {
    headers.get("Contact").map(|c| {
        let first = c.split(',').next().unwrap_or(c);
        strip_brackets(first)
    })
}

fn sdp_response(
    req: &SipRequest,
    code: u16,
    reason: &str,
    tag: &str,
    local: SocketAddr,
    body: Option<&SessionDescription>,
) -> SipResponse {
    let mut resp = SipResponse::to(req, code, reason, Some(tag));
    resp.headers_mut()
        .add("Contact", format!("<sip:siptg@{local}>"));
    if let Some(sd) = body {
        resp.headers_mut().add("Content-Type", "application/sdp");
        resp.body = sd.to_string().into_bytes();
    }
    resp
}

impl Call {
    /// Starts a call from the caller's `invite` (received from `source`) to `target`. The
    /// dataplane legs already exist at `leg_a` and `leg_b`; `prefs` is the caller's
    /// connection's codec list; `local` is our SIP address. Refused with `488` when the offer
    /// has nothing we take, `400` when it cannot be read.
    pub fn start(
        invite: SipRequest,
        source: SocketAddr,
        target: &Target,
        prefs: &CodecPrefs,
        leg_a: SocketAddr,
        leg_b: SocketAddr,
        local: SocketAddr,
    ) -> Result<Call, Refusal> {
        let refuse = |code: u16, reason: &str| Refusal {
            code,
            reason: reason.to_string(),
        };
        let offer = SessionDescription::parse(&invite.body).map_err(|e| {
            let (code, reason) = e.status();
            refuse(code, reason)
        })?;
        let session_id = rand::random::<u32>() as u64;
        let leg_a_media = LocalMedia::new(leg_a.ip(), leg_a.port(), session_id);
        let (a_answer, neg_a) = sdp::answer(&offer, prefs, &leg_a_media).map_err(|e| {
            let (code, reason) = e.status();
            refuse(code, reason)
        })?;
        // B gets the codec A was answered with, so the legs relay without transcoding.
        let codec = AudioCodec::from_name(&neg_a.codec.name)
            .ok_or_else(|| refuse(488, "Not Acceptable Here"))?;
        let prefs_b = CodecPrefs::new([codec], neg_a.codec.telephone_event.is_some())
            .map_err(|_| refuse(500, "Server Internal Error"))?;
        let leg_b_media = LocalMedia::new(leg_b.ip(), leg_b.port(), session_id + 1);
        let b_offer = sdp::offer(&prefs_b, &leg_b_media, false);

        let a_tag = tag();
        let a = Dialog {
            call_id: invite.call_id().unwrap_or_default().to_string(),
            local: format!(
                "{};tag={a_tag}",
                invite.header("To").unwrap_or("<sip:siptg>")
            ),
            remote: invite.header("From").unwrap_or_default().to_string(),
            remote_target: contact_of(invite.headers()).unwrap_or_else(|| invite.uri.clone()),
            route_set: invite
                .headers()
                .get_all("Record-Route")
                .map(str::to_string)
                .collect(),
            local_cseq: 0,
            address: source,
        };
        let from_user = super::message::uri_user(invite.header("From").unwrap_or(""))
            .unwrap_or_else(|| "siptg".into());
        let to_uri = strip_brackets(&target.contact);
        let mut b = Dialog {
            call_id: format!("{:032x}@siptg", rand::random::<u128>()),
            local: format!("<sip:{from_user}@{}>;tag={}", local.ip(), tag()),
            remote: format!("<{to_uri}>"),
            remote_target: to_uri.clone(),
            route_set: Vec::new(),
            local_cseq: 0,
            address: target.address,
        };
        let mut b_invite = b.request(Method::Invite, local);
        let max_fwd = invite
            .header("Max-Forwards")
            .and_then(|m| m.trim().parse::<u32>().ok())
            .unwrap_or(70)
            .saturating_sub(1);
        if max_fwd == 0 {
            return Err(refuse(483, "Too Many Hops"));
        }
        {
            let h = b_invite.headers_mut();
            h.set("Max-Forwards", max_fwd.to_string());
            h.add("Contact", format!("<sip:{from_user}@{local}>"));
            h.add("Content-Type", "application/sdp");
        }
        b_invite.body = b_offer.to_string().into_bytes();

        let mut call = Call {
            state: CallState::Calling,
            local,
            a,
            b,
            a_invite: invite,
            b_invite: b_invite.clone(),
            a_answer,
            b_offer,
            prefs_b,
            leg_a_media,
            leg_b_media,
            out: VecDeque::new(),
        };
        call.out.push_back(CallAction::UpdateLeg {
            side: Side::A,
            spec: neg_a.to_leg_spec(true),
        });
        let dest = call.b.address;
        call.out.push_back(CallAction::Send {
            side: Side::B,
            req: b_invite,
            dest,
        });
        Ok(call)
    }

    /// The call's state.
    pub fn state(&self) -> CallState {
        self.state
    }

    /// Call-IDs of the two dialogs (the runtime's index).
    pub fn call_ids(&self) -> (&str, &str) {
        (&self.a.call_id, &self.b.call_id)
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<CallAction> {
        self.out.pop_front()
    }

    fn a_tag(&self) -> String {
        self.a
            .local
            .rsplit_once(";tag=")
            .map(|(_, t)| t.to_string())
            .unwrap_or_default()
    }

    fn end(&mut self, reason: &str) {
        if self.state != CallState::Ended {
            self.state = CallState::Ended;
            self.out.push_back(CallAction::Ended {
                reason: reason.to_string(),
            });
        }
    }

    /// A response from `side` to a request we sent it.
    pub fn on_response(&mut self, side: Side, resp: SipResponse) {
        let Some((_, method)) = resp.cseq() else {
            return;
        };
        if side == Side::B && method == Method::Invite && self.is_initial_b(&resp) {
            self.on_b_invite_response(resp);
            return;
        }
        if method == Method::Invite && (200..300).contains(&resp.code) {
            // A re-INVITE we sent was accepted: ACK it and take the new answer for that leg.
            let dialog = match side {
                Side::A => &self.a,
                Side::B => &self.b,
            };
            let mut ack = SipRequest::new(Method::Ack, strip_brackets(&dialog.remote_target));
            let h = ack.headers_mut();
            h.add(
                "Via",
                format!("SIP/2.0/UDP {};branch={};rport", self.local, branch()),
            );
            h.add("Max-Forwards", "70");
            h.add("From", dialog.local.clone());
            h.add("To", dialog.remote.clone());
            h.add("Call-ID", dialog.call_id.clone());
            h.add(
                "CSeq",
                format!("{} ACK", resp.cseq().map(|c| c.0).unwrap_or(0)),
            );
            let dest = dialog.address;
            self.out.push_back(CallAction::SendAck {
                side,
                req: ack,
                dest,
            });
            if let Ok(answer) = SessionDescription::parse(&resp.body) {
                let our = match side {
                    Side::A => sdp::offer(&self.prefs_b, &self.leg_a_media, false),
                    Side::B => self.b_offer.clone(),
                };
                if let Ok(neg) = sdp::apply_answer(&our, &answer) {
                    self.out.push_back(CallAction::UpdateLeg {
                        side,
                        spec: neg.to_leg_spec(true),
                    });
                }
            }
        }
    }

    fn is_initial_b(&self, resp: &SipResponse) -> bool {
        resp.cseq().map(|c| c.0) == self.b_invite.cseq().map(|c| c.0)
            && resp.call_id() == Some(self.b.call_id.as_str())
    }

    fn on_b_invite_response(&mut self, resp: SipResponse) {
        let tag = self.a_tag();
        match resp.code {
            100 => {}
            101..=199 => {
                if self.state != CallState::Calling {
                    return;
                }
                // Early media (183 with SDP, or 180 with SDP): take B's answer now so its
                // ringback or announcement reaches A, which gets our answer in a 183.
                let early = SessionDescription::parse(&resp.body)
                    .ok()
                    .and_then(|ans| sdp::apply_answer(&self.b_offer, &ans).ok());
                match early {
                    Some(neg) => {
                        self.out.push_back(CallAction::UpdateLeg {
                            side: Side::B,
                            spec: neg.to_leg_spec(true),
                        });
                        let progress = sdp_response(
                            &self.a_invite,
                            183,
                            "Session Progress",
                            &tag,
                            self.local,
                            Some(&self.a_answer),
                        );
                        self.out.push_back(CallAction::RespondInvite(progress));
                    }
                    None => {
                        let ringing =
                            sdp_response(&self.a_invite, 180, "Ringing", &tag, self.local, None);
                        self.out.push_back(CallAction::RespondInvite(ringing));
                    }
                }
            }
            200..=299 => {
                // Learn B's dialog from the 2xx (RFC 3261 §12.1.2) and ACK it (again, if this
                // is a retransmission).
                if let Some(to) = resp.header("To") {
                    self.b.remote = to.to_string();
                }
                if let Some(c) = contact_of(resp.headers()) {
                    self.b.remote_target = c;
                }
                self.b.route_set = resp
                    .headers()
                    .get_all("Record-Route")
                    .map(str::to_string)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let mut ack = SipRequest::new(Method::Ack, strip_brackets(&self.b.remote_target));
                {
                    let h = ack.headers_mut();
                    h.add(
                        "Via",
                        format!("SIP/2.0/UDP {};branch={};rport", self.local, branch()),
                    );
                    h.add("Max-Forwards", "70");
                    for r in &self.b.route_set {
                        h.add("Route", r.clone());
                    }
                    h.add("From", self.b.local.clone());
                    h.add("To", self.b.remote.clone());
                    h.add("Call-ID", self.b.call_id.clone());
                    h.add(
                        "CSeq",
                        format!("{} ACK", self.b_invite.cseq().map(|c| c.0).unwrap_or(1)),
                    );
                }
                let dest = self.b.address;
                self.out.push_back(CallAction::SendAck {
                    side: Side::B,
                    req: ack,
                    dest,
                });
                if self.state != CallState::Calling {
                    return;
                }
                let neg = SessionDescription::parse(&resp.body)
                    .map_err(|e| e.to_string())
                    .and_then(|ans| {
                        sdp::apply_answer(&self.b_offer, &ans).map_err(|e| e.to_string())
                    });
                match neg {
                    Ok(neg) => {
                        self.out.push_back(CallAction::UpdateLeg {
                            side: Side::B,
                            spec: neg.to_leg_spec(true),
                        });
                        let ok = sdp_response(
                            &self.a_invite,
                            200,
                            "OK",
                            &tag,
                            self.local,
                            Some(&self.a_answer),
                        );
                        self.out.push_back(CallAction::RespondInvite(ok));
                        self.state = CallState::Confirmed;
                    }
                    Err(e) => {
                        // B answered with media we cannot use: hang B up, refuse A.
                        let bye = self.b.request(Method::Bye, self.local);
                        let dest = self.b.address;
                        self.out.push_back(CallAction::Send {
                            side: Side::B,
                            req: bye,
                            dest,
                        });
                        let refused = sdp_response(
                            &self.a_invite,
                            488,
                            "Not Acceptable Here",
                            &tag,
                            self.local,
                            None,
                        );
                        self.out.push_back(CallAction::RespondInvite(refused));
                        self.end(&format!("callee's answer unusable: {e}"));
                    }
                }
            }
            code => {
                if self.state == CallState::Calling {
                    let reason = if resp.reason.is_empty() {
                        "Call Failed"
                    } else {
                        resp.reason.as_str()
                    };
                    let fail = sdp_response(&self.a_invite, code, reason, &tag, self.local, None);
                    self.out.push_back(CallAction::RespondInvite(fail));
                    self.end(&format!("callee answered {code} {reason}"));
                }
            }
        }
    }

    /// A request from `side` within the call (ACK, BYE, CANCEL, re-INVITE, INFO, …).
    pub fn on_request(&mut self, side: Side, req: SipRequest) {
        let tag = self.a_tag();
        match (&req.method, side) {
            (Method::Ack, _) => {}
            (Method::Cancel, Side::A) => {
                let ok = SipResponse::to(&req, 200, "OK", Some(&tag));
                self.out.push_back(CallAction::Respond { side, resp: ok });
                if self.state == CallState::Calling {
                    let terminated = sdp_response(
                        &self.a_invite,
                        487,
                        "Request Terminated",
                        &tag,
                        self.local,
                        None,
                    );
                    self.out.push_back(CallAction::RespondInvite(terminated));
                    let cancel = self.b_invite.cancel();
                    let dest = self.b.address;
                    self.out.push_back(CallAction::Send {
                        side: Side::B,
                        req: cancel,
                        dest,
                    });
                    self.end("caller cancelled");
                }
            }
            (Method::Bye, _) => {
                let ok = SipResponse::to(&req, 200, "OK", None);
                self.out.push_back(CallAction::Respond { side, resp: ok });
                if self.state != CallState::Ended {
                    let other = side.other();
                    let dialog = match other {
                        Side::A => &mut self.a,
                        Side::B => &mut self.b,
                    };
                    let bye = dialog.request(Method::Bye, self.local);
                    let dest = dialog.address;
                    self.out.push_back(CallAction::Send {
                        side: other,
                        req: bye,
                        dest,
                    });
                    self.end(match side {
                        Side::A => "caller hung up",
                        Side::B => "callee hung up",
                    });
                }
            }
            (Method::Invite, _) if self.state == CallState::Confirmed => {
                self.on_reinvite(side, req)
            }
            (Method::Info, _) if self.state == CallState::Confirmed => {
                // DTMF (`application/dtmf-relay`, `application/dtmf`) and other INFO bodies
                // cross to the other side as they are.
                let ok = SipResponse::to(&req, 200, "OK", None);
                self.out.push_back(CallAction::Respond { side, resp: ok });
                let other = side.other();
                let dialog = match other {
                    Side::A => &mut self.a,
                    Side::B => &mut self.b,
                };
                let mut info = dialog.request(Method::Info, self.local);
                if let Some(ct) = req.header("Content-Type") {
                    info.headers_mut().add("Content-Type", ct.to_string());
                }
                info.body = req.body.clone();
                let dest = dialog.address;
                self.out.push_back(CallAction::Send {
                    side: other,
                    req: info,
                    dest,
                });
            }
            (Method::Info | Method::Update | Method::Message | Method::Options, _) => {
                // Answered here; media changes by UPDATE are not relayed yet.
                let ok = SipResponse::to(&req, 200, "OK", None);
                self.out.push_back(CallAction::Respond { side, resp: ok });
            }
            _ => {
                let resp = SipResponse::to(&req, 481, "Call/Transaction Does Not Exist", None);
                self.out.push_back(CallAction::Respond { side, resp });
            }
        }
    }

    /// Hold/resume: answer the side that asked, mirror its direction to the other side.
    fn on_reinvite(&mut self, side: Side, req: SipRequest) {
        let offer = match SessionDescription::parse(&req.body) {
            Ok(o) => o,
            Err(e) => {
                let (code, reason) = e.status();
                let resp = SipResponse::to(&req, code, reason, None);
                self.out.push_back(CallAction::Respond { side, resp });
                return;
            }
        };
        let media = match side {
            Side::A => &mut self.leg_a_media,
            Side::B => &mut self.leg_b_media,
        };
        media.session_version += 1;
        let media = media.clone();
        match sdp::answer(&offer, &self.prefs_b, &media) {
            Ok((answer, neg)) => {
                let mut ok = SipResponse::to(&req, 200, "OK", None);
                ok.headers_mut()
                    .add("Contact", format!("<sip:siptg@{}>", self.local));
                ok.headers_mut().add("Content-Type", "application/sdp");
                ok.body = answer.to_string().into_bytes();
                self.out.push_back(CallAction::Respond { side, resp: ok });
                self.out.push_back(CallAction::UpdateLeg {
                    side,
                    spec: neg.to_leg_spec(true),
                });
                // Tell the other side: the direction the asking side wants, from our leg's view.
                let other = side.other();
                let mirrored = neg.direction.reversed();
                let other_media = match other {
                    Side::A => &mut self.leg_a_media,
                    Side::B => &mut self.leg_b_media,
                };
                other_media.session_version += 1;
                other_media.direction = mirrored;
                let other_media = other_media.clone();
                let offer = sdp::offer(&self.prefs_b, &other_media, false);
                if other == Side::B {
                    self.b_offer = offer.clone();
                }
                let dialog = match other {
                    Side::A => &mut self.a,
                    Side::B => &mut self.b,
                };
                let mut reinvite = dialog.request(Method::Invite, self.local);
                reinvite
                    .headers_mut()
                    .add("Contact", format!("<sip:siptg@{}>", self.local));
                reinvite
                    .headers_mut()
                    .add("Content-Type", "application/sdp");
                reinvite.body = offer.to_string().into_bytes();
                let dest = dialog.address;
                self.out.push_back(CallAction::Send {
                    side: other,
                    req: reinvite,
                    dest,
                });
            }
            Err(e) => {
                let (code, reason) = e.status();
                let resp = SipResponse::to(&req, code, reason, None);
                self.out.push_back(CallAction::Respond { side, resp });
            }
        }
    }

    /// The direction we last offered `side` (for tests and status).
    pub fn offered_direction(&self, side: Side) -> Direction {
        match side {
            Side::A => self.leg_a_media.direction,
            Side::B => self.leg_b_media.direction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::msg::{parse_datagram, SipMessage};

    const A: &str = "127.0.0.1:5070";
    const B: &str = "127.0.0.1:5080";
    const US: &str = "127.0.0.1:5060";

    fn invite_from_a() -> SipRequest {
        let sdp = "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";
        let msg = format!("INVITE sip:bob@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {A};branch=z9hG4bKa1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@127.0.0.1>;tag=atag\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: call-a\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{A}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len());
        match parse_datagram(msg.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    fn start() -> (Call, Vec<CallAction>) {
        let prefs = CodecPrefs::default();
        let mut call = Call::start(
            invite_from_a(),
            A.parse().unwrap(),
            &Target {
                contact: format!("<sip:bob@{B}>"),
                address: B.parse().unwrap(),
            },
            &prefs,
            "127.0.0.1:30000".parse().unwrap(),
            "127.0.0.1:30002".parse().unwrap(),
            US.parse().unwrap(),
        )
        .unwrap();
        let acts = std::iter::from_fn(|| call.poll_action()).collect();
        (call, acts)
    }

    fn b_invite(acts: &[CallAction]) -> SipRequest {
        acts.iter()
            .find_map(|a| match a {
                CallAction::Send {
                    side: Side::B, req, ..
                } if req.method == Method::Invite => Some(req.clone()),
                _ => None,
            })
            .expect("an INVITE to B")
    }

    fn answer_from_b(inv: &SipRequest, code: u16) -> SipResponse {
        let mut r = SipResponse::to(
            inv,
            code,
            if code == 200 { "OK" } else { "Ringing" },
            Some("btag"),
        );
        r.headers_mut().add("Contact", format!("<sip:bob@{B}>"));
        if code == 200 {
            let offer = SessionDescription::parse(&inv.body).unwrap();
            let (ans, _) = sdp::answer(
                &offer,
                &CodecPrefs::default(),
                &LocalMedia::new("127.0.0.1".parse().unwrap(), 41000, 7),
            )
            .unwrap();
            r.headers_mut().add("Content-Type", "application/sdp");
            r.body = ans.to_string().into_bytes();
        }
        r
    }

    #[test]
    fn a_call_rings_answers_and_ends_with_bye_from_the_callee() {
        let (mut call, acts) = start();
        assert!(matches!(
            acts[0],
            CallAction::UpdateLeg { side: Side::A, .. }
        ));
        let inv = b_invite(&acts);
        assert_eq!(inv.uri, format!("sip:bob@{B}"));
        let offer = String::from_utf8(inv.body.clone()).unwrap();
        // B is offered the codec A's offer was answered with (PCMA first in our list) only.
        assert!(offer.contains("RTP/AVP 8 101"), "{offer}");
        assert!(offer.contains("c=IN IP4 127.0.0.1") && offer.contains("m=audio 30002"));

        call.on_response(Side::B, answer_from_b(&inv, 180));
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(matches!(&acts[0], CallAction::RespondInvite(r) if r.code == 180));

        call.on_response(Side::B, answer_from_b(&inv, 200));
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(
            matches!(&acts[0], CallAction::SendAck { side: Side::B, req, .. } if req.method == Method::Ack && req.header("To").unwrap().contains("btag"))
        );
        assert!(
            matches!(&acts[1], CallAction::UpdateLeg { side: Side::B, spec } if spec.remote == Some("127.0.0.1:41000".parse().unwrap()))
        );
        let CallAction::RespondInvite(ok) = &acts[2] else {
            panic!("{acts:?}")
        };
        assert_eq!(ok.code, 200);
        assert!(String::from_utf8_lossy(&ok.body).contains("m=audio 30000 RTP/AVP 8"));
        assert_eq!(call.state(), CallState::Confirmed);

        // The callee hangs up: 200 to B, BYE to A in A's dialog (our tag as From), call ended.
        let mut bye = SipRequest::new(Method::Bye, format!("sip:bob@{US}"));
        for (n, v) in [
            ("Via", format!("SIP/2.0/UDP {B};branch=z9hG4bKb2")),
            ("From", "<sip:bob@127.0.0.1>;tag=btag".into()),
            ("To", ok.header("From").unwrap_or_default().to_string()),
            ("Call-ID", inv.call_id().unwrap().to_string()),
            ("CSeq", "2 BYE".into()),
        ] {
            bye.headers_mut().add(n, v);
        }
        call.on_request(Side::B, bye);
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(
            matches!(&acts[0], CallAction::Respond { side: Side::B, resp } if resp.code == 200)
        );
        let CallAction::Send {
            side: Side::A,
            req,
            dest,
        } = &acts[1]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(req.method, Method::Bye);
        assert_eq!(req.uri, format!("sip:alice@{A}"));
        assert_eq!(*dest, A.parse().unwrap());
        assert_eq!(req.header("Call-ID"), Some("call-a"));
        assert!(req.header("To").unwrap().contains("atag"));
        assert!(matches!(&acts[2], CallAction::Ended { .. }));
    }

    #[test]
    fn early_media_from_the_callee_reaches_the_caller_in_a_183() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        let mut progress = answer_from_b(&inv, 200);
        progress.code = 183;
        progress.reason = "Session Progress".into();
        call.on_response(Side::B, progress);
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(
            matches!(&acts[0], CallAction::UpdateLeg { side: Side::B, spec } if spec.remote == Some("127.0.0.1:41000".parse().unwrap()))
        );
        let CallAction::RespondInvite(r) = &acts[1] else {
            panic!("{acts:?}")
        };
        assert_eq!((r.code, r.reason.as_str()), (183, "Session Progress"));
        assert!(String::from_utf8_lossy(&r.body).contains("m=audio 30000"));
        // The 200 still completes the call.
        call.on_response(Side::B, answer_from_b(&inv, 200));
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(acts
            .iter()
            .any(|a| matches!(a, CallAction::RespondInvite(r) if r.code == 200)));
        assert_eq!(call.state(), CallState::Confirmed);
    }

    #[test]
    fn info_dtmf_is_relayed_to_the_other_side() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        call.on_response(Side::B, answer_from_b(&inv, 200));
        while call.poll_action().is_some() {}
        let mut info = SipRequest::new(Method::Info, format!("sip:bob@{US}"));
        for (n, v) in [
            ("Via", format!("SIP/2.0/UDP {A};branch=z9hG4bKi1")),
            ("From", "<sip:alice@127.0.0.1>;tag=atag".to_string()),
            ("To", "<sip:bob@127.0.0.1>;tag=x".to_string()),
            ("Call-ID", "call-a".to_string()),
            ("CSeq", "2 INFO".to_string()),
            ("Content-Type", "application/dtmf-relay".to_string()),
        ] {
            info.headers_mut().add(n, v);
        }
        info.body = b"Signal=5\r\nDuration=160\r\n".to_vec();
        call.on_request(Side::A, info);
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(
            matches!(&acts[0], CallAction::Respond { side: Side::A, resp } if resp.code == 200)
        );
        let CallAction::Send {
            side: Side::B,
            req,
            dest,
        } = &acts[1]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(req.method, Method::Info);
        assert_eq!(req.header("Content-Type"), Some("application/dtmf-relay"));
        assert_eq!(req.body, b"Signal=5\r\nDuration=160\r\n");
        assert_eq!(req.call_id(), inv.call_id());
        assert_eq!(*dest, B.parse().unwrap());
    }

    #[test]
    fn cancel_before_answer_gives_487_and_cancels_the_callee() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        let a_inv = invite_from_a();
        let mut cancel = a_inv.cancel();
        cancel
            .headers_mut()
            .set("Via", a_inv.header("Via").unwrap().to_string());
        call.on_request(Side::A, cancel);
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(
            matches!(&acts[0], CallAction::Respond { side: Side::A, resp } if resp.code == 200)
        );
        assert!(
            matches!(&acts[1], CallAction::RespondInvite(r) if r.code == 487 && r.reason == "Request Terminated")
        );
        assert!(
            matches!(&acts[2], CallAction::Send { side: Side::B, req, .. } if req.method == Method::Cancel && req.top_via_branch() == inv.top_via_branch())
        );
        assert!(matches!(&acts[3], CallAction::Ended { .. }));
    }

    #[test]
    fn a_busy_callee_is_relayed_to_the_caller() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        let busy = SipResponse::to(&inv, 486, "Busy Here", Some("btag"));
        call.on_response(Side::B, busy);
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(
            matches!(&acts[0], CallAction::RespondInvite(r) if r.code == 486 && r.reason == "Busy Here")
        );
        assert!(matches!(&acts[1], CallAction::Ended { .. }));
    }

    #[test]
    fn hold_from_the_caller_is_answered_and_mirrored_to_the_callee() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        call.on_response(Side::B, answer_from_b(&inv, 200));
        while call.poll_action().is_some() {}
        let mut reinvite = invite_from_a();
        reinvite.headers_mut().set("CSeq", "2 INVITE");
        reinvite.body = String::from_utf8(reinvite.body.clone())
            .unwrap()
            .replace("a=sendrecv", "a=sendonly")
            .into_bytes();
        call.on_request(Side::A, reinvite);
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        let CallAction::Respond {
            side: Side::A,
            resp,
        } = &acts[0]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(resp.code, 200);
        assert!(String::from_utf8_lossy(&resp.body).contains("a=recvonly"));
        assert!(matches!(
            &acts[1],
            CallAction::UpdateLeg { side: Side::A, .. }
        ));
        let CallAction::Send {
            side: Side::B, req, ..
        } = &acts[2]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(req.method, Method::Invite);
        assert!(
            String::from_utf8_lossy(&req.body).contains("a=sendonly"),
            "{}",
            String::from_utf8_lossy(&req.body)
        );
        assert_eq!(call.offered_direction(Side::B), Direction::SendOnly);
    }

    #[test]
    fn an_offer_without_a_common_codec_is_refused_with_488() {
        let mut inv = invite_from_a();
        inv.body = String::from_utf8(inv.body.clone())
            .unwrap()
            .replace("RTP/AVP 0 8 101", "RTP/AVP 18")
            .into_bytes();
        let err = Call::start(
            inv,
            A.parse().unwrap(),
            &Target {
                contact: "<sip:b@h>".into(),
                address: B.parse().unwrap(),
            },
            &CodecPrefs::default(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
            US.parse().unwrap(),
        )
        .err()
        .unwrap();
        assert_eq!(
            (err.code, err.reason.as_str()),
            (488, "Not Acceptable Here")
        );
    }
}
