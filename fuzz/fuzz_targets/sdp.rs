//! SDP from arbitrary bytes: the reader never panics, what it reads writes back to the same
//! description, and an offer it reads can be answered (and the answer read back) without panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_control::sip::sdp::{answer, apply_answer, CodecPrefs, LocalMedia, SessionDescription};

fuzz_target!(|data: &[u8]| {
    let Ok(offer) = SessionDescription::parse(data) else {
        return;
    };
    let written = offer.to_string();
    let again = SessionDescription::parse(written.as_bytes()).expect("our own output parses");
    assert_eq!(again, offer, "write then read changes the description");

    for list in ["opus,alaw,mulaw,g722,telephone-event", "mulaw"] {
        let prefs: CodecPrefs = list.parse().expect("a valid list");
        let local = LocalMedia::new("192.0.2.1".parse().unwrap(), 30000, 1);
        // SRTP keys are random, but they never steer the negotiation.
        if let Ok((answered, negotiated)) = answer(&offer, &prefs, &local) {
            let read = SessionDescription::parse(answered.to_string().as_bytes())
                .expect("our answer parses");
            assert_eq!(
                read.media.len(),
                offer.media.len(),
                "RFC 3264: as many m-lines"
            );
            let _ = negotiated.to_leg_spec(true);
            // The offerer's view of the same exchange must not panic either.
            let _ = apply_answer(&offer, &read);
        }
    }
});
