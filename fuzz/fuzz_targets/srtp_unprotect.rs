//! Any datagram arriving on an SRTP leg: unprotected as SRTP and as SRTCP under every suite, it
//! is an error or a packet, never a panic; and the same bytes protected by a sender come back
//! unchanged through a receiver with the same key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_dataplane::srtp::{SrtpContext, MAX_OVERHEAD};
use siptg_proto::SrtpSuite;

const SUITES: [SrtpSuite; 3] = [
    SrtpSuite::AesCm128HmacSha1_80,
    SrtpSuite::AesCm128HmacSha1_32,
    SrtpSuite::AeadAes128Gcm,
];

fn context(suite: SrtpSuite) -> SrtpContext {
    let salt = vec![0x5a; SrtpContext::master_salt_len(suite)];
    SrtpContext::new(suite, &[0xa5; 16], &salt).unwrap()
}

fuzz_target!(|data: &[u8]| {
    for suite in SUITES {
        let mut rx = context(suite);
        // The whole input, then the input as a stream of datagrams on one context.
        let mut buf = data.to_vec();
        let _ = rx.unprotect_rtp(&mut buf, data.len());
        let mut buf = data.to_vec();
        let _ = rx.unprotect_rtcp(&mut buf, data.len());
        for chunk in data.chunks(97) {
            let mut buf = chunk.to_vec();
            let _ = rx.unprotect_rtp(&mut buf, chunk.len());
            let mut buf = chunk.to_vec();
            let _ = rx.unprotect_rtcp(&mut buf, chunk.len());
        }
        // A length beyond the buffer is an error too.
        let mut buf = data.to_vec();
        assert!(rx.unprotect_rtp(&mut buf, data.len() + 1).is_err());

        // Round trip: whatever the sender accepts, a fresh receiver gives back byte for byte.
        let mut tx = context(suite);
        let mut rx = context(suite);
        let mut buf = data.to_vec();
        buf.resize(data.len() + MAX_OVERHEAD, 0);
        if let Ok(n) = tx.protect_rtp(&mut buf, data.len()) {
            let m = rx.unprotect_rtp(&mut buf, n).unwrap();
            assert_eq!(&buf[..m], data);
        }
        let mut buf = data.to_vec();
        buf.resize(data.len() + MAX_OVERHEAD, 0);
        if let Ok(n) = tx.protect_rtcp(&mut buf, data.len()) {
            let m = rx.unprotect_rtcp(&mut buf, n).unwrap();
            assert_eq!(&buf[..m], data);
        }
    }
});
