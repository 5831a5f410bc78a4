//! The one system call gbc needs that rustix marks unsafe. This is the only module where `unsafe`
//! is allowed (the crate denies it everywhere else).
#![allow(unsafe_code)]

use std::io;

use rustix::thread::UnshareFlags;

/// `unshare(2)` for namespace flags.
pub fn unshare_namespaces(flags: UnshareFlags) -> io::Result<()> {
    if flags.contains(UnshareFlags::FILES) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "unshare_namespaces does not unshare FILES"));
    }
    // SAFETY: rustix marks unshare unsafe only because CLONE_FILES can invalidate file descriptors
    // that other threads hold; FILES is refused above.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(io::Error::from)
}
