//! Running a builder in Linux namespaces, without root and without a daemon.
//!
//! A build follows the conventions of the daemon its store dir belongs to ([`Daemon`]): for
//! `/nix/store`, Nix's sandbox (build directory `/build`, uid 1000 / gid 100, Nix's
//! `/etc/passwd`); for `/gnu/store`, guix-daemon's (`/tmp/guix-build-NAME.drv-0`, uid 30001 / gid
//! 30000, its shorter `/etc/passwd` and `/etc/group`). Below, `/build` and uid 1000 stand for either.
//!
//! The agent starts `gbc __sandbox SPEC` (stage 1) with the builder's log pipe as stdout and stderr.
//! Stage 1, single-threaded as `unshare(CLONE_NEWUSER)` requires, enters new user, mount, PID, IPC,
//! UTS and (except for fixed-output derivations) network namespaces, maps the agent's user to root
//! of the new user namespace, and starts `gbc __sandbox-init SPEC` (stage 2), which is PID 1 of the
//! new PID namespace and keeps root's capabilities there. Stage 2 builds the root file system in an
//! empty directory: `/build` (the build directory), an empty `/tmp`, the logical store dir with
//! each path of the input closure bind-mounted read-only, the machine's sandbox paths read-only
//! (none by default: nothing of the host is seen unless named), `/proc`, a minimal `/dev` with a
//! `devpts` of its own, and `/etc/{passwd,group,hosts}` (and, for fixed-output derivations, the
//! host's `/etc/{resolv.conf,hosts,services}`); makes everything but `/build`, `/tmp`, the store
//! dir and `/dev/shm` read-only; pivots into it; then enters
//! a nested user namespace where it is uid 1000 / gid 100 (as in Nix's sandbox) and runs the builder
//! (or, for a builtin builder, runs it itself: [`super::builtins`]).
//! The builder thus has no capabilities over the mounts: it cannot remount its read-only inputs (and
//! mounts copied into any namespace it makes are locked read-only by the kernel).
//! When stage 2 exits, the kernel kills everything left in the namespace; stage 2 dies with stage 1
//! (`PR_SET_PDEATHSIG`), so killing stage 1 ends the whole build.
//!
//! Errors before the builder starts are written to the spec's error file, so the agent can report a
//! setup failure (not a build failure) with the reason.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::symlink;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use rustix::fs::StatVfsMountFlags;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;
use serde::{Deserialize, Serialize};

/// Whose conventions a build follows inside the sandbox: Nix's for `/nix/store` derivations (and
/// any other store dir), guix-daemon's for `/gnu/store` ones (Guix's `nix/libstore/build.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Daemon {
    Nix,
    Guix,
}

impl Daemon {
    pub fn of_store_dir(store_dir: &str) -> Daemon {
        if store_dir == "/gnu/store" { Daemon::Guix } else { Daemon::Nix }
    }

    /// Where the build directory appears, for the derivation `name` (its .drv's name without the
    /// extension): Nix's `/build`, guix-daemon's `/tmp/guix-build-NAME.drv-0`.
    pub fn build_dir(self, name: &str) -> String {
        match self {
            Daemon::Nix => "/build".to_owned(),
            Daemon::Guix => format!("/tmp/guix-build-{name}.drv-0"),
        }
    }

    /// The builder's uid and gid: Nix's sandbox user (1000, group 100), guix-daemon's user in
    /// its own user namespace (`guestUID` 30001, `guestGID` 30000).
    pub fn uid(self) -> u32 {
        match self {
            Daemon::Nix => 1000,
            Daemon::Guix => 30001,
        }
    }

    pub fn gid(self) -> u32 {
        match self {
            Daemon::Nix => 100,
            Daemon::Guix => 30000,
        }
    }

    /// `/etc/passwd` and `/etc/group` as each daemon writes them.
    fn passwd(self, build_dir: &str) -> String {
        let (uid, gid) = (self.uid(), self.gid());
        match self {
            Daemon::Nix => format!(
                "root:x:0:0:Nix build user:{build_dir}:/noshell\nnixbld:x:{uid}:{gid}:Nix build user:{build_dir}:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n"
            ),
            Daemon::Guix => {
                format!("nixbld:x:{uid}:{gid}:Nix build user:/:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n")
            }
        }
    }

    fn group(self) -> String {
        let gid = self.gid();
        match self {
            Daemon::Nix => format!("root:x:0:\nnixbld:!:{gid}:\nnogroup:x:65534:\n"),
            Daemon::Guix => format!("nixbld:!:{gid}:\n"),
        }
    }
}

/// Everything the sandbox helper needs; passed as JSON on its command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// An empty directory that becomes `/`.
    pub chroot: PathBuf,
    /// The build directory, seen at `build_dir_inside`.
    pub build_dir: PathBuf,
    /// Whose conventions the build follows.
    pub daemon: Daemon,
    /// Where the build directory appears ([`Daemon::build_dir`]).
    pub build_dir_inside: String,
    /// The logical store dir, e.g. `/gnu/store`.
    pub store_dir: String,
    /// Where store paths physically are.
    pub store_root: PathBuf,
    /// Base names of the store paths the build may see (its input closure).
    pub inputs: Vec<String>,
    /// Host paths the build sees read-only (the machine's `sandbox_paths`).
    pub paths: Vec<SandboxPath>,
    /// An empty directory, seen as `/tmp`.
    pub tmp_dir: PathBuf,
    /// Keep the host's network (fixed-output derivations only).
    pub network: bool,
    pub builder: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where to write the reason when the sandbox cannot be set up.
    pub error_file: PathBuf,
    /// When the agent runs as root: the unprivileged host user and group the builder runs as
    /// (mapped by the agent into the sandbox's user namespace, see [`map_build_user`]).
    #[serde(default)]
    pub build_user: Option<BuildUser>,
    /// A builtin builder to run in place of `builder` (see [`super::builtins`]).
    #[serde(default)]
    pub builtin: Option<super::builtins::Job>,
}

/// A host path a build sees, in Nix's `sandbox-paths` syntax: `TARGET` (the host's path of the
/// same name), `TARGET=SOURCE`, either with a trailing `?` when a missing source is to be skipped
/// (otherwise it is an error). Both paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPath {
    pub target: PathBuf,
    pub source: PathBuf,
    pub optional: bool,
}

impl SandboxPath {
    pub fn parse(spec: &str) -> Result<SandboxPath, String> {
        let (rest, optional) = match spec.strip_suffix('?') {
            Some(r) => (r, true),
            None => (spec, false),
        };
        let (target, source) = rest.split_once('=').unwrap_or((rest, rest));
        for p in [target, source] {
            if !p.starts_with('/') {
                return Err(format!("sandbox path {spec:?}: {p:?} is not an absolute path"));
            }
            if Path::new(p).components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(format!("sandbox path {spec:?}: {p:?} has a .. component"));
            }
        }
        if target == "/" {
            return Err(format!("sandbox path {spec:?}: the sandbox's root can't be a host path"));
        }
        Ok(SandboxPath { target: target.into(), source: source.into(), optional })
    }
}

impl std::fmt::Display for SandboxPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.target.display())?;
        if self.source != self.target {
            write!(f, "={}", self.source.display())?;
        }
        if self.optional {
            f.write_str("?")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for SandboxPath {
    type Err = String;
    fn from_str(s: &str) -> Result<SandboxPath, String> {
        SandboxPath::parse(s)
    }
}

/// A host uid and gid of no account, for one build at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildUser {
    pub uid: u32,
    pub gid: u32,
}

/// For a build user, the agent's half of entering the sandbox: stage 1 stops itself once it is in
/// its new user namespace; map the sandbox's root to the host's (to set the sandbox up) and
/// the daemon's build uid and gid to the build user (to run the builder), then let it go on. Only a
/// process privileged in the parent namespace may write such maps, hence the agent.
pub fn map_build_user(pid: u32, user: BuildUser, daemon: Daemon) -> io::Result<()> {
    use rustix::process::{Pid, Signal, WaitOptions, kill_process, waitpid};
    let p = Pid::from_raw(pid as i32).ok_or_else(|| io::Error::other("no sandbox process"))?;
    match waitpid(Some(p), WaitOptions::UNTRACED)? {
        Some((_, status)) if status.stopped() => {}
        other => {
            return Err(io::Error::other(format!(
                "the sandbox ended before its user namespace was mapped ({:?})",
                other.map(|(_, s)| s)
            )));
        }
    }
    let (uid, gid) = (daemon.uid(), daemon.gid());
    let mapped = fs::write(format!("/proc/{pid}/uid_map"), format!("0 0 1\n{uid} {} 1\n", user.uid))
        .and_then(|()| fs::write(format!("/proc/{pid}/gid_map"), format!("0 0 1\n{gid} {} 1\n", user.gid)));
    // Let it go on in any case: unmapped, it fails and says so.
    kill_process(p, Signal::CONT)?;
    mapped.map_err(|e| io::Error::new(e.kind(), format!("mapping the build user into the sandbox: {e}")))
}

/// The command that runs `spec`'s builder in a sandbox; the caller sets stdout/stderr.
pub fn command(spec: &SandboxSpec) -> io::Result<Command> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("__sandbox").arg(serde_json::to_string(spec).map_err(io::Error::other)?);
    cmd.env_clear().stdin(Stdio::null());
    Ok(cmd)
}

/// Exit code of the helper when the sandbox could not be set up (the reason is in the error file).
pub const SETUP_FAILED: u8 = 125;
/// Exit code of the helper when the builder could not be started (not there, not executable): a
/// fault of the derivation, which no other try will mend (the reason is in the error file).
pub const NO_BUILDER: u8 = 124;
/// Exit code of the helper when the builder, or the sandbox's init, was killed by a signal: not
/// the builder's own doing as far as anyone can tell (the reason is in the error file).
pub const KILLED: u8 = 123;
/// Exit code of the helper when a builtin builder failed (the reason is in the error file).
pub const BUILTIN_FAILED: u8 = 122;

fn fail(spec_error_file: &Path, stage: &str, e: &io::Error) -> ExitCode {
    let _ = fs::write(spec_error_file, format!("{stage}: {e}"));
    ExitCode::from(SETUP_FAILED)
}

/// The spec, or the exit of a stage that cannot even read it (there is no error file to write to).
fn parse(spec: &str, stage: &str) -> Result<SandboxSpec, ExitCode> {
    serde_json::from_str(spec).map_err(|e| {
        let _ = writeln!(io::stderr(), "gbc {stage}: {e}");
        ExitCode::from(SETUP_FAILED)
    })
}

/// Stage 1: enter the namespaces and start stage 2 as their PID 1.
pub fn stage1(spec_json: &str) -> ExitCode {
    let spec = match parse(spec_json, "__sandbox") {
        Ok(s) => s,
        Err(code) => return code,
    };
    match enter_namespaces(&spec) {
        Ok(()) => {}
        Err(e) => return fail(&spec.error_file, "entering namespaces", &e),
    }
    let status = Command::new("/proc/self/exe").arg("__sandbox-init").arg(spec_json).env_clear().status();
    match status {
        Ok(s) => exit_code(s, "the sandbox's init", |why| fs::write(&spec.error_file, why)),
        Err(e) => fail(&spec.error_file, "starting the sandbox's init", &e),
    }
}

/// Pass on how a child ended: its exit code, or, when a signal killed it, [`KILLED`] with the
/// reason written by `report`.
fn exit_code(s: std::process::ExitStatus, who: &str, report: impl FnOnce(String) -> io::Result<()>) -> ExitCode {
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => {
            let _ = report(format!("{who} was killed by signal {sig} ({})", signal_name(sig)));
            ExitCode::from(KILLED)
        }
        _ => ExitCode::from(1),
    }
}

/// `SIGKILL` for 9: the name `kill -l` gives, with the prefix.
fn signal_name(sig: i32) -> String {
    match rustix::process::Signal::from_named_raw(sig) {
        Some(s) => format!("{s:?}").replace("Signal::", "SIG"),
        None => format!("signal {sig}"),
    }
}

fn enter_namespaces(spec: &SandboxSpec) -> io::Result<()> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let mut flags = UnshareFlags::NEWUSER
        | UnshareFlags::NEWNS
        | UnshareFlags::NEWPID
        | UnshareFlags::NEWIPC
        | UnshareFlags::NEWUTS;
    if !spec.network {
        flags |= UnshareFlags::NEWNET;
    }
    super::sys::unshare_namespaces(flags)
        .map_err(|e| io::Error::new(e.kind(), format!("unshare: {e} (are user namespaces allowed on this host?)")))?;
    if spec.build_user.is_some() {
        // The agent maps root and the build user, then wakes this process.
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP)?;
        return match fs::read_to_string("/proc/self/uid_map") {
            Ok(map) if !map.trim().is_empty() => Ok(()),
            _ => Err(io::Error::other("the agent did not map the build user")),
        };
    }
    map_self(0, uid, 0, gid)
}

/// Map this process's user and group (`outer_*` in the parent user namespace) to `uid`/`gid` in the
/// user namespace it has just entered.
fn map_self(uid: u32, outer_uid: u32, gid: u32, outer_gid: u32) -> io::Result<()> {
    fs::write("/proc/self/setgroups", "deny")?;
    fs::write("/proc/self/uid_map", format!("{uid} {outer_uid} 1"))?;
    fs::write("/proc/self/gid_map", format!("{gid} {outer_gid} 1"))?;
    Ok(())
}

/// Leave root behind and become the build user: when the agent mapped one (it runs as root),
/// simply switch to it, dropping every capability; otherwise (only root is mapped) enter a nested
/// user namespace where this process is the build user.
fn become_build_user(spec: &SandboxSpec) -> io::Result<()> {
    if spec.build_user.is_some() {
        use rustix::process::{Gid, Uid};
        rustix::thread::set_thread_groups(&[])?;
        let gid = Gid::from_raw(spec.daemon.gid());
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
        let uid = Uid::from_raw(spec.daemon.uid());
        return Ok(rustix::thread::set_thread_res_uid(uid, uid, uid)?);
    }
    super::sys::unshare_namespaces(UnshareFlags::NEWUSER)?;
    map_self(spec.daemon.uid(), 0, spec.daemon.gid(), 0)
}

/// Stage 2, PID 1 of the sandbox: build the root, pivot into it, run the builder.
pub fn stage2(spec_json: &str) -> ExitCode {
    let spec = match parse(spec_json, "__sandbox-init") {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Open the error file now: after pivoting, its path is out of reach.
    let mut errors = match OpenOptions::new().write(true).create(true).truncate(true).open(&spec.error_file) {
        Ok(f) => f,
        Err(e) => return fail(&spec.error_file, "opening the error file", &e),
    };
    let mut setup_failed = |what: &str, e: io::Error| {
        let _ = write!(errors, "{what}: {e}");
        ExitCode::from(SETUP_FAILED)
    };
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)) {
        return setup_failed("setting the parent-death signal", e.into());
    }
    // A builtin's CA bundle, read while the host's files are still in sight.
    let ca = match spec.builtin.as_ref().and_then(|b| b.ca_file.as_ref()) {
        Some(file) => match fs::read(file) {
            Ok(pem) => Some(pem),
            Err(e) => return setup_failed(&format!("reading CA certificates {}", file.display()), e),
        },
        None => None,
    };
    if let Err(e) = build_root(&spec) {
        return setup_failed("setting up the sandbox", e);
    }
    if let Err(e) = become_build_user(&spec) {
        return setup_failed("becoming the build user", e);
    }
    // Changing credentials clears the parent-death signal: set it again, or killing stage 1 would
    // no longer end the build.
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)) {
        return setup_failed("setting the parent-death signal", e.into());
    }
    // The builder may not make setuid or setgid files (nor set extended attributes); it starts
    // with Nix's umask.
    if let Err(e) = super::seccomp::apply() {
        return setup_failed("restricting the builder's system calls", e);
    }
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    if let Some(job) = &spec.builtin {
        let env = spec.env.iter().cloned().collect();
        return match super::builtins::run(job, &env, ca.as_deref(), &mut io::stderr()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                let _ = write!(errors, "{}: {why}", spec.builder);
                ExitCode::from(BUILTIN_FAILED)
            }
        };
    }
    let mut cmd = Command::new(&spec.builder);
    cmd.args(&spec.args).env_clear().envs(spec.env.iter().map(|(k, v)| (k, v))).current_dir(&spec.build_dir_inside);
    cmd.stdin(Stdio::null());
    match cmd.status() {
        Ok(s) => exit_code(s, "the builder", |why| errors.write_all(why.as_bytes())),
        Err(e) => {
            let _ = write!(errors, "starting the builder {}: {e}", spec.builder);
            ExitCode::from(NO_BUILDER)
        }
    }
}

fn ctx<T>(r: rustix::io::Result<T>, what: impl FnOnce() -> String) -> io::Result<T> {
    r.map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", what())))
}

fn ioctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))
}

/// Bind `source` at `target` read-only, keeping the flags the kernel locks in a user namespace.
fn bind_read_only(source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
    let bind = if recursive { rustix::mount::mount_bind_recursive } else { rustix::mount::mount_bind };
    ctx(bind(source, target), || format!("bind-mounting {}", source.display()))?;
    remount_read_only(target)
}

/// Make the bind mount at `target` read-only.
fn remount_read_only(target: &Path) -> io::Result<()> {
    let locked = ctx(rustix::fs::statvfs(target), || format!("statvfs {}", target.display()))?.f_flag;
    let mut flags = MountFlags::BIND | MountFlags::RDONLY;
    for (have, want) in [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ] {
        if locked.contains(have) {
            flags |= want;
        }
    }
    ctx(rustix::mount::mount_remount(target, flags, ""), || format!("making {} read-only", target.display()))
}

/// Create a mount point at `target` of the same kind as `source` (or a symlink copy for symlinks);
/// returns whether `source` should be bind-mounted there.
fn make_mount_point(source: &Path, target: &Path) -> io::Result<bool> {
    let md = ioctx(fs::symlink_metadata(source), || format!("{}", source.display()))?;
    if let Some(parent) = target.parent() {
        ioctx(fs::create_dir_all(parent), || format!("creating {}", parent.display()))?;
    }
    if md.file_type().is_symlink() {
        let to = fs::read_link(source)?;
        ioctx(symlink(&to, target), || format!("creating symlink {}", target.display()))?;
        Ok(false)
    } else if md.is_dir() {
        ioctx(fs::create_dir_all(target), || format!("creating {}", target.display()))?;
        Ok(true)
    } else {
        ioctx(File::create(target), || format!("creating {}", target.display()))?;
        Ok(true)
    }
}

fn inside(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn build_root(spec: &SandboxSpec) -> io::Result<()> {
    let root = &spec.chroot;
    ctx(rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC), || {
        "making mounts private".to_owned()
    })?;
    // pivot_root needs the new root to be a mount point.
    ctx(rustix::mount::mount_bind(root, root), || format!("bind-mounting {}", root.display()))?;

    // An empty /tmp of the build's own, as in Nix's sandbox and guix-daemon's (builders are told
    // to use the build directory, through TMPDIR, but some write to /tmp regardless); Guix's
    // build directory is inside it.
    let tmp = inside(root, "/tmp");
    fs::create_dir_all(&tmp)?;
    ctx(rustix::mount::mount_bind(&spec.tmp_dir, &tmp), || "mounting /tmp".to_owned())?;

    let build = inside(root, &spec.build_dir_inside);
    fs::create_dir_all(&build)?;
    ctx(rustix::mount::mount_bind(&spec.build_dir, &build), || "mounting the build directory".to_owned())?;

    let store = inside(root, &spec.store_dir);
    ioctx(fs::create_dir_all(&store), || format!("creating {}", store.display()))?;
    // The store dir is its own (writable) mount, so the root can be made read-only below: every
    // file here belongs to the builder's uid (one uid is all an unprivileged user namespace maps),
    // so permissions alone could not keep the builder from writing outside its outputs.
    ctx(rustix::mount::mount_bind(&store, &store), || format!("bind-mounting {}", store.display()))?;
    if spec.build_user.is_some() {
        // As in Nix: the build user's group may add outputs; the sticky bit keeps it from the rest.
        std::os::unix::fs::chown(&store, Some(0), Some(spec.daemon.gid()))?;
        fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o1775))?;
    }
    for base in &spec.inputs {
        let source = spec.store_root.join(base);
        let target = store.join(base);
        if make_mount_point(&source, &target)? {
            bind_read_only(&source, &target, false)?;
        }
    }

    for p in &spec.paths {
        if let Err(e) = fs::symlink_metadata(&p.source) {
            if p.optional {
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("sandbox path {p}: {}: {e}", p.source.display())));
        }
        let target = inside(root, &p.target.to_string_lossy());
        if make_mount_point(&p.source, &target)? {
            bind_read_only(&p.source, &target, true)?;
        }
    }

    let proc = inside(root, "/proc");
    fs::create_dir_all(&proc)?;
    ctx(
        rustix::mount::mount("proc", &proc, "proc", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, None),
        || "mounting /proc".to_owned(),
    )?;

    let dev = inside(root, "/dev");
    fs::create_dir_all(&dev)?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let source = Path::new("/dev").join(name);
        if source.exists() {
            let target = dev.join(name);
            File::create(&target)?;
            ctx(rustix::mount::mount_bind(&source, &target), || format!("binding {}", source.display()))?;
        }
    }
    // Pseudo-terminals of the sandbox's own (a new devpts instance), as in Nix's sandbox.
    let pts = dev.join("pts");
    fs::create_dir_all(&pts)?;
    ctx(
        rustix::mount::mount(
            "none",
            &pts,
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some(c"newinstance,mode=0620,ptmxmode=0666"),
        ),
        || "mounting /dev/pts".to_owned(),
    )?;
    symlink("/dev/pts/ptmx", dev.join("ptmx"))?;
    let shm = dev.join("shm");
    fs::create_dir_all(&shm)?;
    ctx(
        rustix::mount::mount("none", &shm, "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, Some(c"mode=1777")),
        || "mounting /dev/shm".to_owned(),
    )?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(link))?;
    }

    let etc = inside(root, "/etc");
    fs::create_dir_all(&etc)?;
    fs::write(etc.join("passwd"), spec.daemon.passwd(&spec.build_dir_inside))?;
    fs::write(etc.join("group"), spec.daemon.group())?;
    fs::write(etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    if spec.network {
        // As in Nix, a fixed-output build resolves names as the host does.
        for file in ["resolv.conf", "hosts", "services"] {
            let host = Path::new("/etc").join(file);
            if host.exists() {
                ioctx(fs::copy(&host, etc.join(file)), || format!("copying {}", host.display()))?;
            }
        }
    }

    ctx(rustix::system::sethostname(b"localhost"), || "setting the host name".to_owned())?;
    if !spec.network {
        super::sys::loopback_up().map_err(|e| io::Error::new(e.kind(), format!("bringing up lo: {e}")))?;
    }
    remount_read_only(root)?;

    ctx(rustix::process::chdir(root), || "entering the new root".to_owned())?;
    ctx(rustix::process::pivot_root(".", "."), || "pivot_root".to_owned())?;
    ctx(rustix::mount::unmount(".", UnmountFlags::DETACH), || "detaching the old root".to_owned())?;
    ctx(rustix::process::chdir(spec.build_dir_inside.as_str()), || format!("entering {}", spec.build_dir_inside))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_paths_in_nix_s_syntax() {
        let p = |s: &str| SandboxPath::parse(s);
        assert_eq!(p("/bin"), Ok(SandboxPath { target: "/bin".into(), source: "/bin".into(), optional: false }));
        assert_eq!(
            p("/bin/sh=/nix/store/x-busybox/bin/sh?"),
            Ok(SandboxPath { target: "/bin/sh".into(), source: "/nix/store/x-busybox/bin/sh".into(), optional: true })
        );
        for s in ["/bin", "/lib64?", "/etc/ssl=/etc/ssl-build", "/a=/b?"] {
            assert_eq!(p(s).map(|x| x.to_string()), Ok(s.to_owned()));
        }
        for bad in ["bin", "/a=b", "/a/../etc", "/", "/=/x", ""] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }
}
