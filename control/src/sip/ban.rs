//! Brute-force protection for the SIP edge, the way SIP.TG's Worker does it with fail2ban
//! (`maxretry=5`, `findtime=600`, `bantime=1800`, `bantime.increment=true`): too many failed
//! authentications from one address within a window ban that address, and every repeat offence
//! bans it for longer.
//!
//! Sans-IO: the caller passes `now` and acts on the answers (drop packets from a banned address,
//! log a new [`Ban`]). Memory is bounded: entries are forgotten once nothing about them matters
//! any more, and at most [`BanConfig::max_tracked`] addresses are tracked.
//!
//! IPv6 addresses are tracked per network of [`BanConfig::ipv6_prefix`] bits (a /64 by
//! default): one subscriber usually holds a whole /64, so banning single IPv6 addresses would
//! neither stop an attacker nor protect the table from being filled.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::cidr::Cidr;

/// Longest duration the list works with; longer configured values are clamped so that time
/// arithmetic can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The numbers of the policy; defaults are SIP.TG's fail2ban jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanConfig {
    /// Failures within `window` that trigger a ban; 0 turns banning off.
    pub max_failures: u32,
    /// How far back failures count (fail2ban's `findtime`).
    pub window: Duration,
    /// Length of a first ban (fail2ban's `bantime`).
    pub ban: Duration,
    /// Each repeat offence multiplies the previous ban by this (1 = no growth, 0 treated as 1).
    pub multiplier: u32,
    /// Upper bound of a grown ban.
    pub max_ban: Duration,
    /// How long after its last ban ends an address's offence history is kept; a failure after
    /// that starts again from a first ban.
    pub forget: Duration,
    /// Addresses and networks that are never banned (our own Manager, a customer's PBX).
    pub allow: Vec<Cidr>,
    /// Most addresses tracked at once; beyond it the entry closest to being forgotten goes.
    pub max_tracked: usize,
    /// IPv6 addresses are tracked and banned per network of this many bits (128 = per address).
    pub ipv6_prefix: u8,
}

impl Default for BanConfig {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window: Duration::from_secs(600),
            ban: Duration::from_secs(1800),
            multiplier: 2,
            max_ban: Duration::from_secs(7 * 24 * 3600),
            forget: Duration::from_secs(24 * 3600),
            allow: Vec::new(),
            max_tracked: 100_000,
            ipv6_prefix: 64,
        }
    }
}

/// A ban that has just started; returned so the caller can log it and drop the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The banned network: the address for IPv4, its `ipv6_prefix` network for IPv6.
    pub net: Cidr,
    /// How long this ban lasts.
    pub duration: Duration,
    /// When it ends.
    pub until: Instant,
    /// Which offence this is (1 for the first ban).
    pub offence: u32,
}

/// A current ban, as listed for the control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanInfo {
    /// The banned network (see [`Ban::net`]); its `addr()` is what `lift` takes.
    pub net: Cidr,
    /// When the ban ends.
    pub until: Instant,
    /// Time left at the `now` passed to `list`.
    pub remaining: Duration,
    /// Bans this address has had within the offence memory, this one included.
    pub offences: u32,
}

#[derive(Debug)]
struct Entry {
    /// Failures inside the window, oldest first; never more than `max_failures`.
    failures: VecDeque<Instant>,
    /// End of the current or last ban.
    banned_until: Option<Instant>,
    offences: u32,
    /// When this entry stops mattering; its key in `BanList::by_expiry`.
    expires: Instant,
}

/// Failure counts, bans and offence history per address. See the module docs.
#[derive(Debug)]
pub struct BanList {
    config: BanConfig,
    entries: HashMap<IpAddr, Entry>,
    /// Entries ordered by when they can be forgotten: the front is pruned when expired and
    /// evicted first when the table is full (failure-only entries go before bans).
    by_expiry: BTreeSet<(Instant, IpAddr)>,
    /// Latest `now` seen, so `lift` can tell a current ban from one that just ended.
    latest: Option<Instant>,
}

fn add(t: Instant, d: Duration) -> Instant {
    // Durations are clamped to MAX_DURATION, so this only falls back on absurd clocks.
    t.checked_add(d).unwrap_or(t)
}

impl BanList {
    /// A list with this policy. Out-of-range numbers are clamped rather than refused (config
    /// validation is the place to refuse them): durations to ten years, `max_ban` to at least
    /// `ban`, `ipv6_prefix` to 128, `max_tracked` to at least 1.
    pub fn new(mut config: BanConfig) -> Self {
        config.window = config.window.min(MAX_DURATION);
        config.ban = config.ban.min(MAX_DURATION);
        config.max_ban = config.max_ban.min(MAX_DURATION).max(config.ban);
        config.forget = config.forget.min(MAX_DURATION);
        config.multiplier = config.multiplier.max(1);
        config.max_tracked = config.max_tracked.max(1);
        config.ipv6_prefix = config.ipv6_prefix.min(128);
        Self {
            config,
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            latest: None,
        }
    }

    /// The policy in force (after clamping).
    pub fn config(&self) -> &BanConfig {
        &self.config
    }

    /// Number of addresses currently tracked (failures, bans or offence history).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn key(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let p = u32::from(self.config.ipv6_prefix);
                let mask = if p == 0 {
                    0
                } else {
                    u128::MAX << (128 - p.min(128))
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    fn net_of(&self, key: IpAddr) -> Cidr {
        let prefix = match key {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => self.config.ipv6_prefix,
        };
        // The key is already masked and the prefix in range; fall back to the host network.
        Cidr::new(key, prefix).unwrap_or_else(|_| Cidr::host(key))
    }

    fn is_allowed(&self, ip: IpAddr) -> bool {
        self.config.allow.iter().any(|n| n.contains(ip))
    }

    fn observe(&mut self, now: Instant) {
        if self.latest.is_none_or(|l| now > l) {
            self.latest = Some(now);
        }
        // Forget whatever has expired; each entry is popped once, so this is cheap amortised.
        while let Some(&(expires, key)) = self.by_expiry.first() {
            if expires > now {
                break;
            }
            self.by_expiry.pop_first();
            self.entries.remove(&key);
        }
    }

    /// When an entry stops mattering: its last failure leaves the window, and its last ban
    /// plus the offence memory has passed. `None` means it can go now.
    fn expiry(&self, e: &Entry) -> Option<Instant> {
        let failures = e.failures.back().map(|&t| add(t, self.config.window));
        let history = e.banned_until.map(|t| add(t, self.config.forget));
        failures.max(history)
    }

    /// Re-files `key` in the expiry index after its entry changed, or drops it.
    fn refile(&mut self, key: IpAddr) {
        let Some(entry) = self.entries.get(&key) else {
            return;
        };
        let old = entry.expires;
        match self.expiry(entry) {
            Some(new) => {
                if new != old {
                    self.by_expiry.remove(&(old, key));
                    self.by_expiry.insert((new, key));
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.expires = new;
                    }
                }
            }
            None => {
                self.by_expiry.remove(&(old, key));
                self.entries.remove(&key);
            }
        }
    }

    /// Whether `ip` is banned now, and for how much longer. Called for every request from the
    /// network, so it is one hash lookup plus amortised pruning.
    pub fn is_banned(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        self.observe(now);
        let entry = self.entries.get(&self.key(ip))?;
        let until = entry.banned_until?;
        if until <= now || self.is_allowed(ip) {
            return None;
        }
        Some(until.saturating_duration_since(now))
    }

    /// Counts a failed authentication from `ip`; returns the ban it triggers, if any.
    /// Failures while already banned are ignored (the caller should not have processed the
    /// request), as are failures from allow-listed addresses.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) -> Option<Ban> {
        self.observe(now);
        if self.config.max_failures == 0 || self.is_allowed(ip) {
            return None;
        }
        let key = self.key(ip);
        if !self.entries.contains_key(&key) {
            if self.entries.len() >= self.config.max_tracked {
                // Full: drop the entry closest to being forgotten anyway. Failure-only entries
                // expire within `window`, bans much later, so bans are the last to go.
                if let Some((_, victim)) = self.by_expiry.pop_first() {
                    self.entries.remove(&victim);
                }
            }
            let e = Entry {
                failures: VecDeque::new(),
                banned_until: None,
                offences: 0,
                expires: now,
            };
            self.by_expiry.insert((now, key));
            self.entries.insert(key, e);
        }
        let window = self.config.window;
        let max_failures = self.config.max_failures;
        let entry = self.entries.get_mut(&key)?;
        if entry.banned_until.is_some_and(|t| t > now) {
            return None;
        }
        while entry
            .failures
            .front()
            .is_some_and(|&t| add(t, window) <= now)
        {
            entry.failures.pop_front();
        }
        entry.failures.push_back(now);
        let mut ban = None;
        if entry.failures.len() >= max_failures as usize {
            entry.failures.clear();
            entry.offences = entry.offences.saturating_add(1);
            let offence = entry.offences;
            let duration = ban_duration(&self.config, offence);
            let until = add(now, duration);
            entry.banned_until = Some(until);
            ban = Some(Ban {
                net: self.net_of(key),
                duration,
                until,
                offence,
            });
        }
        self.refile(key);
        ban
    }

    /// A successful authentication from `ip`: its failure count starts again, but its offence
    /// history stays, so an attacker who also owns one valid account still escalates.
    pub fn record_success(&mut self, ip: IpAddr) {
        let key = self.key(ip);
        if let Some(e) = self.entries.get_mut(&key) {
            e.failures.clear();
            self.refile(key);
        }
    }

    /// The bans in force at `now`, ordered by network.
    pub fn list(&self, now: Instant) -> Vec<BanInfo> {
        let mut out: Vec<BanInfo> = self
            .entries
            .iter()
            .filter_map(|(&key, e)| {
                let until = e.banned_until.filter(|&t| t > now)?;
                Some(BanInfo {
                    net: self.net_of(key),
                    until,
                    remaining: until.saturating_duration_since(now),
                    offences: e.offences,
                })
            })
            .collect();
        out.sort_by_key(|b| b.net);
        out
    }

    /// Lifts the ban on `ip` (an operator's decision) and forgets everything about it,
    /// offence history included, since lifting says the ban was a mistake. Returns whether a
    /// ban was in force as of the latest time the list has seen.
    pub fn lift(&mut self, ip: IpAddr) -> bool {
        let key = self.key(ip);
        let Some(e) = self.entries.remove(&key) else {
            return false;
        };
        self.by_expiry.remove(&(e.expires, key));
        match (e.banned_until, self.latest) {
            (Some(until), Some(latest)) => until > latest,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// `ban × multiplier^(offence−1)`, capped at `max_ban`.
fn ban_duration(config: &BanConfig, offence: u32) -> Duration {
    let mut d = config.ban;
    for _ in 1..offence {
        if d >= config.max_ban {
            break;
        }
        d = d.saturating_mul(config.multiplier);
    }
    d.min(config.max_ban)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn list() -> BanList {
        BanList::new(BanConfig::default())
    }

    /// Fails `n` times, one minute apart from `start`; returns the last result and time.
    fn fail(bans: &mut BanList, addr: &str, n: u32, start: Instant) -> (Option<Ban>, Instant) {
        let mut t = start;
        let mut last = None;
        for i in 0..n {
            t = start + MIN * i;
            last = bans.record_failure(ip(addr), t);
        }
        (last, t)
    }

    #[test]
    fn five_failures_in_the_window_ban_for_thirty_minutes() {
        let mut bans = list();
        let t0 = Instant::now();
        let (none, _) = fail(&mut bans, "192.0.2.1", 4, t0);
        assert!(none.is_none());
        assert!(bans.is_banned(ip("192.0.2.1"), t0 + MIN * 4).is_none());
        let t = t0 + MIN * 4;
        let ban = bans
            .record_failure(ip("192.0.2.1"), t)
            .expect("fifth failure bans");
        assert_eq!(ban.duration, Duration::from_secs(1800));
        assert_eq!(ban.offence, 1);
        assert_eq!(ban.until, t + Duration::from_secs(1800));
        assert_eq!(ban.net.to_string(), "192.0.2.1/32");
        assert_eq!(
            bans.is_banned(ip("192.0.2.1"), t),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            bans.is_banned(ip("192.0.2.1"), t + Duration::from_secs(1799)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            bans.is_banned(ip("192.0.2.1"), t + Duration::from_secs(1800)),
            None
        );
        // Other addresses are unaffected; a mapped form of the same address is the same one.
        assert_eq!(bans.is_banned(ip("192.0.2.2"), t), None);
        assert!(bans.is_banned(ip("::ffff:192.0.2.1"), t).is_some());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let mut bans = list();
        let t0 = Instant::now();
        fail(&mut bans, "192.0.2.1", 4, t0);
        // The first failure leaves the 600 s window just before the fifth arrives.
        let t = t0 + Duration::from_secs(600);
        assert!(bans.record_failure(ip("192.0.2.1"), t).is_none());
        // But the four inside the window plus one more do ban (sliding window).
        let ban = bans.record_failure(ip("192.0.2.1"), t + Duration::from_secs(1));
        assert!(ban.is_some());

        let mut bans = list();
        fail(&mut bans, "192.0.2.9", 4, t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(bans.record_failure(ip("192.0.2.9"), later).is_none());
        assert_eq!(bans.is_banned(ip("192.0.2.9"), later), None);
    }

    #[test]
    fn repeat_offences_double_up_to_the_cap() {
        let mut bans = list();
        let mut t = Instant::now();
        let mut expected = Duration::from_secs(1800);
        for offence in 1..=12 {
            let (ban, last) = fail(&mut bans, "198.51.100.7", 5, t);
            let ban = ban.expect("banned");
            assert_eq!(ban.offence, offence);
            assert_eq!(ban.duration, expected, "offence {offence}");
            expected = (expected * 2).min(Duration::from_secs(7 * 24 * 3600));
            // Failures during the ban are ignored.
            assert!(bans
                .record_failure(ip("198.51.100.7"), last + MIN)
                .is_none());
            t = ban.until + MIN;
        }
        assert_eq!(
            ban_duration(bans.config(), 2),
            Duration::from_secs(3600),
            "second offence is one hour"
        );
        assert_eq!(
            ban_duration(bans.config(), u32::MAX),
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn offence_history_is_forgotten_after_a_day() {
        let mut bans = list();
        let t0 = Instant::now();
        let (ban, _) = fail(&mut bans, "192.0.2.1", 5, t0);
        let ban = ban.expect("banned");
        let t = ban.until + Duration::from_secs(24 * 3600);
        let (ban, _) = fail(&mut bans, "192.0.2.1", 5, t);
        let ban = ban.expect("banned again");
        assert_eq!(ban.offence, 1);
        assert_eq!(ban.duration, Duration::from_secs(1800));
    }

    #[test]
    fn success_clears_failures_but_not_history() {
        let mut bans = list();
        let t0 = Instant::now();
        fail(&mut bans, "192.0.2.1", 4, t0);
        bans.record_success(ip("192.0.2.1"));
        assert!(bans.is_empty(), "nothing left to remember");
        let (none, _) = fail(&mut bans, "192.0.2.1", 4, t0 + MIN * 5);
        assert!(none.is_none());

        let (ban, _) = fail(&mut bans, "192.0.2.2", 5, t0);
        let ban = ban.expect("banned");
        let after = ban.until + MIN;
        bans.record_success(ip("192.0.2.2"));
        let (ban, _) = fail(&mut bans, "192.0.2.2", 5, after);
        assert_eq!(ban.expect("banned").offence, 2);
    }

    #[test]
    fn allow_listed_addresses_are_never_banned() {
        let mut bans = BanList::new(BanConfig {
            allow: vec![
                "10.0.0.0/8".parse().expect("cidr"),
                "2001:db8::/32".parse().expect("cidr"),
                "192.0.2.5".parse().expect("cidr"),
            ],
            ..BanConfig::default()
        });
        let t0 = Instant::now();
        for a in ["10.1.2.3", "2001:db8::1", "192.0.2.5", "::ffff:10.9.9.9"] {
            let (ban, t) = fail(&mut bans, a, 50, t0);
            assert!(ban.is_none(), "{a}");
            assert_eq!(bans.is_banned(ip(a), t), None, "{a}");
        }
        assert!(bans.is_empty());
        let (ban, _) = fail(&mut bans, "192.0.2.6", 5, t0);
        assert!(ban.is_some());
    }

    #[test]
    fn lift_and_list() {
        let mut bans = list();
        let t0 = Instant::now();
        let (a, _) = fail(&mut bans, "203.0.113.9", 5, t0);
        let (b, t) = fail(&mut bans, "2001:db8:1:2:3:4:5:6", 5, t0);
        fail(&mut bans, "203.0.113.10", 3, t0);
        let a = a.expect("ban a");
        let b = b.expect("ban b");
        assert_eq!(b.net.to_string(), "2001:db8:1:2::/64");

        let listed = bans.list(t);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].net, a.net);
        assert_eq!(listed[0].offences, 1);
        assert_eq!(listed[0].remaining, a.until - t);
        assert_eq!(listed[1].net, b.net);
        assert!(bans.list(t + Duration::from_secs(1800)).is_empty());

        // Another address of the same /64 is banned too, and lifting by it lifts the /64.
        assert!(bans.is_banned(ip("2001:db8:1:2::99"), t).is_some());
        assert!(bans.lift(ip("2001:db8:1:2::1")));
        assert!(bans.is_banned(ip("2001:db8:1:2:3:4:5:6"), t).is_none());
        assert!(!bans.lift(ip("2001:db8:1:2::1")), "already lifted");
        assert!(!bans.lift(ip("203.0.113.10")), "failures only, no ban");
        assert!(!bans.lift(ip("198.51.100.1")), "unknown");

        // Lifting forgets the history: the next ban is a first offence again.
        assert!(bans.lift(ip("203.0.113.9")));
        let (again, _) = fail(&mut bans, "203.0.113.9", 5, t + MIN);
        assert_eq!(again.expect("banned").offence, 1);
        assert_eq!(bans.list(t + MIN * 5).len(), 1);
    }

    #[test]
    fn per_address_ipv6_when_configured() {
        let mut bans = BanList::new(BanConfig {
            ipv6_prefix: 128,
            ..BanConfig::default()
        });
        let t0 = Instant::now();
        let (ban, t) = fail(&mut bans, "2001:db8::1", 5, t0);
        assert_eq!(ban.expect("banned").net.to_string(), "2001:db8::1/128");
        assert!(bans.is_banned(ip("2001:db8::2"), t).is_none());
    }

    #[test]
    fn disabled_when_max_failures_is_zero() {
        let mut bans = BanList::new(BanConfig {
            max_failures: 0,
            ..BanConfig::default()
        });
        let (ban, _) = fail(&mut bans, "192.0.2.1", 100, Instant::now());
        assert!(ban.is_none());
        assert!(bans.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_bans_outlive_failure_counts() {
        let mut bans = BanList::new(BanConfig {
            max_tracked: 100,
            ..BanConfig::default()
        });
        let t0 = Instant::now();
        // Ten banned addresses first.
        for i in 0..10u32 {
            let (ban, _) = fail(&mut bans, &format!("198.51.100.{i}"), 5, t0);
            assert!(ban.is_some());
        }
        let t = t0 + MIN * 5;
        // Then a flood of single failures from many addresses.
        for i in 0..5000u32 {
            let a = IpAddr::V4((0x0a00_0000 + i).into());
            bans.record_failure(a, t + Duration::from_millis(u64::from(i)));
            assert!(bans.len() <= 100);
            assert_eq!(bans.entries.len(), bans.by_expiry.len());
        }
        // The flood evicted failure counts, not the bans.
        for i in 0..10u32 {
            assert!(
                bans.is_banned(ip(&format!("198.51.100.{i}")), t + MIN)
                    .is_some(),
                "ban {i} survived the flood"
            );
        }
        // Everything expires on its own: failures after the window, bans after ban + forget.
        let late = t0 + Duration::from_secs(1800 + 24 * 3600 + 3600);
        assert!(bans.is_banned(ip("192.0.2.1"), late).is_none());
        assert!(bans.is_empty());
    }

    #[test]
    fn failure_only_entries_expire() {
        let mut bans = list();
        let t0 = Instant::now();
        fail(&mut bans, "192.0.2.1", 3, t0);
        assert_eq!(bans.len(), 1);
        bans.is_banned(ip("192.0.2.2"), t0 + Duration::from_secs(2 * 60 + 600));
        assert!(bans.is_empty());
    }

    #[test]
    fn absurd_config_is_clamped() {
        let mut bans = BanList::new(BanConfig {
            max_failures: 1,
            ban: Duration::MAX,
            window: Duration::MAX,
            forget: Duration::MAX,
            max_ban: Duration::ZERO,
            multiplier: 0,
            max_tracked: 0,
            ipv6_prefix: 200,
            allow: Vec::new(),
        });
        let t0 = Instant::now();
        let ban = bans.record_failure(ip("::1"), t0).expect("banned");
        assert_eq!(ban.duration, MAX_DURATION);
        assert!(bans.record_failure(ip("::2"), t0).is_some());
        assert_eq!(bans.len(), 1);
    }
}
