//! `machines.ron`: the build hosts a coordinator uses. Parsing and validation only; no I/O but
//! reading the file and checking that the key files it names can be read ([`load`]).
//!
//! Errors name the file and a line:column: RON syntax and field errors carry ron's own position;
//! a value that is wrong in itself (empty `systems`, `parallel_builds: 0`, a bad key) is refused
//! while the machine is read, so its position is the end of that machine's entry; a duplicate
//! name, at the end of the second entry with that name.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::formats::host_key::HostPublicKey;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachinesFile {
    /// Keys whose signatures are accepted on the outputs of machines that pin no `signing_key`.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    pub machines: Machines,
}

/// The machine list: names are unique.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Machines(pub Vec<Machine>);

/// One build host.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "RawMachine")]
pub struct Machine {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The remote user; None: the coordinator's own user name.
    pub user: Option<String>,
    /// Private key file; None: ssh-agent (`$SSH_AUTH_SOCK`).
    pub identity: Option<PathBuf>,
    /// Pinned host key, an OpenSSH public key line (`ssh-ed25519 AAAA…`).
    pub host_key: Option<String>,
    /// A known_hosts file to check the host key against, when none is pinned.
    pub known_hosts: Option<PathBuf>,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub speed: f64,
    pub parallel_builds: u32,
    /// 1-minute load divided by cores above which no new build starts.
    pub max_load: Option<f64>,
    /// Free bytes in the agent's store below which no new build starts.
    pub min_free_disk: Option<u64>,
    /// The remote command that starts the agent.
    pub agent: String,
    pub agent_args: Vec<String>,
    /// Host paths builds see read-only (Nix's `sandbox-paths` syntax), given to the agent.
    pub sandbox_paths: Vec<crate::build::sandbox::SandboxPath>,
    /// The Nix-format public key (`name:base64`) this host's outputs must be signed with.
    pub signing_key: Option<String>,
    pub enabled: bool,
    /// Upload the coordinator's own `gbc` when the host's agent is missing or incompatible.
    pub auto_deploy: bool,
    /// Binary caches the host takes inputs from itself (checked against the coordinator's
    /// substituter keys), before the coordinator sends what it still lacks.
    pub substituters: Vec<String>,
}

fn default_port() -> u16 {
    22
}
fn default_speed() -> f64 {
    1.0
}
fn default_parallel() -> u32 {
    1
}
fn default_agent() -> String {
    "gbc agent".to_owned()
}
fn yes() -> bool {
    true
}

/// What the file says, before the checks that need a whole entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    name: String,
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    identity: Option<PathBuf>,
    #[serde(default)]
    host_key: Option<String>,
    #[serde(default)]
    known_hosts: Option<PathBuf>,
    systems: Vec<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    mandatory_features: Vec<String>,
    #[serde(default = "default_speed")]
    speed: f64,
    #[serde(default = "default_parallel")]
    parallel_builds: u32,
    #[serde(default)]
    max_load: Option<f64>,
    #[serde(default)]
    min_free_disk: Option<u64>,
    #[serde(default = "default_agent")]
    agent: String,
    #[serde(default)]
    agent_args: Vec<String>,
    #[serde(default)]
    sandbox_paths: Vec<String>,
    #[serde(default)]
    signing_key: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    auto_deploy: bool,
    #[serde(default)]
    substituters: Vec<String>,
}

/// What is wrong with one machine's entry.
#[derive(Debug, thiserror::Error)]
pub enum InvalidMachine {
    #[error("machine name {0:?} must be non-empty, without spaces or slashes")]
    Name(String),
    #[error("machine \"{name}\": {what}")]
    Field { name: String, what: String },
}

impl TryFrom<RawMachine> for Machine {
    type Error = InvalidMachine;

    fn try_from(r: RawMachine) -> Result<Machine, InvalidMachine> {
        let name = &r.name;
        let bad = |what: String| Err(InvalidMachine::Field { name: name.clone(), what });
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(InvalidMachine::Name(name.clone()));
        }
        if r.host.is_empty() {
            return bad("host is empty".into());
        }
        if r.systems.is_empty() {
            return bad("systems is empty: name at least one system, like \"x86_64-linux\"".into());
        }
        if let Some(s) = r.systems.iter().chain(&r.features).chain(&r.mandatory_features).find(|s| s.is_empty()) {
            return bad(format!("{s:?} is not a system or feature name"));
        }
        if let Some(f) = r.mandatory_features.iter().find(|f| !r.features.contains(f)) {
            return bad(format!("mandatory feature {f:?} is not in features"));
        }
        if r.parallel_builds == 0 {
            return bad("parallel_builds must be at least 1".into());
        }
        if !(r.speed.is_finite() && r.speed > 0.0) {
            return bad(format!("speed must be a positive number, not {}", r.speed));
        }
        if let Some(l) = r.max_load
            && !(l.is_finite() && l > 0.0)
        {
            return bad(format!("max_load must be a positive number, not {l}"));
        }
        match (&r.host_key, &r.known_hosts) {
            (None, None) => {
                return bad("no host_key and no known_hosts: the host's key must be pinned (add host_key: \"ssh-ed25519 AAAA…\", as `ssh-keyscan` prints it, or known_hosts: \"FILE\")".into());
            }
            (Some(k), _) => {
                if let Err(e) = crate::ssh::parse_host_key(k) {
                    return bad(format!("host_key: {e}"));
                }
            }
            (None, Some(_)) => {}
        }
        if let Some(k) = &r.signing_key
            && let Err(e) = HostPublicKey::parse(k)
        {
            return bad(format!("signing_key {k:?}: {e}"));
        }
        if r.agent.trim().is_empty() {
            return bad("agent is empty".into());
        }
        let sandbox_paths = r.sandbox_paths.iter().map(|p| crate::build::sandbox::SandboxPath::parse(p));
        let sandbox_paths = match sandbox_paths.collect::<Result<Vec<_>, _>>() {
            Ok(paths) => paths,
            Err(e) => return bad(format!("sandbox_paths: {e}")),
        };
        let substituters = r.substituters.iter().map(|u| crate::coordinator_file::check_url(u));
        let substituters = match substituters.collect::<Result<Vec<_>, _>>() {
            Ok(urls) => urls,
            Err(e) => return bad(e),
        };
        Ok(Machine {
            name: r.name,
            host: r.host,
            port: r.port,
            user: r.user,
            identity: r.identity,
            host_key: r.host_key,
            known_hosts: r.known_hosts,
            systems: r.systems,
            features: r.features,
            mandatory_features: r.mandatory_features,
            speed: r.speed,
            parallel_builds: r.parallel_builds,
            max_load: r.max_load,
            min_free_disk: r.min_free_disk,
            agent: r.agent,
            agent_args: r.agent_args,
            sandbox_paths,
            signing_key: r.signing_key,
            enabled: r.enabled,
            auto_deploy: r.auto_deploy,
            substituters,
        })
    }
}

impl<'de> Deserialize<'de> for Machines {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Machines, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Machines;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of machines")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Machines, A::Error> {
                let mut names = BTreeSet::new();
                let mut out = Vec::new();
                while let Some(m) = seq.next_element::<Machine>()? {
                    if !names.insert(m.name.clone()) {
                        return Err(de::Error::custom(format!("machine name \"{}\" is used twice", m.name)));
                    }
                    out.push(m);
                }
                Ok(Machines(out))
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Debug, Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parse a machines file's text. `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<MachinesFile, ConfigError> {
    let options = ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    let parsed: MachinesFile = options.from_str(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: e.span.start.line,
        column: e.span.start.col,
        message: e.code.to_string(),
    })?;
    for (i, k) in parsed.trusted_keys.iter().enumerate() {
        if let Err(e) = HostPublicKey::parse(k) {
            let (line, column) = locate(text, k);
            return Err(ConfigError {
                file: file.to_owned(),
                line,
                column,
                message: format!("trusted_keys[{i}] {k:?}: {e}"),
            });
        }
    }
    if parsed.trusted_keys.is_empty()
        && let Some(m) = parsed.machines.0.iter().find(|m| m.signing_key.is_none())
    {
        let (line, column) = locate(text, &format!("\"{}\"", m.name));
        return Err(ConfigError {
            file: file.to_owned(),
            line,
            column,
            message: format!(
                "machine \"{}\": no signing_key and no trusted_keys: its outputs could not be checked (`gbc machines test {}` shows the key its agent uses)",
                m.name, m.name
            ),
        });
    }
    Ok(parsed)
}

/// Read and check a machines file: its syntax and values, and that the files it names can be
/// read. Relative paths in it are taken from the file's directory.
pub fn load(path: &Path) -> Result<MachinesFile, ConfigError> {
    let (file, text) = read_config(path)?;
    let mut parsed = parse(&text, &file)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for m in &mut parsed.machines.0 {
        for (what, p) in [("identity", &mut m.identity), ("known_hosts", &mut m.known_hosts)] {
            let Some(p) = p else { continue };
            if p.is_relative() {
                *p = base.join(&*p);
            }
            if let Err(e) = std::fs::File::open(&*p) {
                let (line, column) = locate(&text, &format!("\"{}\"", m.name));
                return Err(ConfigError {
                    file,
                    line,
                    column,
                    message: format!("machine \"{}\": {what} {}: cannot read: {e}", m.name, p.display()),
                });
            }
        }
        if let Some(p) = &m.identity
            && let Err(e) = crate::ssh::check_identity(p)
        {
            let (line, column) = locate(&text, &format!("\"{}\"", m.name));
            return Err(ConfigError {
                file,
                line,
                column,
                message: format!("machine \"{}\": identity {}: not a usable private key: {e}", m.name, p.display()),
            });
        }
    }
    Ok(parsed)
}

/// A configuration file's name (for errors) and text.
pub(crate) fn read_config(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(e) => Err(ConfigError { file, line: 0, column: 0, message: format!("cannot read: {e}") }),
    }
}

/// Line and column (1-based) of the first occurrence of `needle`, or 0:0.
pub(crate) fn locate(text: &str, needle: &str) -> (usize, usize) {
    let Some(at) = text.find(needle) else { return (0, 0) };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "farm-1:xhEUSJFW7Y4RUUMyYjUwjPk+fYSVH0SruBaiw7GI2t8=";
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICt8gLdDAnGRd/jMz++Wkv8w45IPl6BGi/collfki9dG";

    fn one(fields: &str) -> String {
        format!(
            "(machines: [(name: \"a\", host: \"h\", host_key: \"{KEY}\", systems: [\"x86_64-linux\"], signing_key: \"{SIG}\", {fields})])"
        )
    }

    fn err(text: &str) -> String {
        match parse(text, "m.ron") {
            Ok(v) => unreachable!("parsed: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults() {
        let f = parse(&one(""), "m.ron").unwrap_or_else(|e| unreachable!("{e}"));
        let m = &f.machines.0[0];
        assert_eq!((m.port, m.speed, m.parallel_builds, m.enabled, m.auto_deploy), (22, 1.0, 1, true, false));
        assert_eq!(m.agent, "gbc agent");
        assert!(m.user.is_none() && m.identity.is_none() && m.known_hosts.is_none());
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../machines.example.ron");
        let f = parse(text, "machines.example.ron").unwrap_or_else(|e| unreachable!("{e}"));
        assert!(f.machines.0.len() >= 2, "the example shows several machines");
        assert!(f.machines.0.iter().any(|m| m.auto_deploy) && f.machines.0.iter().any(|m| m.known_hosts.is_some()));
        assert!(f.machines.0.iter().any(|m| m.sandbox_paths.iter().any(|p| p.optional)));
    }

    #[test]
    fn sandbox_paths_are_checked() {
        let e = err(&one("sandbox_paths: [\"/bin\", \"usr\"]"));
        assert!(
            e.starts_with("m.ron:1:") && e.contains("sandbox_paths") && e.contains("\"usr\" is not an absolute path"),
            "{e}"
        );
        let e = err(&one("sandbox_paths: [\"/\"]"));
        assert!(e.contains("root"), "{e}");
    }

    #[test]
    fn bad_values_name_the_machine_and_position() {
        let e = err(&one("parallel_builds: 0"));
        assert!(e.starts_with("m.ron:1:") && e.contains("machine \"a\": parallel_builds must be at least 1"), "{e}");
        let e = err("(machines: [\n  (name: \"a\", host: \"h\", host_key: \"x\", systems: [])\n])");
        assert!(e.starts_with("m.ron:2:") && e.contains("systems is empty"), "{e}");
        let e = err(&one("colour: \"red\""));
        assert!(e.contains("colour") && e.starts_with("m.ron:1:"), "{e}");
        let e = err(&one("host_key: \"ssh-ed25519 AAAA\""));
        assert!(e.contains("duplicate") || e.contains("host_key"), "{e}");
        let e = err("(machines: [(name: \"a\", host: \"h\", systems: [\"x\"])])");
        assert!(e.contains("no host_key and no known_hosts"), "{e}");
        let e = err("(machines: [(name: \"a\", host: \"h\", host_key: \"ssh-ed25519 AAAA\", systems: [\"x\"])])");
        assert!(e.contains("host_key:"), "{e}");
        let e = err(&one("").replace(SIG, "nope"));
        assert!(e.contains("signing_key \"nope\""), "{e}");
        let e = err(&one("").replace(&format!("signing_key: \"{SIG}\", "), ""));
        assert!(e.contains("machine \"a\": no signing_key and no trusted_keys"), "{e}");
        let e = err(&one("speed: 0.0"));
        assert!(e.contains("speed must be a positive number"), "{e}");
        let e = err(&one("features: [\"kvm\"], mandatory_features: [\"big\"]"));
        assert!(e.contains("mandatory feature \"big\" is not in features"), "{e}");
    }

    #[test]
    fn duplicate_names_point_at_the_second() {
        let m = format!("(name: \"a\", host: \"h\", host_key: \"{KEY}\", systems: [\"x\"], signing_key: \"{SIG}\")");
        let e = err(&format!("(machines: [\n{m},\n{m},\n])"));
        assert!(e.starts_with("m.ron:3:") && e.contains("machine name \"a\" is used twice"), "{e}");
    }

    #[test]
    fn top_level_must_be_the_struct() {
        let e = err("[]");
        assert!(e.starts_with("m.ron:1:"), "{e}");
        let e = err("(machines: [], colour: 1)");
        assert!(e.contains("colour"), "{e}");
        let e = err("(trusted_keys: [\"x\"], machines: [])");
        assert!(e.contains("trusted_keys[0]"), "{e}");
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("machines.ron");
        std::fs::write(&path, format!("(machines: [\n(name: \"b\", host: \"h\", host_key: \"{KEY}\", systems: [\"x\"], identity: \"nope\", signing_key: \"{SIG}\")])"))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let e = match load(&path) {
            Ok(f) => unreachable!("{f:?}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(":2:") && e.contains("machine \"b\": identity") && e.contains("nope: cannot read"), "{e}");
    }
}
