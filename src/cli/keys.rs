//! `gbc keygen`, `gbc sign` and `gbc verify`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::args::KeyFormat;
use super::{check_failed, warn};
use crate::formats::gcrypt;
use crate::formats::guix_ecdsa::SecretKey as GuixSecretKey;
use crate::formats::host_key::{HostSecretKey, parse_trusted_keys};
use crate::formats::narinfo::{NarInfo, VerifyError, verify_text};
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

pub fn keygen(format: KeyFormat, args: &[String]) -> anyhow::Result<()> {
    let (secret, secret_file, public, public_file) = match (format, args) {
        (KeyFormat::Nix, [name, secret_file, public_file]) => {
            let key = SecretKey::generate(name)?;
            (key.to_nix_string(), secret_file, key.public().to_string(), public_file)
        }
        (KeyFormat::Guix, [secret_file, public_file]) => {
            let key = GuixSecretKey::generate()?;
            let secret = zeroize::Zeroizing::new(format!("{}\n", gcrypt::secret_key_sx(&key).to_text()));
            (secret, secret_file, format!("{}\n", gcrypt::public_key_sx(key.public()).to_text()), public_file)
        }
        (KeyFormat::Nix, _) => bail!("keygen: a Nix key takes NAME SECRET PUBLIC ({} arguments given)", args.len()),
        (KeyFormat::Guix, _) => {
            bail!("keygen --format guix: takes SECRET PUBLIC (Guix keys have no name; {} arguments given)", args.len())
        }
    };
    write_pair(Path::new(secret_file), &secret, Path::new(public_file), &public)
}

/// Write a new key pair's files: neither may exist; the secret one gets mode 0600.
fn write_pair(secret_file: &Path, secret: &str, public_file: &Path, public: &str) -> anyhow::Result<()> {
    if public_file.exists() {
        bail!("{}: already exists; refusing to overwrite a key file", public_file.display());
    }
    write_new(secret_file, secret.as_bytes(), 0o600)?;
    write_new(public_file, public.as_bytes(), 0o644)
}

/// Read a secret key file, warning when others can read it.
pub fn load_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = zeroize::Zeroizing::new(fs::read_to_string(path).with_context(|| path.display().to_string())?);
    let key = SecretKey::parse(&text).with_context(|| format!("{}: not a secret key", path.display()))?;
    warn_if_readable(path)?;
    Ok(key)
}

fn warn_if_readable(path: &Path) -> anyhow::Result<()> {
    let mode = fs::metadata(path).with_context(|| path.display().to_string())?.permissions().mode();
    if mode & 0o077 != 0 {
        warn(format!(
            "{}: secret key file is readable by group or others (mode {:04o}); run chmod 600 on it",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Read a secret key file in Nix's format (`NAME:base64`) or Guix's (a libgcrypt s-expression),
/// warning when others can read it.
fn load_any_secret_key(path: &Path) -> anyhow::Result<HostSecretKey> {
    let text = zeroize::Zeroizing::new(fs::read(path).with_context(|| path.display().to_string())?);
    let key = HostSecretKey::parse(&text).with_context(|| format!("{}: not a secret key", path.display()))?;
    warn_if_readable(path)?;
    Ok(key)
}

/// Read public keys from files: Nix keys (white-space separated `NAME:base64`), or Guix keys
/// (a `(public-key …)` s-expression, or an ACL of them as /etc/guix/acl holds).
pub fn load_trusted_keys(paths: &[impl AsRef<Path>]) -> anyhow::Result<TrustedKeys> {
    let mut keys = TrustedKeys::default();
    for path in paths {
        let path = path.as_ref();
        let text = fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let these = parse_trusted_keys(&text).with_context(|| format!("{}: not a public key", path.display()))?;
        if these.is_empty() {
            bail!("{}: holds no public key", path.display());
        }
        keys.extend(these);
    }
    Ok(keys)
}

fn read_narinfo(path: &Path) -> anyhow::Result<(String, NarInfo)> {
    let text = fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let info = NarInfo::parse(&text).map_err(|e| check_failed(path.display(), e))?;
    Ok((text, info))
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

pub fn sign(key_files: &[PathBuf], host: Option<String>, narinfos: &[impl AsRef<Path>]) -> anyhow::Result<()> {
    let (mut nix, mut guix) = (Vec::new(), None);
    for path in key_files {
        match load_any_secret_key(path)? {
            HostSecretKey::Nix(k) => nix.push(k),
            HostSecretKey::Guix(_) if guix.is_some() => {
                bail!("{}: a second Guix key: a narinfo has one Signature: line", path.display())
            }
            HostSecretKey::Guix(k) => guix = Some(k),
        }
    }
    let host = host.unwrap_or_else(|| rustix::system::uname().nodename().to_string_lossy().into_owned());
    if host.is_empty() || host.contains([';', '\n']) {
        bail!("--host {host:?}: a Signature: line's host name must be non-empty, without ';' or a newline");
    }
    for path in narinfos {
        let path = path.as_ref();
        let (_, mut ni) = read_narinfo(path)?;
        if ni.guix_signature.is_some() && guix.is_none() && !nix.is_empty() {
            return Err(check_failed(
                path.display(),
                "has a Guix Signature: that a new Sig: line would invalidate; give its Guix key too (--key)",
            ));
        }
        for key in &nix {
            ni.sign(key).map_err(|e| check_failed(path.display(), e))?;
        }
        if let Some(key) = &guix {
            ni.sign_guix(key, &host).map_err(|e| check_failed(path.display(), e))?;
        }
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
        let (text, _) = read_narinfo(path)?;
        match verify_text(&text, &keys) {
            Ok(signer) => writeln!(out, "{}: signed by {signer}", path.display())?,
            Err(VerifyError::Malformed(e)) => return Err(check_failed(path.display(), e)),
            Err(e @ VerifyError::Untrusted(_)) => failed.push(format!("{}: {e}", path.display())),
        }
    }
    match failed.as_slice() {
        [] => Ok(()),
        failed => Err(anyhow::Error::new(super::CheckFailed(failed.join("; ")))),
    }
}

/// The state dir given, else the default one.
fn state_or_default(state_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match state_dir {
        Some(s) => Ok(s),
        None => super::realise::default_state_dir(),
    }
}

/// A key file the coordinator makes on first start; its absence is explained by `missing`.
fn read_made_key(path: &Path, missing: &str) -> anyhow::Result<Vec<u8>> {
    fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!("{}: {missing}", path.display())
        } else {
            anyhow::Error::new(e).context(path.display().to_string())
        }
    })
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
        None => state_or_default(state_dir)?.join("keys/guix-signing-key.sec"),
    };
    let text = read_made_key(
        &path,
        "no Guix key yet: a coordinator makes it when it first starts with a /gnu/store cache (or --guix-signatures)",
    )?;
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
            let path = state_or_default(state_dir)?.join("keys/cache.public");
            let text = read_made_key(&path, "no cache key yet: it is made when the coordinator first starts")?;
            let text = String::from_utf8_lossy(&text);
            PublicKey::parse(text.trim()).map_err(|e| check_failed(path.display(), e))?.to_string()
        }
    };
    println!("{public}");
    Ok(())
}
