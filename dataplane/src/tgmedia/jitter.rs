//! The jitter buffer of the transcoding direction (Telegram → PBX), sans-IO.
//!
//! Opus packets from Telegram arrive with network jitter, sometimes reordered or lost. When the
//! gateway transcodes, it is the last point that can still reorder and conceal: it plays the
//! packets out on a steady clock, [`JitterBuffer::target_delay`] behind the first of a talk
//! spurt, and reports a hole as [`Playout::Missing`] (with the next packet when it is already
//! here, whose in-band FEC can rebuild the lost frame) so the decoder conceals it.
//!
//! The delay adapts to the measured jitter (RFC 3550 estimator) at each new talk spurt, never
//! mid-spurt (that would be an audible skip). Storage is a fixed ring: no allocation per packet
//! (the payloads are the receive path's shared buffers).

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Packets held at most; one arriving further ahead restarts playout from it.
pub const SLOTS: usize = 16;
/// Playout delay bounds.
pub const MIN_DELAY: Duration = Duration::from_millis(20);
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// Frames concealed in a row before playout stops and waits for the next talk spurt (DTX or a
/// long outage: inventing more would only be noise).
pub const MAX_CONCEALED: u32 = 5;
/// The frame length assumed for a hole (Telegram sends 20 ms Opus frames).
pub const FRAME: Duration = Duration::from_millis(20);
/// Opus RTP clock ticks per millisecond.
const TICKS_PER_MS: f64 = 48.0;

/// What to play now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// The packet due now.
    Packet(Arc<[u8]>),
    /// The packet due now is missing: conceal one frame (from `next`'s FEC when present).
    Missing { next: Option<Arc<[u8]>> },
}

/// Counters for stats and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub played: u64,
    pub concealed: u64,
    /// Arrived after their playout time (or duplicates).
    pub late: u64,
    /// Playout restarts (talk spurts and overruns).
    pub restarts: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    seq: u64,
    payload: Arc<[u8]>,
}

/// Reorders and times Opus packets for decoding.
#[derive(Debug)]
pub struct JitterBuffer {
    ring: [Option<Slot>; SLOTS],
    /// The sequence number due next and when; `None` while waiting for a talk spurt.
    next: Option<(u64, Instant)>,
    /// The last sequence number played or concealed: older arrivals are late.
    last: Option<u64>,
    concealed_in_row: u32,
    delay: Duration,
    /// RFC 3550 interarrival jitter in ms, and the previous (arrival, timestamp).
    jitter_ms: f64,
    prev: Option<(Instant, u32)>,
    stats: JitterStats,
}

impl Default for JitterBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl JitterBuffer {
    /// An empty buffer starting at a 40 ms delay.
    pub fn new() -> Self {
        JitterBuffer {
            ring: Default::default(),
            next: None,
            last: None,
            concealed_in_row: 0,
            delay: Duration::from_millis(40),
            jitter_ms: 0.0,
            prev: None,
            stats: JitterStats::default(),
        }
    }

    /// The playout delay the next talk spurt starts with.
    pub fn target_delay(&self) -> Duration {
        self.delay
    }

    /// Counters so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// A packet arrived at `now` with extended sequence number `seq` and RTP `timestamp`.
    pub fn push(&mut self, now: Instant, seq: u64, timestamp: u32, payload: Arc<[u8]>) {
        self.measure(now, timestamp);
        if self.last.is_some_and(|l| seq <= l) {
            self.stats.late += 1;
            return;
        }
        match self.next {
            None => {
                // A talk spurt starts: adapt the delay now, while nothing is playing.
                let want = Duration::from_secs_f64((2.0 * self.jitter_ms + 40.0) / 1000.0);
                self.delay = want.clamp(MIN_DELAY, MAX_DELAY);
                self.ring = Default::default();
                self.next = Some((seq, now + self.delay));
                self.concealed_in_row = 0;
                self.stats.restarts += 1;
            }
            Some((due, _)) if seq >= due + SLOTS as u64 => {
                // Far ahead of playout (a clock running fast, or a long stall): restart here.
                self.ring = Default::default();
                self.next = Some((seq, now + self.delay));
                self.concealed_in_row = 0;
                self.stats.restarts += 1;
            }
            Some(_) => {}
        }
        let slot = &mut self.ring[seq as usize % SLOTS];
        if slot.as_ref().is_some_and(|s| s.seq == seq) {
            self.stats.late += 1; // duplicate
            return;
        }
        *slot = Some(Slot { seq, payload });
    }

    /// When [`JitterBuffer::pop`] has something; `None` while waiting for packets.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next.map(|(_, at)| at)
    }

    /// What to play at `now`, if anything is due; call until `None`. Each item is assumed to
    /// play for [`FRAME`] unless [`JitterBuffer::played_for`] says otherwise.
    pub fn pop(&mut self, now: Instant) -> Option<Playout> {
        let (seq, at) = self.next?;
        if now < at {
            return None;
        }
        let out = match self.take(seq) {
            Some(payload) => {
                self.concealed_in_row = 0;
                self.stats.played += 1;
                Playout::Packet(payload)
            }
            None => {
                let waiting = self.ring.iter().flatten().any(|s| s.seq > seq);
                if !waiting && self.concealed_in_row >= MAX_CONCEALED {
                    // Nothing more is coming for now: wait for the next talk spurt.
                    self.next = None;
                    return None;
                }
                self.concealed_in_row += 1;
                self.stats.concealed += 1;
                let next = self.peek(seq + 1);
                Playout::Missing { next }
            }
        };
        self.last = Some(seq);
        self.next = Some((seq + 1, at + FRAME));
        Some(out)
    }

    /// Sets how long the item just popped plays (a 40 or 60 ms Opus packet plays longer).
    pub fn played_for(&mut self, duration: Duration) {
        if let Some((_, at)) = self.next.as_mut() {
            *at = *at - FRAME + duration.max(Duration::from_millis(1));
        }
    }

    fn take(&mut self, seq: u64) -> Option<Arc<[u8]>> {
        let slot = &mut self.ring[seq as usize % SLOTS];
        if slot.as_ref().is_some_and(|s| s.seq == seq) {
            slot.take().map(|s| s.payload)
        } else {
            None
        }
    }

    fn peek(&self, seq: u64) -> Option<Arc<[u8]>> {
        self.ring[seq as usize % SLOTS]
            .as_ref()
            .filter(|s| s.seq == seq)
            .map(|s| s.payload.clone())
    }

    /// RFC 3550 §6.4.1 interarrival jitter, in ms.
    fn measure(&mut self, now: Instant, timestamp: u32) {
        if let Some((at, ts)) = self.prev {
            let arrival_ms = now.saturating_duration_since(at).as_secs_f64() * 1000.0;
            let media_ms = timestamp.wrapping_sub(ts) as i32 as f64 / TICKS_PER_MS;
            let d = (arrival_ms - media_ms).abs();
            self.jitter_ms += (d - self.jitter_ms) / 16.0;
        }
        self.prev = Some((now, timestamp));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(n: u8) -> Arc<[u8]> {
        Arc::from(vec![n].into_boxed_slice())
    }

    /// Plays on a 5 ms clock from `t0` for `ms`, feeding `arrivals` (ms, seq) as they come.
    fn run(jb: &mut JitterBuffer, t0: Instant, arrivals: &[(u64, u64)], ms: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut t = 0;
        while t <= ms {
            let now = t0 + Duration::from_millis(t);
            for &(_, seq) in arrivals.iter().filter(|(at, _)| *at == t) {
                jb.push(now, seq, (seq as u32) * 960, pkt(seq as u8));
            }
            while let Some(p) = jb.pop(now) {
                out.push(match p {
                    Playout::Packet(b) => format!("{}@{t}", b[0]),
                    Playout::Missing { next: Some(n) } => format!("fec{}@{t}", n[0]),
                    Playout::Missing { next: None } => format!("plc@{t}"),
                });
            }
            t += 5;
        }
        out
    }

    #[test]
    fn reordered_packets_play_in_order_on_a_steady_clock() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        // 0 at 0 ms, 2 before 1, the rest on time.
        let arrivals = [(0, 0), (20, 2), (25, 1), (60, 3), (80, 4)];
        let out = run(&mut jb, t0, &arrivals, 200);
        assert_eq!(out[..5], ["0@40", "1@60", "2@80", "3@100", "4@120"]);
        assert_eq!(jb.stats().played, 5);
    }

    #[test]
    fn a_hole_is_concealed_with_fec_when_the_next_packet_is_here_and_late_ones_are_dropped() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        // 1 never comes in time (it arrives after its slot); 3 is lost for good.
        let arrivals = [(0, 0), (20, 2), (65, 1), (80, 4), (100, 5)];
        let out = run(&mut jb, t0, &arrivals, 200);
        assert_eq!(
            out[..6],
            ["0@40", "fec2@60", "2@80", "fec4@100", "4@120", "5@140"]
        );
        let s = jb.stats();
        assert_eq!((s.played, s.late), (4, 1));
        // Two holes, and the three frames after the last packet until the run ends at 200 ms.
        assert_eq!(s.concealed, 5);
    }

    #[test]
    fn playout_stops_after_a_few_concealed_frames_and_restarts_on_the_next_spurt() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        let arrivals = [(0, 0), (1000, 60)];
        let out = run(&mut jb, t0, &arrivals, 1100);
        let at = |o: &String| o.split('@').nth(1).and_then(|t| t.parse::<u64>().ok());
        let plc = out
            .iter()
            .filter(|o| o.starts_with("plc") && at(o) < Some(1000))
            .count();
        assert_eq!(plc as u32, MAX_CONCEALED, "{out:?}");
        // The next spurt plays after the (adapted) delay.
        assert!(out.iter().any(|o| o.starts_with("60@")), "{out:?}");
        assert_eq!(jb.stats().restarts, 2);
    }

    #[test]
    fn the_delay_grows_with_jitter_within_bounds() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        // Packets 20 ms apart in media time arriving 0 / 60 ms apart: heavy jitter.
        let mut now = t0;
        for seq in 0..40u64 {
            now += Duration::from_millis(if seq % 2 == 0 { 0 } else { 40 });
            jb.push(now, seq, seq as u32 * 960, pkt(0));
        }
        jb.next = None; // a new spurt adapts the delay
        jb.push(now, 41, 41 * 960, pkt(0));
        assert!(
            jb.target_delay() > Duration::from_millis(40),
            "{:?}",
            jb.target_delay()
        );
        assert!(jb.target_delay() <= MAX_DELAY);
        // A packet far ahead restarts playout from it.
        let before = jb.stats().restarts;
        jb.push(now, 41 + SLOTS as u64 + 3, 0, pkt(9));
        assert_eq!(jb.stats().restarts, before + 1);
    }

    #[test]
    fn a_longer_packet_delays_the_next_one() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        jb.push(t0, 0, 0, pkt(0));
        jb.push(t0, 1, 2880, pkt(1));
        let at = t0 + jb.target_delay();
        assert!(matches!(jb.pop(at), Some(Playout::Packet(_))));
        jb.played_for(Duration::from_millis(60));
        assert!(jb.pop(at + Duration::from_millis(40)).is_none());
        assert!(matches!(
            jb.pop(at + Duration::from_millis(60)),
            Some(Playout::Packet(_))
        ));
    }
}
