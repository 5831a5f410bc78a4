//! The narinfo parser never panics, and what it renders parses back to the same value.
#![no_main]

use gbc::formats::narinfo::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = NarInfo::parse(text) {
        let rendered = info.to_string();
        assert_eq!(NarInfo::parse(&rendered).ok(), Some(info));
    }
});
