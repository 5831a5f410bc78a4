//! Native realisation: building one derivation as Nix's and Guix's daemons do, in a sandbox over a
//! [`LocalStore`], and registering its outputs.
//!
//! Steps: check the inputs are valid and take their closure; prepare the environment (Nix's
//! variables, `passAsFile`, output placeholders, `__structuredAttrs` files) and a fresh build
//! directory; run the builder in the sandbox
//! ([`sandbox`]) with log, silence and total timeouts; check every declared output exists;
//! canonicalise it ([`canon`]); check fixed-output hashes; hash its NAR while scanning for references
//! ([`refs`]); apply the derivation's reference checks ([`checks`]); move it into the store and
//! record it valid.

pub(crate) mod builtins;
pub mod canon;
mod checks;
pub mod refs;
pub mod sandbox;
mod seccomp;
mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read as _, Write};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::formats::derivation::structured::{AttrsError, Export, ExportedPath, Rewrites, structured_attrs};
use crate::formats::derivation::{Derivation, DrvKind};
use crate::formats::hash::{AnyHashSink, Hash, HashAlgo, PipelinedHashSink, sha256};
use crate::formats::nar;
use crate::formats::nix32;
use crate::formats::store_path::{StoreDir, StorePath};
use crate::store::{LocalStore, PathInfo, remove_tree};

/// How builds run on this host.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub cores: u32,
    /// Kill the build after this long without log output.
    pub max_silent: Option<Duration>,
    /// Kill the build after this long in total.
    pub timeout: Option<Duration>,
    /// Host paths builds see (none by default).
    pub sandbox_paths: Vec<sandbox::SandboxPath>,
    /// Set to stop the build.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for BuildSettings {
    fn default() -> BuildSettings {
        BuildSettings {
            cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            max_silent: None,
            timeout: None,
            sandbox_paths: Vec::new(),
            cancel: None,
        }
    }
}

/// One derivation to build, already validated by the caller.
pub struct BuildRequest<'a> {
    pub drv_path: &'a str,
    pub drv: &'a Derivation,
    pub store_dir: &'a StoreDir,
    /// The derivation's name (its `.drv` base name without hash and extension).
    pub name: &'a str,
    /// Output name → path, as validated from the derivation's contents.
    pub outputs: &'a BTreeMap<String, StorePath>,
    /// Full paths the build uses directly: input sources and the used outputs of input derivations.
    pub inputs: BTreeSet<String>,
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every output is valid; `built` is false when they already were and nothing ran.
    Success {
        outputs: BTreeMap<String, PathInfo>,
        built: bool,
    },
    /// The builder failed, or its outputs were unacceptable (missing, wrong fixed-output hash).
    Failed {
        exit_code: Option<i32>,
        reason: String,
    },
    TimedOut(Duration),
    SilentTooLong(Duration),
    Canceled,
    /// The build could not be started (sandbox, file system, partially valid outputs...).
    SetupFailure(String),
    /// The build failed for a reason outside the derivation, which another try may not meet: the
    /// builder was killed by a signal, or the store's disk was full (Nix's `TransientFailure`).
    TransientFailure(String),
    MissingInputs(Vec<String>),
}

/// The host uids builds run as when the agent is root: Nix's `auto-allocate-uids` range, which
/// no account uses; one per build running at once.
const BUILD_UID_BASE: u32 = 872_415_232;
const BUILD_UIDS: u32 = 1 << 16;

/// A build user in use, given back when dropped.
struct BuildUserSlot(u32);

static BUILD_UIDS_IN_USE: std::sync::Mutex<BTreeSet<u32>> = std::sync::Mutex::new(BTreeSet::new());

impl BuildUserSlot {
    /// A free build user when this process is root; None otherwise (the sandbox then maps the
    /// agent's own user, the only one an unprivileged user namespace can).
    fn take() -> io::Result<Option<BuildUserSlot>> {
        if !rustix::process::geteuid().is_root() || !build_uids_exist() {
            return Ok(None);
        }
        let mut in_use = BUILD_UIDS_IN_USE.lock().map_err(|_| io::Error::other("build users lock poisoned"))?;
        let free =
            (0..BUILD_UIDS).find(|n| !in_use.contains(n)).ok_or_else(|| io::Error::other("no free build user"))?;
        in_use.insert(free);
        Ok(Some(BuildUserSlot(free)))
    }

    fn user(&self) -> sandbox::BuildUser {
        sandbox::BuildUser { uid: BUILD_UID_BASE + self.0, gid: BUILD_UID_BASE + self.0 }
    }
}

/// Whether the build uids exist in this process's user namespace: true for root on the host,
/// false for "root" in a user namespace that maps only a few ids.
fn build_uids_exist() -> bool {
    static EXIST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EXIST.get_or_init(|| {
        let map = fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
        map.lines().any(|line| {
            let f: Vec<u64> = line.split_whitespace().filter_map(|n| n.parse().ok()).collect();
            matches!(f[..], [inside, _, len] if inside <= u64::from(BUILD_UID_BASE)
                && inside + len >= u64::from(BUILD_UID_BASE) + u64::from(BUILD_UIDS))
        })
    })
}

impl Drop for BuildUserSlot {
    fn drop(&mut self) {
        if let Ok(mut in_use) = BUILD_UIDS_IN_USE.lock() {
            in_use.remove(&self.0);
        }
    }
}

/// Free bytes below which a failed build is put down to a full disk (Nix's threshold).
const LOW_DISK: u64 = 8 << 20;

/// The free bytes on the file system of `dir`, when below [`LOW_DISK`].
fn low_disk(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    (free < LOW_DISK).then_some(free)
}

/// Build `req` in `store`, passing log output to `log` as it comes.
pub fn build(
    store: &LocalStore,
    req: &BuildRequest<'_>,
    settings: &BuildSettings,
    log: &mut dyn FnMut(&[u8]),
) -> Outcome {
    match try_build(store, req, settings, log) {
        Ok(outcome) => outcome,
        Err(e) if e.kind() == io::ErrorKind::StorageFull => {
            Outcome::TransientFailure(format!("the build host's disk is full: {e}"))
        }
        Err(e) => Outcome::SetupFailure(e.to_string()),
    }
}

fn try_build(
    store: &LocalStore,
    req: &BuildRequest<'_>,
    settings: &BuildSettings,
    log: &mut dyn FnMut(&[u8]),
) -> io::Result<Outcome> {
    let sd = req.store_dir;
    let out_paths: BTreeMap<&str, String> = req.outputs.iter().map(|(o, p)| (o.as_str(), sd.display(p))).collect();

    // Already built?
    let mut valid = BTreeMap::new();
    for (o, p) in &out_paths {
        if let Some(info) = store.query(sd, p)? {
            valid.insert(o.to_string(), info);
        }
    }
    if valid.len() == out_paths.len() {
        return Ok(Outcome::Success { outputs: valid, built: false });
    }
    if let Some(o) = valid.keys().next() {
        return Ok(Outcome::SetupFailure(format!(
            "output {o:?} ({}) is already valid but others are not; refusing to rebuild part of a derivation",
            out_paths[o.as_str()]
        )));
    }

    let (closure, missing) = store.closure(sd, req.inputs.iter().map(String::as_str))?;
    if !missing.is_empty() {
        return Ok(Outcome::MissingInputs(missing.into_iter().collect()));
    }

    let work = store.temp_dir("build")?;
    let result = run_and_collect(store, req, settings, log, &work, &closure, &out_paths);
    let cleanup = remove_tree(&work);
    let outcome = result?;
    cleanup?;
    Ok(outcome)
}

fn run_and_collect(
    store: &LocalStore,
    req: &BuildRequest<'_>,
    settings: &BuildSettings,
    log: &mut dyn FnMut(&[u8]),
    work: &Path,
    closure: &BTreeSet<String>,
    out_paths: &BTreeMap<&str, String>,
) -> io::Result<Outcome> {
    let sd = req.store_dir;
    let top = work.join("top");
    let chroot = work.join("root");
    let error_file = work.join("setup-error");
    let tmp = work.join("tmp");
    fs::create_dir(&top)?;
    fs::create_dir(&chroot)?;
    fs::create_dir(&tmp)?;
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;

    let rewrites = Rewrites::for_outputs(out_paths.iter().map(|(o, p)| (*o, p.as_str())));
    let mut export = |roots: &[String]| exported(store, sd, closure, roots);
    // What the derivation asks for that cannot be done fails the build, as in Nix: no other try
    // or host would do better.
    let unbuildable = |e: NotStarted| Ok(Outcome::Failed { exit_code: None, reason: e.into_reason()? });
    let daemon = sandbox::Daemon::of_store_dir(sd.as_str());
    let build_dir_inside = daemon.build_dir(req.name);
    let env = match environment(req, settings, (daemon, &build_dir_inside), &top, out_paths, &rewrites, &mut export) {
        Ok(env) => env,
        Err(e) => return unbuildable(e),
    };
    if let Err(e) = export_references_graph(store, req, closure, &top) {
        return unbuildable(e.into());
    }
    let inputs = closure.iter().map(|p| sd.parse_path(p).map(|sp| sp.to_string())).collect::<Result<Vec<_>, _>>();
    let inputs = inputs.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // As root, the builder runs as a host user of its own, which owns the build directory.
    let build_user = BuildUserSlot::take()?;
    if let Some(u) = build_user.as_ref().map(BuildUserSlot::user) {
        std::os::unix::fs::chown(&top, Some(u.uid), Some(u.gid))?;
    }
    let builtin = match builtins::kind_of(&req.drv.builder) {
        None => None,
        Some(kind) => {
            let (o, out) = out_paths.iter().next().ok_or_else(|| io::Error::other("a derivation without outputs"))?;
            let name = req.outputs[*o].name().to_owned();
            match kind.and_then(|k| builtins::Job::new(k, req.drv, out, &name)) {
                Ok(job) => Some(job),
                Err(reason) => return Ok(Outcome::Failed { exit_code: None, reason }),
            }
        }
    };
    let mut paths = settings.sandbox_paths.clone();
    if builtin.as_ref().is_some_and(|b| b.kind == builtins::Kind::GuixGitDownload) {
        // guix-daemon runs it outside its chroot, with the host's git: the host's tools it is.
        let host = builtins::git::HOST_PATHS.iter().map(|p| sandbox::SandboxPath::parse(p));
        paths.extend(host.collect::<Result<Vec<_>, _>>().map_err(io::Error::other)?);
    }
    let spec = sandbox::SandboxSpec {
        builtin,
        build_user: build_user.as_ref().map(BuildUserSlot::user),
        chroot: chroot.clone(),
        build_dir: top,
        daemon,
        build_dir_inside,
        store_dir: sd.as_str().to_owned(),
        store_root: store.root().to_owned(),
        inputs,
        paths,
        tmp_dir: tmp,
        network: matches!(req.drv.kind(), Ok(DrvKind::FixedOutput { .. })),
        builder: rewrites.apply(&req.drv.builder),
        args: req.drv.args.iter().map(|a| rewrites.apply(a)).collect(),
        env: env.into_iter().collect(),
        error_file: error_file.clone(),
    };

    let map = |pid: u32| spec.build_user.map_or(Ok(()), |u| sandbox::map_build_user(pid, u, daemon));
    // The build user stays taken until this function returns, after the outputs are the agent's.
    let ended = match run_logged(sandbox::command(&spec)?, settings, log, &map) {
        Ok(ended) => ended,
        // A sandbox that ended before the agent could map its build user said why in the file.
        Err(e) => match fs::read_to_string(&error_file) {
            Ok(report) if !report.is_empty() => return Ok(Outcome::SetupFailure(report)),
            _ => return Err(e),
        },
    };
    let status = match ended {
        Ended::Exited(status) => status,
        Ended::TimedOut(d) => return Ok(Outcome::TimedOut(d)),
        Ended::Silent(d) => return Ok(Outcome::SilentTooLong(d)),
        Ended::Canceled => return Ok(Outcome::Canceled),
    };
    let report = fs::read_to_string(&error_file).unwrap_or_default();
    let code = status.code();
    if !report.is_empty() {
        return Ok(match code.and_then(|c| u8::try_from(c).ok()) {
            Some(sandbox::NO_BUILDER) => Outcome::Failed { exit_code: None, reason: report },
            Some(sandbox::KILLED) => Outcome::TransientFailure(report),
            Some(sandbox::BUILTIN_FAILED) => Outcome::Failed { exit_code: Some(1), reason: report },
            _ => Outcome::SetupFailure(report),
        });
    }
    if !status.success() {
        let reason = match code {
            Some(c) => format!("builder exited with status {c}"),
            None => format!("the sandbox was killed by a signal ({status})"),
        };
        // As Nix does: a failure with the store's disk (nearly) full is put down to that.
        if let Some(free) = low_disk(store.root()) {
            let note = format!(
                "the build host's store has only {free} bytes free: the failure may have been caused by lack of free disk space"
            );
            log(format!("\ngbc: {note}\n").as_bytes());
            return Ok(Outcome::TransientFailure(format!("{reason}; {note}")));
        }
        return Ok(match code {
            Some(_) => Outcome::Failed { exit_code: code, reason },
            None => Outcome::TransientFailure(reason),
        });
    }

    // Every output must exist; canonicalise it and check fixed-output hashes.
    let built_root = chroot.join(sd.as_str().trim_start_matches('/'));
    let mut found = BTreeMap::new();
    for (o, p) in out_paths {
        let sp = &req.outputs[*o];
        let at = built_root.join(sp.as_str());
        if fs::symlink_metadata(&at).is_err() {
            return Ok(Outcome::Failed {
                exit_code: Some(0),
                reason: format!("builder did not create output {o:?} ({p})"),
            });
        }
        if let Err(e) = canon::canonicalise(&at) {
            if e.kind() != io::ErrorKind::InvalidData {
                return Err(e);
            }
            // What the builder left is not storable: its fault, named by the logical path.
            let reason = e.to_string().replace(&built_root.display().to_string(), sd.as_str());
            return Ok(Outcome::Failed { exit_code: Some(0), reason });
        }
        found.insert(o.to_string(), at);
    }

    // Hash and scan references, checking fixed-output hashes in the same pass; check the
    // references (allowedReferences...); move into the store, register.
    let candidates: Vec<&str> =
        closure.iter().map(String::as_str).chain(out_paths.values().map(String::as_str)).collect();
    let fixed = match req.drv.kind() {
        Ok(DrvKind::FixedOutput { recursive, hash }) => Some((recursive, hash)),
        _ => None,
    };
    let mut scanned = BTreeMap::new();
    let mut built = BTreeMap::new();
    for (o, at) in found {
        let want = fixed.as_ref().map(|(recursive, hash)| (*recursive, hash.algo()));
        let (nar_hash, nar_size, references, actual) = hash_and_scan_fixed(&at, candidates.iter().copied(), want)?;
        if let (Some((_, hash)), Some(actual)) = (&fixed, actual)
            && actual != *hash
        {
            return Ok(Outcome::Failed {
                exit_code: Some(0),
                reason: format!(
                    "fixed-output hash mismatch in {}: wanted {}, got {}",
                    out_paths[o.as_str()],
                    hash.to_nix32_string(),
                    actual.to_nix32_string()
                ),
            });
        }
        let path = sd.display(&req.outputs[&o]);
        built.insert(o.clone(), checks::Built { path, nar_size, references });
        scanned.insert(o, (at, nar_hash));
    }
    let lookup = |p: &str| Ok(store.query(sd, p)?.map(|i| (i.nar_size, i.references)));
    match checks::check(req.drv, &built, &lookup) {
        Ok(()) => {}
        Err(checks::CheckError::Io(e)) => return Err(e),
        Err(refused) => return Ok(Outcome::Failed { exit_code: Some(0), reason: refused.to_string() }),
    }
    let mut outputs = BTreeMap::new();
    for (o, (at, nar_hash)) in scanned {
        let Some(b) = built.remove(&o) else { continue };
        let sp = &req.outputs[&o];
        store.clear_stale(sd, &b.path)?;
        fs::rename(&at, store.physical(sp))?;
        let info = PathInfo {
            path: b.path,
            nar_hash: nar_hash.to_nix32_string(),
            nar_size: b.nar_size,
            references: b.references.into_iter().collect(),
            deriver: Some(req.drv_path.to_owned()),
        };
        store.register(sd, &info)?;
        outputs.insert(o, info);
    }
    Ok(Outcome::Success { outputs, built: true })
}

/// Why `exportReferencesGraph` can't be given to a builder: the host's I/O, or what the derivation
/// asks (Nix's words).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    OddTokens(String),
    #[error("invalid file name '{0}' in 'exportReferencesGraph'")]
    BadName(String),
    #[error("'exportReferencesGraph' contains a non-store path '{0}'")]
    NotStorePath(String),
    #[error("cannot export references of path '{0}' because it is not in the input closure of the derivation")]
    NotAnInput(String),
    #[error("'exportReferencesGraph' of a closure with a derivation ({0}) is not supported")]
    Derivation(String),
}

/// Why a build did not start: the host's I/O failed (a setup failure), or the derivation asks for
/// what can't be done (it fails, as in Nix: no other try or host would do better).
#[derive(Debug, thiserror::Error)]
enum NotStarted {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Attrs(#[from] AttrsError<ExportError>),
    #[error(transparent)]
    Export(#[from] ExportError),
}

impl NotStarted {
    /// The host's I/O error, if that is what it is; else the reason the derivation can't build.
    fn into_reason(self) -> io::Result<String> {
        match self {
            NotStarted::Io(e) | NotStarted::Export(ExportError::Io(e)) => Err(e),
            NotStarted::Attrs(AttrsError::Export(ExportError::Io(e))) => Err(e),
            other => Ok(other.to_string()),
        }
    }
}

/// The builder's environment, as Nix's `initEnv` makes it (or guix-daemon's `startBuilder`, which
/// differs only in lacking `NIX_LOG_FD`, `TERM` and `NIX_OUTPUT_CHECKED`), with output placeholders
/// replaced; for a `__structuredAttrs` derivation, `.attrs.json` and `.attrs.sh` in the build
/// directory instead of its variables. The inner error is a derivation gbc cannot build.
fn environment(
    req: &BuildRequest<'_>,
    settings: &BuildSettings,
    (daemon, b): (sandbox::Daemon, &str),
    top: &Path,
    out_paths: &BTreeMap<&str, String>,
    rewrites: &Rewrites,
    export: Export<'_, ExportError>,
) -> Result<BTreeMap<String, String>, NotStarted> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), "/path-not-set".to_owned());
    env.insert("HOME".to_owned(), "/homeless-shelter".to_owned());
    env.insert("NIX_STORE".to_owned(), req.store_dir.as_str().to_owned());
    env.insert("NIX_BUILD_CORES".to_owned(), settings.cores.to_string());
    let outputs: BTreeMap<String, String> = out_paths.iter().map(|(o, p)| ((*o).to_owned(), p.clone())).collect();
    match structured_attrs(req.drv, &outputs, rewrites, export) {
        Some(Ok((json, sh))) => {
            for (file, contents, var) in
                [(".attrs.json", json, "NIX_ATTRS_JSON_FILE"), (".attrs.sh", sh, "NIX_ATTRS_SH_FILE")]
            {
                fs::write(top.join(file), contents)?;
                env.insert(var.to_owned(), format!("{b}/{file}"));
            }
        }
        Some(Err(e)) => return Err(e.into()),
        None => {
            let pass_as_file: BTreeSet<&str> =
                req.drv.env.get("passAsFile").map(|v| v.split_whitespace().collect()).unwrap_or_default();
            for (k, v) in &req.drv.env {
                if pass_as_file.contains(k.as_str()) {
                    let file = format!(".attr-{}", nix32::encode(&sha256(k.as_bytes())));
                    fs::write(top.join(&file), rewrites.apply(v))?;
                    env.insert(format!("{k}Path"), format!("{b}/{file}"));
                } else {
                    env.insert(k.clone(), rewrites.apply(v));
                }
            }
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.to_owned(), b.to_owned());
    }
    // A fixed output is checked by its hash, so its builder may see what `impureEnvVars` names
    // of this process's environment (proxy settings, say), as with Nix.
    if matches!(req.drv.kind(), Ok(DrvKind::FixedOutput { .. })) {
        if daemon == sandbox::Daemon::Nix {
            env.insert("NIX_OUTPUT_CHECKED".to_owned(), "1".to_owned());
        }
        for var in req.drv.strings_attr("impureEnvVars").unwrap_or_default() {
            env.insert(var.clone(), std::env::var(&var).unwrap_or_default());
        }
    }
    if daemon == sandbox::Daemon::Nix {
        env.insert("NIX_LOG_FD".to_owned(), "2".to_owned());
        env.insert("TERM".to_owned(), "xterm-256color".to_owned());
    }
    Ok(env)
}

/// Nix's `exportReferencesGraph` (without structured attributes): pairs `NAME PATH`, each giving a
/// file NAME in the build directory with the closure of PATH (which must be in the input closure)
/// in `nix-store --register-validity` form, derivers left empty.
fn export_references_graph(
    store: &LocalStore,
    req: &BuildRequest<'_>,
    inputs: &BTreeSet<String>,
    top: &Path,
) -> Result<(), ExportError> {
    let Some(spec) = req.drv.env.get("exportReferencesGraph").filter(|_| !req.drv.env.contains_key("__json")) else {
        return Ok(());
    };
    let words: Vec<&str> = spec.split_whitespace().collect();
    if !words.len().is_multiple_of(2) {
        return Err(ExportError::OddTokens(spec.clone()));
    }
    let sd = req.store_dir;
    for pair in words.chunks(2) {
        let (name, path) = (pair[0], pair[1]);
        let mut chars = name.bytes();
        let good_name = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
            && chars.all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
        if !good_name {
            return Err(ExportError::BadName(name.to_owned()));
        }
        // A path inside a store path stands for that store path.
        let base =
            path.strip_prefix(sd.as_str()).and_then(|r| r.strip_prefix('/')).map(|r| r.split('/').next().unwrap_or(r));
        let Some(root) =
            base.and_then(|b| sd.parse_path(&format!("{}/{b}", sd.as_str())).ok()).map(|sp| sd.display(&sp))
        else {
            return Err(ExportError::NotStorePath(path.to_owned()));
        };
        let graph = graph_of(store, sd, inputs, std::slice::from_ref(&root))?;
        let mut text = String::new();
        for (p, info) in &graph {
            text.push_str(&format!("{p}\n\n{}\n", info.references.len()));
            for r in &info.references {
                text.push_str(r);
                text.push('\n');
            }
        }
        fs::write(top.join(name), text)?;
    }
    Ok(())
}

/// The closure of `roots` (which must be in the build's input closure), each path with its record.
fn graph_of(
    store: &LocalStore,
    sd: &StoreDir,
    inputs: &BTreeSet<String>,
    roots: &[String],
) -> Result<BTreeMap<String, PathInfo>, ExportError> {
    if let Some(r) = roots.iter().find(|r| !inputs.contains(*r)) {
        return Err(ExportError::NotAnInput(r.clone()));
    }
    let (paths, _) = store.closure(sd, roots.iter().map(String::as_str))?;
    let mut graph = BTreeMap::new();
    for p in paths {
        if p.ends_with(".drv") {
            return Err(ExportError::Derivation(p));
        }
        if let Some(info) = store.query(sd, &p)? {
            graph.insert(p, info);
        }
    }
    Ok(graph)
}

/// `exportReferencesGraph` with structured attributes: every path of the closure with its NAR hash,
/// size, references and closure size.
fn exported(
    store: &LocalStore,
    sd: &StoreDir,
    inputs: &BTreeSet<String>,
    roots: &[String],
) -> Result<Vec<ExportedPath>, ExportError> {
    let graph = graph_of(store, sd, inputs, roots)?;
    let closure_size = |start: &str| -> u64 {
        let mut seen = BTreeSet::from([start]);
        let mut todo = vec![start];
        while let Some(p) = todo.pop() {
            for r in graph.get(p).map(|i| i.references.as_slice()).unwrap_or_default() {
                if seen.insert(r.as_str()) {
                    todo.push(r.as_str());
                }
            }
        }
        seen.iter().filter_map(|p| graph.get(*p)).map(|i| i.nar_size).sum()
    };
    Ok(graph
        .iter()
        .map(|(p, i)| ExportedPath {
            path: p.clone(),
            nar_hash: i.nar_hash.clone(),
            nar_size: i.nar_size,
            references: i.references.clone(),
            closure_size: closure_size(p),
        })
        .collect())
}

enum Ended {
    Exited(ExitStatus),
    TimedOut(Duration),
    Silent(Duration),
    Canceled,
}

/// Run `cmd` with stdout and stderr on one pipe whose bytes go to `log`, enforcing the timeouts.
fn run_logged(
    mut cmd: std::process::Command,
    settings: &BuildSettings,
    log: &mut dyn FnMut(&[u8]),
    started: &dyn Fn(u32) -> io::Result<()>,
) -> io::Result<Ended> {
    let (mut reader, writer) = io::pipe()?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn()?;
    drop(cmd);
    if let Err(e) = started(child.id()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(16);
    let pump = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let start = Instant::now();
    let mut last_output = Instant::now();
    let killed = loop {
        let now = Instant::now();
        let mut wait = Duration::from_secs(3600);
        if let Some(t) = settings.timeout {
            wait = wait.min((start + t).saturating_duration_since(now));
        }
        if let Some(s) = settings.max_silent {
            wait = wait.min((last_output + s).saturating_duration_since(now));
        }
        if let Some(cancel) = &settings.cancel {
            if cancel.load(Ordering::Relaxed) {
                break Some(Ended::Canceled);
            }
            wait = wait.min(Duration::from_millis(200));
        }
        match rx.recv_timeout(wait) {
            Ok(chunk) => {
                last_output = Instant::now();
                log(&chunk);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if let Some(t) = settings.timeout.filter(|t| now >= start + *t) {
                    break Some(Ended::TimedOut(t));
                }
                if let Some(s) = settings.max_silent.filter(|s| now >= last_output + *s) {
                    break Some(Ended::Silent(s));
                }
            }
        }
    };
    if let Some(ended) = killed {
        // Killing stage 1 kills the sandbox's init (parent-death signal), and with it everything.
        let _ = child.kill();
        let _ = child.wait();
        drop(rx);
        let _ = pump.join();
        return Ok(ended);
    }
    let _ = pump.join();
    Ok(Ended::Exited(child.wait()?))
}

/// The NAR hash and size of the tree at `path`, and which of `candidates` (full store paths) it
/// refers to.
pub(crate) fn hash_and_scan<'a>(
    path: &Path,
    candidates: impl IntoIterator<Item = &'a str>,
) -> io::Result<(Hash, u64, BTreeSet<String>)> {
    let (hash, size, refs, _) = hash_and_scan_fixed(path, candidates, None)?;
    Ok((hash, size, refs))
}

/// [`hash_and_scan`], and in the same pass, when `fixed` asks for it, the fixed-output hash of
/// the tree: of the file's contents (flat) or of its NAR (recursive) with that algorithm. The NAR
/// is hashed on a helper thread while this one scans it, so one read of the output does all.
fn hash_and_scan_fixed<'a>(
    path: &Path,
    candidates: impl IntoIterator<Item = &'a str>,
    fixed: Option<(bool, HashAlgo)>,
) -> io::Result<(Hash, u64, BTreeSet<String>, Option<Hash>)> {
    struct Tee<'x>(&'x mut PipelinedHashSink, &'x mut refs::RefScanner, Option<&'x mut AnyHashSink>);
    impl Write for Tee<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write_all(buf)?;
            self.1.write_all(buf)?;
            if let Some(h) = self.2.as_mut() {
                h.write_all(buf)?;
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut nar_hash = PipelinedHashSink::new()?;
    let mut scanner = refs::RefScanner::new(candidates);
    let mut fixed_sink = match fixed {
        // A recursive SHA-256 is the NAR hash itself.
        Some((true, HashAlgo::Sha256)) | None => None,
        Some((_, algo)) => Some(AnyHashSink::new(algo)),
    };
    if matches!(fixed, Some((false, _))) {
        let md = fs::symlink_metadata(path)?;
        if !md.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: a flat fixed output must be a regular file", path.display()),
            ));
        }
        let executable = std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o100 != 0;
        let mut w = BufWriter::with_capacity(1 << 20, Tee(&mut nar_hash, &mut scanner, None));
        let contents = Tee2(File::open(path)?, fixed_sink.as_mut());
        nar::writer::begin(&mut w)?.regular(executable, md.len(), contents)?;
        w.flush()?;
    } else {
        let mut w = BufWriter::with_capacity(1 << 20, Tee(&mut nar_hash, &mut scanner, fixed_sink.as_mut()));
        nar::dump_path(path, &mut w).map_err(|e| io::Error::new(e.source.kind(), e.to_string()))?;
        w.flush()?;
    }
    let (h, size) = nar_hash.finish()?;
    let fixed_hash = match fixed {
        Some((true, HashAlgo::Sha256)) => Some(h.clone()),
        Some(_) => fixed_sink.map(AnyHashSink::finish),
        None => None,
    };
    Ok((h, size, scanner.finish(), fixed_hash))
}

/// A reader that also feeds what it reads to a hash.
struct Tee2<'x, R>(R, Option<&'x mut AnyHashSink>);

impl<R: io::Read> io::Read for Tee2<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        if let Some(h) = self.1.as_mut() {
            h.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}
