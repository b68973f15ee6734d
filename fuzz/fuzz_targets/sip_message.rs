//! The B2BUA's SIP message model on arbitrary bytes: datagram and stream parsing, and for what
//! parses, serialisation (which must read back), responses, ACK and CANCEL building.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_control::sip::msg::{
    parse_datagram, parse_stream, parse_stream_frame, ParseError, SipMessage, SipResponse,
};

fn exercise(msg: &SipMessage) {
    let bytes = msg.to_bytes();
    // What we write must be what we read: the writer never emits something we reject.
    // (Expanding compact names can push a header section just under the limit over it.)
    match parse_datagram(&bytes) {
        Ok(back) => assert_eq!(back.to_bytes(), bytes),
        Err(ParseError::HeadersTooLarge) => {}
        Err(e) => panic!("serialised message does not read back: {e}"),
    }
    let _ = (
        msg.top_via_branch(),
        msg.cseq(),
        msg.call_id(),
        msg.from_tag(),
        msg.to_tag(),
    );
    let _ = msg.headers().split("Via").count();
    if let SipMessage::Request(req) = msg {
        let mut req = req.clone();
        req.stamp_received("[2001:db8::1]:5060".parse().unwrap());
        let resp = SipResponse::to(&req, 486, "Busy Here", Some("t"));
        let _ = resp.to_bytes();
        let _ = req.ack_for(&resp).to_bytes();
        let _ = req.cancel().to_bytes();
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = parse_datagram(data) {
        exercise(&msg);
    }
    // Stream: drain frames the way a TCP reader does; every step must make progress.
    let mut at = 0;
    while at < data.len() {
        match parse_stream_frame(&data[at..]) {
            Ok(Some((_, used))) => {
                assert!(used > 0);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok(Some((msg, used))) = parse_stream(data) {
        assert!(used <= data.len());
        exercise(&msg);
    }
});
