//! The client commands: `submit`, `watch`, `build`, `builds`, `show`, `log`, `cancel`, `machines`.
//! Each connects to the coordinator's socket, sends requests ([`crate::api`]) and prints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, IsTerminal as _, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::args::{ClientOpts, SubmitOpts};
use super::drv::{input_locations, read_first};
use super::realise::default_state_dir;
use super::remote;
use super::upload;
use super::{CheckFailed, check_failed};
use crate::api::{self, BuildDetail, BuildState, BuildSummary, DrvFile, Event, NoMachine, Reply, Request};
use crate::formats::derivation::Derivation;

/// A connection to the coordinator.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Where the coordinator is, and how to start one there (for the message when none listens).
fn address(opts: &ClientOpts) -> anyhow::Result<(remote::Address, String)> {
    let given =
        opts.coordinator.clone().map(|s| (s, "--coordinator")).or_else(|| {
            std::env::var("GBC_COORDINATOR").ok().filter(|s| !s.is_empty()).map(|s| (s, "GBC_COORDINATOR"))
        });
    if let Some((s, from)) = given {
        let addr = remote::parse(&s).map_err(|e| anyhow::anyhow!("{from}: {e}"))?;
        return Ok((addr, "gbc coordinator --state-dir <its state dir>".into()));
    }
    let dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()?,
    };
    Ok((remote::Address::Socket(dir.join("gbc.sock")), format!("gbc coordinator --state-dir {}", dir.display())))
}

impl Client {
    pub fn connect(opts: &ClientOpts) -> anyhow::Result<Client> {
        let (addr, start) = address(opts)?;
        let (stream, name) = match &addr {
            remote::Address::Socket(path) => {
                let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        anyhow::anyhow!("no coordinator is listening on {}; start one with: {start}", path.display())
                    }
                    _ => anyhow::Error::new(e).context(path.display().to_string()),
                })?;
                (stream, path.display().to_string())
            }
            remote::Address::Ssh(a) => (remote::connect(a, opts)?, a.to_string()),
        };
        let mut client = Client { reader: BufReader::new(stream.try_clone()?), writer: stream };
        match client.reply().with_context(|| format!("{name}: no greeting"))? {
            Reply::Hello { protocol, .. } if protocol == api::CLIENT_PROTOCOL_VERSION => Ok(client),
            Reply::Hello { protocol, gbc_version } => anyhow::bail!(
                "{name}: the coordinator (gbc {gbc_version}) speaks client protocol {protocol}, this gbc speaks {}",
                api::CLIENT_PROTOCOL_VERSION
            ),
            other => anyhow::bail!("{name}: unexpected greeting {other:?}"),
        }
    }

    pub fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line).context("sending to the coordinator")?;
        Ok(())
    }

    /// The next reply; an `error` reply becomes an error.
    pub fn reply(&mut self) -> anyhow::Result<Reply> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("reading from the coordinator")? == 0 {
            anyhow::bail!("the coordinator closed the connection");
        }
        match serde_json::from_str(&line).with_context(|| format!("bad reply from the coordinator: {}", line.trim()))? {
            Reply::Error { message } => Err(anyhow::Error::new(CheckFailed(message))),
            r => Ok(r),
        }
    }

    pub(super) fn read_bytes(&mut self, n: u64, out: &mut impl Write) -> anyhow::Result<()> {
        let copied = io::copy(&mut (&mut self.reader).take(n), out)?;
        if copied != n {
            anyhow::bail!("the coordinator closed the connection in the middle of a log");
        }
        Ok(())
    }

    pub(super) fn call(&mut self, request: &Request) -> anyhow::Result<Reply> {
        self.send(request)?;
        self.reply()
    }
}

pub(super) fn unexpected(r: &Reply) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from the coordinator: {r:?}")
}

/// Read each DRV and, recursively, its input derivations.
fn read_submission(drvs: &[PathBuf]) -> anyhow::Result<(Vec<DrvFile>, BTreeMap<String, String>)> {
    let mut files = Vec::with_capacity(drvs.len());
    let mut inputs: BTreeMap<String, String> = BTreeMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    for file in drvs {
        let aterm = read_aterm(file, &fs::read(file).with_context(|| file.display().to_string())?)?;
        let drv = Derivation::parse(aterm.as_bytes()).map_err(|e| check_failed(file.display(), e))?;
        let mut stack: Vec<String> = drv.input_drvs.keys().cloned().collect();
        while let Some(p) = stack.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            let bytes =
                read_first(&input_locations(file, &p)).with_context(|| format!("{}: input {p}", file.display()))?;
            let text = read_aterm(Path::new(&p), &bytes)?;
            let input = Derivation::parse(text.as_bytes()).map_err(|e| check_failed(&p, e))?;
            stack.extend(input.input_drvs.keys().filter(|k| !seen.contains(*k)).cloned());
            inputs.insert(p, text);
        }
        files.push(DrvFile { file: file.display().to_string(), aterm });
    }
    Ok((files, inputs))
}

fn read_aterm(file: &Path, bytes: &[u8]) -> anyhow::Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| check_failed(file.display(), "not a derivation: not UTF-8 text"))
}

/// What a submission gave: the client still connected, and the coordinator's answer.
pub(super) struct Submitted {
    pub(super) client: Client,
    pub(super) builds: Vec<String>,
    dependencies: Vec<String>,
    no_machine: Vec<NoMachine>,
    substitutable: Vec<String>,
    available: Vec<crate::api::Available>,
}

/// Send a submission, uploading first what the coordinator's cache lacks and this machine has.
pub(super) fn submit_with_uploads(client: &ClientOpts, opts: &SubmitOpts) -> anyhow::Result<Submitted> {
    let (derivations, inputs) = read_submission(&opts.drvs)?;
    let upload = !opts.no_upload;
    let local = if upload { Some((derivations.clone(), inputs.clone())) } else { None };
    let mut c = Client::connect(client)?;
    let request = Request::Submit {
        derivations,
        inputs,
        priority: opts.priority,
        tags: opts.tags.clone(),
        ignore_if_built: opts.ignore_if_built,
        upload,
        substitutes: !opts.no_substitutes,
        skip_substitutable: opts.skip_substitutable,
    };
    let mut reply = c.call(&request)?;
    if let (Reply::Wanted { paths }, Some((files, inputs))) = (&reply, &local) {
        c.upload(files, inputs, paths)?;
        reply = c.call(&Request::Uploaded)?;
    }
    match reply {
        Reply::Submitted { builds, dependencies, no_machine, substitutable, available } => {
            Ok(Submitted { client: c, builds, dependencies, no_machine, substitutable, available })
        }
        r => Err(unexpected(&r)),
    }
}

impl Client {
    /// Upload what the cache lacks of a submission's inputs and this machine has.
    fn upload(
        &mut self,
        files: &[DrvFile],
        inputs: &BTreeMap<String, String>,
        wanted: &[String],
    ) -> anyhow::Result<()> {
        if wanted.is_empty() {
            return Ok(());
        }
        // The coordinator accepted the submission, so this check passes; it gives the graph.
        let checked = crate::coordinator::submit::check(files, inputs)
            .map_err(|e| anyhow::Error::new(CheckFailed(e.to_string())))?;
        let (plan, left_out) =
            upload::plan(&checked, wanted, |paths| match self.call(&Request::Missing { paths })? {
                Reply::Missing { paths } => Ok(paths),
                r => Err(unexpected(&r)),
            })?;
        for p in &left_out {
            eprintln!(
                "gbc: not uploading {p}: it refers to paths that are neither in the coordinator's cache nor here"
            );
        }
        for local in &plan {
            self.send(&Request::AddPath {
                path: local.path.clone(),
                references: local.references.clone(),
                nar_size: local.nar_size,
            })?;
            let mut w = Exactly { w: io::BufWriter::with_capacity(1 << 20, &mut self.writer), left: local.nar_size };
            crate::formats::nar::dump_path(Path::new(&local.path), &mut w)
                .with_context(|| format!("uploading {}", local.path))?;
            if w.left != 0 {
                anyhow::bail!("uploading {}: it changed while it was being read", local.path);
            }
            w.w.flush().context("sending to the coordinator")?;
            drop(w);
            match self.reply()? {
                Reply::Added { .. } => {}
                r => return Err(unexpected(&r)),
            }
        }
        Ok(())
    }
}

/// A writer that takes exactly `left` more bytes.
struct Exactly<W: Write> {
    w: W,
    left: u64,
}

impl<W: Write> Write for Exactly<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::other("it changed while it was being read"));
        }
        let n = self.w.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

pub fn submit(client: &ClientOpts, opts: &SubmitOpts, json: bool) -> anyhow::Result<()> {
    let Submitted { builds, dependencies, no_machine, substitutable, available, .. } =
        submit_with_uploads(client, opts)?;
    let mut out = io::stdout().lock();
    if json {
        let all = serde_json::json!({
            "builds": builds,
            "dependencies": dependencies,
            "no_machine": no_machine,
            "substitutable": substitutable,
            "available": available,
        });
        writeln!(out, "{all}")?;
        return Ok(());
    }
    for b in builds {
        writeln!(out, "{b}")?;
    }
    if !substitutable.is_empty() {
        writeln!(io::stderr(), "gbc: {} inputs will come from substituters", substitutable.len())?;
    }
    for a in &available {
        writeln!(io::stderr(), "gbc: {}: available, not built", a.drv)?;
    }
    warn_no_machine(&no_machine)
}

fn no_machine_line(n: &NoMachine) -> String {
    format!("build {} ({}) waits: {}", n.build, short_drv(&n.drv), n.reason)
}

/// One warning line on standard error for each build no machine can take.
fn warn_no_machine(no_machine: &[NoMachine]) -> anyhow::Result<()> {
    let mut err = io::stderr().lock();
    for n in no_machine {
        writeln!(err, "gbc: warning: {}", no_machine_line(n))?;
    }
    Ok(())
}

/// How watch shows progress.
#[derive(Clone, Copy, PartialEq)]
enum Style {
    Json,
    Lines,
    /// Lines, plus a status line kept at the bottom of the terminal.
    Terminal,
}

struct Progress<W: Write> {
    out: W,
    style: Style,
    states: HashMap<String, BuildState>,
    status_shown: bool,
}

impl<W: Write> Progress<W> {
    fn event(&mut self, ev: &Event) -> io::Result<()> {
        let previous = self.states.insert(ev.build.clone(), ev.state);
        match self.style {
            Style::Json => {
                serde_json::to_writer(&mut self.out, ev)?;
                writeln!(self.out)?;
            }
            Style::Lines | Style::Terminal => {
                // A snapshot of a queued build says nothing new; don't flood the screen with them.
                if !(ev.snapshot && ev.state == BuildState::Queued) && previous != Some(ev.state) || ev.retry {
                    self.clear_status()?;
                    writeln!(self.out, "{}", describe_event(ev))?;
                }
                if self.style == Style::Terminal {
                    self.show_status()?;
                }
            }
        }
        self.out.flush()
    }

    fn clear_status(&mut self) -> io::Result<()> {
        if self.status_shown {
            write!(self.out, "\r\x1b[K")?;
            self.status_shown = false;
        }
        Ok(())
    }

    fn show_status(&mut self) -> io::Result<()> {
        self.clear_status()?;
        let count = |s: BuildState| self.states.values().filter(|&&v| v == s).count();
        write!(
            self.out,
            "[{} builds: {} queued, {} running, {} succeeded, {} failed, {} canceled]",
            self.states.len(),
            count(BuildState::Queued),
            count(BuildState::Running),
            count(BuildState::Succeeded),
            count(BuildState::Failed),
            count(BuildState::Canceled)
        )?;
        self.status_shown = true;
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.clear_status()?;
        self.out.flush()
    }

    /// Builds that did not succeed.
    fn unsuccessful(&self) -> usize {
        self.states.values().filter(|s| **s != BuildState::Succeeded).count()
    }
}

fn short_drv(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let name = base.split_once('-').map_or(base, |(_, name)| name);
    name.strip_suffix(".drv").unwrap_or(name)
}

fn describe_event(ev: &Event) -> String {
    let mut s = format!("{} {:<9} {} {}", clock(ev.at_ms), ev.state.as_str(), ev.build, short_drv(&ev.drv));
    if let Some(m) = &ev.machine
        && ev.state != BuildState::Queued
    {
        s.push_str(&format!(" on {m}"));
    }
    if let Some(r) = &ev.reason {
        let what = if ev.retry { "retrying after" } else { "" };
        s.push_str(&format!(": {what}{}{r}", if what.is_empty() { "" } else { " " }));
    }
    s
}

/// UTC time of day.
fn clock(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime("%H:%M:%S").to_string(),
        Err(_) => format!("{ms} ms"),
    }
}

/// UTC date and time, `YYYY-MM-DD HH:MM:SS`.
fn datetime(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => format!("{ms} ms"),
    }
}

/// Stream a watch to its end; returns how many watched builds did not succeed.
fn follow<W: Write>(c: &mut Client, builds: Vec<String>, progress: &mut Progress<W>) -> anyhow::Result<usize> {
    c.send(&Request::Watch { builds })?;
    loop {
        match c.reply()? {
            Reply::Event { event } => progress.event(&event)?,
            Reply::End => break,
            r => return Err(unexpected(&r)),
        }
    }
    progress.finish()?;
    Ok(progress.unsuccessful())
}

fn style(json: bool, terminal: bool) -> Style {
    if json {
        Style::Json
    } else if terminal {
        Style::Terminal
    } else {
        Style::Lines
    }
}

pub fn watch(client: &ClientOpts, uuids: Vec<String>, json: bool) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    let stdout = io::stdout();
    let style = style(json, stdout.is_terminal());
    let mut progress = Progress { out: stdout.lock(), style, states: HashMap::new(), status_shown: false };
    let bad = follow(&mut c, uuids, &mut progress)?;
    let total = progress.states.len();
    if bad > 0 {
        return Err(anyhow::Error::new(CheckFailed(format!("{bad} of {total} builds did not succeed"))));
    }
    Ok(())
}

pub fn build(client: &ClientOpts, opts: &SubmitOpts, json: bool, wait_for_machine: bool) -> anyhow::Result<()> {
    let Submitted { client: mut c, builds, dependencies: deps, no_machine, available, .. } =
        submit_with_uploads(client, opts)?;
    if let Some(first) = no_machine.first() {
        if !wait_for_machine {
            let more = match no_machine.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            return Err(anyhow::Error::new(CheckFailed(format!(
                "{}{more}; it stays queued until a machine can take it (gbc cancel drops it, --wait-for-machine waits)",
                no_machine_line(first)
            ))));
        }
        warn_no_machine(&no_machine)?;
    }
    let stderr = io::stderr();
    let style = style(json, stderr.is_terminal());
    let mut progress = Progress { out: stderr.lock(), style, states: HashMap::new(), status_shown: false };
    let mut watched = builds.clone();
    watched.extend(deps);
    follow(&mut c, watched, &mut progress)?;
    drop(progress);
    let mut failed = Vec::new();
    let mut out = io::stdout().lock();
    for a in &available {
        writeln!(io::stderr(), "gbc: {}: available, not built", a.drv)?;
        for path in a.outputs.values() {
            writeln!(out, "{path}")?;
        }
    }
    for uuid in &builds {
        let detail = show_detail(&mut c, uuid)?;
        if detail.summary.state == BuildState::Succeeded {
            for path in detail.outputs.values() {
                writeln!(out, "{path}")?;
            }
        } else {
            let why = detail.summary.reason.clone().unwrap_or_default();
            failed.push(format!("{} ({}) {}: {why}", uuid, short_drv(&detail.summary.drv), detail.summary.state));
        }
    }
    out.flush()?;
    match failed.len() {
        0 => Ok(()),
        1 => Err(anyhow::Error::new(CheckFailed(format!("build {}", failed[0])))),
        n => Err(anyhow::Error::new(CheckFailed(format!("{n} builds did not succeed; first: {}", failed[0])))),
    }
}

fn show_detail(c: &mut Client, uuid: &str) -> anyhow::Result<BuildDetail> {
    match c.call(&Request::Show { build: uuid.to_owned() })? {
        Reply::Build { build } => Ok(*build),
        r => Err(unexpected(&r)),
    }
}

pub fn builds(
    client: &ClientOpts,
    state: Option<BuildState>,
    tags: Vec<(String, String)>,
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    let list: Vec<BuildSummary> = match c.call(&Request::Builds { state, tags, limit: Some(limit) })? {
        Reply::Builds { builds } => builds,
        r => return Err(unexpected(&r)),
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        serde_json::to_writer(&mut out, &list)?;
        writeln!(out)?;
    } else {
        for b in &list {
            writeln!(
                out,
                "{}  {:<9}  {}  {:>4}  {}",
                b.uuid,
                b.state.as_str(),
                datetime(b.created_ms),
                b.priority,
                short_drv(&b.drv)
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

pub fn show(client: &ClientOpts, uuid: &str, json: bool) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    let d = show_detail(&mut c, uuid)?;
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &d)?;
        writeln!(out)?;
        return Ok(());
    }
    let s = &d.summary;
    writeln!(out, "build      {}", s.uuid)?;
    writeln!(out, "state      {}", s.state)?;
    if let Some(r) = &s.reason {
        writeln!(out, "reason     {r}")?;
    }
    if let Some(w) = &d.waiting_for_machine {
        writeln!(out, "waiting    {w}")?;
    }
    writeln!(out, "derivation {}", s.drv)?;
    writeln!(out, "system     {}", d.system)?;
    writeln!(out, "priority   {}", s.priority)?;
    for (k, v) in &s.tags {
        writeln!(out, "tag        {k}={v}")?;
    }
    writeln!(out, "submitted  {}", datetime(s.created_ms))?;
    if let Some(t) = s.started_ms {
        writeln!(out, "started    {}", datetime(t))?;
    }
    if let Some(t) = s.ended_ms {
        writeln!(out, "ended      {}", datetime(t))?;
    }
    for (name, path) in &d.outputs {
        writeln!(out, "output     {name} {path}")?;
    }
    for dep in &d.dependencies {
        writeln!(out, "depends on {dep}")?;
    }
    for path in &d.from_substituters {
        writeln!(out, "upstream   {path}")?;
    }
    for a in &d.attempt_list {
        let status = a.status.map_or("running", |s| s.as_str());
        write!(out, "attempt {}  on {}, {}, {status}", a.n, a.machine, datetime(a.started_ms))?;
        if let Some(r) = &a.reason {
            write!(out, ": {r}")?;
        }
        writeln!(out)?;
        for o in &a.outputs {
            writeln!(out, "  {} {} {} {} bytes", o.name, o.path, o.nar_hash, o.nar_size)?;
            writeln!(out, "    signed {}", o.signature)?;
        }
    }
    Ok(())
}

pub fn log(client: &ClientOpts, uuid: &str, attempt: Option<u32>, no_follow: bool) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    c.send(&Request::Log { build: uuid.to_owned(), attempt, follow: !no_follow, cancel_if_left: false })?;
    let mut out = super::raw_stdout()?;
    loop {
        match c.reply()? {
            Reply::Log { bytes } => c.read_bytes(bytes, &mut out)?,
            Reply::End => return Ok(()),
            r => return Err(unexpected(&r)),
        }
    }
}

pub fn cancel(client: &ClientOpts, uuids: &[String]) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    for u in uuids {
        match c.call(&Request::Cancel { build: u.clone() })? {
            Reply::Canceled { .. } => {}
            r => return Err(unexpected(&r)),
        }
    }
    Ok(())
}

pub fn machines(client: &ClientOpts, json: bool) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    let list = match c.call(&Request::Machines)? {
        Reply::Machines { machines } => machines,
        r => return Err(unexpected(&r)),
    };
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &list)?;
        writeln!(out)?;
        return Ok(());
    }
    for m in &list {
        write!(
            out,
            "{}  {} since {}  running {}/{}  speed {}  {}",
            m.name,
            m.state,
            datetime(m.since_ms),
            m.running.len(),
            m.parallel_builds,
            m.speed,
            m.systems.join(",")
        )?;
        if let Some(l) = m.load1 {
            write!(out, "  load {l:.2}")?;
        }
        if let Some(f) = m.free_space {
            write!(out, "  {:.1} GiB free", f as f64 / f64::from(1u32 << 30))?;
        }
        if let Some(h) = &m.held_back {
            write!(out, "  no new builds: {h}")?;
        }
        if let Some(e) = &m.last_error {
            write!(out, "  last error: {e}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

pub fn hooks(client: &ClientOpts, json: bool) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    let list = match c.call(&Request::Hooks)? {
        Reply::Hooks { hooks } => hooks,
        r => return Err(unexpected(&r)),
    };
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &list)?;
        writeln!(out)?;
        return Ok(());
    }
    if list.is_empty() {
        writeln!(out, "no hooks (coordinator.ron's hooks: see coordinator.ron(5))")?;
    }
    for h in &list {
        let events: Vec<&str> = h.events.iter().map(|e| e.as_str()).collect();
        let events = if events.is_empty() { "every event".to_owned() } else { events.join(",") };
        write!(
            out,
            "{}  {}  backlog {}  running {}  given up {}  runs {}  failures {}",
            h.name, events, h.backlog, h.running, h.given_up, h.runs, h.failures
        )?;
        if !h.configured {
            write!(out, "  (no longer configured)")?;
        }
        if let Some(e) = &h.last_error {
            write!(out, "  last error: {e}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

pub fn hooks_retry(client: &ClientOpts, name: &str) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    match c.call(&Request::HooksRetry { hook: name.to_owned() })? {
        Reply::HooksRetried { hook, events } => {
            println!("{hook}: {events} events to run again");
            Ok(())
        }
        r => Err(unexpected(&r)),
    }
}

pub fn stats(client: &ClientOpts, reset: bool) -> anyhow::Result<()> {
    let mut c = Client::connect(client)?;
    match c.call(&Request::Stats { reset })? {
        Reply::Stats { stats } => {
            println!("{}", serde_json::to_string(&stats)?);
            Ok(())
        }
        r => Err(unexpected(&r)),
    }
}

pub fn cache_gc(client: &ClientOpts, keep_since: std::time::Duration) -> anyhow::Result<()> {
    let keep_since_ms = api::now_ms().saturating_sub(i64::try_from(keep_since.as_millis()).unwrap_or(i64::MAX));
    let mut c = Client::connect(client)?;
    match c.call(&Request::CacheGc { keep_since_ms })? {
        Reply::CacheGc { gc } => {
            println!(
                "removed {} narinfos and {} NARs ({:.1} MB); kept {} narinfos",
                gc.removed_narinfos,
                gc.removed_nars,
                gc.freed_bytes as f64 / 1e6,
                gc.kept_narinfos
            );
            Ok(())
        }
        Reply::Error { message } => anyhow::bail!("{message}"),
        r => Err(unexpected(&r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        // date -u -d @1795000000 +'%F %T'
        assert_eq!(datetime(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00");
    }
}
