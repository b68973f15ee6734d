//! Known-answer vectors (RFC 3711 Appendix B, RFC 7714 §16–17), byte-for-byte cross-checks with
//! webrtc-srtp 0.17 for every suite (RTP and RTCP, across a sequence-number wrap), and the
//! failure behaviours the relay relies on: replays, tampering, truncation and garbage are errors
//! that leave the context as it was.

use super::*;
use webrtc_srtp::context::Context as WebrtcContext;
use webrtc_srtp::protection_profile::ProtectionProfile;

const SUITES: [SrtpSuite; 3] = [
    SrtpSuite::AesCm128HmacSha1_80,
    SrtpSuite::AesCm128HmacSha1_32,
    SrtpSuite::AeadAes128Gcm,
];

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn key_and_salt(suite: SrtpSuite) -> (Vec<u8>, Vec<u8>) {
    let key: Vec<u8> = (0..16u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let salt: Vec<u8> = (0..SrtpContext::master_salt_len(suite) as u8)
        .map(|i| i.wrapping_mul(91).wrapping_add(5))
        .collect();
    (key, salt)
}

fn ours(suite: SrtpSuite) -> SrtpContext {
    let (key, salt) = key_and_salt(suite);
    SrtpContext::new(suite, &key, &salt).unwrap()
}

fn theirs(suite: SrtpSuite) -> WebrtcContext {
    let (key, salt) = key_and_salt(suite);
    let profile = match suite {
        SrtpSuite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        SrtpSuite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        SrtpSuite::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
    };
    WebrtcContext::new(&key, &salt, profile, None, None).unwrap()
}

/// A 20 ms G.711 packet (172 octets), payload varying with `seq`.
fn rtp(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 8];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..160u32).map(|i| (i as u8) ^ (seq as u8)));
    p
}

/// An RTP packet with two CSRCs and a one-byte-header extension (RFC 8285), so the header
/// length the cipher skips is not 12.
fn rtp_with_csrc_and_extension(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = vec![0x92, 0x60];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&1234u32.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&0x1111_1111u32.to_be_bytes());
    p.extend_from_slice(&0x2222_2222u32.to_be_bytes());
    // 0xBEDE, 1 word: id 1, len 2 (3 octets of data) then padding.
    p.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 0x12, 0xaa, 0xbb, 0xcc]);
    p.extend_from_slice(b"payload after a 28-octet header");
    p
}

/// A compound RTCP packet: a receiver report with one report block, then an SDES CNAME.
fn rtcp(ssrc: u32, n: u8) -> Vec<u8> {
    let mut p = vec![0x81, 201, 0, 7];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&0xcafe_f00du32.to_be_bytes());
    p.extend((0..20u8).map(|i| i ^ n));
    // SDES: one chunk, CNAME "siptg" (2 + 5 octets, then 1 null: 12 octets = 3 words).
    p.extend_from_slice(&[0x81, 202, 0, 3]);
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[1, 5, b's', b'i', b'p', b't', b'g', 0]);
    p
}

/// `packet` followed by room for any suite's overhead.
fn with_room(packet: &[u8]) -> Vec<u8> {
    let mut b = packet.to_vec();
    b.resize(packet.len() + MAX_OVERHEAD, 0);
    b
}

fn protect_rtp(ctx: &mut SrtpContext, packet: &[u8]) -> Vec<u8> {
    let mut b = with_room(packet);
    let n = ctx.protect_rtp(&mut b, packet.len()).unwrap();
    b.truncate(n);
    b
}

fn unprotect_rtp(ctx: &mut SrtpContext, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
    let mut b = packet.to_vec();
    let n = ctx.unprotect_rtp(&mut b, packet.len())?;
    b.truncate(n);
    Ok(b)
}

fn protect_rtcp(ctx: &mut SrtpContext, packet: &[u8]) -> Vec<u8> {
    let mut b = with_room(packet);
    let n = ctx.protect_rtcp(&mut b, packet.len()).unwrap();
    b.truncate(n);
    b
}

fn unprotect_rtcp(ctx: &mut SrtpContext, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
    let mut b = packet.to_vec();
    let n = ctx.unprotect_rtcp(&mut b, packet.len())?;
    b.truncate(n);
    Ok(b)
}

/// Sequence numbers from 65 500 through a wrap to 99 (ROC 0 then 1).
fn across_wrap() -> impl Iterator<Item = u16> {
    (65_500..=u16::MAX).chain(0..100)
}

// ---- RFC 3711 Appendix B ----

#[test]
fn rfc3711_b2_aes_cm_keystream() {
    let key: [u8; 16] = hex("2B7E151628AED2A6ABF7158809CF4F3C").try_into().unwrap();
    let salt: [u8; 14] = hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD").try_into().unwrap();
    // The whole 65 282-block segment, SSRC 0 and index 0.
    let mut ks = vec![0u8; 1_044_512];
    CmTransform::rtp_keystream_for_test(&key, &salt, 0, 0, &mut ks);
    assert_eq!(
        ks[..48],
        hex("E03EAD0935C95E80E166B16DD92B4EB4
             D23513162B02D0F72A43A2FE4A5F97AB
             41E95B3BB0A2E8DD477901E4FCA894C0")[..]
    );
    assert_eq!(
        ks[ks.len() - 48..],
        hex("EC8CDF7398607CB0F2D21675EA9EA1E4
             362B7C3C6773516318A077D7FC5073AE
             6A2CC3787889374FBEB4C81B17BA6C44")[..]
    );
}

#[test]
fn rfc3711_b3_key_derivation() {
    let master_key: [u8; 16] = hex("E1F97A0D3E018BE0D64FA32C06DE4139").try_into().unwrap();
    let master_salt = hex("0EC675AD498AFEEBB6960B3AABE6");
    let mut auth = [0u8; 94];
    let (key, salt) = CmTransform::session_keys_for_test(&master_key, &master_salt, &mut auth);
    assert_eq!(key[..], hex("C61E7A93744F39EE10734AFE3FF7A087")[..]);
    assert_eq!(salt[..], hex("30CBBC08863D8C85D49DB34A9AE1")[..]);
    assert_eq!(
        auth[..],
        hex("CEBE321F6FF7716B6FD4AB49AF256A15
             6D38BAA48F0A0ACF3C34E2359E6CDBCE
             E049646C43D9327AD175578EF7227098
             6371C10C9A369AC2F94A8C5FBCDDDC25
             6D6E919A48B610EF17C2041E47403576
             6B68642C59BBFC2F34DB60DBDFB2")[..]
    );
}

// ---- RFC 7714 §16–17 (AEAD_AES_128_GCM, stated with session keys) ----

fn rfc7714_context() -> SrtpContext {
    let key: [u8; 16] = hex("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
    // "Quid pro quo"
    let salt: [u8; 12] = hex("517569642070726f2071756f").try_into().unwrap();
    SrtpContext {
        suite: SrtpSuite::AeadAes128Gcm,
        transform: Transform::Gcm(GcmTransform::from_session_for_test(&key, &salt)),
        streams: StreamTable::default(),
    }
}

/// RFC 7714 §16: "Gallia est omnis divisa in partes tres", SSRC 0x5501a0b2, SEQ 0xf17b.
const RFC7714_RTP: &str = "8040f17b8041f8d35501a0b247616c6c696120657374206f6d6e697320646976
                           69736120696e207061727465732074726573";
/// RFC 7714 §16.1.1 (encryption) and §16.1.2 (decryption).
const RFC7714_SRTP: &str = "8040f17b8041f8d35501a0b2f24de3a3fb34de6cacba861c9d7e4bcabe633bd5
                            0d294e6f42a5f47a51c7d19b36de3adf8833899d7f27beb16a9152cf765ee439
                            0cce";
/// RFC 7714 §17: the RTCP packet of SSRC "Mars" that every §17 vector protects.
const RFC7714_RTCP: &str = "81c8000d4d6172734e5450314e545032525450200000042a0000e9304c756e61
                            deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
/// RFC 7714 §17.1: AEAD_AES_128_GCM encryption and tagging, SRTCP index 0x5d4 (decrypting it
/// must give the packet back).
const RFC7714_SRTCP: &str = "81c8000d4d61727363e94885dcdab67ca727d7662f6b7e997ff5c0f76c06f32d
                             c676a5f1730d6fda4ce09b4686303ded0bb9275bc84aa45896cf4d2fc5abf872
                             45d9eade800005d4";
/// RFC 7714 §17, AEAD_AES_128_GCM tagging only: not encrypted (E clear), the whole packet and
/// the index word are associated data.
const RFC7714_SRTCP_TAG_ONLY: &str =
    "81c8000d4d6172734e5450314e545032525450200000042a0000e9304c756e61
     deadbeefdeadbeefdeadbeefdeadbeefdeadbeef841dd9683dd78ec92ae58790
     125f62b3000005d4";

#[test]
fn rfc7714_16_1_srtp_gcm_protect_and_unprotect() {
    let plain = hex(RFC7714_RTP);
    let protected = hex(RFC7714_SRTP);
    assert_eq!(protect_rtp(&mut rfc7714_context(), &plain), protected);
    assert_eq!(
        unprotect_rtp(&mut rfc7714_context(), &protected).unwrap(),
        plain
    );
}

#[test]
fn rfc7714_17_1_srtcp_gcm_protect_and_unprotect() {
    let plain = hex(RFC7714_RTCP);
    let protected = hex(RFC7714_SRTCP);
    let mut sender = rfc7714_context();
    // The vector uses SRTCP index 0x5d4; our first index is 1.
    sender.streams.get_or_insert(0x4d61_7273).rtcp = replay::RtcpStream::starting_after(0x5d3);
    assert_eq!(protect_rtcp(&mut sender, &plain), protected);
    assert_eq!(
        unprotect_rtcp(&mut rfc7714_context(), &protected).unwrap(),
        plain
    );
}

#[test]
fn rfc7714_17_srtcp_gcm_tag_only_is_accepted_and_checked() {
    let plain = hex(RFC7714_RTCP);
    let tagged = hex(RFC7714_SRTCP_TAG_ONLY);
    assert_eq!(
        unprotect_rtcp(&mut rfc7714_context(), &tagged).unwrap(),
        plain
    );
    let mut bad = tagged.clone();
    bad[20] ^= 1;
    let mut b = bad.clone();
    assert_eq!(
        rfc7714_context().unprotect_rtcp(&mut b, bad.len()),
        Err(SrtpError::AuthenticationFailed)
    );
    assert_eq!(b, bad, "a failed check leaves the buffer as it was");
}

// ---- Cross-checks with webrtc-srtp ----

#[test]
fn rtp_matches_webrtc_srtp_across_a_wrap_for_every_suite() {
    for suite in SUITES {
        let (mut we, mut they) = (ours(suite), theirs(suite));
        let (mut our_rx, mut their_rx) = (ours(suite), theirs(suite));
        for seq in across_wrap() {
            let plain = if seq % 7 == 0 {
                rtp_with_csrc_and_extension(0xdead_beef, seq)
            } else {
                rtp(0xdead_beef, seq)
            };
            let mine = protect_rtp(&mut we, &plain);
            let other = they.encrypt_rtp(&plain).unwrap();
            assert_eq!(mine[..], other[..], "{suite:?} seq {seq}: protect differs");
            assert_eq!(mine.len(), plain.len() + we.rtp_overhead());
            assert_eq!(
                unprotect_rtp(&mut our_rx, &other).unwrap(),
                plain,
                "{suite:?} seq {seq}: we unprotect theirs"
            );
            assert_eq!(
                their_rx.decrypt_rtp(&mine).unwrap()[..],
                plain[..],
                "{suite:?} seq {seq}: they unprotect ours"
            );
        }
        assert_eq!(we.roc(0xdead_beef), Some(1), "{suite:?}");
        assert_eq!(our_rx.roc(0xdead_beef), Some(1), "{suite:?}");
    }
}

#[test]
fn rtcp_matches_webrtc_srtp_for_every_suite() {
    for suite in SUITES {
        let (mut we, mut they) = (ours(suite), theirs(suite));
        let (mut our_rx, mut their_rx) = (ours(suite), theirs(suite));
        for n in 0..50u8 {
            let plain = rtcp(0x0102_0304, n);
            let mine = protect_rtcp(&mut we, &plain);
            let other = they.encrypt_rtcp(&plain).unwrap();
            assert_eq!(mine[..], other[..], "{suite:?} #{n}: protect differs");
            assert_eq!(mine.len(), plain.len() + we.rtcp_overhead());
            assert_eq!(unprotect_rtcp(&mut our_rx, &other).unwrap(), plain);
            assert_eq!(their_rx.decrypt_rtcp(&mine).unwrap()[..], plain[..]);
        }
    }
}

#[test]
fn srtcp_of_the_32_bit_suite_carries_the_80_bit_tag() {
    let c = ours(SrtpSuite::AesCm128HmacSha1_32);
    assert_eq!((c.tag_len(), c.rtcp_overhead()), (4, 14));
    let c = ours(SrtpSuite::AesCm128HmacSha1_80);
    assert_eq!((c.tag_len(), c.rtcp_overhead()), (10, 14));
    let c = ours(SrtpSuite::AeadAes128Gcm);
    assert_eq!((c.tag_len(), c.rtcp_overhead()), (16, 20));
}

// ---- Late joiners, reordering, replay ----

#[test]
fn a_receiver_that_joins_after_a_wrap_needs_set_roc() {
    for suite in SUITES {
        let mut tx = ours(suite);
        let mut last = Vec::new();
        for seq in across_wrap() {
            last = protect_rtp(&mut tx, &rtp(7, seq));
        }
        // Without the ROC, a fresh receiver assumes 0 and the tag cannot match.
        assert_eq!(
            unprotect_rtp(&mut ours(suite), &last),
            Err(SrtpError::AuthenticationFailed),
            "{suite:?}"
        );
        let mut rx = ours(suite);
        rx.set_roc(7, tx.roc(7).unwrap());
        assert_eq!(
            unprotect_rtp(&mut rx, &last).unwrap(),
            rtp(7, 99),
            "{suite:?}"
        );
        let next = protect_rtp(&mut tx, &rtp(7, 100));
        assert_eq!(unprotect_rtp(&mut rx, &next).unwrap(), rtp(7, 100));
    }
}

#[test]
fn reordered_packets_across_a_wrap_are_accepted_once() {
    for suite in SUITES {
        let mut tx = ours(suite);
        let packets: Vec<(u16, Vec<u8>)> = across_wrap()
            .map(|seq| (seq, protect_rtp(&mut tx, &rtp(9, seq))))
            .collect();
        let mut rx = ours(suite);
        // Deliver in pairs swapped: ..., 65535 after 0, ...
        for pair in packets.chunks(2) {
            for (seq, p) in pair.iter().rev() {
                assert_eq!(
                    unprotect_rtp(&mut rx, p).unwrap(),
                    rtp(9, *seq),
                    "{suite:?}"
                );
            }
        }
        for (seq, p) in packets.iter().rev().take(60) {
            assert!(
                matches!(
                    unprotect_rtp(&mut rx, p),
                    Err(SrtpError::Replayed { ssrc: 9, .. })
                ),
                "{suite:?} seq {seq}"
            );
        }
        let (_, oldest) = &packets[0];
        assert!(matches!(
            unprotect_rtp(&mut rx, oldest),
            Err(SrtpError::TooOld { .. })
        ));
    }
}

#[test]
fn a_replayed_srtcp_packet_is_rejected() {
    for suite in SUITES {
        let mut tx = ours(suite);
        let mut rx = ours(suite);
        let first = protect_rtcp(&mut tx, &rtcp(5, 1));
        let second = protect_rtcp(&mut tx, &rtcp(5, 2));
        unprotect_rtcp(&mut rx, &second).unwrap();
        unprotect_rtcp(&mut rx, &first).unwrap();
        assert_eq!(
            unprotect_rtcp(&mut rx, &first),
            Err(SrtpError::Replayed { ssrc: 5, index: 1 })
        );
        assert_eq!(
            unprotect_rtcp(&mut rx, &second),
            Err(SrtpError::Replayed { ssrc: 5, index: 2 })
        );
    }
}

#[test]
fn protecting_the_same_index_twice_is_refused() {
    for suite in SUITES {
        let mut tx = ours(suite);
        protect_rtp(&mut tx, &rtp(3, 10));
        let p = rtp(3, 10);
        let mut b = with_room(&p);
        assert_eq!(
            tx.protect_rtp(&mut b, p.len()),
            Err(SrtpError::Replayed { ssrc: 3, index: 10 })
        );
    }
}

// ---- Tampering, truncation, garbage ----

#[test]
fn a_tampered_packet_fails_and_changes_nothing() {
    for suite in SUITES {
        let mut tx = ours(suite);
        let good = protect_rtp(&mut tx, &rtp(1, 500));
        let mut rx = ours(suite);
        for at in [1, 3, 8, 12, 100, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            let mut b = bad.clone();
            assert_eq!(
                rx.unprotect_rtp(&mut b, bad.len()),
                Err(SrtpError::AuthenticationFailed),
                "{suite:?} octet {at}"
            );
            assert_eq!(b, bad, "{suite:?}: buffer untouched");
        }
        // The forgeries did not poison the window: the genuine packet still goes through.
        assert_eq!(unprotect_rtp(&mut rx, &good).unwrap(), rtp(1, 500));

        let good = protect_rtcp(&mut tx, &rtcp(1, 0));
        for at in [1, 9, 20, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x02;
            assert_eq!(
                unprotect_rtcp(&mut rx, &bad),
                Err(SrtpError::AuthenticationFailed),
                "{suite:?} RTCP octet {at}"
            );
        }
        assert_eq!(unprotect_rtcp(&mut rx, &good).unwrap(), rtcp(1, 0));
    }
}

#[test]
fn forged_packets_from_unknown_ssrcs_do_not_evict_real_streams() {
    let suite = SrtpSuite::AesCm128HmacSha1_80;
    let mut tx = ours(suite);
    let mut rx = ours(suite);
    for seq in across_wrap() {
        unprotect_rtp(&mut rx, &protect_rtp(&mut tx, &rtp(42, seq))).unwrap();
    }
    for ssrc in 1000..1100 {
        let mut forged = rtp(ssrc, 1);
        forged.extend_from_slice(&[0; 10]);
        assert_eq!(
            unprotect_rtp(&mut rx, &forged),
            Err(SrtpError::AuthenticationFailed)
        );
    }
    assert_eq!(rx.roc(42), Some(1));
    let next = protect_rtp(&mut tx, &rtp(42, 100));
    assert_eq!(unprotect_rtp(&mut rx, &next).unwrap(), rtp(42, 100));
}

#[test]
fn every_truncation_is_an_error() {
    for suite in SUITES {
        let mut tx = ours(suite);
        let srtp = protect_rtp(&mut tx, &rtp_with_csrc_and_extension(2, 1));
        let srtcp = protect_rtcp(&mut tx, &rtcp(2, 0));
        let mut rx = ours(suite);
        for len in 0..srtp.len() {
            assert!(
                unprotect_rtp(&mut rx, &srtp[..len]).is_err(),
                "{suite:?} {len}"
            );
        }
        for len in 0..srtcp.len() {
            assert!(
                unprotect_rtcp(&mut rx, &srtcp[..len]).is_err(),
                "{suite:?} {len}"
            );
        }
        // The whole packets still pass afterwards.
        unprotect_rtp(&mut rx, &srtp).unwrap();
        unprotect_rtcp(&mut rx, &srtcp).unwrap();
    }
}

#[test]
fn garbage_and_bad_lengths_are_errors_not_panics() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for suite in SUITES {
        let mut ctx = ours(suite);
        let mut buf = vec![0u8; 1600];
        for round in 0..4000 {
            let len = (next() % 1600) as usize;
            for b in buf.iter_mut() {
                *b = next() as u8;
            }
            if round % 2 == 0 {
                buf[0] = 0x80 | (buf[0] & 0x3f); // get past the version check
            }
            let _ = ctx.unprotect_rtp(&mut buf, len);
            let _ = ctx.unprotect_rtcp(&mut buf, len);
            let _ = ctx.protect_rtp(&mut buf, len.min(1500));
            let _ = ctx.protect_rtcp(&mut buf, len.min(1500));
        }
        let mut small = [0x80u8; 16];
        assert_eq!(
            ctx.unprotect_rtp(&mut small, 17),
            Err(SrtpError::LengthOutOfBounds { len: 17, cap: 16 })
        );
        let need = 12 + ctx.rtp_overhead();
        let mut tight = vec![0x80u8; need - 1];
        assert_eq!(
            ctx.protect_rtp(&mut tight, 12),
            Err(SrtpError::NoRoom {
                need,
                cap: need - 1
            })
        );
        assert_eq!(
            ctx.protect_rtp(&mut [0x40; 40], 40),
            Err(SrtpError::BadVersion { version: 1 })
        );
        // A header extension that claims more than the packet holds.
        let mut p = rtp(1, 1);
        p[0] |= 0x10;
        p[14] = 0xff;
        p[15] = 0xff;
        let len = p.len();
        p.resize(len + MAX_OVERHEAD, 0);
        assert!(matches!(
            ctx.protect_rtp(&mut p, len),
            Err(SrtpError::TooShort { .. })
        ));
    }
}

#[test]
fn keys_of_the_wrong_length_are_refused() {
    for suite in SUITES {
        let (key, salt) = key_and_salt(suite);
        assert_eq!(
            SrtpContext::new(suite, &key[..15], &salt).err(),
            Some(SrtpError::BadKeyLength {
                suite,
                expected: 16,
                got: 15
            })
        );
        assert!(matches!(
            SrtpContext::new(suite, &key, &[0; 13]).err(),
            Some(SrtpError::BadSaltLength { got: 13, .. })
        ));
    }
}

#[test]
fn more_ssrcs_than_the_table_holds_still_work() {
    for suite in SUITES {
        let mut tx = ours(suite);
        let mut rx = ours(suite);
        for round in 0..3u16 {
            for ssrc in 0..(2 * MAX_SSRCS as u32) {
                let p = rtp(ssrc, 1000 + round);
                assert_eq!(
                    unprotect_rtp(&mut rx, &protect_rtp(&mut tx, &p)).unwrap(),
                    p
                );
            }
        }
    }
}
