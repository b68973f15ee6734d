//! Per-account flood control, sans-IO. Telegram answers a too-eager client with
//! `FLOOD_WAIT_N` (wait N seconds before that kind of request), `PEER_FLOOD` (too many calls or
//! messages to people who do not know the account) or, through TDLib, "Too Many Requests:
//! retry after N". Sending anything more during the wait only lengthens it and risks the
//! account, so while a wait runs requests fail fast with the remaining seconds.

use super::error::TgError;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Which requests a wait holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloodScope {
    /// One method (FLOOD_WAIT is per method on Telegram's side).
    Method(&'static str),
    /// Calls and messages to other users (PEER_FLOOD).
    Peers,
}

/// The running waits of one account.
#[derive(Debug, Default)]
pub struct FloodGate {
    until: HashMap<FloodScope, Instant>,
    /// How long PEER_FLOOD holds back calls (Telegram does not say; tg2sip used a day).
    peer_flood_hold: Duration,
}

impl FloodGate {
    /// A gate that holds calls back for `peer_flood_hold` after PEER_FLOOD.
    pub fn new(peer_flood_hold: Duration) -> Self {
        Self {
            until: HashMap::new(),
            peer_flood_hold,
        }
    }

    /// May `method` be sent now? `to_peer` marks calls and messages to other users.
    pub fn check(
        &mut self,
        method: &'static str,
        to_peer: bool,
        now: Instant,
    ) -> Result<(), TgError> {
        self.until.retain(|_, until| *until > now);
        if to_peer {
            if let Some(until) = self.until.get(&FloodScope::Peers) {
                return Err(TgError::PeerFlood {
                    seconds: remaining(*until, now),
                });
            }
        }
        if let Some(until) = self.until.get(&FloodScope::Method(method)) {
            return Err(TgError::FloodWait {
                seconds: remaining(*until, now),
            });
        }
        Ok(())
    }

    /// Learns from a failed `method`; returns the error the caller should see (a flood error
    /// becomes the typed wait).
    pub fn observe(&mut self, method: &'static str, error: TgError, now: Instant) -> TgError {
        if error.is("PEER_FLOOD") {
            let until = now + self.peer_flood_hold;
            self.until.insert(FloodScope::Peers, until);
            return TgError::PeerFlood {
                seconds: remaining(until, now),
            };
        }
        match error.flood_wait() {
            Some(wait) if !wait.is_zero() => {
                let until = now + wait;
                let slot = self
                    .until
                    .entry(FloodScope::Method(method))
                    .or_insert(until);
                *slot = (*slot).max(until);
                TgError::FloodWait {
                    seconds: remaining(*slot, now),
                }
            }
            _ => error,
        }
    }

    /// The running waits, for status: (scope, seconds left).
    pub fn waits(&self, now: Instant) -> Vec<(String, u32)> {
        let mut v: Vec<_> = self
            .until
            .iter()
            .filter(|(_, u)| **u > now)
            .map(|(scope, until)| {
                let name = match scope {
                    FloodScope::Method(m) => (*m).to_string(),
                    FloodScope::Peers => "PEER_FLOOD".to_string(),
                };
                (name, remaining(*until, now))
            })
            .collect();
        v.sort();
        v
    }
}

/// Whole seconds left, rounded up, at least 1 while a wait runs.
fn remaining(until: Instant, now: Instant) -> u32 {
    let left = until.saturating_duration_since(now);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_wait_holds_back_that_method_until_it_expires() {
        let mut gate = FloodGate::new(Duration::from_secs(86400));
        let t0 = Instant::now();
        assert!(gate.check("phone.requestCall", true, t0).is_ok());
        let e = gate.observe(
            "phone.requestCall",
            TgError::from_rpc(420, "FLOOD_WAIT_30"),
            t0,
        );
        assert_eq!(e, TgError::FloodWait { seconds: 30 });
        assert_eq!(
            gate.check("phone.requestCall", true, t0 + Duration::from_secs(10)),
            Err(TgError::FloodWait { seconds: 20 })
        );
        // Other methods are not held back.
        assert!(gate.check("messages.getDhConfig", false, t0).is_ok());
        assert!(gate
            .check("phone.requestCall", true, t0 + Duration::from_secs(30))
            .is_ok());
        assert!(gate.waits(t0 + Duration::from_secs(31)).is_empty());
    }

    #[test]
    fn peer_flood_holds_back_calls_and_messages_only() {
        let mut gate = FloodGate::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        let e = gate.observe(
            "phone.requestCall",
            TgError::from_rpc(400, "PEER_FLOOD"),
            t0,
        );
        assert_eq!(e, TgError::PeerFlood { seconds: 3600 });
        assert!(matches!(
            gate.check("messages.sendMessage", true, t0),
            Err(TgError::PeerFlood { .. })
        ));
        assert!(gate.check("phone.discardCall", false, t0).is_ok());
        assert_eq!(gate.waits(t0), vec![("PEER_FLOOD".to_string(), 3600)]);
    }

    #[test]
    fn other_errors_pass_through() {
        let mut gate = FloodGate::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let e = gate.observe("x", TgError::from_rpc(400, "USER_PRIVACY_RESTRICTED"), t0);
        assert!(e.is("USER_PRIVACY_RESTRICTED"));
        assert!(gate.check("x", true, t0).is_ok());
    }

    #[test]
    fn too_many_requests_text_is_a_flood_wait() {
        let mut gate = FloodGate::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let e = gate.observe(
            "x",
            TgError::from_rpc(429, "Too Many Requests: retry after 5"),
            t0,
        );
        assert_eq!(e.to_string(), "Too Many Requests: retry after 5");
    }
}
