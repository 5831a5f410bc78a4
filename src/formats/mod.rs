//! The store formats, byte-exact with Nix.
//!
//! Architecture invariant: everything under `formats` is synchronous and free of tokio, SQLite and SSH.
//! Parsers take bytes or `std::io::Read`, printers write to `std::io::Write` or return bytes; the only
//! filesystem access is in [`nar::dump`] and [`nar::restore`], which read and write the trees a NAR
//! describes. Callers at the edges (CLI, agent, coordinator) decide where bytes come from.

pub mod derivation;
pub mod gcrypt;
pub mod guix_ecdsa;
pub mod hash;
pub mod host_key;
pub mod nar;
pub mod narinfo;
pub mod nix32;
pub mod nix_wire;
pub mod sexp;
pub mod signing;
pub mod store_path;
