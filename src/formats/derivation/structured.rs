//! What a builder sees of a derivation besides its environment: output placeholders replaced by
//! the output paths, and, for `__structuredAttrs` derivations, the `.attrs.json` and `.attrs.sh`
//! files Nix writes into the build directory.
//!
//! Checked against Nix 2.8 (tests/nix_realise.rs builds derivations that copy these files into
//! their outputs and compares the NAR hashes with Nix's own realisation).

use std::collections::BTreeMap;

use serde_json::Value;

use super::Derivation;
use crate::formats::hash::sha256;
use crate::formats::nix32;

/// Nix's `hashPlaceholder`: what `builtins.placeholder output` evaluates to, replaced at build time
/// by the output's path.
pub fn hash_placeholder(output: &str) -> String {
    format!("/{}", nix32::encode(&sha256(format!("nix-output:{output}").as_bytes())))
}

/// Replaces each output's placeholder with its path (Nix's `inputRewrites` for outputs known in
/// advance).
#[derive(Debug, Clone)]
pub struct Rewrites(Vec<(String, String)>);

impl Rewrites {
    /// `outputs`: output name → full path.
    pub fn for_outputs<'a>(outputs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Rewrites {
        Rewrites(outputs.into_iter().map(|(o, p)| (hash_placeholder(o), p.to_owned())).collect())
    }

    pub fn apply(&self, s: &str) -> String {
        let mut s = s.to_owned();
        for (from, to) in &self.0 {
            if s.contains(from.as_str()) {
                s = s.replace(from.as_str(), to);
            }
        }
        s
    }
}

/// One path of an exported references graph, as Nix's `pathInfoToJSON` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPath {
    pub path: String,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    /// The NAR sizes of its closure, summed.
    pub closure_size: u64,
}

/// The closure of some store paths, for `exportReferencesGraph`; the error says why it cannot be
/// given (a path outside the build's input closure, say).
pub type Export<'a, E> = &'a mut dyn FnMut(&[String]) -> Result<Vec<ExportedPath>, E>;

/// Why a derivation's structured attributes can't be given to its builder; `E` is why a closure
/// could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum AttrsError<E: std::error::Error + 'static> {
    #[error("__json is not a JSON object: {0}")]
    NotAnObject(serde_json::Error),
    #[error("exportReferencesGraph.{0} is not a list of store paths")]
    NotAList(String),
    #[error(transparent)]
    Export(E),
    #[error("writing .attrs.json: {0}")]
    Write(serde_json::Error),
}

/// The contents of `.attrs.json` and `.attrs.sh` for a derivation with `__json` in its
/// environment; None for one without. `outputs`: output name → full path.
pub fn structured_attrs<E: std::error::Error + 'static>(
    drv: &Derivation,
    outputs: &BTreeMap<String, String>,
    rewrites: &Rewrites,
    export: Export<'_, E>,
) -> Option<Result<(String, String), AttrsError<E>>> {
    let json = drv.env.get("__json")?;
    Some(attrs_files(json, outputs, rewrites, export))
}

fn attrs_files<E: std::error::Error + 'static>(
    json: &str,
    outputs: &BTreeMap<String, String>,
    rewrites: &Rewrites,
    export: Export<'_, E>,
) -> Result<(String, String), AttrsError<E>> {
    let mut attrs: BTreeMap<String, Value> = serde_json::from_str(json).map_err(AttrsError::NotAnObject)?;
    // exportReferencesGraph: each key gets the closure of its paths.
    if let Some(Value::Object(graphs)) = attrs.get("exportReferencesGraph").cloned() {
        for (key, paths) in graphs {
            let paths: Vec<String> = match &paths {
                Value::Array(items) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
                _ => return Err(AttrsError::NotAList(key)),
            };
            let graph = export(&paths)
                .map_err(AttrsError::Export)?
                .into_iter()
                .map(|p| {
                    serde_json::json!({
                        "closureSize": p.closure_size,
                        "narHash": p.nar_hash,
                        "narSize": p.nar_size,
                        "path": p.path,
                        "references": p.references,
                    })
                })
                .collect();
            attrs.insert(key, Value::Array(graph));
        }
    }
    let outs = outputs.iter().map(|(o, p)| (o.clone(), Value::String(p.clone()))).collect();
    attrs.insert("outputs".into(), Value::Object(outs));
    let json = serde_json::to_string(&attrs).map_err(AttrsError::Write)?;
    Ok((rewrites.apply(&json), rewrites.apply(&shell(&attrs))))
}

/// Nix's `writeStructuredAttrsShell`: every attribute bash can hold (strings, integers, null,
/// Booleans, and arrays and objects of those) as a `declare`; others are left out.
fn shell(attrs: &BTreeMap<String, Value>) -> String {
    let mut sh = String::new();
    for (key, value) in attrs {
        if !is_shell_name(key) {
            continue;
        }
        if let Some(v) = simple(value) {
            sh.push_str(&format!("declare {key}={v}\n"));
        } else if let Value::Array(items) = value {
            if let Some(items) = items.iter().map(simple).collect::<Option<Vec<_>>>() {
                let body: String = items.iter().map(|i| format!("{i} ")).collect();
                sh.push_str(&format!("declare -a {key}=({body})\n"));
            }
        } else if let Value::Object(map) = value
            && let Some(items) = map.iter().map(|(k, v)| simple(v).map(|v| (k, v))).collect::<Option<Vec<_>>>()
        {
            let body: String = items.iter().map(|(k, v)| format!("[{}]={v} ", shell_quote(k))).collect();
            sh.push_str(&format!("declare -A {key}=({body})\n"));
        }
    }
    sh
}

fn simple(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(shell_quote(s)),
        Value::Number(n) => {
            let f = n.as_f64()?;
            (f.ceil() == f).then(|| n.as_i64().map_or_else(|| format!("{}", f as i64), |i| i.to_string()))
        }
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1" } else { "" }.into()),
        _ => None,
    }
}

fn is_shell_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && bytes.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_nix_s() {
        // `nix-instantiate --eval -E 'builtins.placeholder "out"'` (Nix 2.8).
        assert_eq!(hash_placeholder("out"), "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9");
        let r = Rewrites::for_outputs([("out", "/nix/store/x-a"), ("dev", "/nix/store/y-a-dev")]);
        assert_eq!(
            r.apply(&format!("--prefix={} {}", hash_placeholder("out"), hash_placeholder("dev"))),
            "--prefix=/nix/store/x-a /nix/store/y-a-dev"
        );
    }
}
