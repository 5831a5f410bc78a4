//! Checking a submission before anything is stored: every derivation, submitted or input, must
//! parse, give its own path, and declare the outputs its contents give. Pure and synchronous (the
//! server runs it on a blocking thread); errors name the file the client read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::api::DrvFile;
use crate::db::NewDerivation;
use crate::formats::derivation::{self, Derivation, DrvGraph, GraphError};
use crate::formats::store_path::StoreDir;

#[derive(Debug, thiserror::Error)]
#[error("input derivation {0} was not sent")]
struct NotSent(String);

/// Why a submission was refused: what is wrong, naming the file the client read or the input
/// derivation.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("nothing to submit: no derivations")]
    Empty,
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("input derivation {path}: {reason}")]
    Input { path: String, reason: String },
    #[error("input derivation {0} was not sent")]
    NotSent(String),
    #[error("{path}: input derivation {input} {reason}")]
    Edge { path: String, input: String, reason: String },
}

fn input_error(path: &str) -> impl Fn(&dyn std::fmt::Display) -> CheckError + '_ {
    move |e| CheckError::Input { path: path.to_owned(), reason: e.to_string() }
}

/// Derivations in dependency order (inputs first) and the paths of the submitted ones.
#[derive(Debug)]
pub struct Checked {
    pub derivations: Vec<NewDerivation>,
    pub requested: Vec<String>,
    /// For each derivation: its input derivations and the output paths it takes of each.
    pub uses: HashMap<String, Vec<(String, Vec<String>)>>,
}

impl Checked {
    /// The derivations that must be built, given which paths are `available` (in the cache, or
    /// about to be): the submitted ones, and, walking down from them, each input derivation some
    /// needed derivation takes an output of that is not available. An input whose outputs are all
    /// there is not built, and neither is what only it needed.
    pub fn needed(&self, mut available: impl FnMut(&str) -> bool) -> BTreeSet<String> {
        self.needed_in_rounds(|paths| paths.into_iter().filter(|p| available(p)).collect())
    }

    /// [`Checked::needed`], asking about availability a level of the graph at a time (`available`
    /// gets the paths of one level and returns those available), so that slow answers (upstream
    /// caches) are asked for together and only where they matter: below an available input,
    /// nothing is asked.
    pub fn needed_in_rounds(&self, mut available: impl FnMut(Vec<String>) -> BTreeSet<String>) -> BTreeSet<String> {
        let mut needed: BTreeSet<String> = self.requested.iter().cloned().collect();
        let mut frontier: Vec<&str> = self.requested.iter().map(String::as_str).collect();
        let mut known: HashMap<&str, bool> = HashMap::new();
        while !frontier.is_empty() {
            let uses = || frontier.iter().flat_map(|d| self.uses.get(*d).into_iter().flatten());
            let ask: BTreeSet<&str> = uses()
                .flat_map(|(_, outs)| outs.iter().map(String::as_str))
                .filter(|o| !known.contains_key(o))
                .collect();
            let have = available(ask.iter().map(|s| (*s).to_owned()).collect());
            for o in ask {
                known.insert(o, have.contains(o));
            }
            let mut next = Vec::new();
            for (input, outputs) in uses() {
                if !outputs.iter().all(|o| known.get(o.as_str()) == Some(&true)) && needed.insert(input.clone()) {
                    next.push(input.as_str());
                }
            }
            frontier = next;
        }
        needed
    }
}

/// Check a submission. `inputs` maps each input derivation's path to its ATerm.
pub fn check(files: &[DrvFile], inputs: &BTreeMap<String, String>) -> Result<Checked, CheckError> {
    if files.is_empty() {
        return Err(CheckError::Empty);
    }
    let mut graph = DrvGraph::new();
    let mut parsed: HashMap<String, (Derivation, StoreDir, String)> = HashMap::new();
    let mut requested = Vec::with_capacity(files.len());
    for f in files {
        let err = |e: &dyn std::fmt::Display| CheckError::File { file: f.file.clone(), reason: e.to_string() };
        let drv = Derivation::parse(f.aterm.as_bytes()).map_err(|e| err(&e))?;
        let base = f.file.rsplit('/').next().unwrap_or_default();
        let (store_dir, name, claimed) = derivation::identify(base, &drv).map_err(|e| err(&e))?;
        let drv_path = drv.drv_path(&store_dir, &name).map_err(|e| err(&e))?;
        let path = store_dir.display(&drv_path);
        if let Some(claimed) = claimed
            && claimed != drv_path
        {
            return Err(err(&format!("its contents give the path {path}, not its own name")));
        }
        let mut load = |p: &str| inputs.get(p).map(|a| a.as_bytes().to_vec()).ok_or_else(|| NotSent(p.to_owned()));
        graph.resolve_inputs(&store_dir, &drv, &mut load).map_err(|e| match e {
            GraphError::Load { source, .. } => err(&source),
            e => err(&format!("input derivation {e}")),
        })?;
        drv.validate_outputs(&store_dir, &name, &graph.lookup()).map_err(|e| err(&e))?;
        requested.push(path.clone());
        parsed.insert(path, (drv, store_dir, name));
    }
    // Input derivations: their ATerm gave their path (resolve_inputs checked); their outputs must
    // be right too, since they will be built.
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for path in &requested {
        topo(path, &mut parsed, inputs, &mut seen, &mut order)?;
    }
    let mut derivations = Vec::with_capacity(order.len());
    for path in order {
        let Some((drv, store_dir, name)) = parsed.remove(&path) else { continue };
        let outputs = drv.validate_outputs(&store_dir, &name, &graph.lookup()).map_err(|e| input_error(&path)(&e))?;
        let outputs: BTreeMap<String, String> =
            outputs.iter().map(|(o, p)| (o.clone(), store_dir.display(p))).collect();
        derivations.push((path, drv, outputs));
    }
    // The paths each build uses directly: its sources and the outputs it takes of each input.
    let out_paths: HashMap<&str, &BTreeMap<String, String>> =
        derivations.iter().map(|(p, _, o)| (p.as_str(), o)).collect();
    let mut result = Vec::with_capacity(derivations.len());
    let mut uses = HashMap::with_capacity(derivations.len());
    for (path, drv, outputs) in &derivations {
        let mut used: BTreeSet<String> = drv.input_srcs.iter().cloned().collect();
        let mut edges = Vec::with_capacity(drv.input_drvs.len());
        for (input, outs) in &drv.input_drvs {
            let Some(paths) = out_paths.get(input.as_str()) else {
                let reason = "was not sent".to_owned();
                return Err(CheckError::Edge { path: path.clone(), input: input.clone(), reason });
            };
            let mut taken = Vec::with_capacity(outs.len());
            for o in outs {
                let p = paths.get(o).ok_or_else(|| CheckError::Edge {
                    path: path.clone(),
                    input: input.clone(),
                    reason: format!("has no output {o:?}"),
                })?;
                used.insert(p.clone());
                taken.push(p.clone());
            }
            edges.push((input.clone(), taken));
        }
        uses.insert(path.clone(), edges);
        let features = drv.strings_attr("requiredSystemFeatures").map(|f| f.into_iter().collect());
        result.push(NewDerivation {
            path: path.clone(),
            system: drv.system.clone(),
            features: features.unwrap_or_default(),
            aterm: String::from_utf8_lossy(&drv.to_aterm()).into_owned(),
            outputs: outputs.clone(),
            input_drvs: drv.input_drvs.keys().cloned().collect(),
            inputs: used.into_iter().collect(),
        });
    }
    Ok(Checked { derivations: result, requested, uses })
}

/// Post-order walk (inputs first), parsing input derivations as they are reached. Iterative.
fn topo(
    root: &str,
    parsed: &mut HashMap<String, (Derivation, StoreDir, String)>,
    inputs: &BTreeMap<String, String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) -> Result<(), CheckError> {
    if !seen.insert(root.to_owned()) {
        return Ok(());
    }
    let mut stack: Vec<(String, Vec<String>)> = vec![(root.to_owned(), children(root, parsed, inputs)?)];
    while let Some((_, kids)) = stack.last_mut() {
        match kids.pop() {
            Some(k) => {
                if seen.insert(k.clone()) {
                    let grandkids = children(&k, parsed, inputs)?;
                    stack.push((k, grandkids));
                }
            }
            None => {
                if let Some((p, _)) = stack.pop() {
                    order.push(p);
                }
            }
        }
    }
    Ok(())
}

fn children(
    path: &str,
    parsed: &mut HashMap<String, (Derivation, StoreDir, String)>,
    inputs: &BTreeMap<String, String>,
) -> Result<Vec<String>, CheckError> {
    if !parsed.contains_key(path) {
        let aterm = inputs.get(path).ok_or_else(|| CheckError::NotSent(path.to_owned()))?;
        let bad = input_error(path);
        let drv = Derivation::parse(aterm.as_bytes()).map_err(|e| bad(&e))?;
        let store_dir = drv.store_dir().map_err(|e| bad(&e))?;
        let base = path.rsplit('/').next().unwrap_or_default();
        let (_, name, _) = derivation::identify(base, &drv).map_err(|e| bad(&e))?;
        parsed.insert(path.to_owned(), (drv, store_dir, name));
    }
    Ok(parsed.get(path).map(|(d, _, _)| d.input_drvs.keys().rev().cloned().collect()).unwrap_or_default())
}
