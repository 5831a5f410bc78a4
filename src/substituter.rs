//! Upstream binary caches (substituters): which store paths they have, and their NARs, taken into
//! gbc's cache only once checked. Blocking (ureq over rustls, kept-alive connections shared by
//! every thread); the coordinator runs it on blocking threads.
//!
//! An upstream narinfo counts when it parses, names the store path asked for, comes from a cache
//! whose `nix-cache-info` gives the cache's own store dir, has a compression gbc reads, and carries
//! a valid signature by a trusted key (a Nix `Sig:` or a Guix `Signature:`, see
//! [`narinfo::verify_text`]). Its NAR counts when it decompresses to a well-formed NAR with the
//! narinfo's NarHash and NarSize; only then is it published in the cache, with upstream's `Sig:`
//! lines (and the cache's own signature when asked). Answers are remembered, hits for the
//! positive TTL and misses for the negative one, as Nix's narinfo cache does. An upstream that
//! fails (connection, server error, a bad NAR) is skipped for a while (60 s × 3ⁿ, at most an
//! hour), said once in the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::{Cache, Output, StagedNar, Tee};
use crate::formats::hash::PipelinedHashSink;
use crate::formats::narinfo::{self, NarInfo};
use crate::formats::signing::TrustedKeys;
use crate::formats::store_path::StoreDir;

/// How many narinfo lookups, and NAR downloads, run at once.
const LOOKUP_THREADS: usize = 16;
const FETCH_THREADS: usize = 4;
/// Answers remembered before the expired ones are dropped.
const MEMO_PRUNE_AT: usize = 200_000;
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A path an upstream has: its checked narinfo.
#[derive(Debug, Clone)]
pub struct Found {
    /// The upstream's URL.
    pub upstream: String,
    pub info: NarInfo,
}

impl Found {
    /// The full store path.
    pub fn path(&self) -> String {
        self.info.store_dir.display(&self.info.store_path)
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub lookups: AtomicU64,
    pub hits: AtomicU64,
    pub refused: AtomicU64,
    pub failures: AtomicU64,
    pub fetched_bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct Health {
    /// None until `nix-cache-info` was read; then whether its store dir is the cache's.
    store_dir_ok: Option<bool>,
    failures: u32,
    skip_until: Option<Instant>,
}

struct Upstream {
    url: String,
    health: Mutex<Health>,
}

/// What one upstream said about one path.
enum Answer {
    Has(Box<Found>),
    /// It does not have it, or what it has does not check out (remembered like a miss).
    Lacks,
    /// It could not be asked (not remembered).
    Failed,
}

/// (upstream index, hash part) → when it was asked, and what it said.
type Memo = HashMap<(usize, String), (Instant, Option<Arc<Found>>)>;

pub struct Substituter {
    upstreams: Vec<Upstream>,
    keys: TrustedKeys,
    store_dir: StoreDir,
    positive_ttl: Duration,
    negative_ttl: Duration,
    sign: bool,
    agent: ureq::Agent,
    memo: Mutex<Memo>,
    /// Paths being substituted now, and a wake-up for who waits for them.
    inflight: Mutex<BTreeSet<String>>,
    settled: std::sync::Condvar,
    /// Shared by the substituters that replace each other when the settings change.
    pub stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Substituter {
    /// The substituters of `settings` (in priority order, trusting its keys) for a store of
    /// `store_dir`.
    pub fn new(settings: &crate::coordinator_file::Settings, store_dir: StoreDir) -> Substituter {
        Substituter::with_stats(settings, store_dir, Arc::default())
    }

    fn with_stats(settings: &crate::coordinator_file::Settings, store_dir: StoreDir, stats: Arc<Stats>) -> Substituter {
        // Certificates are always checked (without a CA bundle, HTTPS substituters fail).
        let ca = crate::build::builtins::ca_file().and_then(|p| std::fs::read(p).ok());
        let (tls, _) = crate::build::builtins::http::tls_config(ca.as_deref(), true);
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(5)
            .max_idle_connections_per_host(LOOKUP_THREADS)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("gbc/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Substituter {
            upstreams: settings
                .substituters
                .iter()
                .map(|u| Upstream { url: u.clone(), health: Mutex::new(Health::default()) })
                .collect(),
            keys: settings.substituter_keys.clone(),
            store_dir,
            positive_ttl: settings.narinfo_ttl,
            negative_ttl: settings.narinfo_negative_ttl,
            sign: settings.sign_substitutes,
            agent,
            memo: Mutex::new(HashMap::new()),
            inflight: Mutex::new(BTreeSet::new()),
            settled: std::sync::Condvar::new(),
            stats,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The keys upstream narinfos must be signed by.
    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }

    /// Each upstream's URL, and whether it is being asked (false while backed off, or when its
    /// store dir is not the cache's).
    pub fn health(&self) -> Vec<(String, bool)> {
        let now = Instant::now();
        self.upstreams
            .iter()
            .map(|u| {
                let h = lock(&u.health);
                (u.url.clone(), h.store_dir_ok != Some(false) && h.skip_until.is_none_or(|t| t <= now))
            })
            .collect()
    }

    /// Which of `paths` some upstream has (the first in priority order that does), asked in
    /// parallel. Paths outside the cache's store dir are never found.
    pub fn query(&self, paths: &[String]) -> BTreeMap<String, Arc<Found>> {
        let next = AtomicUsize::new(0);
        let found = Mutex::new(BTreeMap::new());
        std::thread::scope(|s| {
            for _ in 0..LOOKUP_THREADS.min(paths.len()) {
                s.spawn(|| {
                    while let Some(path) = paths.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if let Some(f) = self.lookup(path) {
                            lock(&found).insert(path.clone(), f);
                        }
                    }
                });
            }
        });
        found.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remember an answer, dropping the expired ones once there are many.
    fn remember(&self, key: (usize, String), said: Option<Arc<Found>>) {
        let mut memo = lock(&self.memo);
        if memo.len() >= MEMO_PRUNE_AT {
            let (positive, negative) = (self.positive_ttl, self.negative_ttl);
            memo.retain(|_, (at, said)| at.elapsed() < if said.is_some() { positive } else { negative });
        }
        memo.insert(key, (Instant::now(), said));
    }

    /// One path, upstream by upstream.
    fn lookup(&self, path: &str) -> Option<Arc<Found>> {
        let store_path = self.store_dir.parse_path(path).ok()?;
        let hash = store_path.hash_part().to_owned();
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = (i, hash.clone());
            if let Some((at, said)) = lock(&self.memo).get(&key) {
                let ttl = if said.is_some() { self.positive_ttl } else { self.negative_ttl };
                if at.elapsed() < ttl {
                    match said {
                        Some(f) => return Some(f.clone()),
                        None => continue,
                    }
                }
            }
            match self.ask(up, path, &hash) {
                Answer::Has(f) => {
                    let f = Arc::new(*f);
                    self.remember(key, Some(f.clone()));
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(f);
                }
                Answer::Lacks => self.remember(key, None),
                Answer::Failed => {}
            }
        }
        None
    }

    /// Whether `up` may be asked now (not backed off, its store dir checked).
    fn usable(&self, up: &Upstream) -> bool {
        let (checked, skipped) = {
            let h = lock(&up.health);
            (h.store_dir_ok, h.skip_until.is_some_and(|t| Instant::now() < t))
        };
        if skipped {
            return false;
        }
        if let Some(ok) = checked {
            return ok;
        }
        let url = format!("{}/nix-cache-info", up.url);
        let text = match self.get_text(&url) {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.failed(up, "it has no nix-cache-info");
                return false;
            }
            Err(e) => {
                self.failed(up, &e);
                return false;
            }
        };
        let theirs = text.lines().find_map(|l| l.strip_prefix("StoreDir:")).map(str::trim).unwrap_or("/nix/store");
        let ok = theirs == self.store_dir.as_str();
        if !ok {
            tracing::warn!(
                "substituter {}: its store dir is {theirs}, the cache's {}: not used",
                up.url,
                self.store_dir.as_str()
            );
        }
        lock(&up.health).store_dir_ok = Some(ok);
        ok
    }

    fn ask(&self, up: &Upstream, path: &str, hash: &str) -> Answer {
        if !self.usable(up) {
            return Answer::Failed;
        }
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let text = match self.get_text(&format!("{}/{hash}.narinfo", up.url)) {
            Ok(Some(t)) => t,
            Ok(None) => return Answer::Lacks,
            Err(e) => {
                self.failed(up, &e);
                return Answer::Failed;
            }
        };
        self.recovered(up);
        match self.check(&text, path) {
            Ok(info) => Answer::Has(Box::new(Found { upstream: up.url.clone(), info })),
            Err(why) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("substituter {}: {path}: {why}; not used", up.url);
                Answer::Lacks
            }
        }
    }

    /// Whether an upstream narinfo counts for `path`.
    fn check(&self, text: &str, path: &str) -> Result<NarInfo, String> {
        let info = NarInfo::parse(text).map_err(|e| format!("narinfo: {e}"))?;
        if info.store_dir != self.store_dir || info.store_dir.display(&info.store_path) != path {
            return Err(format!("the narinfo is for {}", info.store_dir.display(&info.store_path)));
        }
        narinfo::verify_text(text, &self.keys).map_err(|e| e.to_string())?;
        // A compression gbc can't read makes the narinfo useless: ask for the reader now.
        crate::cache::decompressing(info.compression.as_deref(), io::empty()).map_err(|e| e.to_string())?;
        Ok(info)
    }

    /// GET a small text: Ok(None) on 404, 403 and 410.
    fn get_text(&self, url: &str) -> Result<Option<String>, String> {
        let response = self.agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        if matches!(status, 403 | 404 | 410) {
            return Ok(None);
        }
        if status != 200 {
            return Err(format!("{url}: HTTP {status}"));
        }
        let mut body = response.into_body();
        body.with_config().limit(1 << 20).read_to_string().map(Some).map_err(|e| format!("{url}: {e}"))
    }

    fn failed(&self, up: &Upstream, why: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let mut h = lock(&up.health);
        let backoff = FIRST_BACKOFF.saturating_mul(3u32.saturating_pow(h.failures)).min(MAX_BACKOFF);
        h.failures = h.failures.saturating_add(1);
        h.skip_until = Some(Instant::now() + backoff);
        tracing::warn!("substituter {}: {why}; not asked for {}s", up.url, backoff.as_secs());
    }

    fn recovered(&self, up: &Upstream) {
        let mut h = lock(&up.health);
        h.failures = 0;
        h.skip_until = None;
    }

    /// Which upstream paths the closure of `paths` needs that the target lacks (`has` says what
    /// it has): `paths` and, through upstream references, every path they refer to; references
    /// before what refers to them. Err names a path no upstream has.
    pub fn closure(&self, paths: &[String], has: impl Fn(&str) -> bool) -> Result<Vec<Arc<Found>>, String> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::new();
        let mut level: Vec<String> = paths.iter().filter(|p| !has(p)).cloned().collect();
        while !level.is_empty() {
            level.retain(|p| seen.insert(p.clone()));
            let found = self.query(&level);
            let mut next = Vec::new();
            for p in &level {
                let f = found.get(p).ok_or_else(|| format!("{p}: no substituter has it"))?;
                for r in &f.info.references {
                    let r = f.info.store_dir.display(r);
                    if r != *p && !seen.contains(&r) && !has(&r) {
                        next.push(r);
                    }
                }
                out.push(f.clone());
            }
            level = next;
        }
        Ok(references_first(out))
    }

    /// Take the closure of `paths` from upstream into `cache`: every NAR downloaded, decompressed
    /// and checked, then published together. Returns the paths published. Nothing of a path
    /// whose NAR fails is kept, and then nothing is published.
    pub fn substitute(&self, paths: &[String], cache: &Cache) -> Result<Vec<String>, String> {
        let wanted = self.closure(paths, |p| cache.has(p))?;
        let _claim = self.claim(wanted.iter().map(|f| f.path()).collect());
        // Skip what another call published while this one waited.
        self.fetch_all(wanted.into_iter().filter(|f| !cache.has(&f.path())).collect(), cache)
    }

    /// Take one path from upstream into `cache`, every byte of its NAR also written to `tee` as it
    /// arrives (a build host's transfer: the host checks the NAR against its hash itself, so it
    /// need not wait for the cache's check). The cache publishes it once its references are there
    /// (they come first, in a closure's order). Ok(false): another call took it into the cache
    /// while this one waited, and nothing was written to `tee`. Err: the upstream failed (it is
    /// backed off) or the cache could not stage it; what `tee` got is then not the NAR.
    pub fn substitute_teeing(&self, f: &Found, cache: &Cache, tee: &mut (dyn Write + Send)) -> Result<bool, String> {
        let path = f.path();
        let _claim = self.claim(vec![path.clone()]);
        if cache.has(&path) {
            return Ok(false);
        }
        let one = self.stage(f, cache, tee)?;
        cache.publish(vec![one]).map_err(|e| format!("publishing {path}: {e}"))?;
        Ok(true)
    }

    /// Download `f`'s NAR into the cache's staging area, checked against its narinfo, every byte
    /// of the NAR also written to `tee`. Kept compressed as upstream served it when the cache can
    /// serve that (no second compression, and the compressed file's hash is the only extra work);
    /// recompressed otherwise.
    fn stage(&self, f: &Found, cache: &Cache, tee: &mut (dyn Write + Send)) -> Result<(Output, StagedNar), String> {
        let served = cache.begin_as_served(f.info.compression.as_deref()).map_err(|e| format!("staging a NAR: {e}"))?;
        let Some(mut kept) = served else {
            let (nar, url) = self.open_nar(f)?;
            return self.check_staged(f, &url, cache.stage_nar(Tee { r: nar, w: tee }));
        };
        let (body, url) = self.open_body(f)?;
        let mut body = Tee { r: body, w: &mut kept };
        let nar = (|| {
            let nar = crate::cache::decompressing(f.info.compression.as_deref(), &mut body)?;
            let nar = Tee { r: AtMost { inner: nar, left: f.info.nar_size }, w: tee };
            let (hash, _) = crate::cache::check_nar(nar, PipelinedHashSink::new()?, false)?;
            // The file must hold exactly the compressed NAR: nothing after it.
            if body.read(&mut [0u8; 1])? != 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bytes follow the compressed NAR"));
            }
            hash.finish()
        })();
        let staged = nar.and_then(|(nar_hash, nar_size)| kept.finish(nar_hash, nar_size));
        self.check_staged(f, &url, staged)
    }

    /// Claim `names` all at once (never some while waiting for others: no deadlock), waiting while
    /// another call substitutes any of them; released when the claim is dropped.
    fn claim(&self, names: Vec<String>) -> Claim<'_> {
        let mut inflight = lock(&self.inflight);
        while names.iter().any(|n| inflight.contains(n)) {
            inflight = self.settled.wait(inflight).unwrap_or_else(PoisonError::into_inner);
        }
        inflight.extend(names.iter().cloned());
        Claim { s: self, names }
    }

    fn fetch_all(&self, wanted: Vec<Arc<Found>>, cache: &Cache) -> Result<Vec<String>, String> {
        let next = AtomicUsize::new(0);
        let staged = Mutex::new(Vec::new());
        let failed = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..FETCH_THREADS.min(wanted.len()) {
                s.spawn(|| {
                    while let Some(f) = wanted.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if lock(&failed).is_some() {
                            return;
                        }
                        match self.fetch(f, cache) {
                            Ok(one) => lock(&staged).push(one),
                            Err(e) => {
                                lock(&failed).get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            return Err(e);
        }
        let staged = staged.into_inner().unwrap_or_else(PoisonError::into_inner);
        cache.publish(staged).map_err(|e| format!("publishing substitutes: {e}"))
    }

    /// The body of `f`'s NAR as upstream serves it (compressed as its narinfo says), and its URL.
    fn open_body(&self, f: &Found) -> Result<(impl Read + Send + '_, String), String> {
        let info = &f.info;
        let url = if info.url.starts_with("http://") || info.url.starts_with("https://") {
            info.url.clone()
        } else if info.url.contains("://") {
            return Err(format!("{}: NAR URL {:?} is neither http nor https", f.path(), info.url));
        } else {
            format!("{}/{}", f.upstream, info.url.trim_start_matches('/'))
        };
        let response = self.agent.get(&url).call().map_err(|e| self.failed_at(f, format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.failed_at(f, format!("{url}: HTTP {status}")));
        }
        Ok((CountingReader { inner: response.into_body().into_reader(), count: &self.stats.fetched_bytes }, url))
    }

    /// The NAR of `f`, decompressed as it is read (not checked: the reader's consumer compares
    /// what it gets with the narinfo), and its URL for messages.
    pub fn open_nar(&self, f: &Found) -> Result<(Box<dyn Read + Send + '_>, String), String> {
        let (body, url) = self.open_body(f)?;
        let nar =
            crate::cache::decompressing(f.info.compression.as_deref(), body).map_err(|e| format!("{url}: {e}"))?;
        // Nothing past the narinfo's NarSize is read: an endless stream fills no disk.
        Ok((Box::new(AtMost { inner: nar, left: f.info.nar_size }), url))
    }

    /// Note that the upstream `f` came from failed (it is backed off); returns `why`.
    pub fn failed_at(&self, f: &Found, why: String) -> String {
        if let Some(up) = self.upstreams.iter().find(|u| u.url == f.upstream) {
            self.failed(up, &why);
        }
        why
    }

    /// Download one NAR into the cache's staging area, checked against its narinfo.
    fn fetch(&self, f: &Found, cache: &Cache) -> Result<(Output, StagedNar), String> {
        self.stage(f, cache, &mut io::sink())
    }

    /// The outcome of staging `f`'s NAR from `url`: checked against its narinfo, with the output
    /// record to publish it under.
    fn check_staged(&self, f: &Found, url: &str, staged: io::Result<StagedNar>) -> Result<(Output, StagedNar), String> {
        let (info, path) = (&f.info, f.path());
        let staged = staged.map_err(|e| self.failed_at(f, format!("{url}: {e}")))?;
        if staged.nar_hash != info.nar_hash || staged.nar_size != info.nar_size {
            return Err(self.failed_at(
                f,
                format!(
                    "{url}: the NAR is not the one its narinfo describes ({} bytes, {}; the narinfo says {} bytes, {})",
                    staged.nar_size,
                    staged.nar_hash.to_nix32_string(),
                    info.nar_size,
                    info.nar_hash.to_nix32_string()
                ),
            ));
        }
        let out = Output {
            path,
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.iter().map(|r| info.store_dir.display(r)).collect(),
            deriver: info.deriver.as_ref().map(|d| info.store_dir.display(d)),
            system: info.system.clone(),
            signatures: info.sigs.clone(),
            cache_signs: self.sign,
            ca: None,
        };
        Ok((out, staged))
    }
}

/// Order found paths so that each comes after those of the set it refers to.
fn references_first(found: Vec<Arc<Found>>) -> Vec<Arc<Found>> {
    crate::cache::references_first_by(
        found,
        |f| f.path(),
        |f| f.info.references.iter().map(|r| f.info.store_dir.display(r)).collect(),
    )
}

/// The substituters in force, replaced when the settings change.
pub struct Substituters {
    current: std::sync::RwLock<Arc<Substituter>>,
    store_dir: StoreDir,
}

impl Substituters {
    pub fn new(settings: &crate::coordinator_file::Settings, store_dir: StoreDir) -> Substituters {
        Substituters {
            current: std::sync::RwLock::new(Arc::new(Substituter::new(settings, store_dir.clone()))),
            store_dir,
        }
    }

    pub fn get(&self) -> Arc<Substituter> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// New settings: a new substituter (what the old one remembered is forgotten).
    pub fn update(&self, settings: &crate::coordinator_file::Settings) {
        let stats = self.get().stats.clone();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Substituter::with_stats(settings, self.store_dir.clone(), stats));
    }
}

/// A claim on paths being substituted (see [`Substituter::claim`]).
struct Claim<'a> {
    s: &'a Substituter,
    names: Vec<String>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.s.inflight);
        for n in &self.names {
            inflight.remove(n);
        }
        self.s.settled.notify_all();
    }
}

/// Reads `left` bytes at most; a byte more is an error.
struct AtMost<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for AtMost<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(io::ErrorKind::InvalidData, "the NAR is longer than its narinfo's NarSize")),
            };
        }
        let most = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..most])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Counts bytes as they are read.
struct CountingReader<'a, R> {
    inner: R,
    count: &'a AtomicU64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
