use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use proptest::prelude::*;

use super::*;

/// An in-memory tree, to build NARs from and read them back into.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tree {
    File { executable: bool, data: Vec<u8> },
    Link(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Tree>),
}

fn write_node<W: Write>(node: Node<'_, W>, tree: &Tree) -> std::io::Result<()> {
    match tree {
        Tree::File { executable, data } => node.regular(*executable, data.len() as u64, &data[..]),
        Tree::Link(target) => node.symlink(target),
        Tree::Dir(entries) => {
            let mut dir = node.directory()?;
            for (name, child) in entries {
                write_node(dir.entry(name)?, child)?;
            }
            dir.close()
        }
    }
}

fn to_nar(tree: &Tree) -> Vec<u8> {
    let mut out = Vec::new();
    begin(&mut out).and_then(|root| write_node(root, tree)).unwrap_or_else(|e| unreachable!("{e}"));
    out
}

/// Directories being filled, each with the name it will have in its parent.
type OpenDirs = Vec<(Vec<u8>, BTreeMap<Vec<u8>, Tree>)>;

fn from_nar(bytes: &[u8]) -> Result<Tree, NarError> {
    let mut r = NarReader::new(bytes);
    let mut stack: OpenDirs = Vec::new();
    let mut root = None;
    let mut place = |stack: &mut OpenDirs, name: Vec<u8>, t: Tree| match stack.last_mut() {
        Some((_, entries)) => {
            entries.insert(name, t);
        }
        None => root = Some(t),
    };
    while let Some(ev) = r.next_event()? {
        match ev {
            Event::Directory { name } => stack.push((name, BTreeMap::new())),
            Event::EndDirectory => {
                let (name, entries) = stack.pop().unwrap_or_default();
                place(&mut stack, name, Tree::Dir(entries));
            }
            Event::Symlink { name, target } => place(&mut stack, name, Tree::Link(target)),
            Event::Regular { name, executable, mut contents, .. } => {
                let mut data = Vec::new();
                contents.read_to_end(&mut data).map_err(|e| NarError::Io { offset: 0, source: e })?;
                place(&mut stack, name, Tree::File { executable, data });
            }
        }
    }
    Ok(root.unwrap_or(Tree::Link(Vec::new())))
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(1u8..=255, 1..12).prop_filter("valid entry name", |n| check_entry_name(n).is_ok())
}

fn arb_tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(executable, data)| Tree::File { executable, data }),
        proptest::collection::vec(1u8..=255, 1..20).prop_map(Tree::Link),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| proptest::collection::btree_map(arb_name(), inner, 0..6).prop_map(Tree::Dir))
}

proptest! {
    #[test]
    fn encode_decode_encode_is_identity(tree in arb_tree()) {
        let nar = to_nar(&tree);
        let back = from_nar(&nar).map_err(|e| e.to_string());
        prop_assert_eq!(back, Ok(tree.clone()));
        prop_assert_eq!(to_nar(&tree), nar);
    }

    #[test]
    fn restore_then_dump_is_identity(tree in arb_tree()) {
        let nar = to_nar(&tree);
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let dest = tmp.path().join("out");
        let expected = (crate::formats::hash::Hash::sha256(crate::formats::hash::sha256(&nar)), nar.len() as u64);
        prop_assert_eq!(restore(&nar[..], &dest).ok(), Some(expected));
        let mut dumped = Vec::new();
        prop_assert!(dump_path(&dest, &mut dumped).is_ok());
        prop_assert_eq!(dumped, nar);
    }
}

/// Raw NAR building blocks, for writing NARs the writer would refuse to write.
enum P<'a> {
    S(&'a [u8]),
    U(u64),
}

fn raw(parts: &[P<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            P::S(s) => {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s);
                out.resize(out.len() + padding(s.len() as u64), 0);
            }
            P::U(n) => out.extend_from_slice(&n.to_le_bytes()),
        }
    }
    out
}

fn strs<'a>(s: &[&'a str]) -> Vec<P<'a>> {
    s.iter().map(|s| P::S(s.as_bytes())).collect()
}

/// A directory NAR with the given entries, each a file containing "x".
fn dir_with(names: &[&[u8]]) -> Vec<u8> {
    let mut parts = strs(&["nix-archive-1", "(", "type", "directory"]);
    for n in names {
        parts.extend([P::S(b"entry"), P::S(b"("), P::S(b"name"), P::S(n), P::S(b"node")]);
        parts.extend(strs(&["(", "type", "regular", "contents", "x", ")", ")"]));
    }
    parts.push(P::S(b")"));
    raw(&parts)
}

fn decode_err(nar: &[u8]) -> String {
    match from_nar(nar) {
        Ok(t) => unreachable!("decoded {t:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_rejected(nar: &[u8], want: &str) {
    let e = decode_err(nar);
    assert!(e.contains(want), "error {e:?} should mention {want:?}");
}

#[test]
fn sanity_the_raw_builder_makes_valid_nars() {
    assert!(from_nar(&dir_with(&[b"a", b"b"])).is_ok());
}

#[test]
fn rejects_bad_magic() {
    assert_rejected(&raw(&strs(&["nix-archive-2", "(", "type", "symlink", "target", "x", ")"])), "bad magic");
    assert_rejected(b"", "bad magic");
}

/// A reader that fails while the magic is read is an I/O error, kept as such: the coordinator
/// stages a host's NAR through a tee into its cache, and a full disk at the first write was
/// reported as the host sending "not a NAR".
#[test]
fn an_io_error_at_the_magic_is_not_bad_magic() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        }
    }
    match NarReader::new(Failing).next_event() {
        Err(NarError::Io { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::StorageFull),
        Err(e) => unreachable!("not the reader's error: {e}"),
        Ok(_) => unreachable!("an event from a reader that fails"),
    }
}

#[test]
fn rejects_unsorted_entries() {
    assert_rejected(&dir_with(&[b"b", b"a"]), "must be sorted and unique");
}

#[test]
fn rejects_duplicate_entries() {
    assert_rejected(&dir_with(&[b"a", b"a"]), "must be sorted and unique");
}

#[test]
fn rejects_empty_name() {
    assert_rejected(&dir_with(&[b""]), "empty");
}

#[test]
fn rejects_dot_names() {
    assert_rejected(&dir_with(&[b"."]), ". or ..");
    assert_rejected(&dir_with(&[b".."]), ". or ..");
}

#[test]
fn rejects_slash_in_name() {
    assert_rejected(&dir_with(&[b"a/b"]), "'/'");
}

#[test]
fn rejects_nul_in_name() {
    assert_rejected(&dir_with(&[b"a\0b"]), "NUL");
}

#[test]
fn rejects_every_truncation() {
    let nar = to_nar(&Tree::Dir(BTreeMap::from([
        (b"f".to_vec(), Tree::File { executable: true, data: b"hello world".to_vec() }),
        (b"l".to_vec(), Tree::Link(b"f".to_vec())),
    ])));
    for cut in 0..nar.len() {
        let e = decode_err(&nar[..cut]);
        assert!(e.contains("truncated") || e.contains("bad magic"), "cut at {cut}: {e}");
    }
}

#[test]
fn rejects_trailing_bytes() {
    let mut nar = to_nar(&Tree::Link(b"x".to_vec()));
    nar.push(0);
    assert_rejected(&nar, "trailing bytes");
}

#[test]
fn rejects_absurd_lengths() {
    let huge_name = raw(&[
        P::S(b"nix-archive-1"),
        P::S(b"("),
        P::S(b"type"),
        P::S(b"directory"),
        P::S(b"entry"),
        P::S(b"("),
        P::S(b"name"),
        P::U(1 << 60),
    ]);
    assert_rejected(&huge_name, "more than the limit");
    let huge_token = raw(&[P::S(b"nix-archive-1"), P::U(u64::MAX)]);
    assert_rejected(&huge_token, "more than the limit");
    let huge_file =
        raw(&[P::S(b"nix-archive-1"), P::S(b"("), P::S(b"type"), P::S(b"regular"), P::S(b"contents"), P::U(u64::MAX)]);
    assert_rejected(&huge_file, "more than the limit");
    let long_target = vec![b'a'; MAX_TARGET_LEN + 1];
    let nar = raw(&[
        P::S(b"nix-archive-1"),
        P::S(b"("),
        P::S(b"type"),
        P::S(b"symlink"),
        P::S(b"target"),
        P::S(&long_target),
    ]);
    assert_rejected(&nar, "more than the limit");
    assert_rejected(&dir_with(&[&[b'a'; MAX_NAME_LEN + 1]]), "more than the limit");
}

#[test]
fn rejects_nonzero_padding() {
    let mut nar = to_nar(&Tree::File { executable: false, data: b"abc".to_vec() });
    // The file's padding follows its 3 bytes of contents, 8 + 8 bytes before the final ")".
    let at = nar.len() - 16 - 1;
    nar[at] = 1;
    assert_rejected(&nar, "non-zero padding");
    let mut name = dir_with(&[b"abc"]);
    let pos = name.windows(3).position(|w| w == b"abc").unwrap_or_default();
    name[pos + 3] = b'!';
    assert_rejected(&name, "non-zero padding");
}

#[test]
fn rejects_grammar_violations() {
    let unknown_type = raw(&strs(&["nix-archive-1", "(", "type", "fifo", ")"]));
    assert_rejected(&unknown_type, "expected a node type");
    let no_contents = raw(&strs(&["nix-archive-1", "(", "type", "regular", ")"]));
    assert_rejected(&no_contents, "expected \"contents\"");
    let bad_exec = raw(&strs(&["nix-archive-1", "(", "type", "regular", "executable", "yes"]));
    assert_rejected(&bad_exec, "empty string after");
    let junk_in_dir = raw(&strs(&["nix-archive-1", "(", "type", "directory", "entries"]));
    assert_rejected(&junk_in_dir, "\"entry\" or \")\"");
    let empty_target = raw(&strs(&["nix-archive-1", "(", "type", "symlink", "target", "", ")"]));
    assert_rejected(&empty_target, "symlink target is empty");
    let nul_target = raw(&strs(&["nix-archive-1", "(", "type", "symlink", "target", "a\0", ")"]));
    assert_rejected(&nul_target, "NUL");
}

#[test]
fn rejects_excessive_nesting() {
    let mut tree = Tree::Dir(BTreeMap::new());
    for _ in 0..MAX_DEPTH {
        tree = Tree::Dir(BTreeMap::from([(b"d".to_vec(), tree)]));
    }
    assert_rejected(&to_nar(&tree), "nested deeper");
}

#[test]
fn refuses_to_continue_after_an_error() {
    let nar = dir_with(&[b"b", b"a"]);
    let mut r = NarReader::new(&nar[..]);
    let mut first_err = None;
    for _ in 0..10 {
        match r.next_event() {
            Err(e) => {
                first_err = Some(e);
                break;
            }
            Ok(None) => break,
            Ok(Some(_)) => {}
        }
    }
    assert!(matches!(first_err, Some(NarError::Unsorted { .. })));
    assert!(matches!(r.next_event(), Err(NarError::Poisoned)));
}

#[test]
fn writer_refuses_bad_trees() {
    let mut out = Vec::new();
    let Ok(root) = begin(&mut out) else { unreachable!() };
    let Ok(mut dir) = root.directory() else { unreachable!() };
    assert!(dir.entry(b"b").and_then(|n| n.symlink(b"x")).is_ok());
    assert!(dir.entry(b"a").is_err(), "out of order");
    assert!(dir.entry(b"b").is_err(), "duplicate");
    assert!(dir.entry(b"..").is_err());
    assert!(dir.entry(b"c/d").is_err());
    assert!(dir.entry(b"c").and_then(|n| n.symlink(b"")).is_err(), "empty target");
    let mut out = Vec::new();
    let Ok(root) = begin(&mut out) else { unreachable!() };
    assert!(root.regular(false, 10, &b"short"[..]).is_err(), "contents shorter than declared");
}

/// Everything under `dir`, as relative paths.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn restoring_a_malicious_nar_writes_nothing_outside_dest() {
    let link_then_entry = {
        let mut parts = strs(&["nix-archive-1", "(", "type", "directory"]);
        parts.extend(strs(&[
            "entry",
            "(",
            "name",
            "a",
            "node",
            "(",
            "type",
            "symlink",
            "target",
            "../outside",
            ")",
            ")",
        ]));
        parts.extend(strs(&["entry", "(", "name", "a", "node", "(", "type", "directory"]));
        parts.extend(strs(&["entry", "(", "name", "pwned", "node", "(", "type", "regular", "contents", "x", ")", ")"]));
        parts.extend(strs(&[")", ")", ")"]));
        raw(&parts)
    };
    let truncated_after_file = {
        let mut nar = dir_with(&[b"a", b"b"]);
        nar.truncate(nar.len() - 20);
        nar
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", dir_with(&[b".."])),
        ("slash", dir_with(&[b"../outside/pwned"])),
        ("absolute", dir_with(&[b"/tmp/pwned"])),
        ("symlink then same name", link_then_entry),
        ("truncated", truncated_after_file),
        ("duplicate", dir_with(&[b"a", b"a"])),
    ];
    for (what, nar) in cases {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        fs::create_dir(tmp.path().join("outside")).ok();
        let before = listing(tmp.path());
        let dest = tmp.path().join("dest");
        let r = restore(&nar[..], &dest);
        assert!(r.is_err(), "{what}: restored");
        assert_eq!(listing(tmp.path()), before, "{what}: left files behind");
    }
}

#[test]
fn restore_refuses_an_existing_destination() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let dest = tmp.path().join("dest");
    fs::write(&dest, b"keep me").ok();
    let nar = to_nar(&Tree::File { executable: false, data: b"new".to_vec() });
    assert!(matches!(restore(&nar[..], &dest), Err(RestoreError::Exists(_))));
    assert_eq!(fs::read(&dest).ok().as_deref(), Some(&b"keep me"[..]));
    // A dangling symlink counts as existing too.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &link).ok();
    assert!(matches!(restore(&nar[..], &link), Err(RestoreError::Exists(_))));
    assert!(!tmp.path().join("nowhere").exists());
}

#[test]
fn restore_sets_executable_bits_and_dump_reads_them() {
    use std::os::unix::fs::PermissionsExt as _;
    let tree = Tree::Dir(BTreeMap::from([
        (b"bin".to_vec(), Tree::File { executable: true, data: b"#!/bin/sh\n".to_vec() }),
        (b"data".to_vec(), Tree::File { executable: false, data: Vec::new() }),
        ("\u{e9}t\u{e9}".as_bytes().to_vec(), Tree::Link(b"/abs/dangling".to_vec())),
        (vec![0xff, 0xfe], Tree::Dir(BTreeMap::new())),
    ]));
    let nar = to_nar(&tree);
    let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let dest = tmp.path().join("t");
    assert!(restore(&nar[..], &dest).is_ok());
    let mode = |p: &str| fs::metadata(dest.join(p)).map(|m| m.permissions().mode()).unwrap_or(0);
    assert_eq!(mode("bin") & 0o111, 0o111);
    assert_eq!(mode("data") & 0o111, 0);
    assert!(dest.join(std::ffi::OsStr::from_bytes(&[0xff, 0xfe])).is_dir());
    let (hash, size) = nar_hash(&dest).unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(size, nar.len() as u64);
    assert_eq!(hash, crate::formats::hash::Hash::sha256(crate::formats::hash::sha256(&nar)));
}

#[test]
fn restore_to_a_destination_with_a_maximal_name() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let dest = tmp.path().join("d".repeat(255));
    let nar = to_nar(&Tree::Dir(BTreeMap::from([(b"f".to_vec(), Tree::Link(b"x".to_vec()))])));
    assert!(restore(&nar[..], &dest).is_ok());
    assert!(dest.join("f").is_symlink());
}
