//! The dataplane's control-socket decoder must turn any byte stream into frames or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use siptg_proto::{FrameDecoder, Hello, Message};

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::new();
    dec.push(data);
    while let Ok(Some(_)) = dec.next_frame::<Message>() {}
    let mut dec = FrameDecoder::new();
    dec.push(data);
    let _ = dec.next_frame::<Hello>();
});
