//! `gbc offload nix`: Nix's build hook (the daemon's `build-hook` setting), so that `nix-build`
//! and `nix-store --realise` go through the coordinator's machines unchanged.
//!
//! The protocol (Nix's `hook-instance.cc` and `derivation-goal.cc`, checked against Debian's Nix
//! 2.8): the daemon runs the hook with its verbosity as the one argument, sends its settings
//! and then `try` requests on stdin in its wire format ([`crate::formats::nix_wire`]); the hook
//! answers each on stderr with `# decline`, `# postpone` or `# accept` and the machine's name.
//! After an accept the daemon sends the inputs and the wanted outputs (2.8: output names; later
//! versions: store paths) and reads the build log from fd 4. The hook must leave the outputs
//! valid in the daemon's store, then exit 0; exit 100 is a build failure, 101 a timeout.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Write};
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

/// Serve the daemon's requests until it closes the pipe or one build was taken and done.
/// Returns the exit status for the daemon.
pub fn nix(client: &ClientOpts) -> anyhow::Result<i32> {
    let stdin = io::stdin();
    let mut input = BufReader::new(stdin.lock());
    nix_wire::read_settings(&mut input).context("reading the daemon's settings")?;
    let mut stderr = io::stderr();
    while let Some(request) = nix_wire::read_hook_request(&mut input).context("reading the daemon's request")? {
        match decide(client, &request) {
            Ok(true) => {}
            Ok(false) => {
                writeln!(stderr, "# decline")?;
                continue;
            }
            Err(e) => {
                // The daemon then builds it itself: a coordinator out of reach is no reason to fail.
                writeln!(stderr, "gbc offload: {e:#}; declining {}", request.drv_path)?;
                writeln!(stderr, "# decline")?;
                continue;
            }
        }
        writeln!(stderr, "# accept\ngbc")?;
        stderr.flush()?;
        let (_inputs, wanted) = nix_wire::read_accepted(&mut input).context("reading the inputs and outputs")?;
        return build(client, &request, &wanted);
    }
    Ok(0)
}

/// Whether an up machine of the coordinator has the system and the features.
fn decide(client: &ClientOpts, request: &HookRequest) -> anyhow::Result<bool> {
    let mut c = Client::connect(client)?;
    let machines = match c.call(&Request::Machines)? {
        Reply::Machines { machines } => machines,
        r => return Err(unexpected(&r)),
    };
    Ok(machines.iter().any(|m| {
        m.state == "up"
            && (request.system == "builtin" || m.systems.contains(&request.system))
            && request.required_features.iter().all(|f| m.features.contains(f))
    }))
}

/// Build an accepted derivation through the coordinator and import its outputs.
fn build(client: &ClientOpts, request: &HookRequest, wanted: &[String]) -> anyhow::Result<i32> {
    let opts = SubmitOpts {
        priority: 0,
        tags: vec![("via".into(), "nix-build-hook".into())],
        ignore_if_built: true,
        no_upload: false,
        no_substitutes: false,
        skip_substitutable: false,
        drvs: vec![PathBuf::from(&request.drv_path)],
    };
    let submitted = submit_with_uploads(client, &opts)?;
    let mut c = submitted.client;
    let Some(uuid) = submitted.builds.first().cloned() else {
        anyhow::bail!("{}: the coordinator made no build of it", request.drv_path)
    };
    // The log goes to fd 4, which the daemon reads as the build's output.
    let mut log = std::fs::OpenOptions::new().write(true).open("/dev/fd/4").ok();
    c.send(&Request::Log { build: uuid.clone(), attempt: None, follow: true })?;
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
            let line = format!("gbc: build {uuid} of {} {}: {reason}\n", request.drv_path, state.as_str());
            if let Some(w) = log.as_mut() {
                let _ = w.write_all(line.as_bytes());
            }
            eprint!("{line}");
            let timed_out = detail.attempt_list.last().is_some_and(|a| a.status == Some(AttemptStatus::TimedOut));
            return Ok(if timed_out { EXIT_TIMED_OUT } else { EXIT_BUILD_FAILED });
        }
    }
    let paths = wanted_paths(&detail, wanted);
    // The references as the successful attempt recorded them (for the import's order).
    let recorded: BTreeMap<String, Vec<String>> = detail
        .attempt_list
        .iter()
        .filter(|a| a.status == Some(AttemptStatus::Success))
        .flat_map(|a| a.outputs.iter().map(|o| (o.path.clone(), o.references.clone())))
        .collect();
    import(&mut c, &paths, &recorded, &request.drv_path)?;
    Ok(0)
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

/// Put `paths` from the coordinator's cache into the local store with `nix-store --import`,
/// each after those of them it refers to.
fn import(
    c: &mut Client,
    paths: &[String],
    recorded: &BTreeMap<String, Vec<String>>,
    deriver: &str,
) -> anyhow::Result<()> {
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in paths {
        let r = match recorded.get(p) {
            Some(r) => r.clone(),
            // Not built by this build (an earlier one's): ask (the NAR is read and dropped).
            None => c.nar(p, &mut io::sink())?,
        };
        refs.insert(p.clone(), r);
    }
    let order = references_first(&refs);
    let mut child = Command::new("nix-store")
        .arg("--import")
        // The daemon holds the outputs' locks while its hook runs: Nix's local store skips
        // locking the paths this names (build-remote.pl's way, still in Nix 2.x).
        .env("NIX_HELD_LOCKS", order.join(" "))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running nix-store --import")?;
    let mut to = io::BufWriter::with_capacity(1 << 20, child.stdin.take().context("nix-store's stdin")?);
    for p in &order {
        nix_wire::write_export_head(&mut to)?;
        let references = c.nar(p, &mut to)?;
        nix_wire::write_export_tail(&mut to, p, &references, deriver)?;
    }
    nix_wire::write_export_end(&mut to)?;
    to.flush()?;
    drop(to);
    let status = child.wait()?;
    if !status.success() {
        anyhow::bail!("nix-store --import of {} failed: {status}", order.join(" "));
    }
    Ok(())
}

/// `paths` ordered so that each comes after those of them it refers to.
fn references_first(refs: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let items: Vec<(&String, &Vec<String>)> = refs.iter().collect();
    crate::cache::references_first_by(items, |(p, _)| (*p).clone(), |(_, r)| (*r).clone())
        .into_iter()
        .map(|(p, _)| p.clone())
        .collect()
}

impl Client {
    /// A cached path's NAR into `out`, checked against its NarHash; its references.
    fn nar(&mut self, path: &str, out: &mut impl Write) -> anyhow::Result<Vec<String>> {
        self.send(&Request::Nar { path: path.to_owned() })?;
        match self.reply()? {
            Reply::Nar { nar_hash, nar_size, references, .. } => {
                let mut hashing = Both(HashSink::new(), out);
                self.read_bytes(nar_size, &mut hashing)?;
                let got = hashing.0.finish().0.to_nix32_string();
                if got != nar_hash {
                    anyhow::bail!("{path}: the coordinator sent a NAR of hash {got}, not {nar_hash}");
                }
                Ok(references)
            }
            r => Err(unexpected(&r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
