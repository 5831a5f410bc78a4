//! What `gbc submit` uploads: the inputs of its derivations that the coordinator's binary cache
//! lacks and this machine has. A source (a path added to the store from a file, `builtins.toFile`,
//! a Guix `plain-file`) is found at its store path and recognised by its contents: it is uploaded
//! when its contents and the references found in them give its path, exactly as the coordinator
//! will check. An output of an input derivation is uploaded when this machine's Nix store holds it
//! as valid (`nix-store --query`), with the references and NAR hash Nix recorded. Every reference
//! of an upload is uploaded too unless the cache has it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::build::hash_and_scan;
use crate::coordinator::submit::Checked;
use crate::formats::hash::{Hash, sha256};
use crate::formats::nar;
use crate::formats::store_path::StoreDir;

/// A path this machine can upload.
#[derive(Debug, Clone)]
pub(super) struct Local {
    pub path: String,
    pub references: Vec<String>,
    pub nar_size: u64,
}

/// Finds what this machine has, remembering the answers.
#[derive(Default)]
struct Prober {
    /// Store dir → its entries by hash part (read once, to scan sources for references).
    listings: HashMap<String, HashMap<[u8; 32], String>>,
    found: HashMap<String, Option<Local>>,
}

impl Prober {
    fn probe(&mut self, path: &str, is_output: bool) -> Option<Local> {
        if let Some(known) = self.found.get(path) {
            return known.clone();
        }
        let local = if is_output { valid_in_nix(path) } else { self.source(path) };
        self.found.insert(path.to_owned(), local.clone());
        local
    }

    /// A source at its store path whose contents and references give that path.
    fn source(&mut self, path: &str) -> Option<Local> {
        let (store_dir, sp) = StoreDir::split_path(path).ok()?;
        let md = fs::symlink_metadata(path).ok()?;
        let listing = self.listings.entry(store_dir.as_str().to_owned()).or_insert_with(|| list(&store_dir));
        let (nar_hash, nar_size, scanned) =
            hash_and_scan(Path::new(path), listing.values().map(String::as_str)).ok()?;
        let nar_hash: [u8; 32] = nar_hash.digest().try_into().ok()?;
        // A text path is one non-executable file, hashed flat.
        let executable = md.permissions().mode() & 0o100 != 0;
        let flat = (md.is_file() && !executable).then(|| fs::read(path).ok().map(|b| sha256(&b))).flatten();
        let scanned: Vec<String> = scanned.into_iter().collect();
        // A hash that merely occurs in the contents is not a reference: try without them too.
        [scanned, Vec::new()].into_iter().find_map(|references| {
            store_dir.content_address(&sp, &references, &nar_hash, flat.as_ref()).map(|_| Local {
                path: path.to_owned(),
                references,
                nar_size,
            })
        })
    }
}

/// The store paths under a store dir, by hash part.
fn list(store_dir: &StoreDir) -> HashMap<[u8; 32], String> {
    let Ok(entries) = fs::read_dir(store_dir.as_str()) else { return HashMap::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key: [u8; 32] = name.as_bytes().get(..32)?.try_into().ok()?;
            store_dir.parse_path(&format!("{}/{name}", store_dir.as_str())).ok()?;
            Some((key, format!("{}/{name}", store_dir.as_str())))
        })
        .collect()
}

/// A path Nix holds as valid here, with the references Nix recorded, when its contents still
/// have the NAR hash Nix recorded.
fn valid_in_nix(path: &str) -> Option<Local> {
    let query = |what: &str| -> Option<String> {
        let out = Command::new("nix-store")
            .args(["--query", what, path])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8(out.stdout).ok()).flatten()
    };
    let recorded = Hash::parse(query("--hash")?.trim()).ok()?;
    let references = query("--references")?.lines().map(str::to_owned).collect();
    let (hash, nar_size) = nar::nar_hash(Path::new(path)).ok()?;
    (hash == recorded).then(|| Local { path: path.to_owned(), references, nar_size })
}

/// Decide what to upload: of the `wanted` paths (those the cache lacks), the inputs of the
/// derivations that will be built given what this machine has, and their references the cache
/// lacks (`lacking` asks the coordinator); the coordinator publishes them together, so their order
/// does not matter. Paths whose references can be found nowhere are left out; the second value
/// names them.
pub(super) fn plan(
    checked: &Checked,
    wanted: &[String],
    mut lacking: impl FnMut(Vec<String>) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<(Vec<Local>, Vec<String>)> {
    let outputs: HashSet<&str> =
        checked.derivations.iter().flat_map(|d| d.outputs.values().map(String::as_str)).collect();
    let wanted: BTreeSet<&str> = wanted.iter().map(String::as_str).collect();
    let mut prober = Prober::default();
    let needed = checked.needed(|p| !wanted.contains(p) || prober.probe(p, outputs.contains(p)).is_some());
    let mut plan: BTreeMap<String, Local> = BTreeMap::new();
    for d in checked.derivations.iter().filter(|d| needed.contains(&d.path)) {
        for p in d.inputs.iter().filter(|p| wanted.contains(p.as_str())) {
            if let Some(local) = prober.probe(p, outputs.contains(p.as_str())) {
                plan.insert(p.clone(), local);
            }
        }
    }
    // Their references: ask about those not yet known, take the ones the cache lacks.
    let mut asked: HashSet<String> = wanted.iter().map(|p| (*p).to_owned()).collect();
    let mut unavailable: BTreeSet<String> = BTreeSet::new();
    loop {
        let unknown: BTreeSet<String> = plan
            .values()
            .flat_map(|l| l.references.iter())
            .filter(|r| !plan.contains_key(*r) && !asked.contains(*r))
            .cloned()
            .collect();
        let mut grew = false;
        let newly: Vec<String> = unknown.iter().cloned().collect();
        asked.extend(unknown);
        let missing: Vec<String> = if newly.is_empty() { Vec::new() } else { lacking(newly)? };
        // Wanted paths that turned out to be references are lacking too.
        let refs_wanted: Vec<String> = plan
            .values()
            .flat_map(|l| l.references.iter())
            .filter(|r| wanted.contains(r.as_str()) && !plan.contains_key(*r) && !unavailable.contains(*r))
            .cloned()
            .collect();
        for p in missing.into_iter().chain(refs_wanted) {
            match prober.probe(&p, outputs.contains(p.as_str())) {
                Some(local) => {
                    plan.insert(p, local);
                    grew = true;
                }
                None => {
                    unavailable.insert(p);
                }
            }
        }
        if !grew {
            break;
        }
    }
    // Leave out what refers, directly or not, to a path that is neither in the cache nor here.
    let mut left_out = Vec::new();
    loop {
        let bad: Vec<String> = plan
            .values()
            .filter(|l| l.references.iter().any(|r| unavailable.contains(r)))
            .map(|l| l.path.clone())
            .collect();
        if bad.is_empty() {
            break;
        }
        for b in bad {
            plan.remove(&b);
            unavailable.insert(b.clone());
            left_out.push(b);
        }
    }
    Ok((plan.into_values().collect(), left_out))
}
