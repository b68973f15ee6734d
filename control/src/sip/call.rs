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
//! `c=0.0.0.0`) are answered to the side that asked and mirrored to the other side; so is an
//! UPDATE (RFC 3311) with a changed offer.
//!
//! Reliable provisionals (RFC 3262): when the caller's INVITE has `Require: 100rel`, every 180/183
//! it gets carries `Require: 100rel` and an `RSeq`, is retransmitted (T1, doubling) until its PRACK
//! and, without one for 64×T1, the call fails with `504` and the callee is cancelled. A caller that
//! only lists 100rel in `Supported` gets ordinary provisionals (RFC 3262 leaves it to the UAS, and
//! unreliable ones cannot hold up a call). A callee's reliable provisional is PRACKed.
//!
//! Session timers (RFC 4028) run per side: the interval and refresher are negotiated from the
//! caller's `Session-Expires`/`Min-SE` (`422` below our minimum) and from the callee's 2xx. When we
//! refresh we send UPDATE where the peer allows it, else a re-INVITE, at half the interval; when
//! the peer refreshes and the interval passes without one, both sides get a BYE.
//!
//! Time comes in as `now` arguments ([`Call::poll_timeout`], [`Call::handle_timeout`]): the call
//! keeps no clock of its own, so tests drive it with a fake one.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
    /// Headers the refusal must carry (`Min-SE` with a 422).
    pub headers: Vec<(String, String)>,
}

/// Timing settings of calls: the reliable-provisional timer base and the session timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallConfig {
    /// RFC 3261 T1: first retransmission interval of a reliable provisional; a PRACK is awaited
    /// for 64×T1.
    pub t1: Duration,
    /// The session interval we grant a caller that supports timers but asked for none, and the
    /// longest we accept (a longer request is lowered to it, RFC 4028 §9).
    pub session_expires: Duration,
    /// The shortest session interval we accept (`Min-SE`); shorter requests get `422`. RFC 4028
    /// forbids less than 90 s.
    pub min_se: Duration,
}

impl Default for CallConfig {
    /// T1 500 ms, 30 minutes, 90 s (RFC 4028's recommended and minimum values).
    fn default() -> Self {
        CallConfig {
            t1: Duration::from_millis(500),
            session_expires: Duration::from_secs(1800),
            min_se: Duration::from_secs(90),
        }
    }
}

/// The methods we accept inside a call, advertised in `Allow`.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK, MESSAGE";

/// The extensions we implement, advertised in `Supported`.
pub const SUPPORTED: &str = "100rel, timer";

/// Whether a header (`Require`, `Supported`, `Allow`…) lists `option`, case-insensitively.
pub fn lists(headers: &super::msg::Headers, name: &str, option: &str) -> bool {
    headers
        .get_all(name)
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case(option))
}

/// Who refreshes a session (RFC 4028): the UAC or the UAS of the transaction that set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresher {
    Uac,
    Uas,
}

/// A `Session-Expires` value: seconds and the refresher, if named.
fn parse_session_expires(v: &str) -> Option<(u64, Option<Refresher>)> {
    let mut parts = v.split(';');
    let secs = parts.next()?.trim().parse::<u64>().ok()?;
    let refresher = parts.find_map(|p| {
        let (n, v) = p.split_once('=')?;
        if !n.trim().eq_ignore_ascii_case("refresher") {
            return None;
        }
        match v.trim().to_ascii_lowercase().as_str() {
            "uac" => Some(Refresher::Uac),
            "uas" => Some(Refresher::Uas),
            _ => None,
        }
    });
    Some((secs, refresher))
}

fn parse_min_se(v: &str) -> Option<u64> {
    v.split(';').next()?.trim().parse().ok()
}

/// One side's session timer (RFC 4028 §10).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SessionTimer {
    interval: Duration,
    /// We refresh (else the peer does and we only watch).
    we_refresh: bool,
    /// When something is due: our refresh, or the expiry; `None` until the call is confirmed.
    deadline: Option<Instant>,
    /// Our refresh went out and is unanswered; the deadline is now the expiry.
    refresh_sent: bool,
}

impl SessionTimer {
    fn new(secs: u64, we_refresh: bool) -> Self {
        SessionTimer {
            interval: Duration::from_secs(secs),
            we_refresh,
            deadline: None,
            refresh_sent: false,
        }
    }

    /// How long before the end of the interval a silent session is torn down (§10).
    fn grace(&self) -> Duration {
        (self.interval / 3).min(Duration::from_secs(32))
    }

    /// The session was (re)freshed at `now`.
    fn restart(&mut self, now: Instant) {
        self.refresh_sent = false;
        self.deadline = Some(if self.we_refresh {
            now + self.interval / 2
        } else {
            now + self.interval - self.grace()
        });
    }

    /// `Session-Expires` for a message about this timer, `uac_refreshes` saying whether the
    /// refresher is the UAC of that transaction.
    fn header(&self, uac_refreshes: bool) -> String {
        format!(
            "{};refresher={}",
            self.interval.as_secs(),
            if uac_refreshes { "uac" } else { "uas" }
        )
    }
}

/// Our reliable provisional to the caller that awaits its PRACK.
#[derive(Debug, Clone)]
struct Unacked {
    resp: SipResponse,
    rseq: u32,
    has_sdp: bool,
    next: Instant,
    interval: Duration,
    give_up: Instant,
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
    config: CallConfig,
    /// The caller required reliable provisionals (RFC 3262).
    a_100rel: bool,
    /// The last `RSeq` we used towards the caller.
    a_rseq: u32,
    a_unacked: Option<Unacked>,
    /// Provisionals waiting for the unacknowledged one's PRACK (one at a time, §3).
    a_queued: VecDeque<SipResponse>,
    /// Our 2xx to the caller, held until the reliable provisional with our answer is PRACKed.
    a_held_ok: Option<SipResponse>,
    /// Our answer already reached the caller in a reliable provisional.
    a_answer_reliable: bool,
    /// The callee answered 2xx (its dialog is confirmed, whatever the caller's state).
    b_answered: bool,
    /// The callee's last reliable provisional we PRACKed.
    b_last_rseq: Option<u32>,
    /// Session timers of A and B (RFC 4028), when negotiated.
    timers: [Option<SessionTimer>; 2],
    /// Whether each side lists UPDATE in `Allow` (refreshes use it then).
    allows_update: [bool; 2],
    /// The CSeq of our outstanding session refresh per side.
    refresh_cseq: [Option<u32>; 2],
    /// Each side's last SDP body: an offer identical to it (same origin version, same media)
    /// is a session refresh, answered without disturbing the other side.
    peer_sdp: [Option<Vec<u8>>; 2],
}

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

/// A fresh RFC 3261 branch (`z9hG4bK` + random).
pub(crate) fn branch() -> String {
    format!("z9hG4bK{:016x}", rand::random::<u64>())
}

/// A fresh From/To tag.
pub(crate) fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The URI inside `<…>` (or before the first `;`).
pub(crate) fn strip_brackets(uri: &str) -> String {
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
    if (101..300).contains(&code) {
        resp.headers_mut().add("Allow", ALLOW);
        resp.headers_mut().add("Supported", SUPPORTED);
    }
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
    /// has nothing we take, `400` when it cannot be read, `422` (with our `Min-SE`) when its
    /// session interval is below `config.min_se`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        invite: SipRequest,
        source: SocketAddr,
        target: &Target,
        prefs: &CodecPrefs,
        leg_a: SocketAddr,
        leg_b: SocketAddr,
        local: SocketAddr,
        config: &CallConfig,
    ) -> Result<Call, Refusal> {
        let refuse = |code: u16, reason: &str| Refusal {
            code,
            reason: reason.to_string(),
            headers: Vec::new(),
        };
        // Session timer of the caller's side (RFC 4028 §9).
        let min_se = config.min_se.as_secs().max(90);
        let requested = invite
            .header("Session-Expires")
            .and_then(parse_session_expires);
        let their_min = invite.header("Min-SE").and_then(parse_min_se).unwrap_or(0);
        let a_timers = lists(invite.headers(), "Supported", "timer")
            || lists(invite.headers(), "Require", "timer");
        let a_timer = match requested {
            Some((secs, _)) if secs < min_se => {
                return Err(Refusal {
                    code: 422,
                    reason: "Session Interval Too Small".into(),
                    headers: vec![("Min-SE".into(), min_se.to_string())],
                });
            }
            Some((secs, refresher)) => {
                // We may lower a long interval to ours, never below either Min-SE.
                let secs = secs
                    .min(config.session_expires.as_secs())
                    .max(min_se)
                    .max(their_min);
                let we_refresh = match refresher {
                    Some(Refresher::Uac) => false,
                    Some(Refresher::Uas) => true,
                    // Ours to choose: the caller if it does timers, else us.
                    None => !a_timers,
                };
                Some(SessionTimer::new(secs, we_refresh))
            }
            None if a_timers => Some(SessionTimer::new(
                config.session_expires.as_secs().max(min_se).max(their_min),
                false,
            )),
            None => None,
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
            h.add("Allow", ALLOW);
            h.add("Supported", SUPPORTED);
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
            config: *config,
            a_100rel: false,
            a_rseq: rand::random::<u32>() % 0x7fff_0000 + 1,
            a_unacked: None,
            a_queued: VecDeque::new(),
            a_held_ok: None,
            a_answer_reliable: false,
            b_answered: false,
            b_last_rseq: None,
            timers: [a_timer, None],
            allows_update: [false, false],
            refresh_cseq: [None, None],
            peer_sdp: [None, None],
        };
        call.peer_sdp[0] = Some(call.a_invite.body.clone());
        call.a_100rel = lists(call.a_invite.headers(), "Require", "100rel");
        call.allows_update[0] = lists(call.a_invite.headers(), "Allow", "UPDATE");
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

    /// When the call next needs [`Call::handle_timeout`]: a reliable provisional's
    /// retransmission or PRACK deadline, a session refresh or expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == CallState::Ended {
            return None;
        }
        let unacked = self.a_unacked.as_ref().map(|u| u.next.min(u.give_up));
        let timers = self.timers.iter().flatten().filter_map(|t| t.deadline);
        unacked.into_iter().chain(timers).min()
    }

    /// Runs what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == CallState::Ended {
            return;
        }
        if let Some(u) = &mut self.a_unacked {
            if now >= u.give_up {
                self.prack_timeout();
                return;
            }
            if now >= u.next {
                // RFC 3262 §3: T1, doubling, until the PRACK.
                self.out
                    .push_back(CallAction::RespondInvite(u.resp.clone()));
                u.interval *= 2;
                u.next = now + u.interval;
            }
        }
        for side in [Side::A, Side::B] {
            let Some(timer) = self.timers[idx(side)].as_mut() else {
                continue;
            };
            if timer.deadline.is_none_or(|d| now < d) {
                continue;
            }
            if timer.we_refresh && !timer.refresh_sent {
                timer.refresh_sent = true;
                timer.deadline = Some(now + timer.interval / 2 - timer.grace());
                self.send_refresh(side);
            } else {
                let who = match side {
                    Side::A => "caller",
                    Side::B => "callee",
                };
                self.hang_up_both(&format!("session timer of the {who} expired"));
                return;
            }
        }
    }

    /// No PRACK for 64×T1: the caller's INVITE fails with a 5xx (RFC 3262 §3) and the callee's
    /// INVITE is cancelled (or its answered dialog ended).
    fn prack_timeout(&mut self) {
        self.a_unacked = None;
        self.a_queued.clear();
        self.a_held_ok = None;
        let tag = self.a_tag();
        let fail = sdp_response(
            &self.a_invite,
            504,
            "Server Time-out",
            &tag,
            self.local,
            None,
        );
        self.out.push_back(CallAction::RespondInvite(fail));
        self.abandon_b();
        self.end("no PRACK from the caller");
    }

    /// Drops the callee's side before the caller got a 2xx: BYE when it answered, else CANCEL.
    fn abandon_b(&mut self) {
        let dest = self.b.address;
        let req = if self.b_answered {
            self.b.request(Method::Bye, self.local)
        } else {
            self.b_invite.cancel()
        };
        self.out.push_back(CallAction::Send {
            side: Side::B,
            req,
            dest,
        });
    }

    /// BYE to both confirmed dialogs, and the end.
    fn hang_up_both(&mut self, reason: &str) {
        for side in [Side::A, Side::B] {
            let dialog = match side {
                Side::A => &mut self.a,
                Side::B => &mut self.b,
            };
            let bye = dialog.request(Method::Bye, self.local);
            let dest = dialog.address;
            self.out.push_back(CallAction::Send {
                side,
                req: bye,
                dest,
            });
        }
        self.end(reason);
    }

    /// Our session refresh to `side` (RFC 4028 §7.4/§10): UPDATE without a body when the peer
    /// allows it, else a re-INVITE offering the media it already has.
    fn send_refresh(&mut self, side: Side) {
        let i = idx(side);
        let Some(timer) = &self.timers[i] else {
            return;
        };
        let se = timer.header(true);
        let method = if self.allows_update[i] {
            Method::Update
        } else {
            Method::Invite
        };
        let offer = (method == Method::Invite).then(|| {
            let media = match side {
                Side::A => &self.leg_a_media,
                Side::B => &self.leg_b_media,
            };
            sdp::offer(&self.prefs_b, media, false)
        });
        if let (Some(o), Side::B) = (&offer, side) {
            self.b_offer = o.clone();
        }
        let dialog = match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        };
        let mut req = dialog.request(method, self.local);
        let h = req.headers_mut();
        h.add("Contact", format!("<sip:siptg@{}>", self.local));
        h.add("Session-Expires", se);
        h.add("Supported", SUPPORTED);
        if let Some(o) = offer {
            h.add("Content-Type", "application/sdp");
            req.body = o.to_string().into_bytes();
        }
        self.refresh_cseq[i] = Some(dialog.local_cseq);
        let dest = dialog.address;
        self.out.push_back(CallAction::Send { side, req, dest });
    }

    /// A provisional to the caller: as it is, or reliably when the caller required 100rel
    /// (`Require: 100rel`, the next `RSeq`, retransmitted until PRACKed). One reliable
    /// provisional is outstanding at a time (RFC 3262 §3); later ones wait their turn.
    fn provisional_to_a(&mut self, now: Instant, mut resp: SipResponse) {
        if !self.a_100rel {
            self.out.push_back(CallAction::RespondInvite(resp));
            return;
        }
        if self.a_unacked.is_some() {
            if self.a_queued.len() >= 8 {
                self.a_queued.pop_front();
            }
            self.a_queued.push_back(resp);
            return;
        }
        if self.a_answer_reliable {
            // The caller has our answer: later provisionals must not carry another.
            resp.body.clear();
            resp.headers_mut().remove("Content-Type");
        }
        self.a_rseq = self.a_rseq.wrapping_add(1);
        resp.headers_mut().add("Require", "100rel");
        resp.headers_mut().add("RSeq", self.a_rseq.to_string());
        let has_sdp = !resp.body.is_empty();
        self.a_answer_reliable |= has_sdp;
        self.out.push_back(CallAction::RespondInvite(resp.clone()));
        let t1 = self.config.t1;
        self.a_unacked = Some(Unacked {
            resp,
            rseq: self.a_rseq,
            has_sdp,
            next: now + t1,
            interval: t1,
            give_up: now + t1 * 64,
        });
    }

    /// The caller's 2xx, with our session-timer terms. Held while the reliable provisional
    /// that carried our answer awaits its PRACK (RFC 3262 §3); sending it ends the
    /// retransmission of reliable provisionals.
    fn ok_to_a(&mut self, now: Instant, mut ok: SipResponse) {
        if self.a_unacked.as_ref().is_some_and(|u| u.has_sdp) {
            self.a_held_ok = Some(ok);
            return;
        }
        self.a_unacked = None;
        self.a_queued.clear();
        if let Some(timer) = &mut self.timers[0] {
            // refresher=uac: the caller refreshes; it supports timers, so we require them.
            ok.headers_mut()
                .add("Session-Expires", timer.header(!timer.we_refresh));
            if !timer.we_refresh {
                ok.headers_mut().add("Require", "timer");
            }
            timer.restart(now);
        }
        self.out.push_back(CallAction::RespondInvite(ok));
        self.state = CallState::Confirmed;
    }

    /// A final failure to the caller's INVITE; nothing reliable is pending any more.
    fn final_to_a(&mut self, resp: SipResponse) {
        self.a_unacked = None;
        self.a_queued.clear();
        self.a_held_ok = None;
        self.out.push_back(CallAction::RespondInvite(resp));
    }

    /// A response from `side` to a request we sent it.
    pub fn on_response(&mut self, now: Instant, side: Side, resp: SipResponse) {
        let Some((cseq, method)) = resp.cseq() else {
            return;
        };
        let i = idx(side);
        if matches!(method, Method::Invite | Method::Update)
            && self.refresh_cseq[i] == Some(cseq)
            && resp.code >= 200
        {
            self.refresh_cseq[i] = None;
            match resp.code {
                200..=299 => {
                    if let Some(timer) = &mut self.timers[i] {
                        if let Some((secs, r)) = resp
                            .header("Session-Expires")
                            .and_then(parse_session_expires)
                        {
                            timer.interval = Duration::from_secs(secs.max(90));
                            timer.we_refresh = r != Some(Refresher::Uas);
                        }
                        timer.restart(now);
                    }
                }
                // RFC 4028 §10: a refresh that times out or finds no dialog ends the session.
                408 | 481 => {
                    self.hang_up_both(&format!("session refresh answered {}", resp.code));
                    return;
                }
                _ => {}
            }
        }
        if side == Side::B && method == Method::Invite && self.is_initial_b(&resp) {
            self.on_b_invite_response(now, resp);
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

    fn on_b_invite_response(&mut self, now: Instant, resp: SipResponse) {
        let tag = self.a_tag();
        match resp.code {
            100 => {}
            101..=199 => {
                if self.state != CallState::Calling || self.b_answered {
                    return;
                }
                if lists(resp.headers(), "Require", "100rel") {
                    // A reliable provisional (RFC 3262 §4): PRACK it in its early dialog, once.
                    let Some(rseq) = resp
                        .header("RSeq")
                        .and_then(|v| v.trim().parse::<u32>().ok())
                    else {
                        return; // no RSeq: not a valid reliable provisional
                    };
                    if self.b_last_rseq.is_some_and(|last| rseq <= last) {
                        return; // a retransmission, already PRACKed and relayed
                    }
                    self.b_last_rseq = Some(rseq);
                    self.learn_b_dialog(&resp);
                    let invite_cseq = self.b_invite.cseq().map(|c| c.0).unwrap_or(1);
                    let mut prack = self.b.request(Method::Prack, self.local);
                    prack
                        .headers_mut()
                        .add("RAck", format!("{rseq} {invite_cseq} INVITE"));
                    let dest = self.b.address;
                    self.out.push_back(CallAction::Send {
                        side: Side::B,
                        req: prack,
                        dest,
                    });
                }
                // Early media (183 with SDP, or 180 with SDP): take B's answer now so its
                // ringback or announcement reaches A, which gets our answer in a 183.
                let early = SessionDescription::parse(&resp.body)
                    .ok()
                    .and_then(|ans| sdp::apply_answer(&self.b_offer, &ans).ok());
                match early {
                    Some(neg) => {
                        self.peer_sdp[1] = Some(resp.body.clone());
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
                        self.provisional_to_a(now, progress);
                    }
                    None => {
                        let ringing =
                            sdp_response(&self.a_invite, 180, "Ringing", &tag, self.local, None);
                        self.provisional_to_a(now, ringing);
                    }
                }
            }
            200..=299 => {
                // Learn B's dialog from the 2xx (RFC 3261 §12.1.2) and ACK it (again, if this
                // is a retransmission).
                self.learn_b_dialog(&resp);
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
                if self.state != CallState::Calling || self.b_answered {
                    return;
                }
                self.b_answered = true;
                self.allows_update[1] = lists(resp.headers(), "Allow", "UPDATE");
                // The callee's session timer, if it set one: refresher=uac means us.
                if let Some((secs, r)) = resp
                    .header("Session-Expires")
                    .and_then(parse_session_expires)
                {
                    let mut timer = SessionTimer::new(secs.max(90), r == Some(Refresher::Uac));
                    timer.restart(now);
                    self.timers[1] = Some(timer);
                }
                let neg = SessionDescription::parse(&resp.body)
                    .map_err(|e| e.to_string())
                    .and_then(|ans| {
                        sdp::apply_answer(&self.b_offer, &ans).map_err(|e| e.to_string())
                    });
                match neg {
                    Ok(neg) => {
                        self.peer_sdp[1] = Some(resp.body.clone());
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
                        self.ok_to_a(now, ok);
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
                        self.final_to_a(refused);
                        self.end(&format!("callee's answer unusable: {e}"));
                    }
                }
            }
            code => {
                if self.state == CallState::Calling && !self.b_answered {
                    let reason = if resp.reason.is_empty() {
                        "Call Failed"
                    } else {
                        resp.reason.as_str()
                    };
                    let fail = sdp_response(&self.a_invite, code, reason, &tag, self.local, None);
                    self.final_to_a(fail);
                    self.end(&format!("callee answered {code} {reason}"));
                }
            }
        }
    }

    /// B's dialog from a response that establishes it (a 2xx, or a reliable provisional's
    /// early dialog): its tag, target and route set (RFC 3261 §12.1.2).
    fn learn_b_dialog(&mut self, resp: &SipResponse) {
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
    }

    /// A request from `side` within the call (ACK, BYE, CANCEL, PRACK, re-INVITE, UPDATE,
    /// INFO, …).
    pub fn on_request(&mut self, now: Instant, side: Side, req: SipRequest) {
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
                    self.final_to_a(terminated);
                    self.abandon_b();
                    self.end("caller cancelled");
                }
            }
            (Method::Prack, Side::A) => self.on_prack(now, req),
            (Method::Bye, _) => {
                let ok = SipResponse::to(&req, 200, "OK", None);
                self.out.push_back(CallAction::Respond { side, resp: ok });
                if self.state == CallState::Calling && side == Side::B {
                    // The callee hung up while the caller still waits for its 2xx (a PRACK).
                    let gone = sdp_response(
                        &self.a_invite,
                        480,
                        "Temporarily Unavailable",
                        &tag,
                        self.local,
                        None,
                    );
                    self.final_to_a(gone);
                    self.end("callee hung up before the caller was answered");
                } else if self.state != CallState::Ended {
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
                self.on_reinvite(now, side, req)
            }
            (Method::Update, _) if self.state == CallState::Confirmed && !req.body.is_empty() => {
                // RFC 3311: an offer in UPDATE is answered and mirrored like a re-INVITE's.
                self.on_reinvite(now, side, req)
            }
            (Method::Update, _) if !req.body.is_empty() => {
                // An early offer while the initial offer/answer is still ours to finish.
                let resp = SipResponse::to(&req, 491, "Request Pending", None);
                self.out.push_back(CallAction::Respond { side, resp });
            }
            (Method::Update, _) => {
                // Without a body: a session refresh (RFC 4028) or a no-op.
                let resp = if self.state == CallState::Confirmed {
                    match self.accept_refresh(now, side, &req) {
                        Ok(headers) => {
                            let mut ok = SipResponse::to(&req, 200, "OK", None);
                            for (n, v) in headers {
                                ok.headers_mut().add(&n, v);
                            }
                            ok
                        }
                        Err(too_small) => too_small,
                    }
                } else {
                    SipResponse::to(&req, 200, "OK", None)
                };
                self.out.push_back(CallAction::Respond { side, resp });
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
            (Method::Info | Method::Message | Method::Options, _) => {
                let ok = SipResponse::to(&req, 200, "OK", None);
                self.out.push_back(CallAction::Respond { side, resp: ok });
            }
            _ => {
                let resp = SipResponse::to(&req, 481, "Call/Transaction Does Not Exist", None);
                self.out.push_back(CallAction::Respond { side, resp });
            }
        }
    }

    /// The caller's PRACK: `200` when its `RAck` names our outstanding reliable provisional
    /// (then the held 2xx or the next provisional goes out), else `481` (RFC 3262 §3).
    fn on_prack(&mut self, now: Instant, req: SipRequest) {
        let rack = req.header("RAck").and_then(|v| {
            let mut it = v.split_whitespace();
            let rseq = it.next()?.parse::<u32>().ok()?;
            let cseq = it.next()?.parse::<u32>().ok()?;
            Some((rseq, cseq, Method::from_token(it.next()?)))
        });
        let invite_cseq = self.a_invite.cseq().map(|c| c.0);
        let matches = match (&self.a_unacked, rack) {
            (Some(u), Some((rseq, cseq, method))) => {
                u.rseq == rseq && Some(cseq) == invite_cseq && method == Method::Invite
            }
            _ => false,
        };
        if !matches {
            let resp = SipResponse::to(&req, 481, "Call/Transaction Does Not Exist", None);
            self.out.push_back(CallAction::Respond {
                side: Side::A,
                resp,
            });
            return;
        }
        let ok = SipResponse::to(&req, 200, "OK", None);
        self.out.push_back(CallAction::Respond {
            side: Side::A,
            resp: ok,
        });
        self.a_unacked = None;
        if let Some(ok) = self.a_held_ok.take() {
            self.ok_to_a(now, ok);
        } else if let Some(next) = self.a_queued.pop_front() {
            self.provisional_to_a(now, next);
        }
    }

    /// A re-INVITE or UPDATE from `side` refreshes its session (RFC 4028 §9): its
    /// `Session-Expires` may change the interval and refresher. Returns the headers for our
    /// 2xx, or the `422` to send when its interval is below our minimum.
    fn accept_refresh(
        &mut self,
        now: Instant,
        side: Side,
        req: &SipRequest,
    ) -> Result<Vec<(String, String)>, SipResponse> {
        let min_se = self.config.min_se.as_secs().max(90);
        let requested = req
            .header("Session-Expires")
            .and_then(parse_session_expires);
        if let Some((secs, _)) = requested {
            if secs < min_se {
                let mut resp = SipResponse::to(req, 422, "Session Interval Too Small", None);
                resp.headers_mut().add("Min-SE", min_se.to_string());
                return Err(resp);
            }
        }
        let max = self.config.session_expires.as_secs().max(min_se);
        let slot = &mut self.timers[idx(side)];
        match (slot.as_mut(), requested) {
            (Some(timer), Some((secs, r))) => {
                timer.interval = Duration::from_secs(secs.min(max));
                match r {
                    Some(Refresher::Uac) => timer.we_refresh = false,
                    Some(Refresher::Uas) => timer.we_refresh = true,
                    None => {}
                }
            }
            (None, Some((secs, r))) => {
                // The peer starts a session timer mid-call.
                let peer_does = r == Some(Refresher::Uac)
                    || (r.is_none() && lists(req.headers(), "Supported", "timer"));
                *slot = Some(SessionTimer::new(secs.min(max), !peer_does));
            }
            (_, None) => {}
        }
        let Some(timer) = slot.as_mut() else {
            return Ok(Vec::new());
        };
        timer.restart(now);
        let mut headers = vec![(
            "Session-Expires".to_string(),
            timer.header(!timer.we_refresh),
        )];
        if !timer.we_refresh {
            headers.push(("Require".into(), "timer".into()));
        }
        Ok(headers)
    }

    /// An offer in a re-INVITE or UPDATE: answered to the side that asked and, when the media
    /// changed (hold, resume, a new address), mirrored to the other side as a re-INVITE. An
    /// offer identical to the side's last SDP is a session refresh: answered, not mirrored.
    fn on_reinvite(&mut self, now: Instant, side: Side, req: SipRequest) {
        let offer = match SessionDescription::parse(&req.body) {
            Ok(o) => o,
            Err(e) => {
                let (code, reason) = e.status();
                let resp = SipResponse::to(&req, code, reason, None);
                self.out.push_back(CallAction::Respond { side, resp });
                return;
            }
        };
        let timer_headers = match self.accept_refresh(now, side, &req) {
            Ok(h) => h,
            Err(too_small) => {
                self.out.push_back(CallAction::Respond {
                    side,
                    resp: too_small,
                });
                return;
            }
        };
        let unchanged = self.peer_sdp[idx(side)].as_deref() == Some(req.body.as_slice());
        self.peer_sdp[idx(side)] = Some(req.body.clone());
        let media = match side {
            Side::A => &mut self.leg_a_media,
            Side::B => &mut self.leg_b_media,
        };
        if !unchanged {
            media.session_version += 1;
        }
        let media = media.clone();
        match sdp::answer(&offer, &self.prefs_b, &media) {
            Ok((answer, neg)) => {
                let mut ok = SipResponse::to(&req, 200, "OK", None);
                ok.headers_mut()
                    .add("Contact", format!("<sip:siptg@{}>", self.local));
                for (n, v) in timer_headers {
                    ok.headers_mut().add(&n, v);
                }
                ok.headers_mut().add("Content-Type", "application/sdp");
                ok.body = answer.to_string().into_bytes();
                self.out.push_back(CallAction::Respond { side, resp: ok });
                if unchanged {
                    return;
                }
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

    fn now() -> Instant {
        Instant::now()
    }

    fn invite_from_a() -> SipRequest {
        let sdp = "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";
        let msg = format!("INVITE sip:bob@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {A};branch=z9hG4bKa1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@127.0.0.1>;tag=atag\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: call-a\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{A}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len());
        match parse_datagram(msg.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    fn start() -> (Call, Vec<CallAction>) {
        start_with(invite_from_a()).unwrap()
    }

    /// A call from `invite` (A's INVITE with extra headers), or its refusal.
    fn start_with(invite: SipRequest) -> Result<(Call, Vec<CallAction>), Refusal> {
        let prefs = CodecPrefs::default();
        let mut call = Call::start(
            invite,
            A.parse().unwrap(),
            &Target {
                contact: format!("<sip:bob@{B}>"),
                address: B.parse().unwrap(),
            },
            &prefs,
            "127.0.0.1:30000".parse().unwrap(),
            "127.0.0.1:30002".parse().unwrap(),
            US.parse().unwrap(),
            &CallConfig::default(),
        )?;
        let acts = std::iter::from_fn(|| call.poll_action()).collect();
        Ok((call, acts))
    }

    fn invite_with(headers: &[(&str, &str)]) -> SipRequest {
        let mut inv = invite_from_a();
        for (n, v) in headers {
            inv.headers_mut().add(n, *v);
        }
        inv
    }

    fn drain(call: &mut Call) -> Vec<CallAction> {
        std::iter::from_fn(|| call.poll_action()).collect()
    }

    fn invite_responses(acts: &[CallAction]) -> Vec<SipResponse> {
        acts.iter()
            .filter_map(|a| match a {
                CallAction::RespondInvite(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn sent(acts: &[CallAction], side: Side, method: Method) -> Option<SipRequest> {
        acts.iter().find_map(|a| match a {
            CallAction::Send { side: s, req, .. } if *s == side && req.method == method => {
                Some(req.clone())
            }
            _ => None,
        })
    }

    /// An in-dialog request from A (its tag, our tag on To, CSeq `cseq`).
    fn from_a(method: Method, cseq: u32, headers: &[(&str, &str)], body: &str) -> SipRequest {
        let mut req = SipRequest::new(method.clone(), format!("sip:siptg@{US}"));
        for (n, v) in [
            ("Via", format!("SIP/2.0/UDP {A};branch=z9hG4bKr{cseq}")),
            ("From", "<sip:alice@127.0.0.1>;tag=atag".to_string()),
            ("To", "<sip:bob@127.0.0.1>;tag=ours".to_string()),
            ("Call-ID", "call-a".to_string()),
            ("CSeq", format!("{cseq} {}", method.as_str())),
        ] {
            req.headers_mut().add(n, v);
        }
        for (n, v) in headers {
            req.headers_mut().add(n, *v);
        }
        if !body.is_empty() {
            req.headers_mut().add("Content-Type", "application/sdp");
            req.body = body.as_bytes().to_vec();
        }
        req
    }

    /// Caller requires 100rel: the 183 is reliable, retransmitted T1, 2T1, … until PRACKed;
    /// the 2xx waits for the PRACK of the provisional that carried our answer.
    #[test]
    fn reliable_provisionals_are_retransmitted_until_prack_and_hold_the_2xx() {
        let t0 = Instant::now();
        let (mut call, acts) = start_with(invite_with(&[
            ("Require", "100rel"),
            ("Supported", "100rel"),
        ]))
        .unwrap();
        let inv = b_invite(&acts);
        assert_eq!(inv.header("Supported"), Some(SUPPORTED));
        let mut progress = answer_from_b(&inv, 200);
        progress.code = 183;
        progress.reason = "Session Progress".into();
        call.on_response(t0, Side::B, progress);
        let first = invite_responses(&drain(&mut call));
        assert_eq!(first.len(), 1);
        let p183 = &first[0];
        assert_eq!(p183.code, 183);
        assert_eq!(p183.header("Require"), Some("100rel"));
        let rseq: u32 = p183.header("RSeq").unwrap().parse().unwrap();
        assert!(!p183.body.is_empty());
        assert_eq!(call.poll_timeout(), Some(t0 + Duration::from_millis(500)));
        // Retransmissions at 0.5 s and then 1.5 s (interval doubled), identical.
        call.handle_timeout(t0 + Duration::from_millis(499));
        assert!(drain(&mut call).is_empty());
        call.handle_timeout(t0 + Duration::from_millis(500));
        let again = invite_responses(&drain(&mut call));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].to_bytes(), p183.to_bytes());
        assert_eq!(call.poll_timeout(), Some(t0 + Duration::from_millis(1500)));
        // B answers: the 2xx is held, nothing goes to A yet.
        call.on_response(
            t0 + Duration::from_secs(1),
            Side::B,
            answer_from_b(&inv, 200),
        );
        let acts = drain(&mut call);
        assert!(invite_responses(&acts).is_empty(), "{acts:?}");
        assert_eq!(call.state(), CallState::Calling);
        // A PRACK naming another RSeq is 481; the right one is 200 and releases the 2xx.
        let wrong = format!("{} 1 INVITE", rseq + 5);
        call.on_request(
            t0,
            Side::A,
            from_a(Method::Prack, 2, &[("RAck", &wrong)], ""),
        );
        let acts = drain(&mut call);
        assert!(
            matches!(&acts[0], CallAction::Respond { side: Side::A, resp } if resp.code == 481)
        );
        let rack = format!("{rseq} 1 INVITE");
        call.on_request(
            t0,
            Side::A,
            from_a(Method::Prack, 3, &[("RAck", &rack)], ""),
        );
        let acts = drain(&mut call);
        assert!(
            matches!(&acts[0], CallAction::Respond { side: Side::A, resp } if resp.code == 200 && resp.cseq().map(|c| c.1) == Some(Method::Prack))
        );
        let finals = invite_responses(&acts);
        assert_eq!(finals.len(), 1);
        assert_eq!(finals[0].code, 200);
        assert_eq!(call.state(), CallState::Confirmed);
        // No more retransmissions once PRACKed (no session timer was asked for).
        assert_eq!(call.poll_timeout(), None);
    }

    /// A caller that only supports 100rel gets ordinary provisionals.
    #[test]
    fn supported_100rel_alone_gets_unreliable_provisionals() {
        let (mut call, acts) = start_with(invite_with(&[("Supported", "100rel")])).unwrap();
        let inv = b_invite(&acts);
        call.on_response(now(), Side::B, answer_from_b(&inv, 180));
        let r = invite_responses(&drain(&mut call));
        assert_eq!(r[0].code, 180);
        assert_eq!(r[0].header("RSeq"), None);
        assert_eq!(call.poll_timeout(), None);
    }

    /// No PRACK for 64×T1: 504 to the caller, CANCEL to the callee, the call ends.
    #[test]
    fn no_prack_within_64_t1_fails_the_caller_and_cancels_the_callee() {
        let t0 = Instant::now();
        let (mut call, acts) = start_with(invite_with(&[("Require", "100rel")])).unwrap();
        let inv = b_invite(&acts);
        call.on_response(t0, Side::B, answer_from_b(&inv, 180));
        assert_eq!(invite_responses(&drain(&mut call)).len(), 1);
        let mut retransmissions = 0;
        let mut last = Vec::new();
        while let Some(t) = call.poll_timeout() {
            assert!(t <= t0 + Duration::from_secs(32), "timer past 64*T1");
            call.handle_timeout(t);
            last = drain(&mut call);
            if call.state() == CallState::Ended {
                break;
            }
            retransmissions += invite_responses(&last).len();
        }
        // 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s.
        assert_eq!(retransmissions, 6);
        let finals = invite_responses(&last);
        assert_eq!(
            (finals[0].code, finals[0].reason.as_str()),
            (504, "Server Time-out")
        );
        let cancel = sent(&last, Side::B, Method::Cancel).expect("CANCEL to B");
        assert_eq!(cancel.top_via_branch(), inv.top_via_branch());
        assert!(matches!(last.last(), Some(CallAction::Ended { .. })));
    }

    /// A reliable provisional from the callee is PRACKed once, in its early dialog.
    #[test]
    fn a_reliable_provisional_from_the_callee_is_pracked() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        let mut ringing = answer_from_b(&inv, 180);
        ringing.headers_mut().add("Require", "100rel");
        ringing.headers_mut().add("RSeq", "7");
        call.on_response(now(), Side::B, ringing.clone());
        let acts = drain(&mut call);
        let prack = sent(&acts, Side::B, Method::Prack).expect("PRACK to B");
        assert_eq!(prack.header("RAck"), Some("7 1 INVITE"));
        assert!(prack.header("To").unwrap().contains("tag=btag"));
        assert_eq!(prack.call_id(), inv.call_id());
        assert_eq!(prack.uri, format!("sip:bob@{B}"));
        assert_eq!(prack.cseq().map(|c| c.0), Some(2));
        assert_eq!(invite_responses(&acts)[0].code, 180);
        // Its retransmission is neither PRACKed again nor relayed again.
        call.on_response(now(), Side::B, ringing);
        assert!(drain(&mut call).is_empty());
        // The 2xx still completes the call, ACKed with the INVITE's CSeq.
        call.on_response(now(), Side::B, answer_from_b(&inv, 200));
        let acts = drain(&mut call);
        assert!(acts.iter().any(
            |a| matches!(a, CallAction::SendAck { req, .. } if req.cseq() == Some((1, Method::Ack)))
        ));
        assert_eq!(call.state(), CallState::Confirmed);
    }

    #[test]
    fn a_session_interval_below_min_se_is_refused_with_422() {
        let err = start_with(invite_with(&[
            ("Supported", "timer"),
            ("Session-Expires", "60"),
        ]))
        .err()
        .unwrap();
        assert_eq!(
            (err.code, err.reason.as_str()),
            (422, "Session Interval Too Small")
        );
        assert_eq!(err.headers, vec![("Min-SE".to_string(), "90".to_string())]);
    }

    /// The caller refreshes (refresher=uac): our 2xx says so and requires timer; a refresh
    /// moves the expiry; silence past the interval ends both sides with BYE.
    #[test]
    fn a_caller_that_stops_refreshing_is_hung_up_on_both_sides() {
        let t0 = Instant::now();
        let (mut call, acts) = start_with(invite_with(&[
            ("Supported", "timer"),
            ("Session-Expires", "120;refresher=uac"),
        ]))
        .unwrap();
        let inv = b_invite(&acts);
        call.on_response(t0, Side::B, answer_from_b(&inv, 200));
        let ok = invite_responses(&drain(&mut call)).remove(0);
        assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uac"));
        assert_eq!(ok.header("Require"), Some("timer"));
        // Expiry at 120 - min(32, 40) = 88 s; an UPDATE at 60 s moves it to 148 s.
        assert_eq!(call.poll_timeout(), Some(t0 + Duration::from_secs(88)));
        let t60 = t0 + Duration::from_secs(60);
        call.handle_timeout(t60);
        assert!(drain(&mut call).is_empty());
        call.on_request(
            t60,
            Side::A,
            from_a(
                Method::Update,
                2,
                &[("Session-Expires", "120;refresher=uac")],
                "",
            ),
        );
        let acts = drain(&mut call);
        let CallAction::Respond {
            side: Side::A,
            resp,
        } = &acts[0]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(resp.code, 200);
        assert_eq!(resp.header("Session-Expires"), Some("120;refresher=uac"));
        assert_eq!(acts.len(), 1, "a refresh is not mirrored: {acts:?}");
        assert_eq!(call.poll_timeout(), Some(t60 + Duration::from_secs(88)));
        call.handle_timeout(t60 + Duration::from_secs(88));
        let acts = drain(&mut call);
        assert!(sent(&acts, Side::A, Method::Bye).is_some(), "{acts:?}");
        assert!(sent(&acts, Side::B, Method::Bye).is_some(), "{acts:?}");
        assert!(matches!(acts.last(), Some(CallAction::Ended { .. })));
        assert_eq!(call.state(), CallState::Ended);
        assert_eq!(call.poll_timeout(), None);
    }

    /// We refresh (refresher=uas): UPDATE at half the interval when the caller allows it; an
    /// answered refresh restarts the timer, an unanswered one ends the call.
    #[test]
    fn we_refresh_with_update_at_half_the_interval() {
        let t0 = Instant::now();
        let (mut call, acts) = start_with(invite_with(&[
            ("Supported", "timer"),
            ("Allow", "INVITE, ACK, BYE, CANCEL, UPDATE"),
            ("Session-Expires", "100;refresher=uas"),
        ]))
        .unwrap();
        let inv = b_invite(&acts);
        call.on_response(t0, Side::B, answer_from_b(&inv, 200));
        let ok = invite_responses(&drain(&mut call)).remove(0);
        assert_eq!(ok.header("Session-Expires"), Some("100;refresher=uas"));
        assert_eq!(ok.header("Require"), None);
        let t50 = t0 + Duration::from_secs(50);
        assert_eq!(call.poll_timeout(), Some(t50));
        call.handle_timeout(t50);
        let acts = drain(&mut call);
        let update = sent(&acts, Side::A, Method::Update).expect("UPDATE to A");
        assert_eq!(update.header("Session-Expires"), Some("100;refresher=uac"));
        assert!(update.body.is_empty());
        assert_eq!(update.header("Call-ID"), Some("call-a"));
        // Answered: the next refresh is due 50 s later.
        let mut ok = SipResponse::to(&update, 200, "OK", None);
        ok.headers_mut().add("Session-Expires", "100;refresher=uac");
        let t51 = t0 + Duration::from_secs(51);
        call.on_response(t51, Side::A, ok);
        assert_eq!(call.poll_timeout(), Some(t51 + Duration::from_secs(50)));
        // The next refresh goes unanswered: at 100 - 32 s after the last refresh, BYE.
        call.handle_timeout(t51 + Duration::from_secs(50));
        assert!(sent(&drain(&mut call), Side::A, Method::Update).is_some());
        assert_eq!(call.poll_timeout(), Some(t51 + Duration::from_secs(68)));
        call.handle_timeout(t51 + Duration::from_secs(68));
        let acts = drain(&mut call);
        assert!(sent(&acts, Side::A, Method::Bye).is_some());
        assert!(sent(&acts, Side::B, Method::Bye).is_some());
        assert_eq!(call.state(), CallState::Ended);
    }

    /// Without UPDATE in the caller's Allow, our refresh is a re-INVITE with our SDP, ACKed.
    #[test]
    fn we_refresh_with_reinvite_when_update_is_not_allowed() {
        let t0 = Instant::now();
        let (mut call, acts) = start_with(invite_with(&[("Session-Expires", "90")])).unwrap();
        let inv = b_invite(&acts);
        call.on_response(t0, Side::B, answer_from_b(&inv, 200));
        let ok = invite_responses(&drain(&mut call)).remove(0);
        // No Supported: timer from the caller, so we are the refresher.
        assert_eq!(ok.header("Session-Expires"), Some("90;refresher=uas"));
        call.handle_timeout(t0 + Duration::from_secs(45));
        let acts = drain(&mut call);
        let reinvite = sent(&acts, Side::A, Method::Invite).expect("re-INVITE to A");
        assert!(String::from_utf8_lossy(&reinvite.body).contains("m=audio 30000"));
        let answer = "v=0
o=alice 1 2 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 40000 RTP/AVP 8
a=sendrecv
";
        let mut ok = SipResponse::to(&reinvite, 200, "OK", None);
        ok.headers_mut().add("Content-Type", "application/sdp");
        ok.body = answer.as_bytes().to_vec();
        let t46 = t0 + Duration::from_secs(46);
        call.on_response(t46, Side::A, ok);
        let acts = drain(&mut call);
        assert!(
            matches!(&acts[0], CallAction::SendAck { side: Side::A, req, .. } if req.cseq() == reinvite.cseq().map(|c| (c.0, Method::Ack)))
        );
        assert_eq!(call.poll_timeout(), Some(t46 + Duration::from_secs(45)));
    }

    /// UPDATE with a changed offer is answered and mirrored to the other side like a
    /// re-INVITE; the same offer again is only answered.
    #[test]
    fn update_with_an_offer_is_answered_and_mirrored() {
        let (mut call, acts) = start();
        let inv = b_invite(&acts);
        call.on_response(now(), Side::B, answer_from_b(&inv, 200));
        drain(&mut call);
        let hold = String::from_utf8(invite_from_a().body)
            .unwrap()
            .replace("o=alice 1 1", "o=alice 1 2")
            .replace("a=sendrecv", "a=sendonly");
        call.on_request(now(), Side::A, from_a(Method::Update, 2, &[], &hold));
        let acts = drain(&mut call);
        let CallAction::Respond {
            side: Side::A,
            resp,
        } = &acts[0]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(resp.code, 200);
        assert_eq!(resp.cseq(), Some((2, Method::Update)));
        assert!(String::from_utf8_lossy(&resp.body).contains("a=recvonly"));
        let mirrored = sent(&acts, Side::B, Method::Invite).expect("re-INVITE to B");
        assert!(String::from_utf8_lossy(&mirrored.body).contains("a=sendonly"));
        call.on_request(now(), Side::A, from_a(Method::Update, 3, &[], &hold));
        let acts = drain(&mut call);
        assert_eq!(acts.len(), 1, "{acts:?}");
        assert!(
            matches!(&acts[0], CallAction::Respond { side: Side::A, resp } if resp.code == 200 && String::from_utf8_lossy(&resp.body).contains("a=recvonly"))
        );
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

        call.on_response(now(), Side::B, answer_from_b(&inv, 180));
        let acts: Vec<_> = std::iter::from_fn(|| call.poll_action()).collect();
        assert!(matches!(&acts[0], CallAction::RespondInvite(r) if r.code == 180));

        call.on_response(now(), Side::B, answer_from_b(&inv, 200));
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
        call.on_request(now(), Side::B, bye);
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
        call.on_response(now(), Side::B, progress);
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
        call.on_response(now(), Side::B, answer_from_b(&inv, 200));
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
        call.on_response(now(), Side::B, answer_from_b(&inv, 200));
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
        call.on_request(now(), Side::A, info);
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
        call.on_request(now(), Side::A, cancel);
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
        call.on_response(now(), Side::B, busy);
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
        call.on_response(now(), Side::B, answer_from_b(&inv, 200));
        while call.poll_action().is_some() {}
        let mut reinvite = invite_from_a();
        reinvite.headers_mut().set("CSeq", "2 INVITE");
        reinvite.body = String::from_utf8(reinvite.body.clone())
            .unwrap()
            .replace("a=sendrecv", "a=sendonly")
            .into_bytes();
        call.on_request(now(), Side::A, reinvite);
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
            &CallConfig::default(),
        )
        .err()
        .unwrap();
        assert_eq!(
            (err.code, err.reason.as_str()),
            (488, "Not Acceptable Here")
        );
    }
}
