//! Each core's slice of the RTP port range.
//!
//! Ports are handed out in even/odd pairs (RTP on the even port, RTCP on the next one when
//! rtcp-mux is off). A freed port goes to the back of the queue, so the most recently closed port
//! is the last to be reused and late packets of an old call do not reach a new one.

use std::collections::VecDeque;

/// Free even ports of one core.
#[derive(Debug)]
pub struct PortPool {
    min: u16,
    max: u16,
    free: VecDeque<u16>,
}

impl PortPool {
    /// Pool for the inclusive range `min..=max`; only even ports with room for `port + 1` are used.
    pub fn new(min: u16, max: u16) -> Self {
        let first = min + (min % 2);
        let free = (first..max)
            .step_by(2)
            .filter(|p| p.checked_add(1).is_some_and(|odd| odd <= max))
            .collect();
        Self { min, max, free }
    }

    /// Takes the next free RTP port.
    pub fn take(&mut self) -> Option<u16> {
        self.free.pop_front()
    }

    /// Returns a port to the back of the queue.
    pub fn give_back(&mut self, port: u16) {
        debug_assert!(!self.free.contains(&port), "port {port} freed twice");
        self.free.push_back(port);
    }

    /// Free pairs left.
    pub fn free(&self) -> u32 {
        self.free.len() as u32
    }

    /// The configured slice, inclusive.
    pub fn range(&self) -> (u16, u16) {
        (self.min, self.max)
    }
}

/// Splits `min..=max` into `shards` contiguous slices of whole even/odd pairs.
pub fn split_range(min: u16, max: u16, shards: usize) -> Vec<(u16, u16)> {
    let first = (min + (min % 2)) as u32;
    let pairs = ((max as u32 + 1).saturating_sub(first)) / 2;
    let shards = shards.max(1) as u32;
    let per = pairs / shards;
    let extra = pairs % shards;
    let mut out = Vec::with_capacity(shards as usize);
    let mut start = first;
    for i in 0..shards {
        let n = per + u32::from(i < extra);
        let end = start + 2 * n;
        out.push((start as u16, end.saturating_sub(1).max(start) as u16));
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_even_ports_and_reuses_oldest_freed_last() {
        let mut pool = PortPool::new(10_001, 10_008);
        assert_eq!(pool.free(), 3); // 10002, 10004, 10006 (10008 has no odd partner)
        let a = pool.take().unwrap();
        assert_eq!(a, 10_002);
        pool.give_back(a);
        assert_eq!(pool.take(), Some(10_004));
        assert_eq!(pool.take(), Some(10_006));
        assert_eq!(pool.take(), Some(10_002));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn split_covers_range_without_overlap() {
        let parts = split_range(30_000, 30_999, 3);
        assert_eq!(parts.len(), 3);
        let total: u32 = parts.iter().map(|&(a, b)| PortPool::new(a, b).free()).sum();
        assert_eq!(total, 500);
        for w in parts.windows(2) {
            assert!(w[0].1 < w[1].0);
        }
    }
}
