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

/// Bring the loopback interface up in this process's network namespace, as Nix's sandbox does, so
/// that builds (test suites) can talk to themselves over 127.0.0.1.
pub fn loopback_up() -> io::Result<()> {
    use rustix::ioctl::{Opcode, Updater, ioctl};
    use rustix::net::{AddressFamily, SocketType};

    /// `struct ifreq`: the interface name, then a union whose `ifr_flags` member is a short; 40 bytes.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _rest: [u8; 22],
    }
    const SIOCGIFFLAGS: Opcode = 0x8913;
    const SIOCSIFFLAGS: Opcode = 0x8914;
    const IFF_UP: i16 = 0x1;

    let sock = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    let mut req = IfReq { name: [0; 16], flags: 0, _rest: [0; 22] };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write a `struct ifreq`, which `IfReq` lays out
    // exactly (name, flags at offset 16, the union padded to the struct's full 40 bytes).
    unsafe { ioctl(&sock, Updater::<SIOCGIFFLAGS, IfReq>::new(&mut req)) }?;
    req.flags |= IFF_UP;
    // SAFETY: as above.
    unsafe { ioctl(&sock, Updater::<SIOCSIFFLAGS, IfReq>::new(&mut req)) }?;
    Ok(())
}
