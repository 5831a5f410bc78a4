//! `gbc keygen`, `gbc sign` and `gbc verify`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{Context as _, bail};

use super::{check_failed, warn};
use crate::formats::narinfo::NarInfo;
use crate::formats::signing::{PublicKey, SecretKey, TrustedKeys};

fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    crate::store::write_new(path, contents, mode).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("{}: already exists; refusing to overwrite a key file", path.display())
        } else {
            anyhow::Error::new(e).context(path.display().to_string())
        }
    })
}

pub fn keygen(name: &str, secret_file: &Path, public_file: &Path) -> anyhow::Result<()> {
    let key = SecretKey::generate(name)?;
    if public_file.exists() {
        bail!("{}: already exists; refusing to overwrite a key file", public_file.display());
    }
    write_new(secret_file, key.to_nix_string().as_bytes(), 0o600)?;
    write_new(public_file, key.public().to_string().as_bytes(), 0o644)
}

/// Read a secret key file, warning when others can read it.
pub fn load_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = zeroize::Zeroizing::new(fs::read_to_string(path).with_context(|| path.display().to_string())?);
    let key = SecretKey::parse(&text).with_context(|| format!("{}: not a secret key", path.display()))?;
    let mode = fs::metadata(path).with_context(|| path.display().to_string())?.permissions().mode();
    if mode & 0o077 != 0 {
        warn(format!(
            "{}: secret key file is readable by group or others (mode {:04o}); run chmod 600 on it",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(key)
}

/// Read public keys (white-space separated) from files.
pub fn load_trusted_keys(paths: &[impl AsRef<Path>]) -> anyhow::Result<TrustedKeys> {
    let mut keys = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let text = fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let before = keys.len();
        for word in text.split_whitespace() {
            keys.push(PublicKey::parse(word).with_context(|| format!("{}: not a public key", path.display()))?);
        }
        if keys.len() == before {
            bail!("{}: holds no public key", path.display());
        }
    }
    Ok(TrustedKeys::new(keys))
}

fn read_narinfo(path: &Path) -> anyhow::Result<NarInfo> {
    let text = fs::read_to_string(path).with_context(|| path.display().to_string())?;
    NarInfo::parse(&text).map_err(|e| check_failed(path.display(), e))
}

/// Replace `path`'s contents atomically, keeping its permissions.
fn replace_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let ctx = || path.display().to_string();
    let mode = fs::metadata(path).with_context(ctx)?.permissions().mode();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.gbc-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode & 0o777).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(ctx)
}

pub fn sign(key_file: &Path, narinfos: &[impl AsRef<Path>]) -> anyhow::Result<()> {
    let key = load_secret_key(key_file)?;
    for path in narinfos {
        let path = path.as_ref();
        let mut ni = read_narinfo(path)?;
        ni.sign(&key).map_err(|e| check_failed(path.display(), e))?;
        replace_file(path, ni.to_string().as_bytes())?;
    }
    Ok(())
}

pub fn verify(trusted: &[impl AsRef<Path>], narinfos: &[impl AsRef<Path>]) -> anyhow::Result<()> {
    let keys = load_trusted_keys(trusted)?;
    let mut out = io::stdout().lock();
    let mut failed = Vec::new();
    for path in narinfos {
        let path = path.as_ref();
        let ni = read_narinfo(path)?;
        match ni.verify(&keys).map_err(|e| check_failed(path.display(), e))? {
            Some(k) => writeln!(out, "{}: signed by {}", path.display(), k.name())?,
            None => failed.push(path.display().to_string()),
        }
    }
    match failed.as_slice() {
        [] => Ok(()),
        [one] => Err(check_failed(one, "no valid signature by a trusted key")),
        many => Err(check_failed(many.join(", "), "no valid signature by a trusted key")),
    }
}

/// `gbc cache public-key`.
/// `gbc cache public-key --format guix`: the Guix key of a /gnu/store cache, as `guix archive
/// --authorize` reads it.
pub fn cache_guix_public_key(
    state_dir: Option<std::path::PathBuf>,
    signing_key: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use crate::formats::gcrypt;
    let path = match signing_key {
        Some(path) => path,
        None => match state_dir {
            Some(s) => s,
            None => super::realise::default_state_dir()?,
        }
        .join("keys/guix-signing-key.sec"),
    };
    let text = fs::read(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "{}: no Guix key yet: a coordinator makes it when it first starts with a /gnu/store cache",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(path.display().to_string())
        }
    })?;
    let key = gcrypt::parse_secret_key(&text).map_err(|e| check_failed(path.display(), e))?;
    println!("{}", gcrypt::public_key_sx(key.public()).to_text());
    Ok(())
}

pub fn cache_public_key(
    state_dir: Option<std::path::PathBuf>,
    signing_key: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let public = match signing_key {
        Some(path) => load_secret_key(&path)?.public().to_string(),
        None => {
            let state = match state_dir {
                Some(s) => s,
                None => super::realise::default_state_dir()?,
            };
            let path = state.join("keys/cache.public");
            let text = fs::read_to_string(&path).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    anyhow::anyhow!(
                        "{}: no cache key yet: it is made when the coordinator first starts",
                        path.display()
                    )
                } else {
                    anyhow::Error::new(e).context(path.display().to_string())
                }
            })?;
            PublicKey::parse(text.trim()).map_err(|e| check_failed(path.display(), e))?.to_string()
        }
    };
    println!("{public}");
    Ok(())
}
