//! The Worker's SIP request reader and response writer on arbitrary datagrams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_control::sip::message::{parse_request, response, uri_user};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        let src = "127.0.0.1:5060".parse().unwrap();
        let _ = response(&req, 503, "No response from Manager", src, "t", "siptg", &[]);
        if let Some(from) = req.header("From") {
            let _ = uri_user(from);
        }
    }
});
