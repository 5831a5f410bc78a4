//! Derivations: the data model, `hashDerivationModulo`, output paths, the `.drv` path, and the check
//! that a derivation's declared output paths are the ones its contents give.
//!
//! The check matters for a build farm: a derivation whose declared output path is not the one its
//! contents produce could otherwise overwrite another package's output in the binary cache.

mod aterm;
pub mod structured;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use thiserror::Error;

use super::hash::{Hash, HashAlgo, HashError, sha256};
use super::store_path::{StoreDir, StorePath, StorePathError};

/// A derivation as Nix writes it in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: BTreeMap<String, Output>,
    /// Input derivation paths and which of their outputs are used.
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
    pub input_srcs: BTreeSet<String>,
    pub system: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// One output as declared: its path, and for fixed outputs the hash method/algorithm and the hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub path: String,
    /// `""` (input-addressed), `"sha256"` (flat file hash) or `"r:sha256"` (NAR hash), any algorithm.
    pub hash_algo: String,
    /// Lower-case hex of the expected hash, for fixed outputs.
    pub hash: String,
}

/// How a derivation's output paths are determined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrvKind {
    /// Output paths come from the hash of the derivation (with its inputs hashed modulo).
    InputAddressed,
    /// One output, `out`, whose content hash is declared up front.
    FixedOutput { recursive: bool, hash: Hash },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DrvError {
    #[error("byte {offset}: {msg}")]
    Syntax { offset: usize, msg: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("output {output:?} should be {expected}, but the derivation declares {declared:?}")]
    OutputMismatch { output: String, expected: String, declared: String },
    #[error("environment variable {output:?} should be {expected}, but the derivation has {found:?}")]
    EnvMismatch { output: String, expected: String, found: Option<String> },
    #[error("input derivation {0} has not been hashed")]
    MissingInput(String),
}

/// The hash modulo of each output of a derivation (Nix's `DrvHash`): what the derivations that use
/// it put in place of its path before hashing themselves.
pub type OutputHashes = BTreeMap<String, [u8; 32]>;

impl Derivation {
    /// Parse the ATerm form. Only canonical input is accepted (see [`aterm`]).
    pub fn parse(bytes: &[u8]) -> Result<Derivation, DrvError> {
        let drv = aterm::parse(bytes)?;
        drv.check_shape()?;
        Ok(drv)
    }

    /// The ATerm form, exactly as Nix writes it.
    pub fn to_aterm(&self) -> Vec<u8> {
        aterm::print(self, false, None)
    }

    /// Everything that can be checked without knowing the store dir or other derivations.
    fn check_shape(&self) -> Result<(), DrvError> {
        if self.outputs.is_empty() {
            return Err(DrvError::Invalid("the derivation has no outputs".to_owned()));
        }
        for name in self.outputs.keys() {
            super::store_path::check_name(name)
                .map_err(|why| DrvError::Invalid(format!("output name {name:?} is not valid: {why}")))?;
        }
        self.kind().map(|_| ())
    }

    /// Classify the derivation, refusing the kinds gbc does not build yet.
    /// A list-of-strings attribute such as `requiredSystemFeatures`: from `__json` for a derivation
    /// with structured attributes (where lists stay lists), else its variable split on whitespace.
    pub fn strings_attr(&self, name: &str) -> Option<Vec<String>> {
        match self.env.get("__json") {
            Some(json) => {
                let attrs: serde_json::Value = serde_json::from_str(json).ok()?;
                let items = attrs.get(name)?.as_array()?;
                Some(items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect())
            }
            None => self.env.get(name).map(|v| v.split_whitespace().map(str::to_owned).collect()),
        }
    }

    pub fn kind(&self) -> Result<DrvKind, DrvError> {
        let fixed: Vec<(&String, &Output)> = self.outputs.iter().filter(|(_, o)| !o.hash_algo.is_empty()).collect();
        for (name, o) in &self.outputs {
            if o.hash_algo.is_empty() {
                if !o.hash.is_empty() {
                    return Err(DrvError::Invalid(format!("output {name:?} has a hash but no hash algorithm")));
                }
                if o.path.is_empty() {
                    return Err(DrvError::Unsupported(format!(
                        "output {name:?} has no path (a deferred output of a derivation depending on \
                         content-addressed ones), which is not supported"
                    )));
                }
            } else if o.hash == "impure" {
                return Err(DrvError::Unsupported(format!("output {name:?} is impure, which is not supported")));
            } else if o.hash.is_empty() {
                return Err(DrvError::Unsupported(format!(
                    "output {name:?} is content-addressed (floating), which is not supported"
                )));
            } else if o.hash_algo.starts_with("text:") {
                return Err(DrvError::Unsupported(format!(
                    "output {name:?} is text-hashed content-addressed, which is not supported"
                )));
            }
        }
        let Some((name, o)) = fixed.first() else {
            return Ok(DrvKind::InputAddressed);
        };
        if fixed.len() != 1 || self.outputs.len() != 1 || name.as_str() != "out" {
            return Err(DrvError::Invalid(
                "a fixed-output derivation must have exactly one output, named \"out\"".to_owned(),
            ));
        }
        let (recursive, algo) = match o.hash_algo.strip_prefix("r:") {
            Some(algo) => (true, algo),
            None => (false, o.hash_algo.as_str()),
        };
        let algo = HashAlgo::parse(algo)?;
        Ok(DrvKind::FixedOutput { recursive, hash: Hash::parse_digest(algo, &o.hash)? })
    }

    /// Infer the store dir from the declared output paths (all outputs must agree).
    pub fn store_dir(&self) -> Result<StoreDir, DrvError> {
        let mut dir: Option<StoreDir> = None;
        for o in self.outputs.values() {
            let (d, _) = StoreDir::split_path(&o.path)?;
            match &dir {
                Some(prev) if *prev != d => {
                    return Err(DrvError::Invalid(format!("outputs lie in two store dirs, {prev} and {d}")));
                }
                _ => dir = Some(d),
            }
        }
        dir.ok_or_else(|| DrvError::Invalid("the derivation has no outputs".to_owned()))
    }

    /// Infer the derivation's name from its outputs: `out` is named like the derivation, other
    /// outputs `<name>-<output>`.
    pub fn name_from_outputs(&self) -> Result<String, DrvError> {
        let (output, o) =
            self.outputs.iter().next().ok_or_else(|| DrvError::Invalid("the derivation has no outputs".to_owned()))?;
        let (_, path) = StoreDir::split_path(&o.path)?;
        let name = if output == "out" {
            Some(path.name())
        } else {
            path.name().strip_suffix(output.as_str()).and_then(|n| n.strip_suffix('-'))
        };
        name.map(str::to_owned).ok_or_else(|| {
            DrvError::Invalid(format!("output {output:?} has path {:?}, whose name does not end in -{output}", o.path))
        })
    }

    /// Nix's `hashDerivationModulo`. `inputs` gives the (unmasked) hashes of each input derivation.
    pub fn hash_modulo(
        &self,
        store_dir: &StoreDir,
        name: &str,
        mask_outputs: bool,
        inputs: &dyn Fn(&str) -> Option<OutputHashes>,
    ) -> Result<OutputHashes, DrvError> {
        if let DrvKind::FixedOutput { recursive, hash } = self.kind()? {
            let path = store_dir.make_fixed_output_path(recursive, &hash, name)?;
            let method = if recursive { "r:" } else { "" };
            let s = format!("fixed:out:{method}{}:{}:{}", hash.algo(), hash.to_hex(), store_dir.display(&path));
            return Ok(BTreeMap::from([("out".to_owned(), sha256(s.as_bytes()))]));
        }
        let mut replaced: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outs) in &self.input_drvs {
            let hashes = inputs(path).ok_or_else(|| DrvError::MissingInput(path.clone()))?;
            for o in outs {
                let h = hashes
                    .get(o)
                    .ok_or_else(|| DrvError::Invalid(format!("input derivation {path} has no output {o:?}")))?;
                replaced.entry(super::hash::hex::encode(h)).or_default().insert(o.clone());
            }
        }
        let h = sha256(&aterm::print(self, mask_outputs, Some(&replaced)));
        Ok(self.outputs.keys().map(|o| (o.clone(), h)).collect())
    }

    /// The output paths this derivation's contents give.
    pub fn compute_output_paths(
        &self,
        store_dir: &StoreDir,
        name: &str,
        inputs: &dyn Fn(&str) -> Option<OutputHashes>,
    ) -> Result<BTreeMap<String, StorePath>, DrvError> {
        match self.kind()? {
            DrvKind::FixedOutput { recursive, hash } => {
                Ok(BTreeMap::from([("out".to_owned(), store_dir.make_fixed_output_path(recursive, &hash, name)?)]))
            }
            DrvKind::InputAddressed => {
                let hashes = self.hash_modulo(store_dir, name, true, inputs)?;
                hashes.iter().map(|(o, h)| Ok((o.clone(), store_dir.make_output_path(o, h, name)?))).collect()
            }
        }
    }

    /// Check that every declared output path (and the environment variable named after it) is the
    /// one the derivation's contents give.
    pub fn validate_outputs(
        &self,
        store_dir: &StoreDir,
        name: &str,
        inputs: &dyn Fn(&str) -> Option<OutputHashes>,
    ) -> Result<BTreeMap<String, StorePath>, DrvError> {
        self.check_references(store_dir)?;
        let computed = self.compute_output_paths(store_dir, name, inputs)?;
        for (output, path) in &computed {
            let expected = store_dir.display(path);
            let declared = self.outputs.get(output).map(|o| o.path.as_str()).unwrap_or_default();
            if declared != expected {
                return Err(DrvError::OutputMismatch {
                    output: output.clone(),
                    expected,
                    declared: declared.to_owned(),
                });
            }
            let found = self.env.get(output);
            if found != Some(&expected) {
                return Err(DrvError::EnvMismatch { output: output.clone(), expected, found: found.cloned() });
            }
        }
        Ok(computed)
    }

    /// Every input path must be a store path in `store_dir`; input derivations must end in `.drv`.
    fn check_references(&self, store_dir: &StoreDir) -> Result<(), DrvError> {
        for p in &self.input_srcs {
            store_dir.parse_path(p)?;
        }
        for p in self.input_drvs.keys() {
            if !store_dir.parse_path(p)?.name().ends_with(".drv") {
                return Err(DrvError::Invalid(format!("input derivation {p:?} does not end in .drv")));
            }
        }
        Ok(())
    }

    /// The `.drv` store path of this derivation: a text path over its ATerm, referencing its inputs.
    pub fn drv_path(&self, store_dir: &StoreDir, name: &str) -> Result<StorePath, DrvError> {
        let refs = self.input_srcs.iter().chain(self.input_drvs.keys()).map(String::as_str);
        Ok(store_dir.make_text_path(&format!("{name}.drv"), &sha256(&self.to_aterm()), refs)?)
    }
}

/// Complete an input-addressed derivation as Nix's `derivation` builtin does: compute its output
/// paths (from its contents, inputs hashed modulo through `inputs`), write them into `outputs` and
/// the environment, and return the `.drv` path. `drv.outputs` names the outputs; their paths are
/// overwritten.
pub fn instantiate(
    drv: &mut Derivation,
    store_dir: &StoreDir,
    name: &str,
    inputs: &dyn Fn(&str) -> Option<OutputHashes>,
) -> Result<StorePath, DrvError> {
    if drv.outputs.is_empty() {
        return Err(DrvError::Invalid("a derivation needs at least one output".into()));
    }
    // Any non-empty path will do here: output paths and their variables are masked when hashing.
    for (o, out) in &mut drv.outputs {
        out.path = "pending".to_owned();
        drv.env.insert(o.clone(), String::new());
    }
    let paths = drv.compute_output_paths(store_dir, name, inputs)?;
    for (o, path) in paths {
        let shown = store_dir.display(&path);
        if let Some(out) = drv.outputs.get_mut(&o) {
            out.path.clone_from(&shown);
        }
        drv.env.insert(o, shown);
    }
    drv.drv_path(store_dir, name)
}

/// A derivation file's store dir, its name, and the store path its file name claims (when the file
/// is named like a store path, `<hash>-<name>.drv`; a copy called `foo.drv` takes its name from its
/// outputs instead).
pub fn identify(file_name: &str, drv: &Derivation) -> Result<(StoreDir, String, Option<StorePath>), DrvError> {
    let store_dir = drv.store_dir()?;
    match StorePath::from_base_name(file_name) {
        Ok(sp) => {
            let name = name_from_drv_path(&sp)?.to_owned();
            Ok((store_dir, name, Some(sp)))
        }
        Err(_) => Ok((store_dir, drv.name_from_outputs()?, None)),
    }
}

/// The name of a derivation stored at `path` (`<hash>-<name>.drv`).
pub fn name_from_drv_path(path: &StorePath) -> Result<&str, DrvError> {
    path.name()
        .strip_suffix(".drv")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DrvError::Invalid(format!("{path} does not name a derivation: it must end in .drv")))
}

/// Errors from walking a graph of derivations with [`DrvGraph`].
#[derive(Debug, Error)]
pub enum GraphError<E: std::error::Error + 'static> {
    #[error("{path}: {source}")]
    Load { path: String, source: E },
    #[error("{path}: {source}")]
    Invalid { path: String, source: DrvError },
    #[error("{path}: its contents give the path {computed}")]
    WrongDrvPath { path: String, computed: String },
    #[error("{0}: the derivation graph has a cycle")]
    Cycle(String),
}

/// Hashes modulo of derivations already seen, keyed by `.drv` path. Loading an input checks that its
/// contents give the path it was loaded as, so a graph that passes is exactly what its paths say.
#[derive(Debug, Default)]
pub struct DrvGraph {
    hashes: HashMap<String, OutputHashes>,
}

impl DrvGraph {
    pub fn new() -> DrvGraph {
        DrvGraph::default()
    }

    /// The hashes of a derivation already resolved.
    pub fn get(&self, drv_path: &str) -> Option<&OutputHashes> {
        self.hashes.get(drv_path)
    }

    /// Record the (unmasked) hashes of a derivation made or checked elsewhere.
    pub fn insert(&mut self, drv_path: &str, hashes: OutputHashes) {
        self.hashes.insert(drv_path.to_owned(), hashes);
    }

    /// Lookup function for [`Derivation::hash_modulo`] and friends.
    pub fn lookup(&self) -> impl Fn(&str) -> Option<OutputHashes> + '_ {
        move |p| self.hashes.get(p).cloned()
    }

    /// Make sure every input derivation of `drv` (recursively) is hashed, loading each `.drv` with
    /// `load`. Iterative, so deep chains cannot overflow the stack.
    pub fn resolve_inputs<E: std::error::Error + 'static>(
        &mut self,
        store_dir: &StoreDir,
        drv: &Derivation,
        load: &mut dyn FnMut(&str) -> Result<Vec<u8>, E>,
    ) -> Result<(), GraphError<E>> {
        for root in drv.input_drvs.keys() {
            self.resolve_from(store_dir, root, load)?;
        }
        Ok(())
    }

    /// Depth-first from one input derivation; the stack is always the path from `root` to the
    /// derivation at its top, so a derivation met again on it is a cycle (one met again elsewhere
    /// is a shared input, hashed already).
    fn resolve_from<E: std::error::Error + 'static>(
        &mut self,
        store_dir: &StoreDir,
        root: &str,
        load: &mut dyn FnMut(&str) -> Result<Vec<u8>, E>,
    ) -> Result<(), GraphError<E>> {
        if self.hashes.contains_key(root) {
            return Ok(());
        }
        let mut stack: Vec<(String, Option<(Derivation, String)>)> = vec![(root.to_owned(), None)];
        let mut on_stack: HashSet<String> = HashSet::from([root.to_owned()]);
        while let Some((path, loaded)) = stack.last_mut() {
            if self.hashes.contains_key(path.as_str()) {
                on_stack.remove(path.as_str());
                stack.pop();
                continue;
            }
            if loaded.is_none() {
                *loaded = Some(load_checked(store_dir, path, load)?);
            }
            let Some((input, name)) = loaded.as_ref() else {
                continue;
            };
            let next = input.input_drvs.keys().find(|p| !self.hashes.contains_key(*p)).cloned();
            if let Some(next) = next {
                if !on_stack.insert(next.clone()) {
                    return Err(GraphError::Cycle(next));
                }
                stack.push((next, None));
                continue;
            }
            let hashes = {
                let lookup = self.lookup();
                input
                    .validate_outputs(store_dir, name, &lookup)
                    .and_then(|_| input.hash_modulo(store_dir, name, false, &lookup))
                    .map_err(|source| GraphError::Invalid { path: path.clone(), source })?
            };
            self.hashes.insert(path.clone(), hashes);
        }
        Ok(())
    }
}

/// Load one input derivation and check its contents against its path and its declared outputs.
fn load_checked<E: std::error::Error + 'static>(
    store_dir: &StoreDir,
    path: &str,
    load: &mut dyn FnMut(&str) -> Result<Vec<u8>, E>,
) -> Result<(Derivation, String), GraphError<E>> {
    let invalid = |source| GraphError::Invalid { path: path.to_owned(), source };
    let sp = store_dir.parse_path(path).map_err(|e| invalid(e.into()))?;
    let name = name_from_drv_path(&sp).map_err(invalid)?.to_owned();
    let bytes = load(path).map_err(|source| GraphError::Load { path: path.to_owned(), source })?;
    let drv = Derivation::parse(&bytes).map_err(invalid)?;
    let computed = drv.drv_path(store_dir, &name).map_err(invalid)?;
    if computed != sp {
        return Err(GraphError::WrongDrvPath { path: path.to_owned(), computed: store_dir.display(&computed) });
    }
    Ok((drv, name))
}

#[cfg(test)]
mod tests;
