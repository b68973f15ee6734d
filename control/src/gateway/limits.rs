//! A gateway's plan limits as the Manager keeps them, sans-IO (the time is passed in): the
//! calendar month's talk time (`monthly_duration`, both directions) and the failed calls to
//! Telegram within a rolling hour (`failed_calls_per_hour`), with SIP.TG's `402` answers.
//!
//! Workers report every call's end ([`CallReport`]); the Manager records it here and keeps the
//! resulting [`Usage`] in its database (`Table::Usage`) so the limits survive a restart.
//!
//! Calls in progress share what is left of the month: Workers also report each answer, and
//! while N calls of a gateway talk the rest R runs out N times as fast, so every one of them
//! must end R/N from now ([`Limits::shares`]; the Manager sends each its deadline, again
//! whenever a call starts or ends). A new call is admitted only while something is left after
//! the talking calls' time so far.
//!
//! What counts as a failed call: a PBX → Telegram call that the Manager routed to a Worker and
//! that ended without an answer for a Telegram-side reason (the callee declined, was busy, did
//! not answer, could not be resolved or reached, Telegram refused the request). Not counted: a
//! call the PBX cancelled before the answer (its own ring timeout or a caller who hung up),
//! refusals before a call reaches Telegram (this module's own 402s, lines busy, routing
//! errors), and Telegram → PBX calls (the limit guards the account against Telegram's spam
//! bans, which unanswered outgoing calls draw).

use crate::config::GatewayConfig;
use crate::link::{CallDirection, CallReport};
use crate::sip::reasons;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A call in progress: the Worker running it and its id there.
pub type LiveCall = (String, u64);

/// The window `failed_calls_per_hour` counts in.
pub const FAIL_WINDOW: Duration = Duration::from_secs(3600);

/// What one gateway has used, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The calendar month (UTC, `YYYY-MM`) `talk_ms` belongs to.
    #[serde(default)]
    pub month: String,
    /// Talk time of the month's calls, in milliseconds.
    #[serde(default)]
    pub talk_ms: u64,
    /// When the last hour's failed calls to Telegram ended (Unix milliseconds).
    #[serde(default)]
    pub failed: Vec<u64>,
}

/// Why a call may not start: the status and SIP.TG's reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
}

/// The usage of every gateway.
#[derive(Debug, Default)]
pub struct Limits {
    usage: HashMap<String, Usage>,
    /// Answered calls in progress: their gateway and when they were answered.
    live: HashMap<LiveCall, (String, Instant)>,
}

/// `YYYY-MM` of `now` in UTC.
pub fn month_of(now: SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

fn unix_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Does this call count against `failed_calls_per_hour`? (See the module text.)
pub fn is_failure(r: &CallReport) -> bool {
    r.direction == CallDirection::ToTelegram && !r.answered && !r.cancelled_by_pbx
}

impl Limits {
    /// No usage yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Usage read back from the database.
    pub fn load(&mut self, gateway: &str, usage: Usage) {
        self.usage.insert(gateway.to_string(), usage);
    }

    /// A gateway's usage as of `now` (a new month starts at zero; old failures drop out).
    pub fn usage(&mut self, gateway: &str, now: SystemTime) -> &Usage {
        self.current(gateway, now)
    }

    fn current(&mut self, gateway: &str, now: SystemTime) -> &mut Usage {
        let month = month_of(now);
        let u = self.usage.entry(gateway.to_string()).or_default();
        if u.month != month {
            u.month = month;
            u.talk_ms = 0;
        }
        let since = unix_ms(now).saturating_sub(FAIL_WINDOW.as_millis() as u64);
        u.failed.retain(|t| *t > since);
        u
    }

    /// May a new call of `g` start at `now` (`to_telegram`: a PBX's call)? `Ok` carries the
    /// talk time left this month (`None` = unlimited).
    pub fn admit(
        &mut self,
        g: &GatewayConfig,
        to_telegram: bool,
        now: SystemTime,
    ) -> Result<Option<Duration>, Refusal> {
        let talking = self.talking_ms(g, Instant::now());
        let u = self.current(&g.name, now);
        let budget = (!g.monthly_duration.is_zero()).then(|| {
            let limit = u64::try_from(g.monthly_duration.as_millis()).unwrap_or(u64::MAX);
            Duration::from_millis(limit.saturating_sub(u.talk_ms.saturating_add(talking)))
        });
        if budget.is_some_and(|b| b.is_zero()) {
            return Err(Refusal {
                code: 402,
                reason: reasons::DURATION_EXCEEDED,
            });
        }
        if to_telegram
            && g.failed_calls_per_hour > 0
            && u.failed.len() >= g.failed_calls_per_hour as usize
        {
            return Err(Refusal {
                code: 402,
                reason: reasons::FAIL_CALLS_EXCEEDED,
            });
        }
        Ok(budget)
    }

    /// Talk time so far of `g`'s answered calls in progress. A call talking longer than the
    /// whole month's limit (plus a minute) lost its end report: it is dropped.
    fn talking_ms(&mut self, g: &GatewayConfig, now: Instant) -> u64 {
        let stale = g.monthly_duration + Duration::from_secs(60);
        let gateway = g.name.as_str();
        self.live.retain(|_, (gw, at)| {
            gw != gateway || g.monthly_duration.is_zero() || now.duration_since(*at) <= stale
        });
        self.live
            .values()
            .filter(|(g, _)| g == gateway)
            .map(|(_, at)| u64::try_from(now.duration_since(*at).as_millis()).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add)
    }

    /// A call of `gateway` was answered at `now`.
    pub fn answered(&mut self, call: LiveCall, gateway: &str, now: Instant) {
        self.live.insert(call, (gateway.to_string(), now));
    }

    /// A call is over (its report is [`record`](Self::record)ed separately); true if it was
    /// talking.
    pub fn hung_up(&mut self, call: &LiveCall) -> bool {
        self.live.remove(call).is_some()
    }

    /// The Worker is gone: its calls are no longer talking (their reports are lost with it).
    pub fn forget_worker(&mut self, worker: &str) {
        self.live.retain(|(w, _), _| w != worker);
    }

    /// How long each talking call of `g` may go on from `now`: the month's rest shared by
    /// all of them. Empty for a gateway without `monthly_duration`.
    pub fn shares(
        &mut self,
        g: &GatewayConfig,
        now_wall: SystemTime,
        now: Instant,
    ) -> Vec<(LiveCall, Duration)> {
        if g.monthly_duration.is_zero() {
            return Vec::new();
        }
        let talking = self.talking_ms(g, now);
        let used = self
            .current(&g.name, now_wall)
            .talk_ms
            .saturating_add(talking);
        let limit = u64::try_from(g.monthly_duration.as_millis()).unwrap_or(u64::MAX);
        let calls: Vec<LiveCall> = self
            .live
            .iter()
            .filter(|(_, (gw, _))| *gw == g.name)
            .map(|(k, _)| k.clone())
            .collect();
        let n = calls.len() as u64;
        if n == 0 {
            return Vec::new();
        }
        let each = Duration::from_millis(limit.saturating_sub(used) / n);
        calls.into_iter().map(|c| (c, each)).collect()
    }

    /// Counts a finished call; returns the gateway's usage to store.
    pub fn record(&mut self, r: &CallReport, now: SystemTime) -> Usage {
        let u = self.current(&r.gateway, now);
        u.talk_ms = u.talk_ms.saturating_add(r.talk_ms);
        if is_failure(r) {
            u.failed.push(unix_ms(now));
        }
        u.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(monthly: u64, fails: u32) -> GatewayConfig {
        let mut g: GatewayConfig =
            toml::from_str("name = 'g'\naccount = 'a'\nconnections = ['c']").unwrap();
        g.monthly_duration = Duration::from_secs(monthly);
        g.failed_calls_per_hour = fails;
        g
    }

    fn report(direction: CallDirection, talk_ms: u64, answered: bool, cancel: bool) -> CallReport {
        CallReport {
            gateway: "g".into(),
            call: 1,
            direction,
            answered,
            talk_ms,
            cancelled_by_pbx: cancel,
            code: if answered { 200 } else { 486 },
            reason: String::new(),
        }
    }

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    /// 2026-11-30 23:59:00 UTC and a minute later, in December.
    const NOV_END: u64 = 1_796_083_140;

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(at(NOV_END)), "2026-11");
        assert_eq!(month_of(at(NOV_END + 60)), "2026-12");
    }

    #[test]
    fn talk_time_of_both_directions_uses_up_the_month_and_the_next_month_starts_afresh() {
        let g = gw(60, 0);
        let mut l = Limits::new();
        let now = at(NOV_END - 3600);
        assert_eq!(l.admit(&g, true, now), Ok(Some(Duration::from_secs(60))));
        l.record(&report(CallDirection::ToTelegram, 40_000, true, false), now);
        assert_eq!(l.admit(&g, false, now), Ok(Some(Duration::from_secs(20))));
        let u = l.record(
            &report(CallDirection::FromTelegram, 20_000, true, false),
            now,
        );
        assert_eq!((u.month.as_str(), u.talk_ms), ("2026-11", 60_000));
        let refused = Refusal {
            code: 402,
            reason: "Total calls duration is exceeded",
        };
        assert_eq!(l.admit(&g, true, now), Err(refused));
        assert_eq!(l.admit(&g, false, now), Err(refused));
        // Reloaded (a restart): still used up. December: the full month again.
        let mut again = Limits::new();
        again.load("g", u);
        assert_eq!(again.admit(&g, true, now), Err(refused));
        assert_eq!(
            again.admit(&g, true, at(NOV_END + 60)),
            Ok(Some(Duration::from_secs(60)))
        );
        // Unlimited gateways have no budget.
        assert_eq!(l.admit(&gw(0, 0), true, now), Ok(None));
    }

    #[test]
    fn talking_calls_share_the_rest_of_the_month_and_hold_it_from_new_calls() {
        let g = gw(60, 0);
        let mut l = Limits::new();
        let (wall, t0) = (at(NOV_END - 3600), Instant::now());
        let one = ("w1".to_string(), 1);
        let two = ("w1".to_string(), 2);
        l.answered(one.clone(), "g", t0);
        assert_eq!(
            l.shares(&g, wall, t0 + Duration::from_secs(10)),
            vec![(one.clone(), Duration::from_secs(50))]
        );
        l.answered(two.clone(), "g", t0 + Duration::from_secs(10));
        // 50 s left at t0+10 s, two calls: each may talk 25 s more.
        let mut shares = l.shares(&g, wall, t0 + Duration::from_secs(10));
        shares.sort();
        assert_eq!(
            shares,
            vec![
                (one.clone(), Duration::from_secs(25)),
                (two.clone(), Duration::from_secs(25))
            ]
        );
        // Another gateway's calls are not part of it; no limit, no shares.
        assert!(l.shares(&gw(0, 0), wall, t0).is_empty());
        assert!(l.hung_up(&one));
        assert!(!l.hung_up(&one));
        l.forget_worker("w1");
        assert!(l.shares(&g, wall, t0).is_empty());
    }

    #[test]
    fn failed_calls_to_telegram_count_within_an_hour_but_cancels_and_answers_do_not() {
        let g = gw(0, 2);
        let mut l = Limits::new();
        let t0 = at(NOV_END - 7200);
        l.record(&report(CallDirection::ToTelegram, 0, false, true), t0);
        l.record(&report(CallDirection::ToTelegram, 5_000, true, false), t0);
        l.record(&report(CallDirection::FromTelegram, 0, false, false), t0);
        l.record(&report(CallDirection::ToTelegram, 0, false, false), t0);
        assert_eq!(l.admit(&g, true, t0), Ok(None));
        l.record(
            &report(CallDirection::ToTelegram, 0, false, false),
            t0 + Duration::from_secs(600),
        );
        let refused = Refusal {
            code: 402,
            reason: "Amount of fail calls is exceeded",
        };
        assert_eq!(
            l.admit(&g, true, t0 + Duration::from_secs(601)),
            Err(refused)
        );
        // Telegram users may still call the PBX.
        assert_eq!(l.admit(&g, false, t0 + Duration::from_secs(601)), Ok(None));
        // An hour after the first failure only one remains in the window.
        assert_eq!(l.admit(&g, true, t0 + Duration::from_secs(3601)), Ok(None));
    }
}
