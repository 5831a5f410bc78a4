//! What the user can type: every command and flag, with the help text that `--help` and the man
//! pages are generated from.

use crate::build::sandbox::SandboxPath;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// gbc: a build coordinator for Guix and Nix derivations.
///
/// A coordinator (`gbc coordinator`) keeps a durable queue of builds and hands them to build
/// machines, each running `gbc agent`; `gbc submit`, `watch`, `build`, `builds`, `show`, `log`,
/// `cancel` and `machines` talk to it. The store-format tools underneath (NAR archives,
/// derivations, narinfo signing and verification) are byte-exact with Nix.
///
/// Exit status: 0 on success, 1 when a check failed (invalid or mismatching input, a missing or
/// untrusted signature), 2 on a usage or I/O error.
#[derive(Debug, Parser)]
#[command(name = "gbc", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write, read and hash NAR archives.
    Nar {
        #[command(subcommand)]
        command: NarCommand,
    },
    /// Inspect and check derivations (.drv files).
    Drv {
        #[command(subcommand)]
        command: DrvCommand,
    },
    /// Generate a signing key pair, in Nix's format or in Guix's.
    ///
    /// `gbc keygen NAME SECRET PUBLIC`, like `nix-store --generate-binary-cache-key`: SECRET gets
    /// `NAME:base64` of the 64-byte Ed25519 secret key (mode 0600), PUBLIC `NAME:base64` of the
    /// 32-byte public key. `gbc keygen --format guix SECRET PUBLIC`, like `guix archive
    /// --generate-key`: an ECDSA key on the Ed25519 curve as libgcrypt s-expressions, the secret
    /// key (`(private-key (ecc (curve Ed25519) (q …) (d …)))`, mode 0600) and the public key
    /// `guix archive --authorize` takes. Existing files are never overwritten.
    #[command(override_usage = "gbc keygen NAME SECRET PUBLIC\n       gbc keygen --format guix SECRET PUBLIC")]
    Keygen {
        /// Which clients' key: nix (Ed25519, for `Sig:` lines) or guix (ECDSA, for `Signature:`).
        #[arg(long, value_enum, default_value_t = KeyFormat::Nix)]
        format: KeyFormat,
        /// NAME SECRET PUBLIC for a Nix key (NAME conventionally the cache's host name and a
        /// number, e.g. cache.example.org-1); SECRET PUBLIC for a Guix key (Guix keys have no
        /// name).
        #[arg(required = true, num_args = 2..=3, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Sign narinfo files in place.
    ///
    /// A Nix key (`NAME:base64`, as `gbc keygen` or `nix-store --generate-binary-cache-key` make
    /// it) adds a `Sig:` line over the narinfo's fingerprint, replacing an earlier signature by the
    /// same key name. A Guix key (a libgcrypt s-expression, as `guix archive --generate-key` makes
    /// it in /etc/guix/signing-key.sec) writes the `Signature:` line, last, over the text above
    /// it, replacing an earlier one. Give both to sign for both kinds of client; the Guix
    /// signature is made last, as it covers the `Sig:` lines. Each file is rewritten atomically.
    Sign {
        /// Secret key file, Nix's or Guix's format (told apart by their contents). Repeat for
        /// more keys.
        #[arg(long, required = true, value_name = "SECRET_FILE")]
        key: Vec<PathBuf>,
        /// The host name a Guix `Signature:` line names (default: this machine's, as guix
        /// publish does).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        #[arg(required = true, value_name = "NARINFO")]
        narinfo: Vec<PathBuf>,
    },
    /// Check that narinfo files carry a valid signature by a trusted key.
    ///
    /// A narinfo passes with a `Sig:` by a trusted Nix key over its fingerprint (as Nix checks),
    /// or with a `Signature:` by a trusted Guix key over the text above it (as `guix substitute`
    /// checks; it must be the last field, below StorePath, NarHash and References). Exits 0 only
    /// when every NARINFO passes, 1 otherwise, saying why.
    Verify {
        /// Public key file: Nix keys (`NAME:base64`, several separated by white space), or Guix
        /// keys (a `(public-key …)` s-expression as /etc/guix/signing-key.pub holds it, or an ACL
        /// as /etc/guix/acl does). Repeat for more files.
        #[arg(long, required = true, value_name = "PUBLIC_FILE")]
        trusted: Vec<PathBuf>,
        #[arg(required = true, value_name = "NARINFO")]
        narinfo: Vec<PathBuf>,
    },
    /// Build a derivation locally, in a sandbox, into a local store; print its output paths.
    ///
    /// The same code a build host's agent runs, for debugging a build without a coordinator. Input
    /// derivations (read from beside FILE, else from their store path) are built first when their
    /// outputs are not in the store; input sources must already be there. The build log goes to
    /// standard error. Exits 1 when the build fails, 2 when it cannot be set up.
    Realise {
        file: PathBuf,
        /// Where the store's paths live (default: <state dir>/agent/store, the state dir being
        /// $XDG_STATE_HOME/gbc or ~/.local/state/gbc).
        #[arg(long, value_name = "DIR")]
        store_root: Option<PathBuf>,
        /// NIX_BUILD_CORES for the builder (default: this machine's cores).
        #[arg(long, value_name = "N")]
        cores: Option<u32>,
        /// Kill the build after this long without log output (seconds, or a duration like 1h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        max_silent_time: Option<Duration>,
        /// Kill the build after this long (seconds, or a duration like 3h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// A host path builds see read-only (repeatable; default: none). Nix's sandbox-paths
        /// syntax: PATH, TARGET=SOURCE, and a trailing ? for a path to skip when missing.
        #[arg(long = "sandbox-path", value_name = "SPEC")]
        sandbox_paths: Vec<SandboxPath>,
    },
    /// Serve the build-host side of gbc's protocol on standard input and output.
    ///
    /// The coordinator runs this on each build host (over SSH, or as a child process for the local
    /// machine); see docs/protocol.md. Builds run in a sandbox over the agent's own store, and
    /// outputs are signed with the agent's key, created on first run unless --signing-key is given.
    Agent(AgentOpts),
    /// Run the coordinator in the foreground: the build queue, the machines, the client socket.
    ///
    /// State (the SQLite database, build logs, the local machine's store) lives in the state dir;
    /// clients reach the coordinator through <state dir>/gbc.sock. With no machines file, one
    /// built-in machine, `localhost`, builds with this host's system, running `gbc agent` as a child
    /// process. SIGINT or SIGTERM stops it: no new build starts, running builds get --grace (30 s)
    /// to finish, the others go back to the queue. Killed outright, it loses nothing: builds that
    /// were running are queued again at the next start.
    Coordinator(Box<CoordinatorOpts>),
    /// The coordinator's binary cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Check a machines.ron or coordinator.ron file as the coordinator would.
    ///
    /// Without FILE: <state dir>/machines.ron, and <state dir>/coordinator.ron when it exists. A
    /// FILE whose name contains "coordinator" is read as a coordinator.ron. Prints one line per
    /// machine (and one for the settings) when the files are good; else one error naming the file,
    /// line and column, and exits with status 1.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// State directory whose machines.ron is checked when no FILE is given.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Queue derivations for building; print one build UUID per line, in order.
    ///
    /// Each DRV is read here, with its input derivations (from beside it, else from their store
    /// path), and sent to the coordinator, which checks them all and answers at once. The input
    /// sources the coordinator's binary cache lacks, and the outputs of input derivations that are
    /// valid in this machine's Nix store, are uploaded first. Every input derivation whose outputs
    /// are still missing from the cache gets a build (unless one is queued or running), which the
    /// submitted ones wait for.
    Submit {
        #[command(flatten)]
        submit: SubmitOpts,
        /// One JSON object on standard output: `builds`, `dependencies`, and `no_machine` (the
        /// new builds no machine can take, each with `build`, `drv` and `reason`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Follow builds until they end (every queued or running build when no UUID is given).
    ///
    /// Exits 0 when every watched build succeeded, 1 when one failed or was canceled.
    Watch {
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
        #[arg(value_name = "UUID")]
        uuids: Vec<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Submit derivations, follow their builds, then print their output paths.
    ///
    /// Progress goes to standard error, output paths to standard output. Exits 1 when a build
    /// failed.
    Build {
        #[command(flatten)]
        submit: SubmitOpts,
        /// Progress as one JSON event per line on standard error.
        #[arg(long)]
        json: bool,
        /// Wait for builds no machine can take (until the machines file gives them one); without
        /// it, such a build ends the command at once with an error, and stays queued.
        #[arg(long)]
        wait_for_machine: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List builds, newest first.
    Builds {
        #[arg(long, value_name = "STATE", value_parser = parse_state)]
        state: Option<crate::api::BuildState>,
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: u32,
        /// A JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show everything about one build: state, derivation, outputs, attempts.
    Show {
        uuid: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print a build's log, following it while the build runs.
    Log {
        uuid: String,
        /// Which attempt (default: the latest).
        #[arg(long, value_name = "N")]
        attempt: Option<u32>,
        /// Print what there is now and stop.
        #[arg(long)]
        no_follow: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel queued or running builds; builds waiting for them fail.
    Cancel {
        #[arg(required = true, value_name = "UUID")]
        uuids: Vec<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show the machines: up or down, since when, running builds, load.
    Machines {
        #[command(subcommand)]
        command: Option<MachinesCommand>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show the hooks (coordinator.ron `hooks`): events waiting for each, given up, runs, failures,
    /// the last error. `gbc hooks retry NAME` runs again the events NAME gave up on.
    Hooks {
        #[command(subcommand)]
        command: Option<HooksCommand>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Be a daemon's build hook: `gbc offload nix` is Nix's `build-hook` (Nix 2.8 takes one
    /// program path: use scripts/gbc-nix-build-hook). Derivations an up machine of the
    /// coordinator can build are built there and their outputs imported; others are declined,
    /// so the daemon builds them itself.
    Offload {
        #[command(subcommand)]
        daemon: OffloadDaemon,
    },
    /// Coordinator counters and allocation timings, as JSON.
    #[command(hide = true)]
    Stats {
        /// Start the allocation timing samples afresh.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show what gbc's format tools do, on an embedded example (no Nix needed).
    Demo,
    /// Internal: the sandbox helper (stage 1).
    #[command(name = "__sandbox", hide = true)]
    Sandbox { spec: String },
    /// Internal: the sandbox's init (stage 2).
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit { spec: String },
    /// Write the man pages to DIR.
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
}

/// How a client command finds the coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// The coordinator's state directory (default: $GBC_STATE_DIR, else $XDG_STATE_HOME/gbc or
    /// ~/.local/state/gbc); its socket is <DIR>/gbc.sock.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The coordinator: its socket, or ssh://[USER@]HOST[:PORT][/SOCKET] for one on another host
    /// (SOCKET absolute, or /~/PATH under the user's home; default ~/.local/state/gbc/gbc.sock),
    /// overriding --state-dir [env: GBC_COORDINATOR].
    #[arg(long, value_name = "SOCKET|URL")]
    pub coordinator: Option<String>,
    /// With ssh://: the private key to log in with [env: GBC_SSH_IDENTITY] (default: the
    /// ssh-agent's keys if $SSH_AUTH_SOCK is set, else ~/.ssh/id_ed25519, id_ecdsa or id_rsa).
    #[arg(long, value_name = "FILE")]
    pub ssh_identity: Option<PathBuf>,
    /// With ssh://: the host's public key line; any other key is refused before anything is sent
    /// [env: GBC_SSH_HOST_KEY] (default: checked against the known_hosts file).
    #[arg(long, value_name = "KEY")]
    pub ssh_host_key: Option<String>,
    /// With ssh://: the known_hosts file [env: GBC_SSH_KNOWN_HOSTS] (default: ~/.ssh/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub ssh_known_hosts: Option<PathBuf>,
}

/// How `gbc agent` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentOpts {
    /// State directory (default: $XDG_STATE_HOME/gbc or ~/.local/state/gbc).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where store paths live (default: <state dir>/agent/store).
    #[arg(long, value_name = "DIR")]
    pub store_root: Option<PathBuf>,
    /// Use a fresh empty store of its own, removed when the session ends: what `gbc machines
    /// test` asks for when a running coordinator's agent holds the host's store.
    #[arg(long, conflicts_with = "store_root")]
    pub scratch_store: bool,
    /// Secret key to sign outputs with, Nix's format or Guix's (e.g. /etc/guix/signing-key.sec;
    /// default: <state dir>/agent/signing-key.secret, a Nix key created when missing).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// A system this host builds for (repeatable; default: the native one, e.g. x86_64-linux).
    #[arg(long = "system", value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// A feature this host offers (repeatable), e.g. kvm or big-parallel.
    #[arg(long = "feature", value_name = "FEATURE")]
    pub features: Vec<String>,
    /// A store dir to accept (repeatable; default: /gnu/store and /nix/store).
    #[arg(long = "store-dir", value_name = "DIR")]
    pub store_dirs: Vec<String>,
    /// A host path builds see read-only (repeatable; default: none). Nix's sandbox-paths syntax:
    /// PATH, TARGET=SOURCE, and a trailing ? for a path to skip when the host lacks it.
    #[arg(long = "sandbox-path", value_name = "SPEC")]
    pub sandbox_paths: Vec<SandboxPath>,
    /// NIX_BUILD_CORES for builders (default: this machine's cores).
    #[arg(long, value_name = "N")]
    pub cores: Option<u32>,
}

/// Which client's key format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyFormat {
    Nix,
    Guix,
}

/// How `gbc coordinator` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorOpts {
    /// State directory (default: $GBC_STATE_DIR, else $XDG_STATE_HOME/gbc or ~/.local/state/gbc).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Parallel builds of the local machine (default: this host's cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub local_builds: Option<u32>,
    /// A host path the local machine's builds see read-only (repeatable; default: none). Nix's
    /// sandbox-paths syntax: PATH, TARGET=SOURCE, and a trailing ? for a path to skip when missing.
    /// Build hosts have `sandbox_paths` in machines.ron.
    #[arg(long = "sandbox-path", value_name = "SPEC")]
    pub sandbox_paths: Vec<SandboxPath>,
    /// Attempts a build gets when its setup fails or its machine is lost, before it fails.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Queue a build whose builder failed (or timed out, or was silent too long) again, up to N
    /// times (default 0). Each try is an attempt, recorded as any other; a refused output is not
    /// tried again.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retry_failed: u32,
    /// The wait before the first such try (seconds, or a duration like 5m); each next one waits 3
    /// times longer, at most an hour.
    #[arg(long, value_name = "DURATION", default_value = "60", value_parser = parse_duration)]
    pub retry_failed_delay: Duration,
    /// How long running builds may go on after SIGINT/SIGTERM (seconds, or a duration like 5m).
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = parse_duration)]
    pub grace: Duration,
    /// Kill a build after this long without log output (seconds, or a duration like 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_silent_time: Option<Duration>,
    /// Kill a build after this long (seconds, or a duration like 3h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop a build whose log passes this size (bytes, or with a K, M or G suffix; 0: no limit);
    /// the log keeps its first SIZE bytes and the build fails.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub max_log_size: u64,
    /// The build hosts, a machines.ron file (default: <state dir>/machines.ron when it exists).
    /// With one, the built-in localhost machine is used only if --local-builds is given.
    #[arg(long, value_name = "FILE")]
    pub machines: Option<PathBuf>,
    /// The coordinator's settings, a coordinator.ron file (default: <state dir>/coordinator.ron
    /// when it exists; see coordinator.ron(5)). The flags below override what it says.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A binary cache inputs may be taken from instead of being built (repeatable, in priority
    /// order; replaces the file's `substituters`).
    #[arg(long = "substituter", value_name = "URL")]
    pub substituters: Vec<String>,
    /// A key upstream narinfos must be signed by: Nix's NAME:base64, a Guix (public-key …), or a
    /// file holding them (repeatable; replaces the file's `substituter_keys`).
    #[arg(long = "substituter-key", value_name = "KEY")]
    pub substituter_keys: Vec<String>,
    /// How long a substituter's "has it" is remembered (default 30 days).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub narinfo_ttl: Option<Duration>,
    /// How long a substituter's "doesn't have it" is remembered (default 1 hour).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub narinfo_negative_ttl: Option<Duration>,
    /// Sign what is taken from substituters with the cache's own key too.
    #[arg(long)]
    pub sign_substitutes: bool,
    /// How long to wait before reconnecting to a lost host; tripled after each failure in a row
    /// (plus up to 10% at random, at most an hour).
    #[arg(long, value_name = "DURATION", default_value = "60", value_parser = parse_duration)]
    pub reconnect_delay: Duration,
    /// Silence on an SSH connection before a keepalive; 4 unanswered drop it.
    #[arg(long, value_name = "DURATION", default_value = "15", value_parser = parse_positive_duration, hide = true)]
    pub ssh_keepalive: Duration,
    /// Time between load queries to each agent.
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = parse_positive_duration, hide = true)]
    pub ping_interval: Duration,
    /// How NARs are compressed in the binary cache: zstd (fast), xz (smaller, slower), lzip (as
    /// xz; what guix publish usually serves) or none. Nix and Guix clients read all four.
    #[arg(long, value_name = "METHOD", value_enum, default_value_t = CompressionArg::Zstd)]
    pub compression: CompressionArg,
    /// The store dir of the binary cache (<state dir>/cache); outputs in other store dirs are
    /// built and recorded but not published.
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub cache_store_dir: String,
    /// The secret key narinfos are signed with (default: <state dir>/keys/cache.secret, created on
    /// first start with cache.public beside it).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The Guix-format secret key a /gnu/store cache also signs narinfos with, for Guix clients
    /// (e.g. the /etc/guix/signing-key.sec of the guix publish it replaces; default: <state
    /// dir>/keys/guix-signing-key.sec, created on first start with guix-signing-key.pub beside it).
    #[arg(long, value_name = "FILE")]
    pub guix_signing_key: Option<PathBuf>,
    /// Sign narinfos in Guix's format too in a cache whose store dir is not /gnu/store (a
    /// /gnu/store cache always does, and so does any cache given --guix-signing-key).
    #[arg(long)]
    pub guix_signatures: bool,
    /// Serve the binary cache, Prometheus metrics (/metrics) and a status page (/) over HTTP at
    /// this address, e.g. 0.0.0.0:8080.
    #[arg(long, value_name = "ADDR:PORT")]
    pub http: Option<std::net::SocketAddr>,
    /// How long an HTTP client has to send a request's header; also the longest a kept-alive
    /// connection waits for its next request.
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = parse_positive_duration)]
    pub http_header_timeout: Duration,
    /// Close an HTTP connection on which nothing has moved for this long (a client that stopped
    /// reading a NAR, or sending a request).
    #[arg(long, value_name = "DURATION", default_value = "60", value_parser = parse_positive_duration)]
    pub http_idle_timeout: Duration,
    /// HTTP connections served at once; more wait in the kernel's queue until one closes. It is
    /// lowered if the file descriptor limit would not leave room for the rest of the coordinator
    /// (its client socket, database, machines and builds).
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_max_connections: u64,
}

/// What `submit` and `build` queue, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitOpts {
    /// Higher goes first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i64,
    /// A KEY=VALUE tag (repeatable), for `gbc builds --tag`.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// When a build already produced these outputs, or is queued or running to produce them, use
    /// it instead of a new one (a succeeded one first).
    #[arg(long)]
    pub ignore_if_built: bool,
    /// Upload nothing: inputs the cache lacks are built, or the builds that need them fail.
    #[arg(long)]
    pub no_upload: bool,
    /// Take no input from the coordinator's substituters: build the whole graph here (what its
    /// cache lacks).
    #[arg(long)]
    pub no_substitutes: bool,
    /// Build none of the given derivations whose outputs are all available, in the cache or from
    /// a substituter (only the cache with --no-substitutes): report them as available instead
    /// (`gbc build` prints their outputs first).
    #[arg(long)]
    pub skip_substitutable: bool,
    #[arg(required = true, value_name = "DRV")]
    pub drvs: Vec<PathBuf>,
}

/// How the cache compresses NARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionArg {
    Zstd,
    Xz,
    Lzip,
    None,
}

impl From<CompressionArg> for crate::cache::Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Zstd => crate::cache::Compression::Zstd,
            CompressionArg::Xz => crate::cache::Compression::Xz,
            CompressionArg::Lzip => crate::cache::Compression::Lzip,
            CompressionArg::None => crate::cache::Compression::None,
        }
    }
}

/// A number of seconds (`90`), or a duration as humantime writes it (`90s`, `5m`, `12h`, `30d`,
/// `1h 30m`), in whole seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration (seconds, or like 90m, 12h, 30d): {e}"))?,
    };
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: durations here are whole seconds"));
    }
    Ok(d)
}

/// [`parse_duration`], at least a second.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(|d| if d.is_zero() { Err("must be at least 1 second".into()) } else { Ok(d) })
}

/// `1048576`, `512K`, `64M`, `2G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (bytes, or a number with K, M or G)"))
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_state(s: &str) -> Result<crate::api::BuildState, String> {
    crate::api::BuildState::parse(s)
        .ok_or_else(|| format!("{s:?} is not a state (queued, running, succeeded, failed, canceled)"))
}

#[derive(Debug, Subcommand)]
pub enum NarCommand {
    /// Write the NAR serialisation of PATH to standard output, as `nix-store --dump`.
    Dump { path: PathBuf },
    /// Unpack a NAR read from standard input at DEST, as `nix-store --restore`.
    ///
    /// DEST must not exist. The NAR is fully validated while it streams; the tree is built under a
    /// temporary name beside DEST and renamed into place only when complete, so a bad or truncated
    /// NAR leaves nothing behind, and nothing is ever written outside DEST.
    Restore { dest: PathBuf },
    /// Print the SHA-256 hash of PATH's NAR as `sha256:<nix32>`, as `nix-store -q --hash`.
    Hash { path: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum DrvCommand {
    /// Print a derivation as JSON: outputs, inputDrvs, inputSrcs, system, builder, args, env.
    Show { file: PathBuf },
    /// Compute a derivation's .drv store path and output paths from its contents.
    ///
    /// Prints the .drv path, then one `OUTPUT PATH` line per output. Fails (exit 1) when the
    /// contents do not give the file's own name, or when a declared output path (or the environment
    /// variable of the same name) is not the one the contents give. Input derivations are read from
    /// the file's own directory, else from their store path.
    Path { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// Run again the events hook NAME gave up on (after its max_retries), from the oldest.
    Retry {
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// Which daemon `gbc offload` serves.
#[derive(Debug, Subcommand)]
pub enum OffloadDaemon {
    /// Nix's build hook protocol, on stdin/stderr/fd 4 (the daemon starts it).
    Nix {
        /// The daemon's verbosity (Nix appends it).
        #[arg(value_name = "VERBOSITY")]
        verbosity: Option<String>,
        /// Answer `# postpone` while every machine able to build a derivation is full (also
        /// GBC_OFFLOAD_POSTPONE=1), so the daemon asks again later instead of the build waiting
        /// in the coordinator's queue.
        #[arg(long)]
        postpone: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// guix-daemon's build hook protocol (guix-daemon runs `$GUIX offload SYSTEM MAX-SILENT
    /// PRINT-BUILD-TRACE TIMEOUT`: use the wrapper scripts/guix-offload-wrapper as $GUIX).
    /// Outputs are handed, as an export stream signed by the coordinator's Guix key, to the
    /// --import program, which restores them into the store (scripts/gbc-guix-import does it
    /// with Guix's own `restore-file-set`).
    Guix {
        /// The daemon's system type (unused: each request names its system).
        #[arg(value_name = "SYSTEM")]
        system: String,
        /// The daemon's max-silent-time (unused: the coordinator's machines' settings apply).
        #[arg(value_name = "MAX-SILENT")]
        max_silent: String,
        /// Whether the daemon prints build traces (unused).
        #[arg(value_name = "PRINT-BUILD-TRACE")]
        print_build_trace: String,
        /// The daemon's build timeout (unused: the coordinator's machines' settings apply).
        #[arg(value_name = "TIMEOUT")]
        timeout: String,
        /// The program that gets the signed export stream of the outputs on its stdin and
        /// restores it into the store (default: $GBC_GUIX_IMPORT; without one every request
        /// is declined).
        #[arg(long, value_name = "PROGRAM")]
        import: Option<PathBuf>,
        /// As for `gbc offload nix`.
        #[arg(long)]
        postpone: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// Check that build hosts work, like `guix offload test`.
    ///
    /// For each machine of the machines file (or only NAME): connect, check the host key,
    /// authenticate, start the agent (deploying gbc if the machine has auto_deploy), report its
    /// version, systems, features, load and free disk and its signing key, and send a small NAR
    /// to it and fetch it back. Each failure gets a diagnosis: connection refused, host
    /// unreachable, host key mismatch, authentication refused, agent missing, protocol mismatch.
    /// Exits with status 1 if any machine fails. Needs no running coordinator.
    Test {
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// The machines file (default: <state dir>/machines.ron).
        #[arg(long, value_name = "FILE")]
        machines: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Fetch a store path's NAR from a machine's agent, hash it, and print size, hash and time
    /// (a benchmark of the transport).
    #[command(hide = true)]
    Fetch {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "PATH")]
        path: String,
        #[arg(long, value_name = "FILE")]
        machines: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print the public key clients must trust for the coordinator's binary cache
    /// (`trusted-public-keys` in nix.conf, `guix archive --authorize`).
    PublicKey {
        /// State directory whose keys/cache.public is printed.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The secret key the coordinator was given with --signing-key (or, with --format guix,
        /// --guix-signing-key): its public half is printed.
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// nix: `name:base64`, for trusted-public-keys; guix: the s-expression `guix archive
        /// --authorize` reads (a /gnu/store cache's Guix key).
        #[arg(long, value_enum, default_value_t = KeyFormat::Nix)]
        format: KeyFormat,
    },
    /// Remove from the cache what no recent build needs.
    ///
    /// Kept: the outputs of builds that succeeded within DURATION, the inputs of builds created
    /// within it or still queued or running, and everything those refer to; narinfos go first, then
    /// the NARs no remaining narinfo names. Runs in the coordinator, which stops publishing meanwhile.
    Gc {
        /// How far back builds count as recent: seconds, or a duration like 12h, 30d or 1h 30m.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_since: Duration,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        for bad in ["", "M", "1.5M", "-1", "64T", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
