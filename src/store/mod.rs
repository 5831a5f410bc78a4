//! The local store of a build host: store paths kept under a physical root directory (which builds
//! see at their logical store dir, `/gnu/store`, `/nix/store`, ...), and a record for each valid path.
//!
//! A path is valid exactly when its record exists. Records are written (temporary file, fsync,
//! rename, fsync of the directory) only after the path's contents are complete and synced, so a
//! crash mid-unpack or mid-build leaves nothing marked valid; contents without a record are stale and
//! are removed before the path is made again.
//!
//! Layout under the root: `<hash>-<name>` (the paths themselves), `.gbc-db/<hash>-<name>.json` (the
//! records), `.gbc-tmp/` (build directories and unpacking, on the same file system so outputs move
//! into place with a rename). Names starting with a dot are never store paths, so nothing clashes.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::formats::hash::hex;
use crate::formats::store_path::{StoreDir, StorePath};

/// What is known about a valid store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    /// Full logical path, e.g. `/gnu/store/<hash>-hello-2.12`.
    pub path: String,
    /// `sha256:<nix32>` of the NAR.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full logical paths, sorted.
    pub references: Vec<String>,
    /// The `.drv` that built it, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<String>,
}

/// What opening a store another process holds says (`gbc machines test` recognises it in an
/// agent's last words).
pub const IN_USE: &str = "the store is in use by another gbc process";

pub struct LocalStore {
    root: PathBuf,
    db: PathBuf,
    tmp: PathBuf,
    /// Held for the store's lifetime: one process at a time owns a store root.
    _lock: File,
}

impl LocalStore {
    /// Open (creating if needed) the store under `root`, taking it for this process alone, and
    /// clear what an interrupted earlier owner left in its temporary space.
    pub fn open(root: &Path) -> io::Result<LocalStore> {
        fs::create_dir_all(root).map_err(|e| with_path(e, root))?;
        let lock_path = root.join(".gbc-lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| with_path(e, &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("{}: {IN_USE}", root.display())));
            }
            Err(e) => return Err(with_path(e.into(), &lock_path)),
        }
        let store =
            LocalStore { root: root.to_owned(), db: root.join(".gbc-db"), tmp: root.join(".gbc-tmp"), _lock: lock };
        remove_tree(&store.tmp)?;
        for dir in [&store.db, &store.tmp] {
            fs::create_dir_all(dir).map_err(|e| with_path(e, dir))?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the contents of `path` live on this machine.
    pub fn physical(&self, path: &StorePath) -> PathBuf {
        self.root.join(path.as_str())
    }

    fn record(&self, path: &StorePath) -> PathBuf {
        self.db.join(format!("{path}.json"))
    }

    /// The record of `path` (a full logical path), if it is valid.
    pub fn query(&self, store_dir: &StoreDir, path: &str) -> io::Result<Option<PathInfo>> {
        let sp = store_dir.parse_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let file = self.record(&sp);
        let bytes = match fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(with_path(e, &file)),
        };
        let info: PathInfo = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", file.display())))?;
        // A record for the same base name in another store dir does not make this path valid.
        Ok((info.path == path).then_some(info))
    }

    pub fn is_valid(&self, store_dir: &StoreDir, path: &str) -> io::Result<bool> {
        Ok(self.query(store_dir, path)?.is_some())
    }

    /// Mark a path valid. Its contents must already be complete at [`LocalStore::physical`].
    pub fn register(&self, store_dir: &StoreDir, info: &PathInfo) -> io::Result<()> {
        let sp = store_dir.parse_path(&info.path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        sync_tree(&self.physical(&sp))?;
        // The path's own directory entry (it was just renamed into the root) must be durable before
        // the record that says it is valid.
        File::open(&self.root).and_then(|d| d.sync_all()).map_err(|e| with_path(e, &self.root))?;
        let json = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
        write_atomically(&self.record(&sp), &json)
    }

    /// Add the file or tree at `source` as the content-addressed store path `path` without
    /// references (what `builtins.toFile`, `builtins.path` and Guix's `plain-file` and
    /// `local-file` make), after checking that its contents give exactly that path. The error is
    /// a one-line reason.
    pub fn add_source(&self, store_dir: &StoreDir, path: &str, source: &Path) -> io::Result<Result<PathInfo, String>> {
        let sp = match store_dir.parse_path(path) {
            Ok(sp) => sp,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let mut nar = Vec::new();
        if let Err(e) = crate::formats::nar::dump_path(source, &mut nar) {
            return Err(io::Error::new(e.source.kind(), e.to_string()));
        }
        let nar_hash = crate::formats::hash::sha256(&nar);
        let md = fs::symlink_metadata(source)?;
        let flat = if md.is_file() { Some(crate::formats::hash::sha256(&fs::read(source)?)) } else { None };
        if store_dir.content_address(&sp, &[], &nar_hash, flat.as_ref()).is_none() {
            return Ok(Err(format!(
                "{}: its contents do not make {path} (only sources without references are taken this way)",
                source.display()
            )));
        }
        self.clear_stale(store_dir, path)?;
        let dest = self.physical(&sp);
        crate::formats::nar::restore(&nar[..], &dest).map_err(|e| io::Error::other(e.to_string()))?;
        let info = PathInfo {
            path: path.to_owned(),
            nar_hash: crate::formats::hash::Hash::sha256(nar_hash).to_nix32_string(),
            nar_size: nar.len() as u64,
            references: Vec::new(),
            deriver: None,
        };
        self.register(store_dir, &info)?;
        Ok(Ok(info))
    }

    /// Forget a path and delete its contents (for tests and garbage collection).
    pub fn invalidate(&self, path: &StorePath) -> io::Result<()> {
        match fs::remove_file(self.record(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        remove_tree(&self.physical(path))
    }

    /// Remove whatever lies at `path` without a record: the leftovers of an interrupted unpack or build.
    pub fn clear_stale(&self, store_dir: &StoreDir, path: &str) -> io::Result<()> {
        if self.is_valid(store_dir, path)? {
            return Ok(());
        }
        let sp = store_dir.parse_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        remove_tree(&self.physical(&sp))
    }

    /// A new, empty directory on the store's file system, for a build or an unpack.
    pub fn temp_dir(&self, prefix: &str) -> io::Result<PathBuf> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
        let dir = self.tmp.join(format!("{prefix}-{}", hex::encode(&r)));
        // Only this user may enter: what a build leaves there while it runs is nobody else's.
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| with_path(e, &dir))?;
        Ok(dir)
    }

    /// The closure of `paths` under the references of valid paths. Paths that are not valid are
    /// returned in the second set.
    pub fn closure<'a>(
        &self,
        store_dir: &StoreDir,
        paths: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<(BTreeSet<String>, BTreeSet<String>)> {
        let mut seen = BTreeSet::new();
        let mut missing = BTreeSet::new();
        let mut todo: VecDeque<String> = paths.into_iter().map(str::to_owned).collect();
        while let Some(p) = todo.pop_front() {
            if seen.contains(&p) || missing.contains(&p) {
                continue;
            }
            match self.query(store_dir, &p)? {
                Some(info) => {
                    todo.extend(info.references.into_iter().filter(|r| !seen.contains(r)));
                    seen.insert(p);
                }
                None => {
                    missing.insert(p);
                }
            }
        }
        Ok((seen, missing))
    }
}

/// The error, with the path it concerns in front.
pub(crate) fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Create `path` with `bytes`, durably, with `mode` (0600 for a secret key); an existing file is
/// never overwritten (`AlreadyExists`).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Write `bytes` to `path` so that readers see either the old file or the whole new one, durably.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".tmp-{}", hex::encode(&r)));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| with_path(e, path))
}

/// fsync every file and directory in a tree (symlinks are synced with their directory).
fn sync_tree(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path).map_err(|e| with_path(e, path))?;
    if md.is_dir() {
        for entry in fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
    }
    if !md.file_type().is_symlink() {
        File::open(path).and_then(|f| f.sync_all()).map_err(|e| with_path(e, path))?;
    }
    Ok(())
}

/// Delete a tree, even one made read-only by canonicalisation. Missing is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, path)),
    };
    if md.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|e| with_path(e, path))?;
        for entry in fs::read_dir(path)? {
            remove_tree(&entry?.path())?;
        }
        fs::remove_dir(path).map_err(|e| with_path(e, path))
    } else {
        fs::remove_file(path).map_err(|e| with_path(e, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore, StoreDir) {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let store = LocalStore::open(&tmp.path().join("root")).unwrap_or_else(|e| unreachable!("{e}"));
        (tmp, store, StoreDir::new("/gnu/store").unwrap_or_else(|e| unreachable!("{e}")))
    }

    const A: &str = "/gnu/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a";
    const B: &str = "/gnu/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b";

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: path.to_owned(),
            nar_hash: "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".to_owned(),
            nar_size: 1,
            references: refs.iter().map(|s| s.to_string()).collect(),
            deriver: None,
        }
    }

    #[test]
    fn contents_without_a_record_are_not_valid_and_are_cleared() {
        let (_t, store, sd) = store();
        let a = sd.parse_path(A).unwrap_or_else(|e| unreachable!("{e}"));
        fs::write(store.physical(&a), b"half written").ok();
        assert_eq!(store.is_valid(&sd, A).ok(), Some(false));
        store.clear_stale(&sd, A).ok();
        assert!(!store.physical(&a).exists());
        fs::write(store.physical(&a), b"done").ok();
        store.register(&sd, &info(A, &[])).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(store.query(&sd, A).ok().flatten(), Some(info(A, &[])));
        store.clear_stale(&sd, A).ok();
        assert!(store.physical(&a).exists(), "a valid path is not stale");
        // The same base name in another store dir is not valid.
        let nix = StoreDir::new("/nix/store").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(store.is_valid(&nix, &A.replace("/gnu/", "/nix/")).ok(), Some(false));
    }

    #[test]
    fn closure_follows_references_and_reports_missing() {
        let (_t, store, sd) = store();
        let a = sd.parse_path(A).unwrap_or_else(|e| unreachable!("{e}"));
        fs::write(store.physical(&a), b"x").ok();
        store.register(&sd, &info(A, &[A, B])).unwrap_or_else(|e| unreachable!("{e}"));
        let (have, missing) = store.closure(&sd, [A]).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(have, BTreeSet::from([A.to_owned()]));
        assert_eq!(missing, BTreeSet::from([B.to_owned()]));
    }

    #[test]
    fn one_process_owns_a_store_and_leftovers_are_cleared() {
        let (tmp, store, _) = store();
        let leftover = store.temp_dir("nar").unwrap_or_else(|e| unreachable!("{e}"));
        fs::write(leftover.join("half"), b"x").ok();
        // flock locks belong to open file descriptions: a second open in the same process conflicts.
        let second = LocalStore::open(&tmp.path().join("root"));
        assert!(second.is_err_and(|e| e.to_string().contains("in use")));
        drop(store);
        let reopened = LocalStore::open(&tmp.path().join("root"));
        assert!(reopened.is_ok());
        assert!(!leftover.exists(), "temporary space not cleared");
    }

    #[test]
    fn remove_tree_handles_read_only_directories() {
        let (_t, store, _) = store();
        let dir = store.temp_dir("t").unwrap_or_else(|e| unreachable!("{e}"));
        fs::create_dir(dir.join("sub")).ok();
        fs::write(dir.join("sub/f"), b"x").ok();
        fs::set_permissions(dir.join("sub"), fs::Permissions::from_mode(0o555)).ok();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).ok();
        assert!(remove_tree(&dir).is_ok());
        assert!(!dir.exists());
    }
}
