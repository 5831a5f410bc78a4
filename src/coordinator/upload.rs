//! What a client uploads with a submission: the sources its derivations use and the outputs of
//! input derivations it has, when the binary cache lacks them. Nothing a client sends is trusted:
//! a source must be the content-addressed path (text or source) its contents and references give;
//! any other path must be an output of a derivation of the submission (its path was checked
//! against that derivation); every NAR is parsed while it is staged; every reference must be in
//! the cache or uploaded too. Blocking (the server runs it on blocking threads).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::sync::Arc;

use super::submit::Checked;
use crate::cache::{Cache, Output, StagedNar};
use crate::formats::store_path::StorePathError;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot upload {path}: {source}")]
    Path { path: String, source: StorePathError },
    #[error("{path}: reference {source}")]
    Reference { path: String, source: StorePathError },
    #[error("{0} was uploaded twice")]
    Twice(String),
    #[error("{path}: {source}")]
    Nar { path: String, source: std::io::Error },
    #[error(
        "{0}: its contents and references do not give this path, and no derivation of the submission has it as an output"
    )]
    NotItsPath(String),
    #[error("{path}: its reference {reference} is neither in the cache nor uploaded")]
    Unaccounted { path: String, reference: String },
    #[error("publishing the uploads: {0}")]
    Publish(std::io::Error),
}

/// The inputs of a submission the cache lacks (in its store dir; others it can never hold).
pub fn wanted(cache: &Cache, checked: &Checked) -> Vec<String> {
    let all: BTreeSet<&str> = checked.derivations.iter().flat_map(|d| d.inputs.iter().map(String::as_str)).collect();
    all.into_iter().filter(|p| cache.store_dir().parse_path(p).is_ok() && !cache.has(p)).map(str::to_owned).collect()
}

/// The uploads of one submission, staged until they are all in.
pub struct Uploads {
    cache: Arc<Cache>,
    /// Output path → (the derivation that has it, its system).
    outputs: HashMap<String, (String, String)>,
    /// Path → what arrived for it.
    staged: HashMap<String, (Output, StagedNar)>,
}

impl Uploads {
    pub fn new(cache: Arc<Cache>, checked: &Checked) -> Uploads {
        let outputs = checked
            .derivations
            .iter()
            .flat_map(|d| d.outputs.values().map(|o| (o.clone(), (d.path.clone(), d.system.clone()))))
            .collect();
        Uploads { cache, outputs, staged: HashMap::new() }
    }

    /// Receive the NAR of `path` from `nar` and check that it may be published as that path.
    pub fn add(&mut self, path: &str, references: Vec<String>, nar: impl Read) -> Result<(), UploadError> {
        let store_dir = self.cache.store_dir().clone();
        let sp = store_dir.parse_path(path).map_err(|source| UploadError::Path { path: path.to_owned(), source })?;
        for r in &references {
            store_dir.parse_path(r).map_err(|source| UploadError::Reference { path: path.to_owned(), source })?;
        }
        if self.staged.contains_key(path) {
            return Err(UploadError::Twice(path.to_owned()));
        }
        let nar_error = |source| UploadError::Nar { path: path.to_owned(), source };
        let (staged, flat) = self.cache.stage_checked(nar).map_err(nar_error)?;
        let nar_hash: [u8; 32] = staged
            .nar_hash
            .digest()
            .try_into()
            .map_err(|_| nar_error(std::io::Error::other("the NAR hash is not SHA-256")))?;
        let ca = store_dir.content_address(&sp, &references, &nar_hash, flat.as_ref());
        let deriver = self.outputs.get(path);
        if ca.is_none() && deriver.is_none() {
            return Err(UploadError::NotItsPath(path.to_owned()));
        }
        let out = Output {
            path: path.to_owned(),
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references,
            deriver: deriver.map(|(d, _)| d.clone()),
            system: deriver.map(|(_, s)| s.clone()),
            signatures: Vec::new(),
            cache_signs: true,
            ca,
        };
        self.staged.insert(path.to_owned(), (out, staged));
        Ok(())
    }

    /// Whether `path` was uploaded in this submission.
    pub fn has(&self, path: &str) -> bool {
        self.staged.contains_key(path)
    }

    /// Publish everything uploaded, once every reference is accounted for. Returns how many paths.
    pub fn publish(self) -> Result<usize, UploadError> {
        for (o, _) in self.staged.values() {
            if let Some(r) = o.references.iter().find(|r| !self.staged.contains_key(*r) && !self.cache.has(r)) {
                return Err(UploadError::Unaccounted { path: o.path.clone(), reference: r.clone() });
            }
        }
        let n = self.staged.len();
        if n > 0 {
            self.cache.publish(self.staged.into_values().collect()).map_err(UploadError::Publish)?;
        }
        Ok(n)
    }
}
