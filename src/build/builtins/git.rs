//! Guix's `builtin:git-download` (`git-fetch` of Guix's `guix/build/git.scm`, which `guix
//! perform-download` runs): a checkout of one commit, without `.git`, with the host's `git`.
//!
//! The agent finds `git` on its `PATH` ([`find_git`]); the build then sees the host's `/usr`, `/bin`
//! and `/lib*` read-only ([`HOST_PATHS`]), as guix-daemon runs this builtin outside its chroot with
//! the host's tools. Only http, https and git URLs are fetched; submodules may not use `file://`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::formats::sexp::{self, Sexp};

/// What a git download sees of the host besides the fixed-output sandbox: git and its libraries,
/// its helpers, and the CA certificates it checks HTTPS with.
pub const HOST_PATHS: &[&str] = &["/usr", "/bin", "/lib", "/lib64?", "/etc/ssl?", "/etc/ca-certificates?"];

/// The host's `git`, from the agent's `PATH`, when it is under one of [`HOST_PATHS`].
pub fn find_git() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).map(|d| d.join("git")).find(|p| p.is_file());
    match found {
        Some(git) if git.starts_with("/usr") || git.starts_with("/bin") => Ok(git),
        Some(git) => Err(format!(
            "builtin:git-download: this host's git ({}) is outside /usr and /bin, which the download sees",
            git.display()
        )),
        None => Err("builtin:git-download needs git on the build host, and there is none on the agent's PATH".into()),
    }
}

/// Check out `commit` of the repository at `url` (the derivation's variables, as Guix writes them)
/// into `out`, without `.git`.
pub fn fetch(
    env: &std::collections::BTreeMap<String, String>,
    git: &Path,
    out: &Path,
    log: &mut dyn Write,
) -> Result<(), String> {
    let url = match env.get("url").map(|u| sexp::parse(u)) {
        Some(Ok(Sexp::String(u))) => u,
        Some(Ok(other)) => return Err(format!("url: {other} is not a string")),
        Some(Err(e)) => return Err(format!("url: {e}")),
        None => return Err("the derivation has no 'url'".into()),
    };
    let commit = env.get("commit").ok_or("the derivation has no 'commit'")?;
    let recursive = match env.get("recursive?").map(|r| sexp::parse(r)) {
        None | Some(Ok(Sexp::Bool(false))) => false,
        Some(Ok(Sexp::Bool(true))) => true,
        Some(other) => return Err(format!("recursive?: {other:?} is not #t or #f")),
    };
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("http" | "https" | "git")) {
        return Err(format!("'{url}': only http, https and git URLs are fetched"));
    }
    if commit.is_empty() || commit.starts_with('-') {
        return Err(format!("commit {commit:?} is not a commit"));
    }
    std::fs::create_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let run = |args: &[&str], log: &mut dyn Write| -> Result<bool, String> {
        let _ = writeln!(log, "git {}", args.join(" "));
        let status = Command::new(git)
            .args(["-c", "protocol.file.allow=never", "-c", "advice.detachedHead=false"])
            .args(args)
            .current_dir(out)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/homeless-shelter")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("running {}: {e}", git.display()))?;
        Ok(status.success())
    };
    let must = |args: &[&str], log: &mut dyn Write| -> Result<(), String> {
        if run(args, log)? { Ok(()) } else { Err(format!("git {} failed", args.join(" "))) }
    };
    must(&["init", "--quiet", "--initial-branch=main"], log)?;
    must(&["remote", "add", "origin", &url], log)?;
    if run(&["fetch", "--depth", "1", "origin", commit], log)? {
        must(&["checkout", "--quiet", "FETCH_HEAD"], log)?;
    } else {
        let _ = writeln!(log, "Failed to do a shallow fetch; retrying a full clone...");
        must(&["fetch", "origin"], log)?;
        must(&["checkout", "--quiet", commit], log)?;
    }
    if recursive {
        must(&["submodule", "update", "--init", "--recursive"], log)?;
    }
    remove_git_dirs(out).map_err(|e| format!("removing .git: {e}"))
}

/// Remove every `.git` in the checkout (submodules have their own).
fn remove_git_dirs(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if entry.file_name() == ".git" {
            if kind.is_dir() { std::fs::remove_dir_all(entry.path())? } else { std::fs::remove_file(entry.path())? }
        } else if kind.is_dir() {
            remove_git_dirs(&entry.path())?;
        }
    }
    Ok(())
}
