//! What can stop a coordinator from starting or running, with what it was working on.

use std::path::PathBuf;

/// A coordinator error: each names the file, address or machine concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("--http {addr}: {source}")]
    Http { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{}: another coordinator is already listening there", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{}: not a secret key: {source}", path.display())]
    Key { path: PathBuf, source: crate::formats::signing::KeyError },
    #[error("{}: not a Guix secret key: {source}", path.display())]
    GuixKey { path: PathBuf, source: crate::formats::gcrypt::GuixKeyError },
    #[error("cache store dir {dir}: {source}")]
    StoreDir { dir: String, source: crate::formats::store_path::StorePathError },
    #[error("opening the binary cache: {0}")]
    Cache(std::io::Error),
    #[error("the driver of {0} stopped")]
    DriverStopped(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach the path an I/O error happened on.
pub(super) trait IoPath<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoPath<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io { path: path.to_owned(), source })
    }
}
