//! Build logs on disk: `<state>/logs/<uuid[..2]>/<uuid>/<attempt>.log` while the attempt runs
//! (plain, appended as the agent sends it, so it can be followed), then `<attempt>.log.zst` once it
//! has ended (compressed to a temporary file, synced, renamed; only then is the plain file removed,
//! so a crash at any point leaves one complete copy).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

fn dir(state_dir: &Path, uuid: &str) -> PathBuf {
    let prefix = uuid.get(..2).unwrap_or("xx");
    state_dir.join("logs").join(prefix).join(uuid)
}

pub fn plain_path(state_dir: &Path, uuid: &str, attempt: u32) -> PathBuf {
    dir(state_dir, uuid).join(format!("{attempt}.log"))
}

pub fn compressed_path(state_dir: &Path, uuid: &str, attempt: u32) -> PathBuf {
    dir(state_dir, uuid).join(format!("{attempt}.log.zst"))
}

/// Create (truncating) a file only its owner may read: a build log can hold a secret.
fn private_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// Start an attempt's log (empty).
pub fn create(path: &Path) -> io::Result<BufWriter<File>> {
    if let Some(d) = path.parent() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(d)?;
    }
    Ok(BufWriter::new(private_file(path)?))
}

/// Compress a finished attempt's plain log in place. Nothing to do when it is already done.
pub fn compress(plain: &Path) -> io::Result<()> {
    let mut src = match File::open(plain) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let target = plain.with_extension("log.zst");
    let tmp = plain.with_extension("log.zst.tmp");
    {
        let out = private_file(&tmp)?;
        let mut enc = zstd::Encoder::new(out, 3)?;
        io::copy(&mut src, &mut enc)?;
        let out = enc.finish()?;
        out.sync_all()?;
    }
    fs::rename(&tmp, &target)?;
    if let Some(d) = target.parent() {
        File::open(d)?.sync_all()?;
    }
    fs::remove_file(plain)
}

/// Where an attempt's log stands.
pub enum Stored {
    /// Still being written.
    Plain(PathBuf),
    Compressed(PathBuf),
    Missing,
}

pub fn find(state_dir: &Path, uuid: &str, attempt: u32) -> Stored {
    let c = compressed_path(state_dir, uuid, attempt);
    if c.exists() {
        return Stored::Compressed(c);
    }
    let p = plain_path(state_dir, uuid, attempt);
    if p.exists() {
        return Stored::Plain(p);
    }
    // The plain file may have been compressed between the two checks.
    if c.exists() { Stored::Compressed(c) } else { Stored::Missing }
}

/// Where a log is and its bytes from `offset` on, at most `max`: [`find`] then [`read_from`],
/// found again if the plain file was compressed (and removed) between the two.
pub fn find_and_read(
    state_dir: &Path,
    uuid: &str,
    attempt: u32,
    offset: u64,
    max: usize,
) -> io::Result<(Stored, Vec<u8>)> {
    let mut tries = 0;
    loop {
        let stored = find(state_dir, uuid, attempt);
        match read_from(&stored, offset, max) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && matches!(stored, Stored::Plain(_)) && tries < 3 => {
                tries += 1;
            }
            read => return read.map(|bytes| (stored, bytes)),
        }
    }
}

/// Bytes of a log from `offset` on, at most `max`; compressed logs are decompressed on the way.
pub fn read_from(stored: &Stored, offset: u64, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match stored {
        Stored::Missing => {}
        Stored::Plain(p) => {
            use std::io::Seek as _;
            let mut f = File::open(p)?;
            f.seek(io::SeekFrom::Start(offset))?;
            f.take(max as u64).read_to_end(&mut out)?;
        }
        Stored::Compressed(p) => {
            let mut dec = zstd::Decoder::new(File::open(p)?)?;
            io::copy(&mut (&mut dec).take(offset), &mut io::sink())?;
            dec.take(max as u64).read_to_end(&mut out)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_log_reads_the_same_before_and_after_compression() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let plain = plain_path(dir.path(), "abcdef", 1);
        let mut w = create(&plain)?;
        let text: Vec<u8> = (0..100_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        w.write_all(&text)?;
        w.flush()?;
        let before = read_from(&find(dir.path(), "abcdef", 1), 1000, 5000)?;
        compress(&plain)?;
        assert!(!plain.exists());
        let stored = find(dir.path(), "abcdef", 1);
        assert!(matches!(stored, Stored::Compressed(_)));
        assert_eq!(read_from(&stored, 1000, 5000)?, before);
        assert_eq!(before, text[1000..6000]);
        assert_eq!(read_from(&stored, 0, usize::MAX)?, text);
        // A follower that found the plain file just before it was compressed fails to read it
        // (a build hook saw "No such file or directory"); found again, it reads the same.
        let stale = Stored::Plain(plain.clone());
        assert_eq!(read_from(&stale, 1000, 5000).map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
        assert_eq!(find_and_read(dir.path(), "abcdef", 1, 1000, 5000)?.1, before);
        compress(&plain)?; // already done: nothing happens
        Ok(())
    }
}
