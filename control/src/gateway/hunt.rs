//! Priority hunting for a Telegram user's call to the PBX, sans-IO: SIP.TG's "same priority
//! rings in parallel, next rung after all fail".
//!
//! A [`Hunt`] forks one INVITE (its own Call-ID, tags and branch: an independent [`SipLeg`]
//! UAC) to every target of the current rung. The first 2xx wins: the other forks are
//! cancelled (a fork that answers too is ACKed and sent BYE). The first 18x of any fork is
//! passed on once (the Telegram side rings). When every fork of a rung has failed (a final
//! non-2xx, or a transaction timeout that the runtime reports as 408), the next rung starts;
//! when no rung is left the hunt ends with the last failure. Towards the runtime a hunt looks
//! like one UAC leg: it emits the same [`LegAction`]s (the forks' requests, and `Ringing`,
//! `Answered`, `UpdateLeg`, `Dtmf` and a single `Ended` for the call as a whole).
//!
//! No ring timeout per rung: a PBX that rings without answering holds the hunt until the
//! Telegram caller hangs up (as SIP.TG advises, ring timeouts belong to the PBX).

use super::auth::Credentials;
use super::sipleg::{gateway_prefs, LegAction, SipLeg};
use crate::link::HuntTarget;
use crate::sip::msg::{SipRequest, SipResponse};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// Who the forks' INVITEs are from (the same for every fork).
#[derive(Debug, Clone)]
pub struct Caller {
    pub from_user: String,
    pub from_name: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// One Telegram → PBX call's hunt over the rungs of PBX targets.
pub struct Hunt {
    rungs: VecDeque<Vec<HuntTarget>>,
    caller: Caller,
    /// Our media leg (every fork offers it) and our SIP address.
    leg: SocketAddr,
    local: SocketAddr,
    /// Every fork started so far (ended ones stay: a late 2xx must still be ACKed and BYEd).
    forks: Vec<Fork>,
    /// Where the current rung's forks start in `forks`.
    rung_start: usize,
    winner: Option<usize>,
    ringing: bool,
    /// The hunt as a whole is over (its `Ended` emitted).
    ended: bool,
    /// The last failure of a fork: the hunt's end when every rung failed.
    last_failure: (u16, String),
    /// Our logins at the PBXs, by connection: a fork answers its PBX's digest challenge.
    credentials: HashMap<String, Credentials>,
    out: VecDeque<LegAction>,
}

struct Fork {
    leg: SipLeg,
    connection: String,
    /// Its `Ended` was seen (the fork's own end, not the hunt's).
    done: bool,
}

impl Hunt {
    /// A hunt over `rungs` (empty rungs are skipped) from `caller`, offering our media leg at
    /// `leg`; our SIP address is `local`; `credentials` answer the challenges of the PBXs of
    /// those connections. The first rung's INVITEs are queued at once.
    pub fn new(
        rungs: Vec<Vec<HuntTarget>>,
        caller: Caller,
        leg: SocketAddr,
        local: SocketAddr,
        credentials: HashMap<String, Credentials>,
    ) -> Self {
        let mut h = Self {
            rungs: rungs.into_iter().filter(|r| !r.is_empty()).collect(),
            caller,
            leg,
            local,
            forks: Vec::new(),
            rung_start: 0,
            winner: None,
            ringing: false,
            ended: false,
            last_failure: (480, "Temporarily Unavailable".into()),
            credentials,
            out: VecDeque::new(),
        };
        h.next_rung();
        h
    }

    /// Starts the next rung, or ends the hunt with the last failure when none is left.
    fn next_rung(&mut self) {
        let Some(rung) = self.rungs.pop_front() else {
            let (code, reason) = self.last_failure.clone();
            self.finish(code, &reason);
            return;
        };
        self.rung_start = self.forks.len();
        for t in rung {
            tracing::debug!(connection = %t.connection, uri = %t.request_uri, "hunt: INVITE fork");
            let mut leg = SipLeg::uac(
                &t.request_uri,
                t.address,
                &self.caller.from_user,
                self.caller.from_name.as_deref(),
                &self.caller.headers,
                gateway_prefs(&t.codecs),
                self.leg,
                self.local,
            );
            leg.set_credentials(self.credentials.get(&t.connection).cloned());
            self.forks.push(Fork {
                leg,
                connection: t.connection,
                done: false,
            });
        }
    }

    fn finish(&mut self, code: u16, reason: &str) {
        if !self.ended {
            self.ended = true;
            self.out.push_back(LegAction::Ended {
                code,
                reason: reason.to_string(),
            });
        }
    }

    /// The connection of the fork that answered.
    pub fn answered_connection(&self) -> Option<&str> {
        self.winner.map(|w| self.forks[w].connection.as_str())
    }

    /// Is the hunt (and with it the call's SIP side) over?
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Has a fork answered and is its dialog up?
    pub fn is_confirmed(&self) -> bool {
        self.winner
            .is_some_and(|w| !self.ended && self.forks[w].leg.is_confirmed())
    }

    /// Does the answering PBX hold the call?
    pub fn is_held(&self) -> bool {
        self.winner
            .is_some_and(|w| !self.ended && self.forks[w].leg.is_held())
    }

    /// The Telegram side ended: BYE to the answered fork, else CANCEL every ringing one.
    pub fn hang_up(&mut self, code: u16, reason: &str) {
        if self.ended {
            return;
        }
        self.rungs.clear();
        match self.winner {
            Some(w) => self.forks[w].leg.hang_up(code, reason),
            None => {
                for f in &mut self.forks {
                    f.leg.hang_up(code, reason);
                }
                self.finish(487, "Request Terminated");
            }
        }
    }

    /// DTMF to the PBX that answered.
    pub fn send_info(&mut self, digit: char) {
        if let Some(w) = self.winner {
            self.forks[w].leg.send_info(digit);
        }
    }

    fn fork_of(&mut self, call_id: Option<&str>) -> Option<&mut Fork> {
        let call_id = call_id?;
        self.forks.iter_mut().find(|f| f.leg.call_id() == call_id)
    }

    /// A request from one of the PBXs (by Call-ID: BYE, re-INVITE, INFO…).
    pub fn on_request(&mut self, req: SipRequest) {
        if let Some(f) = self.fork_of(req.call_id()) {
            f.leg.on_request(req);
        }
    }

    /// A response to one of the forks' requests (by Call-ID).
    pub fn on_response(&mut self, resp: SipResponse) {
        if let Some(f) = self.fork_of(resp.call_id()) {
            f.leg.on_response(resp);
        }
    }

    /// The forks' timers (a UAC leg has none today; kept for symmetry with [`SipLeg`]).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.forks.iter().filter_map(|f| f.leg.poll_timeout()).min()
    }

    /// Runs the forks' timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for f in &mut self.forks {
            f.leg.handle_timeout(now);
        }
    }

    /// The next thing to do: the forks' requests and the call's events.
    pub fn poll_action(&mut self) -> Option<LegAction> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            let mut progressed = false;
            for i in 0..self.forks.len() {
                // A fork whose dialog is up answered: the first one wins.
                if self.winner.is_none() && !self.ended && self.forks[i].leg.is_confirmed() {
                    self.win(i);
                }
                while let Some(a) = self.forks[i].leg.poll_action() {
                    progressed = true;
                    self.on_fork_action(i, a);
                }
            }
            if !progressed && self.out.is_empty() {
                return None;
            }
        }
    }

    /// Fork `i` answered first: the others are cancelled (or, if they answered as well, ended
    /// with BYE) and the rest of the hunt is dropped.
    fn win(&mut self, i: usize) {
        tracing::info!(connection = %self.forks[i].connection, "hunt: answered");
        self.winner = Some(i);
        self.rungs.clear();
        for (j, f) in self.forks.iter_mut().enumerate() {
            if j != i {
                f.leg.hang_up(487, "answered elsewhere");
            }
        }
    }

    fn on_fork_action(&mut self, i: usize, a: LegAction) {
        let winner = self.winner == Some(i);
        match a {
            LegAction::Send { .. }
            | LegAction::SendAck { .. }
            | LegAction::CancelInvite { .. }
            | LegAction::Respond(_)
            | LegAction::RespondInvite(_) => self.out.push_back(a),
            LegAction::Ringing => {
                if !self.ringing && self.winner.is_none() && !self.ended {
                    self.ringing = true;
                    self.out.push_back(LegAction::Ringing);
                }
            }
            LegAction::UpdateLeg(_)
            | LegAction::Answered
            | LegAction::Dtmf(_)
            | LegAction::Hold(_) => {
                if winner && !self.ended {
                    self.out.push_back(a);
                } else if self.winner.is_some() && self.forks[i].leg.is_confirmed() {
                    // A second PBX answered: it gets BYE.
                    self.forks[i].leg.hang_up(200, "answered elsewhere");
                }
            }
            LegAction::Ended { code, reason } => {
                self.forks[i].done = true;
                if winner {
                    self.finish(code, &reason);
                    return;
                }
                if self.winner.is_some() || self.ended {
                    return; // a fork we cancelled
                }
                tracing::info!(connection = %self.forks[i].connection, code, %reason, "hunt: fork failed");
                self.last_failure = (code, reason);
                let rung_over = self.forks[self.rung_start..].iter().all(|f| f.done);
                if rung_over {
                    self.next_rung();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::msg::Method;

    fn target(n: u8) -> HuntTarget {
        HuntTarget {
            request_uri: format!("sip:100@127.0.0.{n}:5060"),
            address: format!("127.0.0.{n}:5060").parse().unwrap(),
            connection: format!("pbx{n}"),
            codecs: vec!["PCMA".into()],
        }
    }

    fn hunt(rungs: Vec<Vec<HuntTarget>>) -> Hunt {
        Hunt::new(
            rungs,
            Caller {
                from_user: "+1000".into(),
                from_name: None,
                headers: vec![],
            },
            "127.0.0.1:30000".parse().unwrap(),
            "127.0.0.1:5060".parse().unwrap(),
            HashMap::new(),
        )
    }

    fn drain(h: &mut Hunt) -> Vec<LegAction> {
        std::iter::from_fn(|| h.poll_action()).collect()
    }

    /// The INVITEs sent, by destination.
    fn invites(actions: &[LegAction]) -> Vec<(SocketAddr, SipRequest)> {
        actions
            .iter()
            .filter_map(|a| match a {
                LegAction::Send { req, dest } if req.method == Method::Invite => {
                    Some((*dest, req.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn answer(invite: &SipRequest, code: u16) -> SipResponse {
        let mut r = SipResponse::to(invite, code, "x", Some("pbxtag"));
        if code == 200 {
            r.headers_mut().add("Contact", "<sip:100@127.0.0.9:5060>");
            r.headers_mut().add("Content-Type", "application/sdp");
            r.body = b"v=0\r\no=- 1 1 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n".to_vec();
        }
        r
    }

    #[test]
    fn a_rung_rings_in_parallel_and_the_first_answer_cancels_the_others() {
        let mut h = hunt(vec![vec![target(1), target(2)], vec![target(3)]]);
        let sent = invites(&drain(&mut h));
        assert_eq!(sent.len(), 2, "both forks of the first rung");
        assert_ne!(sent[0].1.call_id(), sent[1].1.call_id());
        h.on_response(answer(&sent[0].1, 180));
        h.on_response(answer(&sent[1].1, 180));
        let a = drain(&mut h);
        assert_eq!(
            a.iter().filter(|x| **x == LegAction::Ringing).count(),
            1,
            "{a:?}"
        );
        h.on_response(answer(&sent[1].1, 200));
        let a = drain(&mut h);
        assert!(a.contains(&LegAction::Answered), "{a:?}");
        assert!(a
            .iter()
            .any(|x| matches!(x, LegAction::SendAck { dest, .. } if *dest == sent[1].0)));
        let loser = sent[0].1.call_id().unwrap().to_string();
        assert!(
            a.contains(&LegAction::CancelInvite { call_id: loser }),
            "{a:?}"
        );
        assert!(h.is_confirmed() && !h.is_ended());
        assert_eq!(h.answered_connection(), Some("pbx2"));
        // The loser answers as well (its 200 crossed our CANCEL): ACK and BYE.
        h.on_response(answer(&sent[0].1, 200));
        let a = drain(&mut h);
        assert!(a
            .iter()
            .any(|x| matches!(x, LegAction::SendAck { dest, .. } if *dest == sent[0].0)));
        assert!(a.iter().any(|x| matches!(x, LegAction::Send { req, dest } if req.method == Method::Bye && *dest == sent[0].0)));
        assert!(!a.contains(&LegAction::Answered));
        // The second rung was never tried; the call ends with the winner.
        h.hang_up(200, "bye");
        let a = drain(&mut h);
        assert!(a.iter().any(|x| matches!(x, LegAction::Send { req, dest } if req.method == Method::Bye && *dest == sent[1].0)));
        assert!(a.iter().any(|x| matches!(x, LegAction::Ended { .. })));
        assert!(invites(&a).is_empty());
        assert!(h.is_ended());
    }

    #[test]
    fn the_next_rung_starts_when_every_fork_of_a_rung_failed() {
        let mut h = hunt(vec![vec![target(1), target(2)], vec![target(3)]]);
        let sent = invites(&drain(&mut h));
        h.on_response(answer(&sent[0].1, 486));
        assert!(invites(&drain(&mut h)).is_empty(), "one fork still rings");
        h.on_response(answer(&sent[1].1, 408));
        let next = invites(&drain(&mut h));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0, "127.0.0.3:5060".parse().unwrap());
        h.on_response(answer(&next[0].1, 603));
        let a = drain(&mut h);
        assert_eq!(
            a.last(),
            Some(&LegAction::Ended {
                code: 603,
                reason: "x".into()
            })
        );
        assert!(h.is_ended() && !h.is_confirmed());
    }

    #[test]
    fn the_caller_hanging_up_cancels_every_ringing_fork() {
        let mut h = hunt(vec![vec![target(1), target(2)]]);
        let sent = invites(&drain(&mut h));
        h.hang_up(487, "caller hung up");
        let a = drain(&mut h);
        for (_, inv) in &sent {
            let id = inv.call_id().unwrap().to_string();
            assert!(
                a.contains(&LegAction::CancelInvite { call_id: id }),
                "{a:?}"
            );
        }
        assert_eq!(
            a.iter()
                .filter(|x| matches!(x, LegAction::Ended { .. }))
                .count(),
            1
        );
        assert!(h.is_ended());
    }

    #[test]
    fn no_reachable_target_ends_at_once() {
        let mut h = hunt(vec![vec![]]);
        let a = drain(&mut h);
        assert!(
            matches!(a.as_slice(), [LegAction::Ended { code: 480, .. }]),
            "{a:?}"
        );
    }
}
