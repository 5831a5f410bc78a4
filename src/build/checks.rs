//! Nix's output checks, applied after a build and before its outputs are registered:
//! `allowedReferences`, `allowedRequisites`, `disallowedReferences`, `disallowedRequisites` (from
//! the derivation's variables, for every output; or per output from `outputChecks` in structured
//! attributes, where `maxSize` and `maxClosureSize` may be set too). A specifier is a store path or
//! the name of one of the derivation's outputs. As in Nix 2.8, the variables' requisite checks
//! leave out the output itself; reference checks do not.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;

use serde_json::Value;

use crate::formats::derivation::Derivation;

/// The NAR size and references of a valid store path, if it is one.
pub type Lookup<'a> = &'a dyn Fn(&str) -> io::Result<Option<(u64, Vec<String>)>>;

/// An output as the build left it.
pub struct Built {
    pub path: String,
    pub nar_size: u64,
    pub references: BTreeSet<String>,
}

#[derive(Default)]
struct Checks {
    allowed_references: Option<Vec<String>>,
    allowed_requisites: Option<Vec<String>>,
    disallowed_references: Option<Vec<String>>,
    disallowed_requisites: Option<Vec<String>>,
    max_size: Option<u64>,
    max_closure_size: Option<u64>,
    ignore_self_refs: bool,
}

/// Why outputs were refused (Nix's words), or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Reading the store's records failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("__json is not JSON: {0}")]
    Json(serde_json::Error),
    #[error("outputChecks.{output}.{key}: not a {what}")]
    Spec { output: String, key: String, what: &'static str },
    #[error("derivation contains an illegal reference specifier '{0}'")]
    Specifier(String),
    #[error("path '{path}' is too large at {size} bytes; limit is {max} bytes")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("closure of path '{path}' is too large at {size} bytes; limit is {max} bytes")]
    ClosureTooLarge { path: String, size: u64, max: u64 },
    #[error("output '{path}' is not allowed to refer to: {}", .refs.join(" "))]
    Refers { path: String, refs: Vec<String> },
}

/// Check the outputs (name → what was built). `lookup` gives the NAR size and references of a
/// valid store path (the inputs).
pub fn check(drv: &Derivation, outputs: &BTreeMap<String, Built>, lookup: Lookup<'_>) -> Result<(), CheckError> {
    let checks = checks_of(drv)?;
    for (name, built) in outputs {
        let Some(c) = checks.get(name).or_else(|| checks.get("")) else { continue };
        if let Some(max) = c.max_size.filter(|&m| built.nar_size > m) {
            return Err(CheckError::TooLarge { path: built.path.clone(), size: built.nar_size, max });
        }
        let needs_closure =
            c.allowed_requisites.is_some() || c.disallowed_requisites.is_some() || c.max_closure_size.is_some();
        let closure = if needs_closure { closure(built, outputs, lookup)? } else { BTreeMap::new() };
        if let Some(max) = c.max_closure_size {
            let total: u64 = closure.values().sum();
            if total > max {
                return Err(CheckError::ClosureTooLarge { path: built.path.clone(), size: total, max });
            }
        }
        let mut requisites: BTreeSet<String> = closure.into_keys().collect();
        if c.ignore_self_refs {
            requisites.remove(&built.path);
        }
        for (spec, allowed, used) in [
            (&c.allowed_references, true, &built.references),
            (&c.allowed_requisites, true, &requisites),
            (&c.disallowed_references, false, &built.references),
            (&c.disallowed_requisites, false, &requisites),
        ] {
            let Some(spec) = spec else { continue };
            let spec = specifiers(drv, spec)?;
            let bad: Vec<String> = used.iter().filter(|p| spec.contains(*p) != allowed).cloned().collect();
            if !bad.is_empty() {
                return Err(CheckError::Refers { path: built.path.clone(), refs: bad });
            }
        }
    }
    Ok(())
}

/// The checks per output name ("" for every output).
fn checks_of(drv: &Derivation) -> Result<BTreeMap<String, Checks>, CheckError> {
    let mut all = BTreeMap::new();
    if let Some(json) = drv.env.get("__json") {
        let attrs: Value = serde_json::from_str(json).map_err(CheckError::Json)?;
        let Some(Value::Object(per_output)) = attrs.get("outputChecks") else { return Ok(all) };
        for (output, spec) in per_output {
            let bad = |key: &str, what| CheckError::Spec { output: output.clone(), key: key.to_owned(), what };
            let strings = |key: &str| -> Result<Option<Vec<String>>, CheckError> {
                match spec.get(key) {
                    None => Ok(None),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|i| i.as_str().map(str::to_owned).ok_or_else(|| bad(key, "list of strings")))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Some),
                    Some(_) => Err(bad(key, "list of strings")),
                }
            };
            let size = |key: &str| -> Result<Option<u64>, CheckError> {
                spec.get(key).map(|v| v.as_u64().ok_or_else(|| bad(key, "size"))).transpose()
            };
            all.insert(
                output.clone(),
                Checks {
                    allowed_references: strings("allowedReferences")?,
                    allowed_requisites: strings("allowedRequisites")?,
                    disallowed_references: strings("disallowedReferences")?,
                    disallowed_requisites: strings("disallowedRequisites")?,
                    max_size: size("maxSize")?,
                    max_closure_size: size("maxClosureSize")?,
                    ignore_self_refs: false,
                },
            );
        }
    } else {
        let var = |k: &str| drv.strings_attr(k);
        all.insert(
            String::new(),
            Checks {
                allowed_references: var("allowedReferences"),
                allowed_requisites: var("allowedRequisites"),
                disallowed_references: var("disallowedReferences"),
                disallowed_requisites: var("disallowedRequisites"),
                ignore_self_refs: true,
                ..Checks::default()
            },
        );
    }
    Ok(all)
}

/// Store paths, or output names standing for their paths.
fn specifiers(drv: &Derivation, spec: &[String]) -> Result<BTreeSet<String>, CheckError> {
    spec.iter()
        .map(|s| {
            if s.starts_with('/') && crate::formats::store_path::StoreDir::split_path(s).is_ok() {
                Ok(s.clone())
            } else if let Some(o) = drv.outputs.get(s) {
                Ok(o.path.clone())
            } else {
                Err(CheckError::Specifier(s.clone()))
            }
        })
        .collect()
}

/// The closure of an output with each path's NAR size: through this build's outputs, then the
/// store's records.
fn closure(start: &Built, outputs: &BTreeMap<String, Built>, lookup: Lookup<'_>) -> io::Result<BTreeMap<String, u64>> {
    let mut seen = BTreeMap::new();
    let mut queue = VecDeque::from([start.path.clone()]);
    while let Some(p) = queue.pop_front() {
        if seen.contains_key(&p) {
            continue;
        }
        let (size, refs): (u64, Vec<String>) = match outputs.values().find(|b| b.path == p) {
            Some(b) => (b.nar_size, b.references.iter().cloned().collect()),
            None => lookup(&p)?.ok_or_else(|| io::Error::other(format!("{p}: not valid, yet referred to")))?,
        };
        seen.insert(p, size);
        queue.extend(refs.into_iter().filter(|r| !seen.contains_key(r)));
    }
    Ok(seen)
}
