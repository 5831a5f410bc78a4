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

/// Check the outputs (name → what was built). `lookup` gives the NAR size and references of a
/// valid store path (the inputs). The inner error says which check failed.
pub fn check(
    drv: &Derivation,
    outputs: &BTreeMap<String, Built>,
    lookup: Lookup<'_>,
) -> io::Result<Result<(), String>> {
    let checks = match checks_of(drv) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    for (name, built) in outputs {
        let Some(c) = checks.get(name).or_else(|| checks.get("")) else { continue };
        if let Some(max) = c.max_size.filter(|&m| built.nar_size > m) {
            return Ok(Err(format!(
                "path '{}' is too large at {} bytes; limit is {max} bytes",
                built.path, built.nar_size
            )));
        }
        let needs_closure =
            c.allowed_requisites.is_some() || c.disallowed_requisites.is_some() || c.max_closure_size.is_some();
        let closure = if needs_closure { closure(built, outputs, lookup)? } else { BTreeMap::new() };
        if let Some(max) = c.max_closure_size {
            let total: u64 = closure.values().sum();
            if total > max {
                return Ok(Err(format!(
                    "closure of path '{}' is too large at {total} bytes; limit is {max} bytes",
                    built.path
                )));
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
            let spec = match specifiers(drv, spec) {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            let bad: Vec<&str> = used.iter().filter(|p| spec.contains(*p) != allowed).map(String::as_str).collect();
            if !bad.is_empty() {
                return Ok(Err(format!("output '{}' is not allowed to refer to: {}", built.path, bad.join(" "))));
            }
        }
    }
    Ok(Ok(()))
}

/// The checks per output name ("" for every output).
fn checks_of(drv: &Derivation) -> Result<BTreeMap<String, Checks>, String> {
    let mut all = BTreeMap::new();
    if let Some(json) = drv.env.get("__json") {
        let attrs: Value = serde_json::from_str(json).map_err(|e| format!("__json is not JSON: {e}"))?;
        let Some(Value::Object(per_output)) = attrs.get("outputChecks") else { return Ok(all) };
        for (output, spec) in per_output {
            let strings = |key: &str| -> Result<Option<Vec<String>>, String> {
                match spec.get(key) {
                    None => Ok(None),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|i| {
                            i.as_str()
                                .map(str::to_owned)
                                .ok_or_else(|| format!("outputChecks.{output}.{key}: not a list of strings"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map(Some),
                    Some(_) => Err(format!("outputChecks.{output}.{key}: not a list of strings")),
                }
            };
            let size = |key: &str| -> Result<Option<u64>, String> {
                spec.get(key)
                    .map(|v| v.as_u64().ok_or_else(|| format!("outputChecks.{output}.{key}: not a size")))
                    .transpose()
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
fn specifiers(drv: &Derivation, spec: &[String]) -> Result<BTreeSet<String>, String> {
    spec.iter()
        .map(|s| {
            if s.starts_with('/') && crate::formats::store_path::StoreDir::split_path(s).is_ok() {
                Ok(s.clone())
            } else if let Some(o) = drv.outputs.get(s) {
                Ok(o.path.clone())
            } else {
                Err(format!("derivation contains an illegal reference specifier '{s}'"))
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
