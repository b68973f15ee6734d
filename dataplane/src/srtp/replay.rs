//! Per-SSRC state: the SRTP packet index (ROC estimation, RFC 3711 §3.3.1 and Appendix A), the
//! SRTCP index, and their 64-packet replay windows (RFC 3711 §3.3.2), in a fixed table that
//! never allocates after the context is made.

use super::SrtpError;

/// Replay window size in packets (RFC 3711 §3.3.2 requires at least 64).
pub(crate) const WINDOW: u64 = 64;
/// SSRCs one context tracks before it forgets the least recently used one.
pub const MAX_SSRCS: usize = 16;
/// Largest SRTCP index (31 bits, RFC 3711 §3.4).
const MAX_SRTCP_INDEX: u32 = 0x7fff_ffff;

/// Where a packet index falls relative to the window: what [`Window::check`] found, kept until
/// the packet has been authenticated and [`Window::commit`] records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    /// The packet index (48-bit SRTP index or 31-bit SRTCP index).
    pub(crate) index: u64,
    /// `index - highest`: positive when the packet is the newest yet.
    delta: i64,
}

/// The highest index seen and a bitmap of the 64 indices at and below it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Window {
    /// `None` until the first packet is recorded.
    highest: Option<u64>,
    /// Bit `n` set: index `highest - n` was seen.
    bits: u64,
}

impl Window {
    /// Places `index` against the window: a new index, or one inside the window not seen yet.
    pub(crate) fn check(&self, ssrc: u32, index: u64) -> Result<Slot, SrtpError> {
        let Some(highest) = self.highest else {
            return Ok(Slot { index, delta: 1 });
        };
        // Both are at most 48 bits, so the difference fits an i64.
        let delta = index as i64 - highest as i64;
        if delta > 0 {
            return Ok(Slot { index, delta });
        }
        let back = delta.unsigned_abs();
        if back >= WINDOW {
            return Err(SrtpError::TooOld { ssrc, index });
        }
        if self.bits & (1 << back) != 0 {
            return Err(SrtpError::Replayed { ssrc, index });
        }
        Ok(Slot { index, delta })
    }

    /// Records a packet placed by [`Window::check`] (after it was authenticated).
    pub(crate) fn commit(&mut self, slot: Slot) {
        if self.highest.is_none() {
            self.highest = Some(slot.index);
            self.bits = 1;
        } else if slot.delta > 0 {
            let shift = slot.delta as u64;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.highest = Some(slot.index);
        } else {
            self.bits |= 1 << slot.delta.unsigned_abs();
        }
    }
}

/// SRTP state of one SSRC: the rollover counter and the window over 48-bit packet indices.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RtpStream {
    /// ROC to assume for the first packet (0, or what [`super::SrtpContext::set_roc`] said).
    initial_roc: u32,
    window: Window,
}

/// A packet's index as estimated from its sequence number, waiting for authentication.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RtpEstimate {
    pub(crate) roc: u32,
    pub(crate) slot: Slot,
}

impl RtpStream {
    /// A stream whose first packet carries rollover counter `roc`.
    pub(crate) fn with_roc(roc: u32) -> Self {
        Self {
            initial_roc: roc,
            window: Window::default(),
        }
    }

    /// The rollover counter of the newest packet (or the one the first packet will get).
    pub(crate) fn roc(&self) -> u32 {
        match self.window.highest {
            Some(h) => (h >> 16) as u32,
            None => self.initial_roc,
        }
    }

    /// RFC 3711 Appendix A: guesses the packet index from `seq` and the highest index seen
    /// (`ROC - 1`, `ROC` or `ROC + 1`), then checks the replay window.
    pub(crate) fn estimate(&self, ssrc: u32, seq: u16) -> Result<RtpEstimate, SrtpError> {
        let Some(highest) = self.window.highest else {
            let index = (u64::from(self.initial_roc) << 16) | u64::from(seq);
            let slot = self.window.check(ssrc, index)?;
            return Ok(RtpEstimate {
                roc: self.initial_roc,
                slot,
            });
        };
        let roc = (highest >> 16) as i64;
        let s_l = (highest & 0xffff) as i64;
        let seq_i = i64::from(seq);
        let v = if s_l < 0x8000 {
            if seq_i - s_l > 0x8000 {
                roc - 1
            } else {
                roc
            }
        } else if s_l - 0x8000 > seq_i {
            roc + 1
        } else {
            roc
        };
        if v < 0 {
            // Before the first ROC: older than anything this stream can carry.
            return Err(SrtpError::TooOld {
                ssrc,
                index: u64::from(seq),
            });
        }
        let Ok(v32) = u32::try_from(v) else {
            // 2^48 packets under one key (RFC 3711 §9.2): the key must change.
            return Err(SrtpError::KeyExhausted { ssrc });
        };
        let index = ((v as u64) << 16) | u64::from(seq);
        let slot = self.window.check(ssrc, index)?;
        Ok(RtpEstimate { roc: v32, slot })
    }

    /// Records an authenticated (or just protected) packet: updates ROC, highest sequence number
    /// and window.
    pub(crate) fn commit(&mut self, estimate: RtpEstimate) {
        self.window.commit(estimate.slot);
    }
}

/// SRTCP state of one SSRC: the index we send next and the window over indices received.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RtcpStream {
    /// Last SRTCP index sent; the next packet gets one more (so the first gets 1, as in libsrtp
    /// and webrtc-srtp).
    sent: u32,
    window: Window,
}

impl RtcpStream {
    /// A stream whose first protected packet gets index `after + 1`.
    pub(crate) fn starting_after(after: u32) -> Self {
        Self {
            sent: after,
            window: Window::default(),
        }
    }

    /// The last index sent.
    pub(crate) fn sent(&self) -> u32 {
        self.sent
    }

    /// The index for the next packet we protect; never reuses one (RFC 3711 §9.2).
    pub(crate) fn next_index(&mut self, ssrc: u32) -> Result<u32, SrtpError> {
        if self.sent >= MAX_SRTCP_INDEX {
            return Err(SrtpError::KeyExhausted { ssrc });
        }
        self.sent += 1;
        Ok(self.sent)
    }

    /// Checks a received index against the window.
    pub(crate) fn check(&self, ssrc: u32, index: u32) -> Result<Slot, SrtpError> {
        self.window.check(ssrc, u64::from(index))
    }

    /// Records an authenticated packet.
    pub(crate) fn commit(&mut self, slot: Slot) {
        self.window.commit(slot);
    }
}

/// Everything kept for one SSRC.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stream {
    pub(crate) ssrc: u32,
    pub(crate) rtp: RtpStream,
    pub(crate) rtcp: RtcpStream,
    last_used: u64,
}

/// Up to [`MAX_SSRCS`] streams; a new SSRC beyond that replaces the least recently used one.
#[derive(Debug, Clone)]
pub(crate) struct StreamTable {
    slots: [Option<Stream>; MAX_SSRCS],
    clock: u64,
    /// Highest SRTCP index any forgotten stream had sent: a stream made after an eviction starts
    /// above it, so an SSRC that comes back can never reuse an SRTCP index (and keystream).
    rtcp_floor: u32,
}

impl Default for StreamTable {
    fn default() -> Self {
        Self {
            slots: [None; MAX_SSRCS],
            clock: 0,
            rtcp_floor: 0,
        }
    }
}

impl StreamTable {
    /// The stream of `ssrc`, if tracked (no LRU update: for read-only queries).
    pub(crate) fn peek(&self, ssrc: u32) -> Option<&Stream> {
        self.slots.iter().flatten().find(|s| s.ssrc == ssrc)
    }

    /// A fresh stream for `ssrc` (not yet in the table): what an unknown SSRC starts from.
    pub(crate) fn fresh(&self, ssrc: u32) -> Stream {
        Stream {
            ssrc,
            rtp: RtpStream::default(),
            rtcp: RtcpStream::starting_after(self.rtcp_floor),
            last_used: 0,
        }
    }

    /// The stream of `ssrc`, created (evicting the least recently used one if full) if new.
    pub(crate) fn get_or_insert(&mut self, ssrc: u32) -> &mut Stream {
        let fresh = self.fresh(ssrc);
        self.clock += 1;
        let clock = self.clock;
        let pos = match self
            .slots
            .iter()
            .position(|s| s.is_some_and(|s| s.ssrc == ssrc))
        {
            Some(pos) => pos,
            None => self.make_room(),
        };
        let slot = &mut self.slots[pos];
        let stream = slot.get_or_insert(fresh);
        stream.last_used = clock;
        stream
    }

    /// Stores `stream` (an authenticated packet's state) for its SSRC, replacing the old one.
    pub(crate) fn store(&mut self, mut stream: Stream) {
        self.clock += 1;
        stream.last_used = self.clock;
        let pos = match self
            .slots
            .iter()
            .position(|s| s.is_some_and(|s| s.ssrc == stream.ssrc))
        {
            Some(pos) => pos,
            None => self.make_room(),
        };
        self.slots[pos] = Some(stream);
    }

    /// Index of a free slot, evicting the least recently used stream if there is none.
    fn make_room(&mut self) -> usize {
        if let Some(pos) = self.slots.iter().position(Option::is_none) {
            return pos;
        }
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if s.last_used < oldest {
                    oldest = s.last_used;
                    victim = i;
                }
            }
        }
        if let Some(old) = self.slots[victim].take() {
            self.rtcp_floor = self.rtcp_floor.max(old.rtcp.sent());
        }
        victim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(s: &mut RtpStream, seq: u16) -> Result<RtpEstimate, SrtpError> {
        let e = s.estimate(1, seq)?;
        s.commit(e);
        Ok(e)
    }

    #[test]
    fn roc_follows_a_wrap_and_a_late_packet_from_before_it() {
        let mut s = RtpStream::default();
        for seq in 65_530..=65_535 {
            assert_eq!(accept(&mut s, seq).unwrap().roc, 0);
        }
        assert_eq!(accept(&mut s, 0).unwrap().roc, 1);
        assert_eq!(accept(&mut s, 2).unwrap().roc, 1);
        // 65534 was seen; 65529 was not and is still inside the window, under ROC 0.
        assert!(matches!(
            s.estimate(1, 65_534),
            Err(SrtpError::Replayed { .. })
        ));
        assert_eq!(accept(&mut s, 65_529).unwrap().roc, 0);
        assert_eq!(accept(&mut s, 1).unwrap().roc, 1);
        assert_eq!(s.roc(), 1);
    }

    #[test]
    fn window_rejects_duplicates_and_packets_older_than_64() {
        let mut s = RtpStream::default();
        accept(&mut s, 1000).unwrap();
        accept(&mut s, 1100).unwrap();
        assert!(matches!(
            s.estimate(1, 1100),
            Err(SrtpError::Replayed { .. })
        ));
        assert!(matches!(s.estimate(1, 1036), Err(SrtpError::TooOld { .. })));
        accept(&mut s, 1037).unwrap();
        assert!(matches!(
            s.estimate(1, 1037),
            Err(SrtpError::Replayed { .. })
        ));
    }

    #[test]
    fn a_packet_before_roc_zero_is_too_old_not_a_panic() {
        let mut s = RtpStream::default();
        accept(&mut s, 10).unwrap();
        assert!(matches!(
            s.estimate(1, 65_530),
            Err(SrtpError::TooOld { .. })
        ));
    }

    #[test]
    fn set_roc_applies_to_the_first_packet() {
        let mut s = RtpStream::with_roc(7);
        assert_eq!(accept(&mut s, 5).unwrap().roc, 7);
        assert_eq!(accept(&mut s, 6).unwrap().roc, 7);
    }

    #[test]
    fn table_evicts_the_least_recently_used_and_keeps_rtcp_indices_unique() {
        let mut t = StreamTable::default();
        for ssrc in 0..MAX_SSRCS as u32 {
            let st = t.get_or_insert(ssrc);
            for _ in 0..=ssrc {
                st.rtcp.next_index(ssrc).unwrap();
            }
        }
        // Touch 0 so that 1 is the least recently used.
        t.get_or_insert(0);
        t.get_or_insert(100);
        assert!(t.peek(1).is_none());
        assert!(t.peek(0).is_some());
        // Stream 1 had sent indices 1..=2; coming back it starts above them.
        let back = t.get_or_insert(1);
        assert_eq!(back.rtcp.next_index(1).unwrap(), 3);
    }
}
