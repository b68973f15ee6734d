//! RFC 4733 telephone-events towards the PBX, sans-IO: digits the Telegram user types become
//! event packets in the SIP leg's own RTP stream (the bridge owns its SSRC, sequence and
//! timestamps, so the events and the audio around them stay one continuous stream).
//!
//! Each digit plays for [`TONE`]: a packet every [`PACKET_INTERVAL`] with the duration so far
//! (the first with the marker bit), then the end packet (E bit) three times as RFC 4733 §2.5.1.4
//! recommends, then [`GAP`] of quiet before the next queued digit.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long each digit sounds.
pub const TONE: Duration = Duration::from_millis(100);
/// Spacing of event packets (one audio packet time).
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// Quiet between two digits, so the PBX's detector sees two presses.
pub const GAP: Duration = Duration::from_millis(60);
/// Digits waiting beyond this many are refused: a runaway sender must not queue minutes.
pub const MAX_QUEUED: usize = 32;
/// Event volume: −10 dBm0, what phones send.
const VOLUME: u8 = 10;
/// End packets sent per digit.
const END_REPEATS: u8 = 3;

/// Why a digit was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtmfError {
    #[error("{0:?} is not a DTMF digit (0-9, *, #, A-D)")]
    NotADigit(char),
    #[error("more than {MAX_QUEUED} digits are waiting")]
    QueueFull,
}

/// The RFC 4733 event code of a keypad digit.
pub fn event_code(digit: char) -> Option<u8> {
    match digit.to_ascii_uppercase() {
        d @ '0'..='9' => Some(d as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        d @ 'A'..='D' => Some(d as u8 - b'A' + 12),
        _ => None,
    }
}

/// One event packet's payload and RTP header bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPacket {
    /// The 4-byte RFC 4733 payload: event, E|R|volume, duration.
    pub payload: [u8; 4],
    /// The first packet of an event (RTP marker bit).
    pub marker: bool,
    /// A new event starts here: its RTP timestamp is the stream's current one.
    pub starts_event: bool,
}

#[derive(Debug)]
struct Playing {
    code: u8,
    started: Instant,
    next: Instant,
    sent: u32,
    ends_sent: u8,
}

/// Plays queued digits as event packets on a timer.
#[derive(Debug)]
pub struct DtmfSender {
    /// Timestamp units per millisecond of the event clock (8 for 8 kHz).
    units_per_ms: u32,
    queue: VecDeque<u8>,
    playing: Option<Playing>,
    /// No new digit starts before this (the gap after the last one).
    quiet_until: Option<Instant>,
    /// When the last digit was queued (the earliest it can start).
    queued_at: Option<Instant>,
}

impl DtmfSender {
    /// A sender for an event clock of `clock_rate` Hz (the SIP leg's telephone-event rate).
    pub fn new(clock_rate: u32) -> Self {
        DtmfSender {
            units_per_ms: (clock_rate / 1000).max(1),
            queue: VecDeque::new(),
            playing: None,
            quiet_until: None,
            queued_at: None,
        }
    }

    /// Queues `digit`, typed at `now`.
    pub fn push(&mut self, digit: char, now: Instant) -> Result<(), DtmfError> {
        let code = event_code(digit).ok_or(DtmfError::NotADigit(digit))?;
        if self.queue.len() >= MAX_QUEUED {
            return Err(DtmfError::QueueFull);
        }
        self.queue.push_back(code);
        self.queued_at = Some(now);
        Ok(())
    }

    /// A digit is sounding: audio towards the PBX is held back meanwhile.
    pub fn is_playing(&self) -> bool {
        self.playing.is_some()
    }

    /// When [`DtmfSender::poll`] has something next; `None` when idle.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.playing {
            Some(p) => Some(p.next),
            None if !self.queue.is_empty() => match (self.quiet_until, self.queued_at) {
                (Some(q), Some(t)) => Some(q.max(t)),
                (q, t) => q.or(t),
            },
            None => None,
        }
    }

    /// The next event packet due at `now`, if any; call until `None`.
    pub fn poll(&mut self, now: Instant) -> Option<EventPacket> {
        if self.playing.is_none() {
            if self.quiet_until.is_some_and(|q| now < q) {
                return None;
            }
            let code = self.queue.pop_front()?;
            self.playing = Some(Playing {
                code,
                started: now,
                next: now,
                sent: 0,
                ends_sent: 0,
            });
        }
        let p = self.playing.as_mut()?;
        if now < p.next {
            return None;
        }
        let elapsed = p.next.saturating_duration_since(p.started) + PACKET_INTERVAL;
        let ending = elapsed >= TONE + PACKET_INTERVAL;
        let shown = if ending { TONE } else { elapsed.min(TONE) };
        let duration = (shown.as_millis() as u32 * self.units_per_ms).min(u16::MAX as u32) as u16;
        let flags = if ending { 0x80 } else { 0 } | VOLUME;
        let [hi, lo] = duration.to_be_bytes();
        let packet = EventPacket {
            payload: [p.code, flags, hi, lo],
            marker: p.sent == 0,
            starts_event: p.sent == 0,
        };
        p.sent += 1;
        p.next += PACKET_INTERVAL;
        if ending {
            p.ends_sent += 1;
            if p.ends_sent >= END_REPEATS {
                self.quiet_until = Some(p.next + GAP);
                self.playing = None;
            }
        }
        Some(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the sender on a 5 ms clock and collects (ms since start, packet).
    fn play(s: &mut DtmfSender, t0: Instant, ms: u64) -> Vec<(u64, EventPacket)> {
        let mut out = Vec::new();
        let mut t = 0;
        while t <= ms {
            let now = t0 + Duration::from_millis(t);
            while let Some(p) = s.poll(now) {
                out.push((t, p));
            }
            t += 5;
        }
        out
    }

    #[test]
    fn a_digit_is_marker_then_growing_durations_then_three_end_packets() {
        let t0 = Instant::now();
        let mut s = DtmfSender::new(8000);
        s.push('5', t0).unwrap();
        assert_eq!(s.poll_timeout(), Some(t0));
        let got = play(&mut s, t0, 500);
        let durations: Vec<u16> = got
            .iter()
            .map(|(_, p)| u16::from_be_bytes([p.payload[2], p.payload[3]]))
            .collect();
        // 20, 40, 60, 80, 100 ms at 8 units/ms, then the end (100 ms) three times.
        assert_eq!(durations, vec![160, 320, 480, 640, 800, 800, 800, 800]);
        assert!(got[0].1.marker && got[0].1.starts_event);
        assert!(got[1..].iter().all(|(_, p)| !p.marker && !p.starts_event));
        assert!(got.iter().all(|(_, p)| p.payload[0] == 5));
        let ends: Vec<bool> = got.iter().map(|(_, p)| p.payload[1] & 0x80 != 0).collect();
        assert_eq!(
            ends,
            vec![false, false, false, false, false, true, true, true]
        );
        assert!(got.iter().all(|(_, p)| p.payload[1] & 0x3f == VOLUME));
        // One packet every 20 ms.
        let times: Vec<u64> = got.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![0, 20, 40, 60, 80, 100, 120, 140]);
        assert!(!s.is_playing() && s.poll_timeout().is_none());
    }

    #[test]
    fn queued_digits_play_in_order_with_a_gap_and_each_starts_a_new_event() {
        let t0 = Instant::now();
        let mut s = DtmfSender::new(8000);
        for d in ['1', '#', 'd'] {
            s.push(d, t0).unwrap();
        }
        let got = play(&mut s, t0, 2000);
        let starts: Vec<(u64, u8)> = got
            .iter()
            .filter(|(_, p)| p.starts_event)
            .map(|(t, p)| (*t, p.payload[0]))
            .collect();
        assert_eq!(
            starts.iter().map(|s| s.1).collect::<Vec<_>>(),
            vec![1, 11, 15]
        );
        // The next digit starts after the last end packet plus the gap.
        assert!(starts[1].0 >= 140 + GAP.as_millis() as u64);
        assert_eq!(got.len(), 24);
    }

    #[test]
    fn wideband_clocks_scale_durations_and_bad_digits_are_refused() {
        let t0 = Instant::now();
        let mut s = DtmfSender::new(48_000);
        s.push('0', t0).unwrap();
        let first = s.poll(t0).unwrap();
        assert_eq!(
            u16::from_be_bytes([first.payload[2], first.payload[3]]),
            960
        );
        assert_eq!(s.push('x', t0), Err(DtmfError::NotADigit('x')));
        let mut full = DtmfSender::new(8000);
        for _ in 0..MAX_QUEUED {
            full.push('1', t0).unwrap();
        }
        assert_eq!(full.push('1', t0), Err(DtmfError::QueueFull));
        assert_eq!(event_code('*'), Some(10));
        assert_eq!(event_code('a'), Some(12));
    }
}
