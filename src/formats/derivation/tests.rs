use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/drv");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".drv") {
            out.push((format!("/nix/store/{name}"), std::fs::read(entry.path()).unwrap_or_default()));
        }
    }
    out.sort();
    assert!(out.len() >= 10, "fixtures missing in {}", dir.display());
    out
}

fn nix_store() -> StoreDir {
    StoreDir::new("/nix/store").unwrap_or_else(|e| unreachable!("{e}"))
}

fn parse(bytes: &[u8]) -> Derivation {
    Derivation::parse(bytes).unwrap_or_else(|e| unreachable!("{e}"))
}

/// Resolve every fixture's inputs from the fixture set itself.
fn resolved_graph(fx: &[(String, Vec<u8>)]) -> DrvGraph {
    let map: BTreeMap<String, Vec<u8>> = fx.iter().cloned().collect();
    let mut graph = DrvGraph::new();
    let mut load = |p: &str| -> Result<Vec<u8>, Infallible> { Ok(map.get(p).cloned().unwrap_or_default()) };
    for (path, bytes) in fx {
        let drv = parse(bytes);
        graph.resolve_inputs(&nix_store(), &drv, &mut load).unwrap_or_else(|e| unreachable!("{path}: {e}"));
    }
    graph
}

#[test]
fn aterm_round_trips_nix_written_derivations() {
    for (path, bytes) in fixtures() {
        let drv = parse(&bytes);
        assert_eq!(drv.to_aterm(), bytes, "{path}");
    }
}

#[test]
fn drv_paths_match_the_names_nix_gave_them() {
    for (path, bytes) in fixtures() {
        let drv = parse(&bytes);
        let (dir, sp) = StoreDir::split_path(&path).unwrap_or_else(|e| unreachable!("{e}"));
        let name = name_from_drv_path(&sp).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(drv.drv_path(&dir, name), Ok(sp.clone()), "{path}");
        assert_eq!(drv.store_dir(), Ok(dir), "{path}");
        assert_eq!(drv.name_from_outputs().as_deref(), Ok(name), "{path}");
    }
}

#[test]
fn declared_outputs_validate() {
    let fx = fixtures();
    let graph = resolved_graph(&fx);
    for (path, bytes) in &fx {
        let drv = parse(bytes);
        let name = drv.name_from_outputs().unwrap_or_default();
        let paths = drv.validate_outputs(&nix_store(), &name, &graph.lookup());
        let paths = paths.unwrap_or_else(|e| unreachable!("{path}: {e}"));
        for (o, p) in paths {
            assert_eq!(nix_store().display(&p), drv.outputs[&o].path);
        }
    }
}

fn fixture(name: &str) -> (String, Derivation) {
    let (p, b) = fixtures().into_iter().find(|(p, _)| p.ends_with(name)).unwrap_or_default();
    (p, parse(&b))
}

#[test]
fn a_tampered_output_path_is_rejected() {
    let fx = fixtures();
    let graph = resolved_graph(&fx);
    let (_, mut drv) = fixture("-chain-b.drv");
    let other = fixture("-single.drv").1.outputs["out"].path.clone();
    drv.outputs.entry("out".to_owned()).and_modify(|o| o.path = other.clone());
    drv.env.insert("out".to_owned(), other);
    let err = drv.validate_outputs(&nix_store(), "chain-b", &graph.lookup());
    assert!(matches!(err, Err(DrvError::OutputMismatch { .. })), "{err:?}");
}

#[test]
fn a_tampered_environment_is_rejected() {
    let fx = fixtures();
    let graph = resolved_graph(&fx);
    let (_, mut drv) = fixture("-multi.drv");
    drv.env.insert("dev".to_owned(), "/nix/store/00000000000000000000000000000000-x".to_owned());
    // The env is masked out of the output hash, so only the env check catches this.
    let err = drv.validate_outputs(&nix_store(), "multi", &graph.lookup());
    assert!(matches!(err, Err(DrvError::EnvMismatch { .. })), "{err:?}");
}

#[test]
fn a_changed_builder_changes_the_output_paths() {
    let fx = fixtures();
    let graph = resolved_graph(&fx);
    let (_, mut drv) = fixture("-single.drv");
    drv.args.push("extra".to_owned());
    let err = drv.validate_outputs(&nix_store(), "single", &graph.lookup());
    assert!(matches!(err, Err(DrvError::OutputMismatch { .. })), "{err:?}");
}

#[test]
fn a_wrong_fixed_output_hash_is_rejected() {
    let (_, mut drv) = fixture("-fixed-flat.drv");
    drv.outputs.entry("out".to_owned()).and_modify(|o| o.hash = "00".repeat(32));
    let err = drv.validate_outputs(&nix_store(), "fixed-flat", &|_| None);
    assert!(matches!(err, Err(DrvError::OutputMismatch { .. })), "{err:?}");
}

#[test]
fn an_input_whose_contents_do_not_match_its_path_is_rejected() {
    let fx = fixtures();
    let (_, drv) = fixture("-chain-b.drv");
    let mut load = |p: &str| -> Result<Vec<u8>, Infallible> {
        let mut bytes = fx.iter().find(|(q, _)| q == p).map(|(_, b)| b.clone()).unwrap_or_default();
        // Swap in a different (valid) derivation under the input's name.
        if p.ends_with("-chain-a.drv") {
            bytes = fixture("-single.drv").1.to_aterm();
        }
        Ok(bytes)
    };
    let err = DrvGraph::new().resolve_inputs(&nix_store(), &drv, &mut load);
    assert!(matches!(err, Err(GraphError::WrongDrvPath { .. })), "{err:?}");
}

#[test]
fn missing_inputs_are_reported() {
    let (_, drv) = fixture("-chain-b.drv");
    let err = drv.validate_outputs(&nix_store(), "chain-b", &|_| None);
    assert!(matches!(err, Err(DrvError::MissingInput(_))), "{err:?}");
}

fn parse_err(s: &str) -> DrvError {
    match Derivation::parse(s.as_bytes()) {
        Ok(d) => unreachable!("parsed {d:?}"),
        Err(e) => e,
    }
}

const MIN: &str = r#"Derive([("out","/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-x","","")],[],[],"s","b",[],[])"#;

#[test]
fn minimal_derivation_parses() {
    assert_eq!(parse(MIN.as_bytes()).to_aterm(), MIN.as_bytes());
}

#[test]
fn non_canonical_and_malformed_input_is_rejected() {
    let cases = [
        (MIN.replace("Derive(", "Derivation("), "expected"),
        (format!("{MIN}\n"), "after the end"),
        (MIN[..MIN.len() - 3].to_owned(), "end of input"),
        (MIN.replace("[],[],", r#"[],["/b","/a"],"#), "not strictly sorted"),
        (MIN.replace("[],[],", r#"[],["/a","/a"],"#), "not strictly sorted"),
        (MIN.replace(r#"[],[])"#, r#"[],[("b",""),("a","")])"#), "not strictly sorted"),
        (MIN.replace(r#""s""#, r#""\q""#), "escape"),
        (MIN.replace(r#""s""#, "\"a\nb\""), "raw control"),
        (MIN.replace(r#""s""#, "\"\u{0}\""), ""),
        (r#"Derive([("out"#.to_owned(), "unterminated"),
    ];
    for (input, want) in cases {
        let e = Derivation::parse(input.as_bytes());
        if want.is_empty() {
            // NUL is a legal byte in a string; only check it round-trips.
            let d = e.unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(d.to_aterm(), input.as_bytes());
            continue;
        }
        let e = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(want), "{input:?}: {e:?} lacks {want:?}");
    }
    let mut bytes = MIN.as_bytes().to_vec();
    let at = MIN.find("\"s\"").unwrap_or_default() + 1;
    bytes[at] = 0xff;
    assert!(matches!(Derivation::parse(&bytes), Err(DrvError::Syntax { .. })));
}

#[test]
fn unsupported_kinds_are_refused_clearly() {
    let floating = MIN.replace(r#""/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-x","","""#, r#""","r:sha256","""#);
    assert!(parse_err(&floating).to_string().contains("content-addressed (floating)"));
    let impure = MIN.replace(r#""/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-x","","""#, r#""","r:sha256","impure""#);
    assert!(parse_err(&impure).to_string().contains("impure"));
    let deferred = MIN.replace(r#""/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-x","","""#, r#""","","""#);
    assert!(parse_err(&deferred).to_string().contains("deferred"));
    let dynamic = r#"DrvWithVersion("xp-dyn-drv",[],[],[],"s","b",[],[])"#;
    assert!(parse_err(dynamic).to_string().contains("dynamic derivations"));
    let dyn_input =
        MIN.replace("[],[],", r#"[("/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-a.drv",(["out"],[]))],[],"#);
    assert!(parse_err(&dyn_input).to_string().contains("dynamic-derivation"));
    let two_fixed = r#"Derive([("a","/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-x-a","sha256","00"),("out","/nix/store/z7hc05ps92sb1hm09cgk2c2kvpvcnq9x-x","","")],[],[],"s","b",[],[])"#;
    assert!(parse_err(two_fixed).to_string().contains("exactly one output"));
    let no_outputs = r#"Derive([],[],[],"s","b",[],[])"#;
    assert!(parse_err(no_outputs).to_string().contains("no outputs"));
}

fn arb_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z\"\\\\\n\r\t ✓\u{0}]{0,12}").unwrap_or_else(|e| unreachable!("{e}"))
}

fn arb_path() -> impl Strategy<Value = String> {
    "[0-9a-df-np-sv-z]{32}-[a-z]{1,8}".prop_map(|b| format!("/gnu/store/{b}"))
}

#[test]
fn list_attributes_come_from_the_variable_or_from_structured_attributes() {
    let mut drv = Derivation {
        outputs: BTreeMap::new(),
        input_drvs: BTreeMap::new(),
        input_srcs: Default::default(),
        system: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec![],
        env: BTreeMap::from([("requiredSystemFeatures".to_owned(), " kvm  big-parallel ".to_owned())]),
    };
    assert_eq!(drv.strings_attr("requiredSystemFeatures"), Some(vec!["kvm".into(), "big-parallel".into()]));
    assert_eq!(drv.strings_attr("allowedReferences"), None);
    // With __json, the variable is not what counts.
    drv.env.insert("__json".into(), r#"{"requiredSystemFeatures":["kvm"],"allowedReferences":[]}"#.into());
    assert_eq!(drv.strings_attr("requiredSystemFeatures"), Some(vec!["kvm".into()]));
    assert_eq!(drv.strings_attr("allowedReferences"), Some(vec![]));
    assert_eq!(drv.strings_attr("disallowedReferences"), None);
}

prop_compose! {
    fn arb_drv()(
        outputs in proptest::collection::btree_map("[a-z]{1,6}", arb_path(), 1..4),
        input_drvs in proptest::collection::btree_map(
            arb_path().prop_map(|p| format!("{p}.drv")),
            proptest::collection::btree_set("[a-z]{1,5}", 1..3),
            0..3),
        input_srcs in proptest::collection::btree_set(arb_path(), 0..3),
        system in arb_string(),
        builder in arb_string(),
        args in proptest::collection::vec(arb_string(), 0..4),
        env in proptest::collection::btree_map(arb_string(), arb_string(), 0..6),
    ) -> Derivation {
        let outputs = outputs.into_iter()
            .map(|(k, path)| (k, Output { path, hash_algo: String::new(), hash: String::new() }))
            .collect();
        Derivation { outputs, input_drvs, input_srcs, system, builder, args, env }
    }
}

proptest! {
    #[test]
    fn print_parse_print_is_identity(drv in arb_drv()) {
        let bytes = drv.to_aterm();
        let back = Derivation::parse(&bytes);
        prop_assert_eq!(back.as_ref().ok(), Some(&drv), "{:?}", back);
        prop_assert_eq!(back.map(|d| d.to_aterm()).ok(), Some(bytes));
    }
}
