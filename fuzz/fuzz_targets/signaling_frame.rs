//! Any blob arriving through `updatePhoneCallSignalingData`: fed to the receive path of every
//! signalling framing (7.0.0, 8.0.0, 13.0.0) it is messages or an error, never a panic. Raw bytes
//! stop at the msg_key or SCTP checksum, so the input is also sent the way a peer holding the
//! key would (sealed plaintexts reach the 8.0.0 message parser and the gunzip of 7.0.0), and as
//! SCTP packets with a valid checksum and the verification tag of an established association.
//!
//! Input: records of `mode ‖ u16 BE length ‖ bytes`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_control::tgcall::crypto::SignalingCrypto;
use siptg_control::tgcall::framing::SignalingFraming;
use siptg_control::tgcall::sctp::seal_checksum;
use std::time::{Duration, Instant};

const KEY: [u8; 256] = [0x5a; 256];

/// A 13.0.0 callee whose association with a real caller is up, and its verification tag.
fn established_v3(now: Instant) -> (SignalingFraming, [u8; 4]) {
    let mut caller = SignalingFraming::new("13.0.0", KEY, true).unwrap();
    let mut callee = SignalingFraming::new("13.0.0", KEY, false).unwrap();
    let mut to_callee = caller.start(now);
    let mut tag = [0; 4];
    for _ in 0..8 {
        let mut to_caller = Vec::new();
        for p in to_callee.drain(..) {
            if p[4..8] != [0; 4] {
                tag.copy_from_slice(&p[4..8]);
            }
            to_caller.extend(callee.receive(&p, now).unwrap().replies);
        }
        for p in to_caller {
            to_callee.extend(caller.receive(&p, now).unwrap().replies);
        }
    }
    (callee, tag)
}

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut raw = SignalingFraming::new("7.0.0", KEY, false).unwrap();
    let mut reliable = SignalingFraming::new("8.0.0", KEY, false).unwrap();
    let (mut sctp, tag) = established_v3(now);
    let mut peer = SignalingCrypto::new(KEY, true);

    let mut rest = data;
    while rest.len() >= 3 {
        let mode = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match mode % 4 {
            0 => {
                for f in [&mut raw, &mut reliable, &mut sctp] {
                    let _ = f.receive(bytes, now);
                }
            }
            1 => {
                // Sealed by the peer: the first byte's top bits become the seq flags (8.0.0).
                let Ok(counter) = peer.next_counter() else {
                    return;
                };
                let flags = u32::from(bytes.first().copied().unwrap_or(0) & 0xC0) << 24;
                let mut plain = (counter | flags).to_be_bytes().to_vec();
                plain.extend_from_slice(bytes.get(1..).unwrap_or_default());
                let packet = peer.seal(&plain);
                let _ = raw.receive(&packet, now);
                let _ = reliable.receive(&packet, now);
            }
            2 => {
                let mut packet = vec![0x13, 0x88, 0x13, 0x88];
                packet.extend_from_slice(if mode & 0x80 != 0 { &[0; 4] } else { &tag });
                packet.extend_from_slice(&[0; 4]);
                packet.extend_from_slice(bytes);
                seal_checksum(&mut packet);
                let _ = sctp.receive(&packet, now);
            }
            _ => {
                now += Duration::from_millis(u64::from(mode) * 40);
                for f in [&mut raw, &mut reliable, &mut sctp] {
                    let _ = f.handle_timeout(now);
                    let _ = f.send(bytes, now);
                }
            }
        }
    }
});
