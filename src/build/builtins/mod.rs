//! The daemons' builtin builders: Nix's `builtin:fetchurl` and Guix's `builtin:download`.
//!
//! As in Nix, a builtin runs where a builder would: inside the build's sandbox (a fixed-output
//! one, so with the network and the host's `/etc/resolv.conf`, `/etc/hosts` and `/etc/services`),
//! as the build user, writing the output at its store path there. What follows is the same as for
//! any build: the output's hash is checked against the derivation's (a mismatch names both), it
//! is canonicalised, scanned and registered by the agent. The sandbox's stage 2 reads the CA
//! bundle before it leaves the host's file system ([`Job::ca_file`]) and calls [`run`].

pub mod git;
mod guix;
pub(crate) mod http;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::formats::derivation::{Derivation, DrvKind};
use crate::formats::hash::Hash;
use crate::formats::nar;

/// The builtin builders gbc runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Nix's `builtin:fetchurl` (`<nix/fetchurl.nix>`).
    NixFetchurl,
    /// Guix's `builtin:download` (`url-fetch` in `guix/download.scm`).
    GuixDownload,
    /// Guix's `builtin:git-download` (`git-fetch` in `guix/build/git.scm`).
    GuixGitDownload,
}

/// Whether `builder` names a builtin: `None` when it does not, else the builtin or why gbc can't
/// run it.
pub fn kind_of(builder: &str) -> Option<Result<Kind, String>> {
    let name = builder.strip_prefix("builtin:")?;
    Some(match name {
        "fetchurl" => Ok(Kind::NixFetchurl),
        "download" => Ok(Kind::GuixDownload),
        "git-download" => Ok(Kind::GuixGitDownload),
        _ => Err(format!(
            "{builder} is a builtin builder gbc does not have (it has builtin:fetchurl, builtin:download and builtin:git-download)"
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_by_name() {
        assert_eq!(kind_of("/bin/sh"), None);
        assert_eq!(kind_of("builtin:fetchurl"), Some(Ok(Kind::NixFetchurl)));
        assert_eq!(kind_of("builtin:download"), Some(Ok(Kind::GuixDownload)));
        assert_eq!(kind_of("builtin:git-download"), Some(Ok(Kind::GuixGitDownload)));
        for other in ["builtin:buildenv", "builtin:unpack-channel"] {
            let why = kind_of(other).and_then(Result::err).unwrap_or_default();
            assert!(why.starts_with(other) && !why.contains('\n'), "{why}");
        }
    }
}

/// What stage 2 of the sandbox needs to run a builtin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub kind: Kind,
    /// The output's store path, where it is written (inside the sandbox).
    pub out: String,
    /// The output's name (its base name without the hash), for content-addressed mirrors.
    pub name: String,
    /// The declared hash, `ALGO:HEX`.
    pub hash: String,
    /// A PEM bundle of CA certificates to check HTTPS servers with, read before the sandbox
    /// hides the host's files; none: certificates are not checked (downloads are hash-checked).
    pub ca_file: Option<PathBuf>,
    /// The host's git, for `builtin:git-download`.
    #[serde(default)]
    pub git: Option<PathBuf>,
}

impl Job {
    /// The job for `drv`, whose builder is the builtin `kind`; `out` is its output's path.
    pub fn new(kind: Kind, drv: &Derivation, out: &str, name: &str) -> Result<Job, String> {
        let Ok(DrvKind::FixedOutput { hash, .. }) = drv.kind() else {
            return Err(format!("{}: only fixed-output derivations may use a builtin builder", drv.builder));
        };
        Ok(Job {
            kind,
            out: out.to_owned(),
            name: name.to_owned(),
            hash: format!("{}:{}", hash.algo().name(), hash.to_hex()),
            ca_file: ca_file(),
            git: if kind == Kind::GuixGitDownload { Some(git::find_git()?) } else { None },
        })
    }
}

/// The host's CA bundle: `NIX_SSL_CERT_FILE` or `SSL_CERT_FILE` when set (as Nix reads them),
/// else Debian's and Fedora's usual places.
pub(crate) fn ca_file() -> Option<PathBuf> {
    let from_env = ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"].iter().filter_map(std::env::var_os).map(PathBuf::from);
    let usual = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"].map(PathBuf::from);
    from_env.chain(usual).find(|p| p.is_file())
}

/// Run `job` with the builder environment `env`; progress and notes go to `log`. An error is the
/// build's failure, in one line.
pub fn run(job: &Job, env: &BTreeMap<String, String>, ca: Option<&[u8]>, log: &mut dyn Write) -> Result<(), String> {
    let out = Path::new(&job.out);
    if job.kind == Kind::GuixGitDownload {
        let git = job.git.as_deref().ok_or("no git on this host")?;
        return git::fetch(env, git, out, log);
    }
    let client = http::Client::new(ca, http::Proxies::from_env(env))?;
    if !client.verifying {
        let _ = writeln!(
            log,
            "note: no CA certificates on this host: HTTPS certificates are not checked (the download is checked against its hash)"
        );
    }
    let hash = Hash::parse(&job.hash).map_err(|e| format!("hash: {e}"))?;
    let executable = env.get("executable").is_some_and(|v| v == "1");
    match job.kind {
        Kind::NixFetchurl => {
            let url = env.get("url").filter(|u| !u.is_empty());
            let listed: Vec<String> =
                env.get("urls").map(|u| u.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
            let urls = if listed.is_empty() { url.into_iter().cloned().collect() } else { listed };
            if urls.is_empty() {
                return Err("the derivation has no 'url'".into());
            }
            if env.get("unpack").is_some_and(|v| v == "1") {
                // As Nix: the download is a NAR, xz-compressed when the main URL ends in .xz.
                let xz = url.is_some_and(|u| u.ends_with(".xz"));
                fetch_nar(&client, &urls, out, xz, log)?;
            } else {
                fetch_file(&client, &urls, out, log)?;
            }
        }
        // Handled above: not an HTTP download.
        Kind::GuixGitDownload => {}
        Kind::GuixDownload => {
            let mut notes = Vec::new();
            let url = env.get("url").ok_or("the derivation has no 'url'")?;
            let read = |var: &str| -> Result<Option<String>, String> {
                env.get(var).map(|p| fs::read_to_string(p).map_err(|e| format!("{var} file {p}: {e}"))).transpose()
            };
            let mut urls = guix::urls(url, read("mirrors")?.as_deref(), &mut notes)?;
            if let Some(text) = read("content-addressed-mirrors")? {
                let mirrors = guix::ca_mirrors(&text, &mut notes)?;
                urls.extend(mirrors.iter().map(|m| m.url(&job.name, &hash)));
            }
            if env.contains_key("download-methods") {
                notes
                    .push("ignoring 'download-methods': gbc tries the URLs, then the content-addressed mirrors".into());
            }
            for n in notes {
                let _ = writeln!(log, "note: {n}");
            }
            fetch_file(&client, &urls, out, log)?;
        }
    }
    if executable {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(out, fs::Permissions::from_mode(0o755)).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}

/// Try `urls` in order until one gives the file at `out`.
fn fetch_file(client: &http::Client, urls: &[String], out: &Path, log: &mut dyn Write) -> Result<(), String> {
    first_that_works(urls, log, |url, log| client.fetch(url, out, log))
}

/// Try `urls` in order until one gives a NAR, unpacked at `out`.
fn fetch_nar(client: &http::Client, urls: &[String], out: &Path, xz: bool, log: &mut dyn Write) -> Result<(), String> {
    let download = Path::new(".gbc-download");
    fetch_file(client, urls, download, log)?;
    let file = File::open(download).map_err(|e| format!("the download: {e}"))?;
    let reader: Box<dyn io::Read> = if xz {
        Box::new(liblzma::read::XzDecoder::new(io::BufReader::new(file)))
    } else {
        Box::new(io::BufReader::new(file))
    };
    let unpacked = nar::restore(reader, out).map(|_| ()).map_err(|e| format!("unpacking the download: {e}"));
    let _ = fs::remove_file(download);
    unpacked
}

fn first_that_works(
    urls: &[String],
    log: &mut dyn Write,
    mut fetch: impl FnMut(&str, &mut dyn Write) -> Result<u64, http::FetchError>,
) -> Result<(), String> {
    let mut failures = Vec::new();
    for url in urls {
        match fetch(url, log) {
            Ok(_) => return Ok(()),
            Err(http::FetchError::Local(e)) => return Err(format!("writing the download: {e}")),
            Err(e) => {
                let _ = writeln!(log, "{e}");
                failures.push(e.to_string());
            }
        }
    }
    Err(match failures.as_slice() {
        [] => "no URL to download from".to_owned(),
        [one] => format!("download failed: {one}"),
        [.., last] => format!("download failed from all {} URLs; the last: {last}", failures.len()),
    })
}
