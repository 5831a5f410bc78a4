//! Checks of what a build host sends back: the outputs it claims (exactly the derivation's, each
//! signed by a trusted key), and each output's NAR as it arrives (a NAR, hashed, scanned for the
//! references it may hold, staged in the cache).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::AttemptResult;
use super::rejected;
use super::session::Active;
use crate::api::AttemptStatus;
use crate::build::refs::RefScanner;
use crate::cache::{self, Cache, StagedNar};
use crate::formats::hash::HashSink;
use crate::formats::host_key::HostPublicKey;
use crate::formats::narinfo;
use crate::pipe::{Both, ChunkReader};
use crate::protocol::{BuildStatus, BuiltOutput, PathMeta};

/// A NAR arriving: its chunks go to a thread that hashes them and stages them in the cache.
pub(super) struct Transfer {
    pub key: String,
    pub meta: PathMeta,
    pub chunks: mpsc::Sender<Vec<u8>>,
    pub done: tokio::sync::oneshot::Receiver<std::io::Result<Received>>,
}

/// What the staging thread made of a NAR.
pub(super) struct Received {
    nar_hash: String,
    nar_size: u64,
    /// The candidate paths whose hash parts occur in it.
    references: BTreeSet<String>,
    staged: Option<StagedNar>,
}

/// Start a thread that checks a NAR's chunks against the NAR grammar as they arrive, hashes them,
/// scans them for the hash parts of `candidates` (the references it may have) and, when there is a
/// cache for its store dir, compresses them into it. A build host is not trusted to send a NAR:
/// bytes that are not one end the transfer with an `InvalidData` error.
pub(super) fn receive(
    cache: Option<Arc<Cache>>,
    key: String,
    meta: PathMeta,
    candidates: BTreeSet<String>,
) -> Transfer {
    let (chunks, rx) = mpsc::channel::<Vec<u8>>(16);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let staging = cache.filter(|c| c.store_dir().parse_path(&meta.path).is_ok());
    std::thread::spawn(move || {
        let result = (|| {
            let nar = ChunkReader::new(rx);
            let scanner = RefScanner::new(candidates.iter().map(String::as_str));
            let (nar_hash, nar_size, staged, scanner) = match staging {
                Some(c) => {
                    let (Both(writer, scanner), _) = cache::check_nar(nar, Both(c.begin()?, scanner), false)?;
                    let s = writer.finish()?;
                    (s.nar_hash.clone(), s.nar_size, Some(s), scanner)
                }
                None => {
                    let (Both(hash, scanner), _) = cache::check_nar(nar, Both(HashSink::new(), scanner), false)?;
                    let (h, n) = hash.finish();
                    (h, n, None, scanner)
                }
            };
            let references = scanner.finish();
            Ok(Received { nar_hash: format!("sha256:{}", nar_hash.to_nix32()), nar_size, references, staged })
        })();
        let _ = done_tx.send(result);
    });
    Transfer { key, meta, chunks, done }
}

/// The paths an output of this attempt may refer to, which its NAR is scanned for: the input
/// closure named in `build`, the inputs, the derivation's outputs, and what the host claims. When
/// the output goes into the cache, whose closure of the inputs is complete, a claimed reference
/// outside that set is refused at once: no build could have found it.
pub(super) fn possible_references(
    a: &Active,
    meta: &PathMeta,
    cache: Option<&Cache>,
) -> Result<BTreeSet<String>, AttemptResult> {
    let mut candidates: BTreeSet<String> = a.announced.clone();
    candidates.extend(a.job.inputs.iter().cloned());
    candidates.extend(a.expected.values().cloned());
    if cache.is_some_and(|c| c.store_dir().parse_path(&meta.path).is_ok())
        && let Some(r) = meta.references.iter().find(|r| !candidates.contains(*r))
    {
        return Err(rejected(format!(
            "the host says {} refers to {r}, which is not among the build's inputs or outputs",
            meta.path
        )));
    }
    candidates.extend(meta.references.iter().cloned());
    Ok(candidates)
}

/// Compare what arrived with what the host claimed: the NAR's hash and size, and its references
/// (every claimed one occurs in it, and no possible one that is not claimed).
pub(super) fn check_received(meta: &PathMeta, r: Received) -> Result<Option<StagedNar>, AttemptResult> {
    if r.nar_hash != meta.nar_hash || r.nar_size != meta.nar_size {
        return Err(rejected(format!(
            "the NAR of {} does not match its claim: {}, {} bytes, claimed {}, {} bytes",
            meta.path, r.nar_hash, r.nar_size, meta.nar_hash, meta.nar_size
        )));
    }
    let claimed: BTreeSet<String> = meta.references.iter().cloned().collect();
    if r.references != claimed {
        let unclaimed: Vec<&String> = r.references.difference(&claimed).collect();
        let absent: Vec<&String> = claimed.difference(&r.references).collect();
        return Err(rejected(format!(
            "the references of {} are not the ones claimed: found but not claimed {unclaimed:?}, claimed but not found {absent:?}",
            meta.path
        )));
    }
    Ok(r.staged)
}

/// What a `finished` message means for an attempt; None when the outputs' NARs are still to come.
pub(super) fn finished(
    a: &mut Active,
    status: BuildStatus,
    outputs: Vec<BuiltOutput>,
    trusted: &[HostPublicKey],
) -> Option<AttemptResult> {
    let failed = |status, reason: String| Some(AttemptResult::Failed { status, reason });
    if let Some(max) = a.log_exceeded {
        return failed(AttemptStatus::BuildFailure, format!("its log passed {max} bytes (--max-log-size)"));
    }
    let retry = |status, reason: String| Some(AttemptResult::Retry { status, reason, count: true });
    match status {
        BuildStatus::Success => match check_outputs(&a.expected, &outputs, trusted) {
            Ok(()) => {
                a.claimed = outputs;
                None
            }
            Err(rejection) => Some(rejection),
        },
        BuildStatus::BuildFailure { exit_code, reason } => {
            let reason = match exit_code {
                Some(c) if reason.is_empty() => format!("the builder exited with status {c}"),
                _ => reason,
            };
            failed(AttemptStatus::BuildFailure, reason)
        }
        BuildStatus::TimedOut { seconds } => failed(AttemptStatus::TimedOut, format!("timed out after {seconds} s")),
        BuildStatus::SilentTooLong { seconds } => {
            failed(AttemptStatus::SilentTooLong, format!("no output for {seconds} s"))
        }
        BuildStatus::SetupFailure { reason } => retry(AttemptStatus::SetupFailure, reason),
        BuildStatus::TransientFailure { reason } => retry(AttemptStatus::TransientFailure, reason),
        BuildStatus::MissingInputs { paths } => Some(AttemptResult::MissingInputs { paths }),
        BuildStatus::Canceled => Some(AttemptResult::Canceled),
    }
}

/// The agent's claimed outputs must be exactly the derivation's, each signed by a trusted key.
fn check_outputs(
    expected: &BTreeMap<String, String>,
    outputs: &[BuiltOutput],
    trusted: &[HostPublicKey],
) -> Result<(), AttemptResult> {
    if outputs.len() != expected.len() {
        let reason = format!("the agent reported {} outputs, the derivation has {}", outputs.len(), expected.len());
        return Err(rejected(reason));
    }
    for o in outputs {
        if expected.get(&o.name) != Some(&o.meta.path) {
            let reason = format!("the agent reported output {} at {}, not the derivation's path", o.name, o.meta.path);
            return Err(rejected(reason));
        }
        let hash = crate::formats::hash::Hash::parse(&o.meta.nar_hash)
            .map_err(|e| rejected(format!("output {}: bad NAR hash {}: {e}", o.name, o.meta.nar_hash)))?;
        let fp = narinfo::fingerprint(&o.meta.path, &hash, o.meta.nar_size, &o.meta.references);
        if !trusted.iter().any(|k| k.verify_fingerprint(&fp, &o.signature)) {
            let by = crate::formats::host_key::describe_signature(&o.signature);
            let reason = format!("output {}: not signed by a trusted key (signature by {by})", o.name);
            return Err(rejected(reason));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a";
    const B: &str = "/nix/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b";

    fn meta(references: &[&str]) -> PathMeta {
        PathMeta {
            path: "/nix/store/2fddh7wrp08zszglvp7wdvxjs8hwjmah-out".into(),
            nar_hash: "sha256:1np9qahxc6apzpgil734ihi7r55ax34iiifyhlj20jvf3a0yyr10".into(),
            nar_size: 120,
            references: references.iter().map(|r| r.to_string()).collect(),
            deriver: None,
        }
    }

    fn received(m: &PathMeta, references: &[&str]) -> Received {
        let references = references.iter().map(|r| r.to_string()).collect();
        Received { nar_hash: m.nar_hash.clone(), nar_size: m.nar_size, references, staged: None }
    }

    fn rejection(r: Result<Option<StagedNar>, AttemptResult>) -> String {
        match r {
            Err(AttemptResult::Retry { status: AttemptStatus::Rejected, reason, .. }) => reason,
            other => unreachable!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn an_output_s_references_must_be_exactly_the_ones_its_nar_holds() {
        let m = meta(&[A]);
        assert!(check_received(&m, received(&m, &[A])).is_ok());
        let hidden = rejection(check_received(&m, received(&m, &[A, B])));
        assert!(
            hidden.contains("found but not claimed [\"/nix/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b\"]"),
            "{hidden}"
        );
        let invented = rejection(check_received(&m, received(&m, &[])));
        assert!(
            invented.contains("claimed but not found [\"/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a\"]"),
            "{invented}"
        );
        let mut other = received(&m, &[A]);
        other.nar_size += 1;
        assert!(rejection(check_received(&m, other)).contains("does not match its claim"));
    }
}
