//! `gbc offload`: the daemons' build hook, so that `nix-build`, `nix-store --realise` and
//! `guix build` go through the coordinator's machines unchanged.
//!
//! **Nix** (`gbc offload nix`; Nix's `hook-instance.cc` and `derivation-goal.cc`, checked against
//! Debian's Nix 2.8): the daemon runs the hook with its verbosity as the one argument, sends its
//! settings and then `try` requests on stdin in its wire format ([`crate::formats::nix_wire`]);
//! the hook answers each on stderr with `# decline`, `# postpone` or `# accept` and the
//! machine's name. After an accept the daemon sends the inputs and the wanted outputs (2.8:
//! output names; later versions: store paths) and reads the build log from fd 4. The hook must
//! leave the outputs valid in the daemon's store, then exit 0; exit 100 is a build failure, 101
//! a timeout.
//!
//! **Guix** (`gbc offload guix SYSTEM MAX-SILENT PRINT-BUILD-TRACE TIMEOUT`; guix-daemon's
//! `nix/libstore/build.cc` and `guix/scripts/offload.scm`): requests are text lines
//! `<0|1> SYSTEM DRV FEATURES` (features joined by commas) on stdin, answered `# accept`,
//! `# decline` or `# postpone` on stdout (the daemon reads stdout and stderr as one pipe); after
//! an accept the daemon writes two lines, the inputs and the missing outputs (space-separated),
//! and reads the log from fd 4. Exit codes as for Nix. The daemon holds the outputs' locks, so
//! the outputs can't go through its `import-paths` (it would wait for them forever): like `guix
//! offload`, the hook hands a signed export stream to a program that restores it into the store
//! directly (`restore-file-set` with `#:lock? #f`, see scripts/gbc-guix-import.scm), signed by
//! the coordinator's Guix key, which /etc/guix/acl must authorize.

use std::collections::BTreeMap;
use std::io::{self, BufRead as _, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context as _;

use super::args::{ClientOpts, SubmitOpts};
use super::client::{Client, submit_with_uploads, unexpected};
use crate::api::{AttemptStatus, BuildDetail, BuildState, Reply, Request};
use crate::formats::hash::HashSink;
use crate::formats::nix_wire::{self, HookRequest};
use crate::pipe::Both;

/// What the daemon takes as "the build failed" (not a hook error).
const EXIT_BUILD_FAILED: i32 = 100;
/// ...and "it timed out".
const EXIT_TIMED_OUT: i32 = 101;

/// What the hook answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Accept,
    /// No up machine has the system and features: the daemon builds it itself.
    Decline,
    /// Some have, but all of them are full (only with `postpone`): the daemon asks again later.
    Postpone,
}

impl Decision {
    fn word(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Decline => "decline",
            Decision::Postpone => "postpone",
        }
    }
}

/// Serve the daemon's requests until it closes the pipe or one build was taken and done.
/// Returns the exit status for the daemon.
pub fn nix(client: &ClientOpts, postpone: bool) -> anyhow::Result<i32> {
    let stdin = io::stdin();
    let mut input = BufReader::new(stdin.lock());
    nix_wire::read_settings(&mut input).context("reading the daemon's settings")?;
    let mut stderr = io::stderr();
    while let Some(request) = nix_wire::read_hook_request(&mut input).context("reading the daemon's request")? {
        let decision = decide_or_decline(client, &request, postpone, &mut stderr);
        if decision != Decision::Accept {
            writeln!(stderr, "# {}", decision.word())?;
            continue;
        }
        writeln!(stderr, "# accept\ngbc")?;
        stderr.flush()?;
        let (_inputs, wanted) = nix_wire::read_accepted(&mut input).context("reading the inputs and outputs")?;
        return build_and_import(
            client,
            &request.drv_path,
            "nix-build-hook",
            &wanted,
            Importer::nix(&request.drv_path),
        );
    }
    Ok(0)
}

/// Options of `gbc offload guix` beyond the daemon's arguments.
pub struct GuixOpts {
    /// The program that restores the signed export stream on its stdin into the store.
    pub import: Option<PathBuf>,
    pub postpone: bool,
}

/// Serve guix-daemon's requests until it closes the pipe or one build was taken and done.
pub fn guix(client: &ClientOpts, opts: &GuixOpts) -> anyhow::Result<i32> {
    let stdin = io::stdin();
    let mut input = BufReader::new(stdin.lock());
    let mut stdout = io::stdout();
    let mut stderr = io::stderr();
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line).context("reading the daemon's request")? == 0 {
            return Ok(0);
        }
        let request = parse_guix_request(&line)?;
        let decision = match &opts.import {
            Some(_) => decide_or_decline(client, &request, opts.postpone, &mut stderr),
            None => {
                writeln!(
                    stderr,
                    "gbc offload: no --import program (or GBC_GUIX_IMPORT); declining {}",
                    request.drv_path
                )?;
                Decision::Decline
            }
        };
        writeln!(stdout, "# {}", decision.word())?;
        stdout.flush()?;
        if decision != Decision::Accept {
            continue;
        }
        let mut inputs = String::new();
        let mut missing = String::new();
        input.read_line(&mut inputs).context("reading the inputs")?;
        if input.read_line(&mut missing).context("reading the missing outputs")? == 0 {
            anyhow::bail!("the daemon closed the pipe before naming the outputs of {}", request.drv_path);
        }
        let wanted: Vec<String> = missing.split_whitespace().map(str::to_owned).collect();
        let program = opts.import.as_deref().context("no import program")?;
        return build_and_import(client, &request.drv_path, "guix-daemon", &wanted, Importer::guix(program));
    }
}

/// What follows an accept: build, then import the wanted outputs; the exit status for the
/// daemon. An error is also written to fd 4, the build's log (what the daemons show of a hook
/// after its accept).
fn build_and_import(
    client: &ClientOpts,
    drv_path: &str,
    via: &str,
    wanted: &[String],
    importer: Importer,
) -> anyhow::Result<i32> {
    let work = || -> anyhow::Result<i32> {
        let (mut c, detail) = match build(client, drv_path, via)? {
            Built::Succeeded(c, detail) => (c, detail),
            Built::Failed(code) => return Ok(code),
        };
        let (paths, recorded) = outputs(&detail, wanted);
        importer.import(&mut c, &paths, &recorded)?;
        Ok(0)
    };
    work().inspect_err(|e| {
        if let Ok(mut log) = std::fs::OpenOptions::new().write(true).open("/dev/fd/4") {
            let _ = writeln!(log, "gbc offload: error: {e:#}");
        }
    })
}

/// `<0|1> SYSTEM DRV FEATURES`, FEATURES joined by commas (and the line ending in a space when
/// there are none).
fn parse_guix_request(line: &str) -> anyhow::Result<HookRequest> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (willing, system, drv, features) = match words.as_slice() {
        [w, s, d] => (*w, *s, *d, ""),
        [w, s, d, f] => (*w, *s, *d, *f),
        _ => anyhow::bail!("not a request of guix-daemon ('<0|1> SYSTEM DRV FEATURES'): {:?}", line.trim_end()),
    };
    let am_willing = match willing {
        "0" => false,
        "1" => true,
        _ => anyhow::bail!("not a request of guix-daemon (it starts with 0 or 1): {:?}", line.trim_end()),
    };
    Ok(HookRequest {
        am_willing,
        system: system.to_owned(),
        drv_path: drv.to_owned(),
        required_features: features.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect(),
    })
}

/// [`decide`], declining when the coordinator can't be asked (the daemon then builds it itself:
/// a coordinator out of reach is no reason to fail a build).
fn decide_or_decline(client: &ClientOpts, request: &HookRequest, postpone: bool, log: &mut impl Write) -> Decision {
    decide(client, request, postpone).unwrap_or_else(|e| {
        let _ = writeln!(log, "gbc offload: {e:#}; declining {}", request.drv_path);
        Decision::Decline
    })
}

/// Accept when an up machine of the coordinator has the system and the features; with
/// `postpone`, postpone while every such machine runs as many builds as it takes.
fn decide(client: &ClientOpts, request: &HookRequest, postpone: bool) -> anyhow::Result<Decision> {
    let mut c = Client::connect(client)?;
    let machines = match c.call(&Request::Machines)? {
        Reply::Machines { machines } => machines,
        r => return Err(unexpected(&r)),
    };
    let able: Vec<_> = machines
        .iter()
        .filter(|m| {
            m.state == "up"
                && (request.system == "builtin" || m.systems.contains(&request.system))
                && request.required_features.iter().all(|f| m.features.contains(f))
        })
        .collect();
    Ok(if able.is_empty() {
        Decision::Decline
    } else if postpone && able.iter().all(|m| m.running.len() >= m.parallel_builds as usize) {
        Decision::Postpone
    } else {
        Decision::Accept
    })
}

/// How an accepted build ended.
enum Built {
    Succeeded(Client, Box<BuildDetail>),
    /// The exit status for the daemon.
    Failed(i32),
}

/// Build an accepted derivation through the coordinator, its log going to fd 4.
fn build(client: &ClientOpts, drv_path: &str, via: &str) -> anyhow::Result<Built> {
    let opts = SubmitOpts {
        priority: 0,
        tags: vec![("via".into(), via.into())],
        ignore_if_built: true,
        no_upload: false,
        no_substitutes: false,
        skip_substitutable: false,
        drvs: vec![PathBuf::from(drv_path)],
    };
    let submitted = submit_with_uploads(client, &opts)?;
    let mut c = submitted.client;
    let Some(uuid) = submitted.builds.first().cloned() else {
        anyhow::bail!("{drv_path}: the coordinator made no build of it")
    };
    // The log goes to fd 4, which the daemon reads as the build's output.
    let mut log = std::fs::OpenOptions::new().write(true).open("/dev/fd/4").ok();
    // The daemon kills its hook when it no longer wants the build: the coordinator then cancels
    // it (unless another hook follows it too).
    c.send(&Request::Log { build: uuid.clone(), attempt: None, follow: true, cancel_if_left: true })?;
    loop {
        match c.reply()? {
            Reply::Log { bytes } => match log.as_mut() {
                Some(w) => c.read_bytes(bytes, w)?,
                None => c.read_bytes(bytes, &mut io::sink())?,
            },
            Reply::End => break,
            r => return Err(unexpected(&r)),
        }
    }
    let detail = match c.call(&Request::Show { build: uuid.clone() })? {
        Reply::Build { build } => *build,
        r => return Err(unexpected(&r)),
    };
    match detail.summary.state {
        BuildState::Succeeded => {}
        state => {
            let reason = detail.summary.reason.clone().unwrap_or_else(|| state.as_str().to_owned());
            // In the build's log (what Nix shows) and on stderr.
            let line = format!("gbc: build {uuid} of {drv_path} {}: {reason}\n", state.as_str());
            if let Some(w) = log.as_mut() {
                let _ = w.write_all(line.as_bytes());
            }
            eprint!("{line}");
            let timed_out = detail.attempt_list.last().is_some_and(|a| a.status == Some(AttemptStatus::TimedOut));
            return Ok(Built::Failed(if timed_out { EXIT_TIMED_OUT } else { EXIT_BUILD_FAILED }));
        }
    }
    Ok(Built::Succeeded(c, Box::new(detail)))
}

/// The wanted outputs' paths, and the references the successful attempt recorded for the
/// outputs it built (for the import's order).
fn outputs(detail: &BuildDetail, wanted: &[String]) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let recorded = detail
        .attempt_list
        .iter()
        .filter(|a| a.status == Some(AttemptStatus::Success))
        .flat_map(|a| a.outputs.iter().map(|o| (o.path.clone(), o.references.clone())))
        .collect();
    (wanted_paths(detail, wanted), recorded)
}

/// The store paths of the wanted outputs (names with Nix 2.8, paths with later versions; all
/// outputs when none is named).
fn wanted_paths(detail: &BuildDetail, wanted: &[String]) -> Vec<String> {
    if wanted.is_empty() {
        return detail.outputs.values().cloned().collect();
    }
    wanted
        .iter()
        .filter_map(|w| if w.starts_with('/') { Some(w.clone()) } else { detail.outputs.get(w).cloned() })
        .collect()
}

/// `paths` in an order that puts each after those of them it refers to.
fn import_order(
    c: &mut Client,
    paths: &[String],
    recorded: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in paths {
        let r = match recorded.get(p) {
            Some(r) => r.clone(),
            // Not built by this build (an earlier one's): ask (the NAR is read and dropped).
            None => c.nar(p, &mut io::sink())?.references,
        };
        refs.insert(p.clone(), r);
    }
    Ok(references_first(&refs))
}

/// How the outputs reach the daemon's store: an export stream on the stdin of `program`.
struct Importer {
    program: Command,
    /// Each item signed by the coordinator's Guix key (what Guix's `restore-file-set` requires).
    signed: bool,
    /// The deriver to name (Nix: the derivation the daemon asked for); else the cache's.
    deriver: Option<String>,
}

impl Importer {
    /// Nix: `nix-store --import`. The daemon holds the outputs' locks while its hook runs: Nix's
    /// local store skips locking the paths `NIX_HELD_LOCKS` names (build-remote.pl's way, still
    /// in Nix 2.x), set once the paths are known.
    fn nix(deriver: &str) -> Importer {
        let mut program = Command::new("nix-store");
        program.arg("--import");
        Importer { program, signed: false, deriver: Some(deriver.to_owned()) }
    }

    /// Guix: the program given, fed a signed stream.
    fn guix(program: &std::path::Path) -> Importer {
        Importer { program: Command::new(program), signed: true, deriver: None }
    }

    /// Stream `paths` from the coordinator's cache to the program, each after those of them it
    /// refers to.
    fn import(
        mut self,
        c: &mut Client,
        paths: &[String],
        recorded: &BTreeMap<String, Vec<String>>,
    ) -> anyhow::Result<()> {
        let order = import_order(c, paths, recorded)?;
        let name = self.program.get_program().to_string_lossy().into_owned();
        // (Named for Guix's import too: its daemon honours it the same way.)
        let mut child = self
            .program
            .env("NIX_HELD_LOCKS", order.join(" "))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("running {name}"))?;
        let mut to = io::BufWriter::with_capacity(1 << 20, child.stdin.take().context("the import's stdin")?);
        let sent = (|| -> anyhow::Result<()> {
            for p in &order {
                nix_wire::write_export_head(&mut to)?;
                let item = c.nar_item(p, self.signed, &mut to)?;
                let deriver = self.deriver.as_deref().or(item.deriver.as_deref()).unwrap_or("");
                if self.signed {
                    nix_wire::write_export_signed_tail(&mut to, p, &item.references, deriver, &item.signature)?;
                } else {
                    nix_wire::write_export_tail(&mut to, p, &item.references, deriver)?;
                }
            }
            nix_wire::write_export_end(&mut to)?;
            Ok(to.flush()?)
        })();
        drop(to);
        let status = child.wait()?;
        if !status.success() {
            anyhow::bail!("{name} (importing {}) failed: {status}", order.join(" "));
        }
        sent
    }
}

/// `paths` ordered so that each comes after those of them it refers to.
fn references_first(refs: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let items: Vec<(&String, &Vec<String>)> = refs.iter().collect();
    crate::cache::references_first_by(items, |(p, _)| (*p).clone(), |(_, r)| (*r).clone())
        .into_iter()
        .map(|(p, _)| p.clone())
        .collect()
}

/// What the coordinator said of a NAR it sent.
struct Item {
    references: Vec<String>,
    deriver: Option<String>,
    /// With `guix_signature` ([`Client::nar_item`]): the Guix signature of the export item.
    signature: String,
}

impl Client {
    /// A cached path's NAR into `out`, checked against its NarHash.
    fn nar(&mut self, path: &str, out: &mut impl Write) -> anyhow::Result<Item> {
        self.nar_item(path, false, out)
    }

    /// [`Client::nar`], with `guix_signature` also the Guix signature of the export item it makes.
    fn nar_item(&mut self, path: &str, guix_signature: bool, out: &mut impl Write) -> anyhow::Result<Item> {
        self.send(&Request::Nar { path: path.to_owned(), guix_signature })?;
        let mut item = match self.reply()? {
            Reply::Nar { nar_hash, nar_size, references, deriver, .. } => {
                let mut hashing = Both(HashSink::new(), out);
                self.read_bytes(nar_size, &mut hashing)?;
                let got = hashing.0.finish().0.to_nix32_string();
                if got != nar_hash {
                    anyhow::bail!("{path}: the coordinator sent a NAR of hash {got}, not {nar_hash}");
                }
                Item { references, deriver, signature: String::new() }
            }
            r => return Err(unexpected(&r)),
        };
        if guix_signature {
            item.signature = match self.reply()? {
                Reply::ExportSignature { signature } => signature,
                r => return Err(unexpected(&r)),
            };
        }
        Ok(item)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn guix_requests_are_read_as_guix_daemon_writes_them() {
        // build.cc: format("%1% %2% %3% %4%") of willing, platform, drv and the features joined
        // by "," (an empty fourth field leaves a trailing space).
        let r = parse_guix_request("1 x86_64-linux /gnu/store/abc-x.drv \n").unwrap();
        assert!(r.am_willing);
        assert_eq!((r.system.as_str(), r.drv_path.as_str()), ("x86_64-linux", "/gnu/store/abc-x.drv"));
        assert!(r.required_features.is_empty());
        let r = parse_guix_request("0 aarch64-linux /gnu/store/abc-x.drv kvm,big-parallel\n").unwrap();
        assert!(!r.am_willing);
        assert_eq!(r.required_features, ["kvm", "big-parallel"]);
        for bad in ["", "2 x86_64-linux /gnu/store/abc-x.drv", "1 x86_64-linux", "1 a b c d"] {
            assert!(parse_guix_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references_come_first() {
        let refs: BTreeMap<String, Vec<String>> = [
            ("/s/a-out".to_owned(), vec!["/s/c-lib".to_owned(), "/s/a-out".to_owned()]),
            ("/s/c-lib".to_owned(), vec!["/s/z-dev".to_owned(), "/s/elsewhere".to_owned()]),
            ("/s/z-dev".to_owned(), vec![]),
        ]
        .into();
        assert_eq!(references_first(&refs), ["/s/z-dev", "/s/c-lib", "/s/a-out"]);
    }
}
