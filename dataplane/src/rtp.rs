//! Just enough RTP/RTCP parsing to relay, count and detect DTMF: fixed header fields only.
//!
//! Written by hand rather than with a crate because the relay needs four fields from a borrowed
//! slice with no allocation, and must treat any byte string as data, never as a reason to panic.

/// The RTP fixed-header fields the relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub payload_type: u8,
    pub marker: bool,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// Offset of the payload (after CSRCs and the extension, if any).
    pub payload_offset: usize,
}

/// What a datagram on a media port turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    Rtp(RtpHeader),
    Rtcp,
}

/// Classifies a datagram (RFC 5761 §4 demultiplexing) and parses the RTP header.
/// Returns `None` for anything that is neither (too short, wrong version, bad lengths).
pub fn classify(data: &[u8]) -> Option<Packet> {
    if data.len() < 4 || data[0] >> 6 != 2 {
        return None;
    }
    // RTCP packet types 192..=223 collide with RTP payload types 64..=95 with the marker set.
    if (192..=223).contains(&data[1]) {
        return if data.len() >= 8 {
            Some(Packet::Rtcp)
        } else {
            None
        };
    }
    if data.len() < 12 {
        return None;
    }
    let csrc_count = (data[0] & 0x0f) as usize;
    let mut offset = 12 + 4 * csrc_count;
    if data[0] & 0x10 != 0 {
        let ext = data.get(offset..offset + 4)?;
        let words = u16::from_be_bytes([ext[2], ext[3]]) as usize;
        offset += 4 + 4 * words;
    }
    if offset > data.len() {
        return None;
    }
    Some(Packet::Rtp(RtpHeader {
        payload_type: data[1] & 0x7f,
        marker: data[1] & 0x80 != 0,
        sequence: u16::from_be_bytes([data[2], data[3]]),
        timestamp: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
        ssrc: u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
        payload_offset: offset,
    }))
}

/// An RFC 4733 telephone-event payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    pub event: u8,
    pub end: bool,
    pub duration: u16,
}

/// Parses the first 4 bytes of a telephone-event payload.
pub fn telephone_event(payload: &[u8]) -> Option<TelephoneEvent> {
    let p = payload.get(..4)?;
    Some(TelephoneEvent {
        event: p[0],
        end: p[1] & 0x80 != 0,
        duration: u16::from_be_bytes([p[2], p[3]]),
    })
}

/// The DTMF character of an RFC 4733 event code (0–15), `None` for non-DTMF events.
pub fn dtmf_digit(event: u8) -> Option<char> {
    const DIGITS: &[u8; 16] = b"0123456789*#ABCD";
    DIGITS.get(event as usize).map(|&b| b as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(pt: u8, seq: u16, ts: u32) -> Vec<u8> {
        let mut p = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&[0xd5; 160]);
        p
    }

    #[test]
    fn parses_fixed_header() {
        let Some(Packet::Rtp(h)) = classify(&rtp(8, 513, 160)) else {
            panic!("not rtp")
        };
        assert_eq!(
            (h.payload_type, h.sequence, h.timestamp, h.ssrc),
            (8, 513, 160, 1)
        );
        assert_eq!(h.payload_offset, 12);
    }

    #[test]
    fn rtcp_sender_report_is_told_apart_from_rtp() {
        assert_eq!(classify(&[0x80, 200, 0, 6, 0, 0, 0, 1]), Some(Packet::Rtcp));
    }

    #[test]
    fn junk_is_rejected() {
        assert_eq!(classify(&[]), None);
        assert_eq!(classify(&[0x40; 20]), None);
        // Claims 15 CSRCs but has none.
        assert_eq!(classify(&[0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        // Extension header that runs past the end.
        let mut p = rtp(0, 1, 1);
        p.truncate(12);
        p[0] |= 0x10;
        assert_eq!(classify(&p), None);
    }

    #[test]
    fn telephone_event_digits() {
        let ev = telephone_event(&[11, 0x8a, 0x03, 0x20]).unwrap();
        assert_eq!(
            ev,
            TelephoneEvent {
                event: 11,
                end: true,
                duration: 800
            }
        );
        assert_eq!(dtmf_digit(ev.event), Some('#'));
        assert_eq!(dtmf_digit(16), None);
    }
}
