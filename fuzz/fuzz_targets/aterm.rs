//! The ATerm parser never panics, and whatever it accepts prints back to the same bytes.
#![no_main]

use gbc::formats::derivation::Derivation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(drv) = Derivation::parse(data) {
        assert_eq!(drv.to_aterm(), data);
    }
});
