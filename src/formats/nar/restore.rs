//! A NAR into a new file system tree, as `nix-store --restore`.
//!
//! Safety: the tree is built under a temporary name beside the destination, using only
//! `*at` system calls relative to directory descriptors the restore itself created, with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`: nothing is ever written outside the destination and no symlink
//! is ever followed (the reader has already refused names like `..` or `a/b`, and sorted unique names
//! mean no entry can land on an earlier one). Only a complete, valid tree is renamed into place
//! (`RENAME_NOREPLACE`); on any error the partial tree is removed.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, RenameFlags};
use thiserror::Error;

use super::reader::{Event, NarError, NarReader};
use crate::formats::hash::{Hash, HashingReader};

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("{}: already exists", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Nar(#[from] NarError),
}

/// Unpack the NAR read from `nar` at `dest`, which must not exist (its parent must).
/// Returns the SHA-256 hash and size of the NAR, computed as it streamed.
pub fn restore<R: Read>(nar: R, dest: &Path) -> Result<(Hash, u64), RestoreError> {
    let io_at = |path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| RestoreError::Io { path, source }
    };
    match fs::symlink_metadata(dest) {
        Ok(_) => return Err(RestoreError::Exists(dest.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(dest)(e)),
    }
    let name = dest
        .file_name()
        .ok_or_else(|| io_at(dest)(io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name")))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent_fd = rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_at(parent)(e.into()))?;
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| io_at(dest)(io::Error::other(e.to_string())))?;
    // At most 64 bytes of the name, so the temporary name stays within NAME_MAX.
    let short: String = name.to_string_lossy().chars().take(64).collect();
    let tmp_name =
        format!(".{short}.gbc-partial-{}-{}", std::process::id(), crate::formats::hash::hex::encode(&random));
    let tmp = parent.join(&tmp_name);

    let mut reader = NarReader::new(HashingReader::new(nar));
    let result = unpack(&mut reader, &parent_fd, OsStr::new(&tmp_name), &tmp).and_then(|()| {
        rustix::fs::renameat_with(&parent_fd, tmp_name.as_str(), &parent_fd, name, RenameFlags::NOREPLACE).map_err(
            |e| match e {
                rustix::io::Errno::EXIST => RestoreError::Exists(dest.to_owned()),
                e => io_at(dest)(e.into()),
            },
        )
    });
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp).or_else(|_| fs::remove_file(&tmp));
        return Err(e);
    }
    Ok(reader.into_inner().finish())
}

fn unpack<R: Read>(
    reader: &mut NarReader<R>,
    parent: &OwnedFd,
    root: &OsStr,
    root_path: &Path,
) -> Result<(), RestoreError> {
    // Open directories, innermost last, with their paths for error messages.
    let mut dirs: Vec<(OwnedFd, PathBuf)> = Vec::new();
    while let Some(event) = reader.next_event()? {
        let (dir_fd, dir_path) = match dirs.last() {
            Some((fd, p)) => (fd, p.clone()),
            None => (parent, PathBuf::new()),
        };
        let target_path = |name: &[u8]| {
            if name.is_empty() { root_path.to_owned() } else { dir_path.join(OsStr::from_bytes(name)) }
        };
        match event {
            Event::Directory { name } => {
                let path = target_path(&name);
                let err = |e: rustix::io::Errno| RestoreError::Io { path: path.clone(), source: e.into() };
                rustix::fs::mkdirat(dir_fd, name_of(&name, root), Mode::from_bits_truncate(0o777)).map_err(err)?;
                let fd = rustix::fs::openat(
                    dir_fd,
                    name_of(&name, root),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(err)?;
                dirs.push((fd, path));
            }
            Event::EndDirectory => {
                dirs.pop();
            }
            Event::Symlink { name, target } => {
                let path = target_path(&name);
                rustix::fs::symlinkat(OsStr::from_bytes(&target), dir_fd, name_of(&name, root))
                    .map_err(|e| RestoreError::Io { path, source: e.into() })?;
            }
            Event::Regular { name, executable, mut contents, .. } => {
                let path = target_path(&name);
                let err = |source: io::Error| RestoreError::Io { path: path.clone(), source };
                let fd = rustix::fs::openat(
                    dir_fd,
                    name_of(&name, root),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_bits_truncate(0o666),
                )
                .map_err(|e| err(e.into()))?;
                if executable {
                    let mode = rustix::fs::fstat(&fd).map_err(|e| err(e.into()))?.st_mode;
                    rustix::fs::fchmod(&fd, Mode::from_bits_truncate(mode | 0o111)).map_err(|e| err(e.into()))?;
                }
                // Drop-behind: a large file's pages are written back as it goes, not all at the
                // fsync that comes before the path is registered.
                let mut file = crate::fsio::DropBehind::new(File::from(fd));
                contents.copy_to(&mut file).map_err(|e| match e.into_inner() {
                    Some(inner) => match inner.downcast::<NarError>() {
                        Ok(nar) => RestoreError::Nar(*nar),
                        Err(other) => err(io::Error::other(other)),
                    },
                    None => err(io::Error::other("write failed")),
                })?;
            }
        }
    }
    Ok(())
}

/// The name to create: the temporary root name for the root node, the entry name otherwise.
fn name_of<'a>(name: &'a [u8], root: &'a OsStr) -> &'a OsStr {
    if name.is_empty() { root } else { OsStr::from_bytes(name) }
}
