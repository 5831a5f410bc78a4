//! `coordinator.ron`: the coordinator's own settings, beside machines.ron. Parsing and validation
//! only; no I/O but reading the file and the key files it names ([`load`]).
//!
//! Errors name the file and a line:column, as machines.ron's do: RON syntax and field errors carry
//! ron's own position, a value that is wrong in itself (a URL gbc can't fetch, a key that does not
//! parse) the position of that value. Flags given to `gbc coordinator` override the file's fields
//! ([`Overrides`]); the file is re-read while the coordinator runs, and a broken edit is logged
//! and changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::formats::host_key::parse_trusted_keys;
use crate::formats::signing::TrustedKeys;
pub use crate::machines::ConfigError;

/// The file as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    /// Binary caches inputs may be taken from, in priority order (http:// or https://).
    #[serde(default)]
    pub substituters: Vec<String>,
    /// Keys an upstream narinfo must be signed by: Nix `NAME:base64`, a Guix `(public-key …)`,
    /// or a file holding either (an absolute path, or one starting with `./` or `../`, taken
    /// from the file's directory).
    #[serde(default)]
    pub substituter_keys: Vec<String>,
    /// How long a substituter's "has it" is remembered, in seconds (Nix's
    /// narinfo-cache-positive-ttl: 30 days).
    #[serde(default = "default_positive_ttl")]
    pub narinfo_ttl_secs: u64,
    /// How long a substituter's "doesn't have it" is remembered, in seconds (Nix's
    /// narinfo-cache-negative-ttl: 1 hour).
    #[serde(default = "default_negative_ttl")]
    pub narinfo_negative_ttl_secs: u64,
    /// Also sign what is taken from substituters with the cache's own key (by default the cache
    /// keeps only the upstream signatures: its clients trust upstream's keys for those paths).
    #[serde(default)]
    pub sign_substitutes: bool,
    /// Programs and URLs that events are delivered to (see docs/hooks.md).
    #[serde(default)]
    pub hooks: Vec<HookFile>,
}

/// One hook as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookFile {
    pub name: String,
    /// Event names ([`crate::api::EventKind`]); every event when empty.
    #[serde(default)]
    pub events: Vec<String>,
    /// A program and its arguments (the event JSON on its stdin)...
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// ...or an http(s) URL the event JSON is POSTed to.
    #[serde(default)]
    pub url: Option<String>,
    /// Events run at once (default 1).
    #[serde(default = "one")]
    pub parallelism: u32,
    /// A run taking longer is killed and counts as failed (default 600).
    #[serde(default = "default_hook_timeout")]
    pub timeout_secs: u64,
    /// Runs after the first before an event is given up (kept for `gbc hooks retry`; default 5).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// The first retry's delay (default 60): the n-th waits this × 3ⁿ⁻¹, jittered, at most an hour.
    #[serde(default = "default_retry_delay")]
    pub retry_delay_secs: u64,
    /// Deliver the events of one build in order: one waits while an earlier one is undelivered.
    #[serde(default)]
    pub ordered: bool,
    /// How much lower than the coordinator's the command's CPU priority is, as nice(1) counts
    /// (0 to 19; default 10): hooks yield the processor to the coordinator and the builds.
    #[serde(default = "default_hook_nice")]
    pub nice: u8,
}

fn default_hook_nice() -> u8 {
    10
}

fn one() -> u32 {
    1
}

fn default_hook_timeout() -> u64 {
    600
}

fn default_max_retries() -> u32 {
    5
}

fn default_retry_delay() -> u64 {
    60
}

/// How a hook takes an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookTarget {
    Command(Vec<String>),
    Url(String),
}

/// A checked hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub name: String,
    /// Empty: every event.
    pub events: std::collections::BTreeSet<crate::api::EventKind>,
    pub target: HookTarget,
    pub parallelism: u32,
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_delay: Duration,
    pub ordered: bool,
    /// Steps nicer than the coordinator its command runs.
    pub nice: u8,
}

impl HookSpec {
    pub fn wants(&self, kind: crate::api::EventKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }
}

/// Check one hook; the error is a one-line reason.
pub fn check_hook(h: &HookFile) -> Result<HookSpec, String> {
    let what = format!("hook {:?}", h.name);
    if h.name.is_empty() || h.name.chars().any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c))) {
        return Err(format!("{what}: a name is letters, digits, '-', '_' and '.'"));
    }
    let mut events = std::collections::BTreeSet::new();
    for e in &h.events {
        let kind = crate::api::EventKind::parse(e).ok_or_else(|| {
            let known: Vec<&str> = crate::api::EventKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("{what}: no event is called {e:?} (there are: {})", known.join(", "))
        })?;
        events.insert(kind);
    }
    let target = match (&h.command, &h.url) {
        (Some(c), None) if c.first().is_some_and(|p| !p.is_empty()) => HookTarget::Command(c.clone()),
        (Some(_), None) => return Err(format!("{what}: command is empty")),
        (None, Some(u)) => HookTarget::Url(check_url(u).map_err(|_| format!("{what}: url {u:?} is not http(s)"))?),
        _ => return Err(format!("{what}: give one of command and url")),
    };
    if h.parallelism == 0 {
        return Err(format!("{what}: parallelism must be at least 1"));
    }
    if h.timeout_secs == 0 {
        return Err(format!("{what}: timeout_secs must be at least 1"));
    }
    if h.nice > 19 {
        return Err(format!("{what}: nice is 0 to 19, not {}", h.nice));
    }
    Ok(HookSpec {
        name: h.name.clone(),
        events,
        target,
        parallelism: h.parallelism,
        timeout: Duration::from_secs(h.timeout_secs),
        max_retries: h.max_retries,
        retry_delay: Duration::from_secs(h.retry_delay_secs),
        ordered: h.ordered,
        nice: h.nice,
    })
}

fn default_positive_ttl() -> u64 {
    30 * 24 * 3600
}

fn default_negative_ttl() -> u64 {
    3600
}

impl Default for CoordinatorFile {
    fn default() -> Self {
        CoordinatorFile {
            substituters: Vec::new(),
            substituter_keys: Vec::new(),
            narinfo_ttl_secs: default_positive_ttl(),
            narinfo_negative_ttl_secs: default_negative_ttl(),
            sign_substitutes: false,
            hooks: Vec::new(),
        }
    }
}

/// What the command line says, over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub substituters: Option<Vec<String>>,
    pub substituter_keys: Option<Vec<String>>,
    pub narinfo_ttl: Option<Duration>,
    pub narinfo_negative_ttl: Option<Duration>,
    pub sign_substitutes: bool,
}

/// The settings in force: the file's, overridden by flags, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub substituters: Vec<String>,
    pub substituter_keys: TrustedKeys,
    pub narinfo_ttl: Duration,
    pub narinfo_negative_ttl: Duration,
    pub sign_substitutes: bool,
    pub hooks: Vec<HookSpec>,
}

impl Default for Settings {
    fn default() -> Self {
        let file = CoordinatorFile::default();
        Settings {
            substituters: Vec::new(),
            substituter_keys: TrustedKeys::default(),
            narinfo_ttl: Duration::from_secs(file.narinfo_ttl_secs),
            narinfo_negative_ttl: Duration::from_secs(file.narinfo_negative_ttl_secs),
            sign_substitutes: false,
            hooks: Vec::new(),
        }
    }
}

impl Settings {
    /// Read the file at `path` (none: the defaults) and apply `overrides`: what a coordinator
    /// starts with, and what it re-reads.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Settings, String> {
        let (file, base) = match path {
            Some(p) => (load(p).map_err(|e| e.to_string())?, p.parent().unwrap_or(Path::new(".")).to_path_buf()),
            None => (CoordinatorFile::default(), PathBuf::from(".")),
        };
        Settings::resolve(&file, overrides, &base).map_err(|message| match path {
            Some(p) => format!("{} (with the flags over it): {message}", p.display()),
            None => message,
        })
    }

    /// Apply `overrides` to `file` (whose values are checked) and read the keys. `base` is where
    /// relative key files are taken from; `what` names the source of the keys in errors.
    pub fn resolve(file: &CoordinatorFile, overrides: &Overrides, base: &Path) -> Result<Settings, String> {
        let substituters = overrides.substituters.clone().unwrap_or_else(|| file.substituters.clone());
        let substituters = substituters.iter().map(|u| check_url(u)).collect::<Result<Vec<_>, _>>()?;
        let keys = overrides.substituter_keys.as_ref().unwrap_or(&file.substituter_keys);
        let mut substituter_keys = TrustedKeys::default();
        for k in keys {
            substituter_keys.extend(read_key(k, base)?);
        }
        if !substituters.is_empty() && substituter_keys.is_empty() {
            return Err("substituters are given but no substituter_keys: nothing from them could be trusted".into());
        }
        Ok(Settings {
            substituters,
            substituter_keys,
            narinfo_ttl: overrides.narinfo_ttl.unwrap_or(Duration::from_secs(file.narinfo_ttl_secs)),
            narinfo_negative_ttl: overrides
                .narinfo_negative_ttl
                .unwrap_or(Duration::from_secs(file.narinfo_negative_ttl_secs)),
            sign_substitutes: overrides.sign_substitutes || file.sign_substitutes,
            hooks: file.hooks.iter().map(check_hook).collect::<Result<_, _>>()?,
        })
    }
}

/// A substituter's URL, without a trailing slash: http or https, with a host.
pub fn check_url(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !url.chars().any(char::is_whitespace) => {
            Ok(url.trim_end_matches('/').to_owned())
        }
        _ => Err(format!("substituter {url:?}: expected an http:// or https:// URL with a host")),
    }
}

fn is_file(key: &str) -> bool {
    key.starts_with('/') || key.starts_with("./") || key.starts_with("../")
}

/// A key given inline, or the keys of the file it names.
fn read_key(key: &str, base: &Path) -> Result<TrustedKeys, String> {
    if is_file(key) {
        let path: PathBuf = base.join(key);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("substituter key file {}: {e}", path.display()))?;
        let keys = parse_trusted_keys(&text).map_err(|e| format!("substituter key file {}: {e}", path.display()))?;
        if keys.is_empty() {
            return Err(format!("substituter key file {}: holds no public key", path.display()));
        }
        return Ok(keys);
    }
    let keys = parse_trusted_keys(key).map_err(|e| format!("substituter key {key:?}: {e}"))?;
    if keys.len() != 1 {
        return Err(format!("substituter key {key:?}: expected one key"));
    }
    Ok(keys)
}

/// Parse a coordinator file's text; `file` names it in errors. Inline values are checked here;
/// key files are read by [`load`].
pub fn parse(text: &str, file: &str) -> Result<CoordinatorFile, ConfigError> {
    let options = ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    let parsed: CoordinatorFile = options.from_str(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: e.span.start.line,
        column: e.span.start.col,
        message: e.code.to_string(),
    })?;
    let at = |needle: &str, message: String| {
        let (line, column) = crate::machines::locate(text, &format!("{needle:?}"));
        ConfigError { file: file.to_owned(), line, column, message }
    };
    for u in &parsed.substituters {
        check_url(u).map_err(|m| at(u, m))?;
    }
    for k in parsed.substituter_keys.iter().filter(|k| !is_file(k)) {
        read_key(k, Path::new(".")).map_err(|m| at(k, m))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for h in &parsed.hooks {
        check_hook(h).map_err(|m| at(&h.name, m))?;
        if !names.insert(h.name.as_str()) {
            // Where it is declared again: the name's second appearance.
            let needle = format!("{:?}", h.name);
            let first = text.find(&needle).map_or(0, |i| i + needle.len());
            let (line, column) = crate::machines::locate(&text[first..], &needle);
            let line_before = text[..first].matches('\n').count();
            let column = if line == 1 {
                column + text[..first].rsplit('\n').next().map_or(0, |l| l.chars().count())
            } else {
                column
            };
            let message = format!("hook {:?} is declared twice", h.name);
            return Err(ConfigError { file: file.to_owned(), line: line + line_before, column, message });
        }
    }
    Ok(parsed)
}

/// Read and check a coordinator file, with the key files it names.
pub fn load(path: &Path) -> Result<CoordinatorFile, ConfigError> {
    let (file, text) = crate::machines::read_config(path)?;
    let parsed = parse(&text, &file)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for k in parsed.substituter_keys.iter().filter(|k| is_file(k)) {
        read_key(k, base).map_err(|message| {
            let (line, column) = crate::machines::locate(&text, &format!("{k:?}"));
            ConfigError { file: file.clone(), line, column, message }
        })?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_resolves() {
        let text = include_str!("../coordinator.example.ron");
        let f = parse(text, "coordinator.example.ron").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(f.substituters.len(), 2);
        let s = Settings::resolve(&f, &Overrides::default(), Path::new(".")).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(s.substituter_keys.len(), 2, "a Nix key and a Guix key");
        assert_eq!(s.narinfo_negative_ttl, Duration::from_secs(600));
        assert_eq!(s.hooks.len(), 2);
        assert_eq!(s.hooks[0].parallelism, 8);
        assert_eq!(s.hooks[1].target, HookTarget::Url("https://hooks.example.org/gbc".into()));
        assert!(s.hooks[1].ordered && s.hooks[1].wants(crate::api::EventKind::MachineDown));
        assert!(!s.hooks[1].wants(crate::api::EventKind::BuildSucceeded));
        assert!(parse("()", "empty").is_ok_and(|f| f == CoordinatorFile::default()));
    }

    #[test]
    fn flags_override_the_file() {
        let f = parse(include_str!("../coordinator.example.ron"), "c").unwrap_or_else(|e| unreachable!("{e}"));
        let o = Overrides {
            substituters: Some(vec!["http://127.0.0.1:8080/".into()]),
            narinfo_ttl: Some(Duration::from_secs(5)),
            sign_substitutes: true,
            ..Overrides::default()
        };
        let s = Settings::resolve(&f, &o, Path::new(".")).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(s.substituters, ["http://127.0.0.1:8080"]);
        assert_eq!((s.narinfo_ttl, s.sign_substitutes), (Duration::from_secs(5), true));
        let none = Overrides { substituter_keys: Some(vec![]), ..Overrides::default() };
        let e = Settings::resolve(&f, &none, Path::new(".")).err().unwrap_or_default();
        assert!(e.contains("no substituter_keys"), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_column_of_what_is_wrong() {
        let cases = [
            ("(\n  substituters: [\"ftp://x\"],\n)", "c.ron:2:18: substituter \"ftp://x\": expected an http"),
            ("(\n  substituter_keys: [\n    \"nokey\",\n  ],\n)", "c.ron:3:5: substituter key \"nokey\""),
            ("(\n  substituter_keys: [\"(public-key (ecc (curve Ed448) (q #00#)))\"],\n)", "c.ron:2:22: "),
            ("(\n  substituterz: [],\n)", "c.ron:2:3: Unexpected field named `substituterz`"),
            ("(\n  narinfo_ttl_secs: -1,\n)", "c.ron:2:"),
            (
                "(hooks: [\n  (name: \"a\", events: [\"build-done\"], command: [\"x\"]),\n])",
                "c.ron:2:10: hook \"a\": no event is called \"build-done\" (there are: build-submitted,",
            ),
            (
                "(hooks: [\n  (name: \"a\", command: [\"x\"], url: \"http://h\"),\n])",
                "c.ron:2:10: hook \"a\": give one of",
            ),
            (
                "(hooks: [\n  (name: \"a\", url: \"ftp://h\"),\n])",
                "c.ron:2:10: hook \"a\": url \"ftp://h\" is not http(s)",
            ),
            ("(hooks: [\n  (name: \"a\", command: []),\n])", "c.ron:2:10: hook \"a\": command is empty"),
            ("(hooks: [\n  (name: \"a b\", command: [\"x\"]),\n])", "c.ron:2:10: hook \"a b\": a name is"),
            (
                "(hooks: [\n  (name: \"a\", command: [\"x\"], parallelism: 0),\n])",
                "c.ron:2:10: hook \"a\": parallelism",
            ),
            (
                "(hooks: [\n  (name: \"a\", command: [\"x\"], nice: 20),\n])",
                "c.ron:2:10: hook \"a\": nice is 0 to 19, not 20",
            ),
            ("(hooks: [\n  (name: \"a\", command: [\"x\"], nice: -1),\n])", "c.ron:2:"),
            (
                "(hooks: [\n  (name: \"a\", command: [\"x\"]),\n  (name: \"a\", url: \"http://h\"),\n])",
                "c.ron:3:10: hook \"a\" is declared twice",
            ),
            ("(hooks: [\n  (name: \"a\", comand: [\"x\"]),\n])", "c.ron:2:15: Unexpected field named `comand`"),
        ];
        for (text, want) in cases {
            let e = parse(text, "c.ron").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with(want), "{e:?} does not start with {want:?}");
        }
    }

    #[test]
    fn key_files_are_read_from_the_file_s_directory() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let key = crate::formats::signing::SecretKey::generate("up-1").unwrap_or_else(|e| unreachable!("{e}"));
        std::fs::write(dir.path().join("up.pub"), format!("{}\n", key.public()))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let conf = dir.path().join("coordinator.ron");
        let text = "(substituters: [\"https://up.example\"], substituter_keys: [\"./up.pub\"])";
        std::fs::write(&conf, text).unwrap_or_else(|e| unreachable!("{e}"));
        let f = load(&conf).unwrap_or_else(|e| unreachable!("{e}"));
        let s = Settings::resolve(&f, &Overrides::default(), dir.path()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(s.substituter_keys.len(), 1);
        std::fs::write(&conf, text.replace("up.pub", "gone.pub")).unwrap_or_else(|e| unreachable!("{e}"));
        let e = load(&conf).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("coordinator.ron:1:") && e.contains("gone.pub"), "{e}");
    }
}
