//! The binary cache: every verified output stored once, as a compressed NAR with a signed narinfo,
//! in the standard layout Nix and Guix clients read (`nix-cache-info`, `<hashpart>.narinfo`,
//! `nar/<filehash>.nar[.zst|.xz|.lz]`).
//!
//! Writes are atomic: a NAR is compressed into `.tmp/` while it arrives ([`NarWriter`]), synced,
//! and renamed into `nar/` under the name of its compressed file's hash; a narinfo is written to a
//! temporary file and renamed. A narinfo appears only once the narinfos of all its references
//! exist (Nix's closure invariant): the outputs of one build are published together, and an output
//! whose other references are missing waits in `.pending/` until they arrive.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::formats::hash::{Hash, HashSink, PipelinedHashSink, hex};
use crate::formats::nar::{Event, NarError, NarReader};
use crate::formats::narinfo::NarInfo;
use crate::formats::signing::{SecretKey, Signature};
use crate::formats::store_path::{ContentAddress, StoreDir, StorePath};
use crate::fsio::DropBehind;
use crate::store::{with_path, write_atomically};

/// How NARs are compressed in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// zstd at level 3, as `zstd -3`.
    Zstd,
    /// xz at level 6, as `xz` and Nix's default: smaller, several times slower.
    Xz,
    /// lzip at level 6, as `lzip` and `guix publish -C lzip` (LZMA like xz, Guix's usual choice).
    Lzip,
}

impl Compression {
    pub const ALL: [Compression; 4] = [Compression::None, Compression::Zstd, Compression::Xz, Compression::Lzip];

    /// The narinfo's `Compression:` value.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Lzip => "lzip",
        }
    }

    /// The compression a narinfo's `Compression:` value names, if the cache serves it.
    pub fn from_name(name: &str) -> Option<Compression> {
        Compression::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The NAR file's name ends with this.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => ".nar",
            Compression::Zstd => ".nar.zst",
            Compression::Xz => ".nar.xz",
            Compression::Lzip => ".nar.lz",
        }
    }
}

/// One path to publish: what the build host said about it, checked.
#[derive(Debug, Clone)]
pub struct Output {
    pub path: String,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub system: Option<String>,
    /// Signatures kept beside the cache's own: the building host's, or upstream's.
    pub signatures: Vec<Signature>,
    /// Whether the cache signs it too (everything but what came from a substituter that the
    /// cache is not told to sign).
    pub cache_signs: bool,
    /// How a content-addressed path (an uploaded source) was made, for the narinfo's `CA`.
    pub ca: Option<ContentAddress>,
}

/// A cache directory and the key it signs with.
pub struct Cache {
    root: PathBuf,
    store_dir: StoreDir,
    key: SecretKey,
    compression: Compression,
    /// Guix's signing key and the host name its signatures give, for Guix clients.
    guix: Option<(crate::formats::guix_ecdsa::SecretKey, String)>,
    /// Held by publishing and by GC: a NAR is in `nar/` a moment before its narinfo is written.
    lock: std::sync::Mutex<()>,
}

impl Cache {
    /// Open (creating) the cache at `root`: its directories, a `nix-cache-info` for `store_dir`,
    /// and an empty `.tmp/` (what a crash left there is dropped).
    pub fn open(root: &Path, store_dir: StoreDir, key: SecretKey, compression: Compression) -> io::Result<Cache> {
        for d in ["nar", ".tmp", ".pending"] {
            fs::create_dir_all(root.join(d)).map_err(|e| with_path(e, &root.join(d)))?;
        }
        for entry in fs::read_dir(root.join(".tmp"))? {
            let _ = fs::remove_file(entry?.path());
        }
        let info = format!("StoreDir: {}\nWantMassQuery: 1\nPriority: 40\n", store_dir.as_str());
        let path = root.join("nix-cache-info");
        if fs::read_to_string(&path).ok().as_deref() != Some(info.as_str()) {
            write_atomically(&path, info.as_bytes())?;
        }
        Ok(Cache { root: root.to_owned(), store_dir, key, compression, guix: None, lock: std::sync::Mutex::new(()) })
    }

    /// Also sign every narinfo in Guix's format (`Signature:`, after Nix's `Sig:` lines) with `key`,
    /// naming `host` as `guix publish` names itself.
    /// Whether narinfos and exports are signed for Guix too ([`Cache::with_guix_key`]).
    pub fn has_guix_key(&self) -> bool {
        self.guix.is_some()
    }

    /// The Guix signature of an export item whose SHA-256 is `hash`
    /// ([`crate::formats::gcrypt::export_signature`]); None without a Guix key.
    pub fn guix_export_signature(&self, hash: &[u8; 32]) -> Option<String> {
        self.guix.as_ref().map(|(key, _)| crate::formats::gcrypt::export_signature(hash, key))
    }

    pub fn with_guix_key(mut self, key: crate::formats::guix_ecdsa::SecretKey, host: String) -> Cache {
        self.guix = Some((key, host));
        self
    }

    /// A narinfo's text as published: Nix's fields and signatures, then Guix's signature of all of
    /// that when the cache has a Guix key.
    fn narinfo_text(&self, info: &NarInfo) -> io::Result<String> {
        // The cache vouches in Guix's format for what it vouches for in Nix's: not for a substitute
        // it was not told to sign (whose upstream `Signature:` covered upstream's text, not this).
        let vouched = info.sigs.iter().any(|s| s.key_name() == self.key.name());
        match &self.guix {
            Some((key, host)) if vouched => {
                let mut info = info.clone();
                info.sign_guix(key, host).map_err(|e| invalid(e.to_string()))?;
                Ok(info.to_string())
            }
            _ => Ok(info.to_string()),
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    fn narinfo_path(&self, path: &StorePath) -> PathBuf {
        self.root.join(format!("{}.narinfo", path.hash_part()))
    }

    /// Whether the cache has this store path (its narinfo is published).
    pub fn has(&self, path: &str) -> bool {
        self.store_dir.parse_path(path).is_ok_and(|p| self.narinfo_path(&p).exists())
    }

    /// Hold the lock publishing takes, as a long publication does (for tests of what waits on it).
    #[cfg(test)]
    pub(crate) fn hold_publishing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Start receiving a NAR: compressed to a temporary file as it is written.
    pub fn begin(&self) -> io::Result<NarWriter> {
        let (sink, tmp) = self.temp_file(true)?;
        let inner = match self.compression {
            Compression::None => Inner::Plain(sink),
            Compression::Zstd => Inner::Zstd(zstd::stream::write::Encoder::new(sink, 3)?),
            Compression::Xz => Inner::Xz(liblzma::write::XzEncoder::new(sink, 6)),
            Compression::Lzip => {
                Inner::Lzip(Box::new(lzma_rust2::LzipWriter::new(sink, lzma_rust2::LzipOptions::with_preset(6))))
            }
        };
        // The NAR is hashed on a helper thread while this one compresses.
        Ok(NarWriter {
            inner: Some(inner),
            nar: Some(PipelinedHashSink::new()?),
            tmp: Some(tmp),
            compression: self.compression,
        })
    }

    /// A new file in `.tmp/` (removed by the caller's drop), hashed as it is written when `hashed`.
    fn temp_file(&self, hashed: bool) -> io::Result<(FileSink, PathBuf)> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
        let tmp = self.root.join(".tmp").join(format!("{}.nar", hex::encode(&r)));
        let file = File::create(&tmp).map_err(|e| with_path(e, &tmp))?;
        let hash = hashed.then(HashSink::new);
        let file = io::BufWriter::with_capacity(256 * 1024, DropBehind::new(file));
        Ok((FileSink { file, hash, written: 0, path: tmp.clone() }, tmp))
    }

    /// Keep a NAR as an upstream cache served it, compressed with `compression`, when the cache
    /// can serve that (no second compression): the compressed bytes are written to the returned
    /// writer as they come, while the caller decompresses them and checks the NAR inside (its
    /// hash and size go to [`ServedWriter::finish`]). `None`: the cache recompresses it
    /// ([`Cache::stage_nar`]).
    pub fn begin_as_served(&self, compression: Option<&str>) -> io::Result<Option<ServedWriter>> {
        let Some(compression) = Compression::from_name(compression.unwrap_or("none")) else { return Ok(None) };
        // An uncompressed file is the NAR: its hash is the NAR's, computed anyway.
        let (sink, tmp) = self.temp_file(compression != Compression::None)?;
        Ok(Some(ServedWriter { sink: Some(sink), tmp: Some(tmp), compression }))
    }

    /// Receive a NAR from a party that is not trusted to send a well-formed one, when its contents'
    /// own hash does not matter (an upstream's NAR): checked against the NAR grammar as it is staged.
    pub fn stage_nar(&self, r: impl io::Read) -> io::Result<StagedNar> {
        let (writer, _) = check_nar(r, self.begin()?, false)?;
        writer.finish()
    }

    /// Receive a NAR from a party that is not trusted to send a well-formed one (a client's upload):
    /// every byte is checked against the NAR grammar while it is staged. Also returns the SHA-256 of
    /// the file's contents when the NAR is one non-executable regular file (what a text path is
    /// made from).
    pub fn stage_checked(&self, r: impl io::Read) -> io::Result<(StagedNar, Option<[u8; 32]>)> {
        let (writer, flat) = check_nar(r, self.begin()?, true)?;
        Ok((writer.finish()?, flat))
    }

    /// Publish the outputs of one build: each NAR renamed into `nar/`, then the narinfos, each
    /// once all its references are in the cache or among these outputs; the others wait in
    /// `.pending/`. Returns the paths published now (these, and any that were waiting for them).
    pub fn publish(&self, outputs: Vec<(Output, StagedNar)>) -> io::Result<Vec<String>> {
        let _guard = self.lock.lock().map_err(|_| io::Error::other("cache lock poisoned"))?;
        let mut infos = Vec::new();
        for (out, staged) in outputs {
            if out.nar_hash != staged.nar_hash || out.nar_size != staged.nar_size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: the NAR received is not the one described", out.path),
                ));
            }
            infos.push(self.store_nar(&out, staged)?);
        }
        // Ready: every reference in the cache or among the ready ones (to a fixpoint: what refers
        // to a waiting path waits too).
        let mut here: BTreeSet<String> = infos.iter().map(|i| i.store_path.as_str().to_owned()).collect();
        loop {
            let held: Vec<String> = infos
                .iter()
                .filter(|i| here.contains(i.store_path.as_str()) && !self.references_present(i, &here))
                .map(|i| i.store_path.as_str().to_owned())
                .collect();
            if held.is_empty() {
                break;
            }
            for h in held {
                here.remove(&h);
            }
        }
        let (ready, waiting): (Vec<NarInfo>, Vec<NarInfo>) =
            infos.into_iter().partition(|i| here.contains(i.store_path.as_str()));
        // References first, so that a crash between two renames leaves no narinfo without its
        // references' (except within a cycle of mutual references).
        let ready = references_first(ready);
        for info in &waiting {
            write_atomically(
                &self.root.join(".pending").join(format!("{}.narinfo", info.store_path.hash_part())),
                self.narinfo_text(info)?.as_bytes(),
            )?;
        }
        let mut published = Vec::new();
        for info in &ready {
            write_atomically(&self.narinfo_path(&info.store_path), self.narinfo_text(info)?.as_bytes())?;
            published.push(self.store_dir.display(&info.store_path));
        }
        if !ready.is_empty() {
            published.extend(self.release_pending()?);
        }
        Ok(published)
    }

    /// Remove every narinfo outside the closure of `roots`, then every NAR no remaining (or
    /// pending) narinfo names. Narinfos go first, so a client never finds one whose NAR is gone.
    pub fn gc(&self, roots: &[String]) -> io::Result<crate::api::GcReport> {
        let _guard = self.lock.lock().map_err(|_| io::Error::other("cache lock poisoned"))?;
        let (live, _) = self.closure(roots)?;
        let live: BTreeSet<String> = live.iter().map(|i| format!("{}.narinfo", i.store_path.hash_part())).collect();
        let mut report = crate::api::GcReport::default();
        let mut wanted = BTreeSet::new();
        for dir in [self.root.clone(), self.root.join(".pending")] {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".narinfo") {
                    continue;
                }
                if dir == self.root && !live.contains(&name) {
                    fs::remove_file(entry.path()).map_err(|e| with_path(e, &entry.path()))?;
                    report.removed_narinfos += 1;
                    continue;
                }
                if let Ok(info) =
                    fs::read_to_string(entry.path()).map_err(|_| ()).and_then(|t| NarInfo::parse(&t).map_err(|_| ()))
                {
                    wanted.insert(info.url.trim_start_matches("nar/").to_owned());
                }
                if dir == self.root {
                    report.kept_narinfos += 1;
                }
            }
        }
        File::open(&self.root)?.sync_all()?;
        for entry in fs::read_dir(self.root.join("nar"))? {
            let entry = entry?;
            if !wanted.contains(entry.file_name().to_string_lossy().as_ref()) {
                report.freed_bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(|e| with_path(e, &entry.path()))?;
                report.removed_nars += 1;
            }
        }
        File::open(self.root.join("nar"))?.sync_all()?;
        Ok(report)
    }

    /// The published narinfo of a store path, if any.
    pub fn narinfo(&self, path: &str) -> io::Result<Option<NarInfo>> {
        let Ok(p) = self.store_dir.parse_path(path) else { return Ok(None) };
        let file = self.narinfo_path(&p);
        match fs::read_to_string(&file) {
            Ok(text) => NarInfo::parse(&text).map(Some).map_err(|e| invalid(format!("{}: {e}", file.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, &file)),
        }
    }

    /// The narinfos of `paths` and of everything they refer to, references first; and the paths
    /// of that closure the cache lacks.
    pub fn closure(&self, paths: &[String]) -> io::Result<(Vec<NarInfo>, Vec<String>)> {
        let mut seen = BTreeSet::new();
        let mut found = Vec::new();
        let mut missing = Vec::new();
        // Depth-first, emitting a path after its references (iteratively: closures can be deep).
        let mut stack: Vec<(String, bool)> = paths.iter().rev().map(|p| (p.clone(), false)).collect();
        let mut infos = std::collections::BTreeMap::new();
        while let Some((path, expanded)) = stack.pop() {
            if expanded {
                if let Some(info) = infos.remove(&path) {
                    found.push(info);
                }
                continue;
            }
            if !seen.insert(path.clone()) {
                continue;
            }
            match self.narinfo(&path)? {
                None => missing.push(path),
                Some(info) => {
                    stack.push((path.clone(), true));
                    for r in info.references.iter().rev() {
                        let r = self.store_dir.display(r);
                        if r != path && !seen.contains(&r) {
                            stack.push((r, false));
                        }
                    }
                    infos.insert(path, info);
                }
            }
        }
        Ok((found, missing))
    }

    /// `paths` and every path of the cache they refer to, directly or not.
    pub fn with_closure(&self, paths: &[String]) -> io::Result<BTreeSet<String>> {
        let (infos, _) = self.closure(paths)?;
        let mut all: BTreeSet<String> = paths.iter().cloned().collect();
        all.extend(infos.iter().map(|i| self.store_dir.display(&i.store_path)));
        Ok(all)
    }

    /// The NAR of a published path, decompressed as it is read.
    pub fn open_nar(&self, info: &NarInfo) -> io::Result<Box<dyn io::Read + Send>> {
        let name = info.url.strip_prefix("nar/").filter(|n| !n.contains('/') && !n.starts_with('.'));
        let Some(name) = name else { return Err(invalid(format!("narinfo URL {:?} is not in nar/", info.url))) };
        let file = self.root.join("nar").join(name);
        let f = File::open(&file).map_err(|e| with_path(e, &file))?;
        decompressing(info.compression.as_deref(), f).map_err(|e| invalid(format!("{}: {e}", file.display())))
    }

    fn references_present(&self, info: &NarInfo, alongside: &BTreeSet<String>) -> bool {
        info.references
            .iter()
            .all(|r| r == &info.store_path || alongside.contains(r.as_str()) || self.narinfo_path(r).exists())
    }

    /// Publish the waiting narinfos whose references have all arrived, until none moves.
    fn release_pending(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            let mut moved = false;
            for entry in fs::read_dir(self.root.join(".pending"))? {
                let entry = entry?;
                let Ok(text) = fs::read_to_string(entry.path()) else { continue };
                let Ok(info) = NarInfo::parse(&text) else { continue };
                if self.references_present(&info, &BTreeSet::new()) {
                    fs::rename(entry.path(), self.narinfo_path(&info.store_path))?;
                    out.push(self.store_dir.display(&info.store_path));
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        if !out.is_empty() {
            File::open(&self.root)?.sync_all()?;
        }
        Ok(out)
    }

    /// Move a staged NAR into `nar/` and describe it.
    fn store_nar(&self, out: &Output, mut staged: StagedNar) -> io::Result<NarInfo> {
        let path = self.store_dir.parse_path(&out.path).map_err(|e| invalid(e.to_string()))?;
        let compression = staged.compression;
        let name = format!("{}{}", staged.file_hash.to_nix32(), compression.extension());
        let dest = self.root.join("nar").join(&name);
        let tmp = staged.tmp.take().ok_or_else(|| invalid("NAR already published".into()))?;
        if dest.exists() {
            // The same compressed bytes (its name is their hash): keep the one there.
            let _ = fs::remove_file(&tmp);
        } else {
            fs::rename(&tmp, &dest).map_err(|e| with_path(e, &dest))?;
            File::open(self.root.join("nar"))?.sync_all()?;
        }
        let parse = |p: &str| self.store_dir.parse_path(p).map_err(|e| invalid(format!("{p}: {e}")));
        let mut references = out.references.iter().map(|r| parse(r)).collect::<io::Result<Vec<_>>>()?;
        references.sort();
        let mut info = NarInfo {
            store_dir: self.store_dir.clone(),
            store_path: path,
            url: format!("nar/{name}"),
            compression: Some(compression.name().to_owned()),
            file_hash: Some(staged.file_hash.clone()),
            file_size: Some(staged.file_size),
            nar_hash: out.nar_hash.clone(),
            nar_size: out.nar_size,
            references,
            deriver: out.deriver.as_deref().map(parse).transpose()?,
            system: out.system.clone(),
            sigs: out.signatures.clone(),
            ca: out.ca.as_ref().map(ToString::to_string),
            extra: Vec::new(),
            guix_signature: None,
        };
        if out.cache_signs {
            info.sign(&self.key).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(info)
    }
}

/// Order narinfos so that each comes after those of the batch it refers to (cycles broken
/// anywhere).
fn references_first(infos: Vec<NarInfo>) -> Vec<NarInfo> {
    references_first_by(infos, |i| i.store_path.clone(), |i| i.references.clone())
}

/// Order `items` so that each comes after those of them it refers to (`refs`, by `key`; cycles
/// broken anywhere).
pub(crate) fn references_first_by<T, K: Ord + Clone>(
    items: Vec<T>,
    key: impl Fn(&T) -> K,
    refs: impl Fn(&T) -> Vec<K>,
) -> Vec<T> {
    let mut by_key: std::collections::BTreeMap<K, T> = items.into_iter().map(|i| (key(&i), i)).collect();
    let roots: Vec<K> = by_key.keys().cloned().collect();
    let mut out = Vec::with_capacity(roots.len());
    let mut entered = BTreeSet::new();
    for root in roots {
        let mut stack = vec![(root, false)];
        while let Some((k, done)) = stack.pop() {
            if done {
                out.extend(by_key.remove(&k));
                continue;
            }
            if !entered.insert(k.clone()) {
                continue;
            }
            stack.push((k.clone(), true));
            if let Some(item) = by_key.get(&k) {
                stack.extend(refs(item).into_iter().filter(|r| by_key.contains_key(r)).map(|r| (r, false)));
            }
        }
    }
    out
}

/// Pass a NAR from a party not trusted to send a well-formed one (a client's upload, a build
/// host's output) through `sink`, checking every byte against the NAR grammar on the way. Returns
/// the sink, and, when `flat` asks for it, the SHA-256 of the file's contents when the NAR is one
/// non-executable regular file (what a text path is made from: only uploads need it, and it costs
/// a pass over the contents). A NAR that breaks the grammar is an `InvalidData` error; an error of
/// the sink (a full disk) keeps its own kind.
pub fn check_nar<W: Write>(r: impl io::Read, sink: W, flat: bool) -> io::Result<(W, Option<[u8; 32]>)> {
    let mut nar = NarReader::new(Tee { r, w: sink });
    let mut flat_hash = None;
    let mut first = flat;
    loop {
        let event = match nar.next_event() {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(NarError::Io { source, .. }) => return Err(source),
            Err(e) => return Err(invalid(e.to_string())),
        };
        if let (true, Event::Regular { executable: false, mut contents, .. }) = (first, event) {
            let mut h = HashSink::new();
            contents.copy_to(&mut h).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => invalid(e.to_string()),
                _ => e,
            })?;
            flat_hash = h.finish().0.digest().try_into().ok();
        }
        first = false;
    }
    Ok((nar.into_inner().w, flat_hash))
}

/// A reader that writes what it reads.
pub(crate) struct Tee<R, W> {
    pub r: R,
    pub w: W,
}

impl<R: io::Read, W: Write> io::Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

struct FileSink {
    file: io::BufWriter<DropBehind<File>>,
    /// None when the file's hash is known otherwise (an uncompressed NAR's is the NAR's).
    hash: Option<HashSink>,
    written: u64,
    /// For errors: a full disk names the file it could not write.
    path: PathBuf,
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf).map_err(|e| with_path(e, &self.path))?;
        if let Some(h) = &mut self.hash {
            h.write_all(&buf[..n])?;
        }
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush().map_err(|e| with_path(e, &self.path))
    }
}

impl FileSink {
    /// Complete and sync the file; its hash (`None` when it was not hashed) and size.
    fn finish(self) -> io::Result<(Option<(Hash, u64)>, u64)> {
        let FileSink { file, hash, written, path } = self;
        let file = file.into_inner().map_err(|e| with_path(e.into_error(), &path))?.into_inner();
        file.sync_all().map_err(|e| with_path(e, &path))?;
        Ok((hash.map(HashSink::finish), written))
    }
}

/// A NAR being kept as an upstream served it (see [`Cache::begin_as_served`]).
pub struct ServedWriter {
    sink: Option<FileSink>,
    tmp: Option<PathBuf>,
    compression: Compression,
}

impl Write for ServedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.as_mut().ok_or_else(|| io::Error::other("NAR writer finished"))?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ServedWriter {
    /// End it, given the hash and size of the NAR its bytes decompress to (the caller checked).
    pub fn finish(mut self, nar_hash: Hash, nar_size: u64) -> io::Result<StagedNar> {
        let sink = self.sink.take().ok_or_else(|| io::Error::other("NAR writer finished"))?;
        let (file_hash, file_size) = match sink.finish()? {
            (Some(hashed), _) => hashed,
            (None, size) if size == nar_size => (nar_hash.clone(), size),
            (None, size) => {
                return Err(invalid(format!("{size} bytes were kept of an uncompressed NAR of {nar_size} bytes")));
            }
        };
        let compression = self.compression;
        Ok(StagedNar { tmp: self.tmp.take(), nar_hash, nar_size, file_hash, file_size, compression })
    }
}

impl Drop for ServedWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

enum Inner {
    Plain(FileSink),
    Zstd(zstd::stream::write::Encoder<'static, FileSink>),
    Xz(liblzma::write::XzEncoder<FileSink>),
    Lzip(Box<lzma_rust2::LzipWriter<FileSink>>),
}

/// A NAR being received into the cache: hashed as it is, and compressed to a temporary file.
pub struct NarWriter {
    inner: Option<Inner>,
    nar: Option<PipelinedHashSink>,
    tmp: Option<PathBuf>,
    compression: Compression,
}

impl Write for NarWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            Some(Inner::Plain(s)) => s.write(buf)?,
            Some(Inner::Zstd(z)) => z.write(buf)?,
            Some(Inner::Xz(x)) => x.write(buf)?,
            Some(Inner::Lzip(l)) => l.write(buf)?,
            None => return Err(io::Error::other("NAR writer finished")),
        };
        match &mut self.nar {
            Some(h) => h.write_all(&buf[..n])?,
            None => return Err(io::Error::other("NAR writer finished")),
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NarWriter {
    /// End the NAR: the compressed file complete and synced, its hashes known.
    pub fn finish(mut self) -> io::Result<StagedNar> {
        let sink = match self.inner.take() {
            Some(Inner::Plain(s)) => s,
            Some(Inner::Zstd(z)) => z.finish()?,
            Some(Inner::Xz(x)) => x.finish()?,
            Some(Inner::Lzip(l)) => (*l).finish()?,
            None => return Err(io::Error::other("NAR writer finished")),
        };
        let (hashed, _) = sink.finish()?;
        let (file_hash, file_size) = hashed.ok_or_else(|| io::Error::other("the NAR file was not hashed"))?;
        let (nar_hash, nar_size) = self.nar.take().ok_or_else(|| io::Error::other("NAR writer finished"))?.finish()?;
        let compression = self.compression;
        Ok(StagedNar { tmp: self.tmp.take(), nar_hash, nar_size, file_hash, file_size, compression })
    }
}

impl Drop for NarWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// A received NAR, compressed, waiting to be published or dropped (dropping deletes it).
#[derive(Debug)]
pub struct StagedNar {
    tmp: Option<PathBuf>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub file_hash: Hash,
    pub file_size: u64,
    /// The file's compression: the cache's, or what an upstream served.
    pub compression: Compression,
}

impl Drop for StagedNar {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// A reader of the NAR inside `body`, compressed as a narinfo's `Compression:` says (what Nix and
/// Guix caches use: none, xz, zstd, bzip2, lzip, gzip; concatenated streams are read through).
pub fn decompressing<'a>(
    compression: Option<&str>,
    body: impl io::Read + Send + 'a,
) -> io::Result<Box<dyn io::Read + Send + 'a>> {
    let body = io::BufReader::with_capacity(256 * 1024, body);
    Ok(match compression {
        None | Some("none") => Box::new(body),
        Some("xz") => Box::new(liblzma::read::XzDecoder::new_multi_decoder(body)),
        Some("zstd") => Box::new(zstd::stream::read::Decoder::with_buffer(body)?),
        Some("bzip2") => Box::new(bzip2::bufread::MultiBzDecoder::new(body)),
        Some("lzip") => Box::new(lzma_rust2::LzipReader::new(body)),
        Some("gzip") => Box::new(flate2::bufread::MultiGzDecoder::new(body)),
        Some(other) => return Err(invalid(format!("compression {other:?} is not one gbc reads"))),
    })
}

/// Read `r` to its end in pieces of `size` bytes (the last may be shorter), handing each to
/// `f`; stops early, with Ok, when `f` returns false (its receiver is gone).
pub fn for_each_chunk(r: &mut impl io::Read, size: usize, mut f: impl FnMut(Vec<u8>) -> bool) -> io::Result<()> {
    loop {
        let mut chunk = vec![0u8; size];
        let mut n = 0;
        while n < size {
            match r.read(&mut chunk[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            return Ok(());
        }
        chunk.truncate(n);
        if !f(chunk) {
            return Ok(());
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::formats::nar::writer;
    use crate::formats::signing::TrustedKeys;

    fn cache(dir: &Path, compression: Compression) -> Cache {
        let key = SecretKey::generate("test-cache-1").unwrap_or_else(|e| unreachable!("{e}"));
        let sd = StoreDir::new("/nix/store").unwrap_or_else(|e| unreachable!("{e}"));
        Cache::open(dir, sd, key, compression).unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// A NAR of one file, staged in the cache, and its description.
    fn stage(c: &Cache, path: &str, contents: &[u8], references: &[&str]) -> (Output, StagedNar) {
        let mut nar = Vec::new();
        writer::begin(&mut nar)
            .and_then(|n| n.regular(false, contents.len() as u64, contents))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut w = c.begin().unwrap_or_else(|e| unreachable!("{e}"));
        w.write_all(&nar).unwrap_or_else(|e| unreachable!("{e}"));
        let staged = w.finish().unwrap_or_else(|e| unreachable!("{e}"));
        let out = Output {
            path: path.to_owned(),
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: references.iter().map(|r| (*r).to_owned()).collect(),
            deriver: None,
            system: Some("x86_64-linux".into()),
            signatures: Vec::new(),
            cache_signs: true,
            ca: None,
        };
        (out, staged)
    }

    const A: &str = "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a";
    const B: &str = "/nix/store/5g0nzi9sd5gk6n8bsmwnmmq5d4y0qqqs-b";
    const C: &str = "/nix/store/7l1x3zy3rw8k4j0i0q6pk2p2x7avq0jj-c";

    #[test]
    fn a_narinfo_waits_for_its_references() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let c = cache(dir.path(), Compression::Zstd);
        // b refers to a, which is not in the cache yet: b waits.
        let b = stage(&c, B, b"b", &[A, B]);
        assert_eq!(c.publish(vec![b]).unwrap_or_else(|e| unreachable!("{e}")), Vec::<String>::new());
        assert!(!c.has(B));
        // c and a arrive together (a build's outputs may refer to each other): both, then b.
        let a = stage(&c, A, b"a", &[C]);
        let cc = stage(&c, C, b"c", &[A]);
        let mut published = c.publish(vec![a, cc]).unwrap_or_else(|e| unreachable!("{e}"));
        published.sort();
        let mut want = vec![A, B, C];
        want.sort_unstable();
        assert_eq!(published, want);
        assert!(c.has(A) && c.has(B) && c.has(C));
        assert_eq!(fs::read_dir(dir.path().join(".pending")).map(|d| d.count()).unwrap_or(1), 0);
        assert_eq!(fs::read_dir(dir.path().join(".tmp")).map(|d| d.count()).unwrap_or(1), 0);

        // Each narinfo is signed by the cache's key and names its compressed NAR by its hash.
        let text = fs::read_to_string(dir.path().join("5g0nzi9sd5gk6n8bsmwnmmq5d4y0qqqs.narinfo")).unwrap_or_default();
        let info = NarInfo::parse(&text).unwrap_or_else(|e| unreachable!("{e}"));
        let trusted = TrustedKeys::new(vec![c.key().public()]);
        assert!(info.verify(&trusted).ok().flatten().is_some());
        let file = fs::read(dir.path().join(&info.url)).unwrap_or_default();
        assert_eq!(Some(Hash::sha256(crate::formats::hash::sha256(&file))), info.file_hash);
        assert_eq!(zstd::decode_all(&file[..]).map(|n| n.len() as u64).ok(), Some(info.nar_size));
    }

    #[test]
    fn what_refers_to_a_waiting_path_waits_too() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let c = cache(dir.path(), Compression::None);
        // a refers to c (absent); b refers to a: neither may appear before c does.
        let a = stage(&c, A, b"a", &[C]);
        let b = stage(&c, B, b"b", &[A]);
        assert_eq!(c.publish(vec![b, a]).unwrap_or_else(|e| unreachable!("{e}")), Vec::<String>::new());
        assert!(!c.has(A) && !c.has(B));
        let cc = stage(&c, C, b"c", &[]);
        let mut published = c.publish(vec![cc]).unwrap_or_else(|e| unreachable!("{e}"));
        published.sort();
        assert_eq!(published, [A, B, C]);
    }

    #[test]
    fn references_come_first() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let c = cache(dir.path(), Compression::None);
        let sd = c.store_dir().clone();
        let info = |p: &str, refs: &[&str]| {
            let (o, s) = stage(&c, p, p.as_bytes(), refs);
            c.store_nar(&o, s).unwrap_or_else(|e| unreachable!("{e}"))
        };
        // b → a → c, given in the worst order.
        let ordered = references_first(vec![info(B, &[A]), info(A, &[C, A]), info(C, &[])]);
        let names: Vec<String> = ordered.iter().map(|i| sd.display(&i.store_path)).collect();
        assert_eq!(names, [C, A, B]);
    }

    #[test]
    fn every_compression_reads_back_as_the_nar() {
        for compression in Compression::ALL {
            let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
            let c = cache(dir.path(), compression);
            let contents = b"some contents ".repeat(1000);
            let (out, staged) = stage(&c, A, &contents, &[]);
            let published = c.publish(vec![(out.clone(), staged)]).unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(published, [A]);
            let info = c.narinfo(A).ok().flatten().unwrap_or_else(|| unreachable!("no narinfo"));
            assert_eq!(info.compression.as_deref(), Some(compression.name()));
            assert!(info.url.ends_with(compression.extension()), "{}", info.url);
            let mut nar = Vec::new();
            c.open_nar(&info)
                .and_then(|mut r| r.read_to_end(&mut nar))
                .unwrap_or_else(|e| unreachable!("{compression:?}: {e}"));
            let mut sink = HashSink::new();
            sink.write_all(&nar).unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(sink.finish(), (out.nar_hash, out.nar_size), "{compression:?}");
        }
    }

    #[test]
    fn a_nar_that_is_not_the_one_described_is_not_published_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let c = cache(dir.path(), Compression::None);
        let (mut out, staged) = stage(&c, A, b"a", &[]);
        out.nar_size += 1;
        assert!(c.publish(vec![(out, staged)]).is_err());
        assert!(!c.has(A));
        assert_eq!(fs::read_dir(dir.path().join(".tmp")).map(|d| d.count()).unwrap_or(1), 0);
        assert_eq!(fs::read_dir(dir.path().join("nar")).map(|d| d.count()).unwrap_or(1), 0);
        // A writer dropped half-way leaves nothing either.
        let mut w = c.begin().unwrap_or_else(|e| unreachable!("{e}"));
        w.write_all(b"partial").unwrap_or_else(|e| unreachable!("{e}"));
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join(".tmp")).map(|d| d.count()).unwrap_or(1), 0);
    }
}
