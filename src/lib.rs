//! gbc: a build coordinator for Guix and Nix derivations.
//!
//! The library is layered (see ARCHITECTURE.md):
//! - [`formats`]: pure, synchronous implementations of the store formats (nix32, hashes, store paths,
//!   derivations, NAR, narinfo, signing keys). They know nothing of tokio, SQLite or SSH.
//! - [`cli`]: the `gbc` command line; the only module that prints to users.

pub mod agent;
pub mod api;
pub mod build;
pub mod cache;
pub mod cli;
pub mod coordinator;
pub mod coordinator_file;
pub mod db;
pub mod examples;
pub mod formats;
pub mod fsio;
pub mod machines;
pub mod pipe;
pub mod protocol;
pub mod ssh;
pub mod store;
pub mod substituter;
