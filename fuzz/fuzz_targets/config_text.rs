//! Any config text: a Config or an error naming what is wrong — never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = siptg_control::config::parse(text, "fuzz", Vec::new());
    }
});
