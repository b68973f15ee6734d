//! Signalling bytes produced by ntgcalls 3.0.5 (an independent C++ implementation of tgcalls) for
//! a known key, decrypted and parsed by siptg's own code: the encryption (x = 128/136 KDF,
//! AES-256-CTR, msg_key), the 8.0.0 framing and the JSON messages must all agree with ntgcalls
//! byte for byte. Regenerate with `tests/interop/tgcalls/capture_vectors.py` inside a netns.

use siptg_control::tgcall::framing::SignalingFraming;
use siptg_control::tgcall::messages::SignalingMessage;
use std::time::Instant;

fn packets(file: &str) -> Vec<Vec<u8>> {
    file.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

fn key() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

#[test]
fn ntgcalls_8_0_0_caller_packets_decrypt_and_parse_as_the_callee() {
    let pkts = packets(include_str!("data/ntgcalls_8.0.0_caller.hex"));
    assert!(!pkts.is_empty());
    let mut callee = SignalingFraming::new("8.0.0", key(), false).unwrap();
    let mut messages = Vec::new();
    for p in &pkts {
        let got = callee.receive(p, Instant::now()).unwrap();
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        for m in got.messages {
            messages.push(SignalingMessage::parse(&m).unwrap());
        }
    }
    // ntgcalls sends candidates as soon as they are gathered, so they may precede InitialSetup.
    let setup = messages
        .iter()
        .find_map(|m| match m {
            SignalingMessage::InitialSetup(s) => Some(s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no InitialSetup in {messages:?}"));
    let candidate = messages
        .iter()
        .find_map(|m| match m {
            SignalingMessage::Candidates(c) => c.candidates.first(),
            _ => None,
        })
        .expect("a Candidates message");
    assert!(candidate.sdp_string.starts_with("candidate:"));
    assert!(setup.ufrag.len() >= 4 && setup.pwd.len() >= 22);
    assert_eq!(setup.fingerprints[0].hash, "sha-256");
    assert_eq!(setup.fingerprints[0].setup, "actpass");
    assert_eq!(setup.fingerprints[0].fingerprint.len(), 32 * 3 - 1);
}

#[test]
fn ntgcalls_packets_do_not_open_with_the_wrong_role_or_key() {
    let pkts = packets(include_str!("data/ntgcalls_8.0.0_caller.hex"));
    // The caller's own direction (x = 128) cannot read what the caller sent (x = 128 send,
    // 136 receive), and a different key fails msg_key: typed errors, no panic.
    let mut same_role = SignalingFraming::new("8.0.0", key(), true).unwrap();
    assert!(same_role.receive(&pkts[0], Instant::now()).is_err());
    let mut wrong_key = SignalingFraming::new("8.0.0", [9; 256], false).unwrap();
    assert!(wrong_key.receive(&pkts[0], Instant::now()).is_err());
}
