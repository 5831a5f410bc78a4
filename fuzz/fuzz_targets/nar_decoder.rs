//! The NAR decoder never panics, and whatever it accepts re-encodes to the same bytes.
#![no_main]

use std::io::Read;

use gbc::formats::nar::{self, Event, NarReader};
use libfuzzer_sys::fuzz_target;

fn reencode(data: &[u8]) -> Option<Vec<u8>> {
    let mut reader = NarReader::new(data);
    // Collect the events, then replay them through the writer.
    let mut events: Vec<Ev> = Vec::new();
    loop {
        match reader.next_event() {
            Err(_) => return None,
            Ok(None) => break,
            Ok(Some(Event::Directory { name })) => events.push((b'd', name, false, Vec::new())),
            Ok(Some(Event::EndDirectory)) => events.push((b'e', Vec::new(), false, Vec::new())),
            Ok(Some(Event::Symlink { name, target })) => events.push((b'l', name, false, target)),
            Ok(Some(Event::Regular { name, executable, mut contents, .. })) => {
                let mut data = Vec::new();
                contents.read_to_end(&mut data).ok()?;
                events.push((b'f', name, executable, data));
            }
        }
    }
    let mut out = Vec::new();
    let root = nar::begin(&mut out).ok()?;
    let mut it = events.into_iter();
    write_node(root, it.next()?, &mut it)?;
    Some(out)
}

/// (kind: d/e/l/f, name, executable, symlink target or file contents)
type Ev = (u8, Vec<u8>, bool, Vec<u8>);

fn write_node<W: std::io::Write>(node: nar::Node<'_, W>, ev: Ev, rest: &mut impl Iterator<Item = Ev>) -> Option<()> {
    match ev.0 {
        b'f' => node.regular(ev.2, ev.3.len() as u64, &ev.3[..]).ok(),
        b'l' => node.symlink(&ev.3).ok(),
        b'd' => {
            let mut dir = node.directory().ok()?;
            loop {
                let next = rest.next()?;
                if next.0 == b'e' {
                    return dir.close().ok();
                }
                let child = dir.entry(&next.1).ok()?;
                write_node(child, next, rest)?;
            }
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(again) = reencode(data) {
        assert_eq!(again, data);
    }
});
