//! RFC 3550 receiver statistics of one RTP stream: extended sequence numbers with the A.1
//! dropout/misorder rules, loss, and A.8 interarrival jitter.

use std::time::Instant;

/// A jump forward of more than this many sequence numbers is not trusted at once (A.1).
const MAX_DROPOUT: u16 = 3000;
/// A jump backward of up to this many is a late (reordered) packet, not a restart (A.1).
const MAX_MISORDER: u16 = 100;

/// Running reception statistics, updated once per received RTP packet, no allocation.
#[derive(Debug, Clone, Default)]
pub struct ReceptionStats {
    started: bool,
    ssrc: u32,
    base_seq: u64,
    max_seq: u16,
    cycles: u64,
    /// Sequence number that would confirm a big jump as a sender restart (A.1 `bad_seq`).
    bad_seq: Option<u16>,
    received: u64,
    /// Packets counted over every SSRC of the leg.
    received_total: u64,
    /// Loss and reception of earlier SSRCs of this leg (re-INVITE, transfer, sender restart).
    prior_lost: u64,
    /// Previous relative transit time in RTP clock units (A.8).
    transit: Option<f64>,
    /// Jitter estimate in RTP clock units.
    jitter: f64,
}

/// One received RTP packet, as the statistics see it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub at: Instant,
    pub clock_rate: u32,
    /// False for packets whose timestamp does not advance with time (RFC 4733 events).
    pub timed: bool,
}

impl ReceptionStats {
    fn restart(&mut self, ssrc: u32, seq: u16) {
        self.prior_lost += self.current_lost();
        self.started = true;
        self.ssrc = ssrc;
        self.base_seq = seq as u64;
        self.max_seq = seq;
        self.cycles = 0;
        self.bad_seq = None;
        self.received = 0;
        self.transit = None;
    }

    /// Accounts one packet; `epoch` is the fixed instant arrival times are measured from.
    pub fn on_packet(&mut self, p: Arrival, epoch: Instant) {
        if !self.started || p.ssrc != self.ssrc {
            self.restart(p.ssrc, p.seq);
        } else {
            let delta = p.seq.wrapping_sub(self.max_seq);
            if delta != 0 && delta < MAX_DROPOUT {
                if p.seq < self.max_seq {
                    self.cycles += 1 << 16;
                }
                self.max_seq = p.seq;
            } else if delta != 0 && delta <= u16::MAX - MAX_MISORDER {
                // A big jump: believe it only when the next packet follows it (sender restart).
                if self.bad_seq == Some(p.seq) {
                    self.restart(p.ssrc, p.seq);
                } else {
                    self.bad_seq = Some(p.seq.wrapping_add(1));
                    return;
                }
            }
            // Otherwise a duplicate or a late packet: counted as received.
        }
        self.received += 1;
        self.received_total += 1;
        if !p.timed || p.clock_rate == 0 {
            return;
        }
        let arrival = p.at.saturating_duration_since(epoch).as_secs_f64() * p.clock_rate as f64;
        let transit = arrival - p.timestamp as f64;
        if let Some(prev) = self.transit {
            let d = (transit - prev).abs();
            // A timestamp jump (new talk spurt, clock reset) is not jitter.
            if d < p.clock_rate as f64 {
                self.jitter += (d - self.jitter) / 16.0;
            }
        }
        self.transit = Some(transit);
    }

    /// Packets expected from the current SSRC's sequence numbers.
    pub fn expected(&self) -> u64 {
        if !self.started {
            return 0;
        }
        (self.cycles + self.max_seq as u64 + 1).saturating_sub(self.base_seq)
    }

    fn current_lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// Packets expected but not received, over every SSRC the leg has seen (duplicates can make
    /// received exceed expected: that counts as 0, never negative).
    pub fn lost(&self) -> u64 {
        self.prior_lost + self.current_lost()
    }

    /// Fraction of packets lost (0–1) over every SSRC of the leg.
    pub fn loss_fraction(&self) -> f64 {
        let lost = self.lost();
        let total = lost + self.received_total;
        if total == 0 {
            0.0
        } else {
            lost as f64 / total as f64
        }
    }

    /// Interarrival jitter in milliseconds.
    pub fn jitter_ms(&self, clock_rate: u32) -> f64 {
        if clock_rate == 0 {
            return 0.0;
        }
        self.jitter * 1000.0 / clock_rate as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn feed(s: &mut ReceptionStats, epoch: Instant, ssrc: u32, seq: u16, i: u32, wobble_ms: u64) {
        s.on_packet(
            Arrival {
                ssrc,
                seq,
                timestamp: 160 * i,
                at: epoch + Duration::from_millis(20 * i as u64 + wobble_ms),
                clock_rate: 8000,
                timed: true,
            },
            epoch,
        );
    }

    #[test]
    fn gap_in_sequence_counts_as_loss_across_wrap() {
        let epoch = Instant::now();
        let mut s = ReceptionStats::default();
        let mut seq: u16 = 65_530;
        for i in 0..20u32 {
            if i != 8 && i != 9 {
                feed(&mut s, epoch, 1, seq, i, 0);
            }
            seq = seq.wrapping_add(1);
        }
        assert_eq!(s.expected(), 20);
        assert_eq!(s.lost(), 2);
        assert!(
            s.jitter_ms(8000) < 0.01,
            "evenly paced stream has no jitter"
        );
    }

    #[test]
    fn uneven_arrival_shows_jitter() {
        let epoch = Instant::now();
        let mut s = ReceptionStats::default();
        for i in 0..100u32 {
            feed(
                &mut s,
                epoch,
                1,
                i as u16,
                i,
                if i % 2 == 0 { 0 } else { 10 },
            );
        }
        let j = s.jitter_ms(8000);
        assert!((8.0..=10.5).contains(&j), "jitter {j}");
    }

    #[test]
    fn new_ssrc_restarts_the_sequence_without_inventing_loss() {
        let epoch = Instant::now();
        let mut s = ReceptionStats::default();
        for i in 0..10u32 {
            feed(&mut s, epoch, 1, 100 + i as u16, i, 0);
        }
        // Re-INVITE: a new sender with a random sequence start.
        for i in 10..20u32 {
            feed(&mut s, epoch, 2, 40_000 + i as u16, i, 0);
        }
        assert_eq!(s.lost(), 0);
        assert_eq!(s.expected(), 10, "expected counts the current SSRC");
    }

    #[test]
    fn one_wild_sequence_number_is_ignored_but_a_restart_is_followed() {
        let epoch = Instant::now();
        let mut s = ReceptionStats::default();
        for i in 0..10u32 {
            feed(&mut s, epoch, 1, i as u16, i, 0);
        }
        feed(&mut s, epoch, 1, 30_000, 10, 0); // corrupt/stray
        for i in 11..15u32 {
            feed(&mut s, epoch, 1, (i - 1) as u16, i, 0);
        }
        assert_eq!(s.lost(), 0, "a single wild packet is not 20k lost");
        // The same SSRC restarting at another sequence: two consecutive packets confirm it.
        feed(&mut s, epoch, 1, 50_000, 15, 0);
        feed(&mut s, epoch, 1, 50_001, 16, 0);
        feed(&mut s, epoch, 1, 50_002, 17, 0);
        assert_eq!(s.lost(), 0);
    }

    #[test]
    fn late_packets_are_not_loss() {
        let epoch = Instant::now();
        let mut s = ReceptionStats::default();
        for (i, seq) in [0u16, 1, 3, 2, 4].into_iter().enumerate() {
            feed(&mut s, epoch, 1, seq, i as u32, 0);
        }
        assert_eq!(s.lost(), 0);
        assert_eq!(s.expected(), 5);
    }
}

/// Listening-quality estimate (MOS, 1–4.5) of a stream by the ITU-T G.107 E-model, simplified as
/// VoIP monitors (rtpengine among them) do: no echo or delay measurement, so the delay impairment
/// uses an effective latency of `2 × jitter + 10 ms`; packet-loss impairment per codec (Ie, Bpl).
pub fn mos(loss_fraction: f64, jitter_ms: f64, codec: &str) -> f64 {
    // (Ie, Bpl) from G.113 Appendix I; G.711 with packet-loss concealment.
    let (ie, bpl) = match codec.to_ascii_uppercase().as_str() {
        "G729" => (11.0, 19.0),
        "G722" => (0.0, 23.0),
        "OPUS" => (0.0, 20.0),
        _ => (0.0, 25.1),
    };
    let ppl = (loss_fraction * 100.0).clamp(0.0, 100.0);
    let ie_eff = ie + (95.0 - ie) * ppl / (ppl + bpl);
    let d = 2.0 * jitter_ms.max(0.0) + 10.0;
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let r = 93.2 - id - ie_eff;
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6
    }
}

#[cfg(test)]
mod mos_tests {
    use super::mos;

    #[test]
    fn clean_g711_is_about_4_4_and_loss_lowers_it() {
        let clean = mos(0.0, 0.0, "PCMA");
        assert!((4.35..=4.45).contains(&clean), "{clean}");
        let one_percent = mos(0.01, 0.0, "PCMA");
        assert!(one_percent < clean && one_percent > 4.1, "{one_percent}");
        let heavy = mos(0.2, 40.0, "PCMA");
        assert!(heavy < 3.0, "{heavy}");
        assert!(mos(1.0, 1000.0, "PCMA") >= 1.0);
    }
}
