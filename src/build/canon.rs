//! Canonicalising outputs as Nix does before they are hashed: modification time 1 (the epoch plus
//! one second), permissions 0444 for files, 0555 for executables and directories, no setuid/setgid,
//! owned by whoever runs the agent (an agent running as root takes back what its build user made).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

const MTIME: Timestamps = Timestamps {
    last_access: Timespec { tv_sec: 1, tv_nsec: 0 },
    last_modification: Timespec { tv_sec: 1, tv_nsec: 0 },
};

/// Canonicalise the tree at `path`, bottom up (a directory's time is set after its contents).
pub fn canonicalise(path: &Path) -> io::Result<()> {
    let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let md = fs::symlink_metadata(path).map_err(at)?;
    let ft = md.file_type();
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    if std::os::unix::fs::MetadataExt::uid(&md) != uid || std::os::unix::fs::MetadataExt::gid(&md) != gid {
        // Changing the owner also clears setuid and setgid bits.
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(at)?;
    }
    if ft.is_dir() {
        // Make sure we can enter and change it, whatever the builder left.
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(at)?;
        for entry in fs::read_dir(path).map_err(at)? {
            canonicalise(&entry.map_err(at)?.path())?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o555)).map_err(at)?;
    } else if ft.is_file() {
        let mode = if md.permissions().mode() & 0o111 != 0 { 0o555 } else { 0o444 };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(at)?;
    } else if !ft.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: outputs may hold only files, directories and symlinks", path.display()),
        ));
    }
    rustix::fs::utimensat(CWD, path, &MTIME, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| at(e.into()))
}
