//! RFC 3550 receiver statistics of one RTP stream: extended sequence, loss, interarrival jitter.

use std::time::Instant;

/// Running reception statistics, updated once per received RTP packet, no allocation.
#[derive(Debug, Clone, Default)]
pub struct ReceptionStats {
    started: bool,
    base_seq: u32,
    max_seq: u16,
    cycles: u32,
    received: u64,
    /// Previous relative transit time in RTP clock units (RFC 3550 A.8).
    transit: f64,
    /// Jitter estimate in RTP clock units.
    jitter: f64,
}

impl ReceptionStats {
    /// Accounts one packet with sequence `seq` and RTP timestamp `ts`, arrived at `arrival`
    /// measured against `epoch`, for a stream clocked at `clock_rate` Hz.
    pub fn on_packet(
        &mut self,
        seq: u16,
        ts: u32,
        arrival: Instant,
        epoch: Instant,
        clock_rate: u32,
    ) {
        let arrival_units =
            arrival.saturating_duration_since(epoch).as_secs_f64() * clock_rate as f64;
        let transit = arrival_units - ts as f64;
        if !self.started {
            self.started = true;
            self.base_seq = seq as u32;
            self.max_seq = seq;
            self.transit = transit;
            self.received = 1;
            return;
        }
        self.received += 1;
        let delta = seq.wrapping_sub(self.max_seq);
        if delta != 0 && delta < 0x8000 {
            if seq < self.max_seq {
                self.cycles += 1 << 16;
            }
            self.max_seq = seq;
        }
        let d = (transit - self.transit).abs();
        self.transit = transit;
        // A timestamp jump (new talk spurt after silence, SSRC change) is not jitter.
        if d < clock_rate as f64 {
            self.jitter += (d - self.jitter) / 16.0;
        }
    }

    /// Packets expected from the sequence numbers seen.
    pub fn expected(&self) -> u64 {
        if !self.started {
            return 0;
        }
        (self.cycles as u64 + self.max_seq as u64) - self.base_seq as u64 + 1
    }

    /// Packets expected but not received (duplicates can make received exceed expected: then 0).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
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

    #[test]
    fn gap_in_sequence_counts_as_loss_across_wrap() {
        let epoch = Instant::now();
        let mut s = ReceptionStats::default();
        let mut seq: u16 = 65_530;
        for i in 0..20u32 {
            if i != 8 && i != 9 {
                let at = epoch + Duration::from_millis(20 * i as u64);
                s.on_packet(seq, 160 * i, at, epoch, 8000);
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
            let wobble = if i % 2 == 0 { 0 } else { 10 };
            let at = epoch + Duration::from_millis(20 * i as u64 + wobble);
            s.on_packet(i as u16, 160 * i, at, epoch, 8000);
        }
        let j = s.jitter_ms(8000);
        assert!((8.0..=10.5).contains(&j), "jitter {j}");
    }
}
