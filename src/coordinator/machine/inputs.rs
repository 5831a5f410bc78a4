//! A session's input thread: sends the agent the inputs it lacks, one path after the other in the
//! order given (a closure's references before the paths that refer to them), from the cache or
//! straight from an upstream substituter. A path from upstream goes to the host as it downloads,
//! while the cache stages it beside (the agent checks every NAR against its hash, so it need not
//! wait for the cache's check): the two copies are written at the same time, not one after the
//! other.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use crate::cache::{self, Cache};
use crate::coordinator::transport;
use crate::formats::narinfo::NarInfo;
use crate::formats::store_path::StoreDir;
use crate::protocol::{ChunkWriter, Frame, Message, NAR_CHUNK, PathMeta};
use crate::substituter::{Found, Substituter};

/// One path to send (or, for `Upstream` without a transfer, only to take into the cache).
pub(super) enum Input {
    Cached(Box<NarInfo>, u64),
    Upstream { found: Arc<Found>, from: Arc<Substituter>, transfer: Option<u64> },
}

/// Transfers whose NAR did not come whole from upstream, with why: the agent refuses them, and
/// the session then takes the path for missing (it is built) rather than for a host's failure.
/// Written before the transfer's end is sent, so it is there when the refusal comes.
#[derive(Clone, Default)]
pub(super) struct Abandoned(Arc<Mutex<HashMap<u64, String>>>);

impl Abandoned {
    fn insert(&self, transfer: u64, why: String) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(transfer, why);
    }

    /// Why `transfer` was abandoned, if it was (forgotten once asked).
    pub(super) fn take(&self, transfer: u64) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&transfer)
    }
}

pub(super) struct Inputs {
    tx: std::sync::mpsc::Sender<Input>,
    pub abandoned: Abandoned,
}

impl Inputs {
    pub(super) fn start(cache: Arc<Cache>, frames: transport::Outbox, machine: String) -> Inputs {
        let (tx, rx) = std::sync::mpsc::channel::<Input>();
        let abandoned = Abandoned::default();
        let gone = abandoned.clone();
        std::thread::spawn(move || {
            while let Ok(input) = rx.recv() {
                let going = match input {
                    Input::Cached(info, transfer) => send_cached(&cache, &info, transfer, &frames),
                    Input::Upstream { found, from, transfer } => {
                        send_upstream(&cache, &from, &found, transfer, &frames, &gone, &machine)
                    }
                };
                if !going {
                    return;
                }
            }
        });
        Inputs { tx, abandoned }
    }

    pub(super) fn send(&self, input: Input) {
        let _ = self.tx.send(input);
    }
}

fn meta(sd: &StoreDir, info: &NarInfo) -> PathMeta {
    PathMeta {
        path: sd.display(&info.store_path),
        nar_hash: format!("sha256:{}", info.nar_hash.to_nix32()),
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| sd.display(r)).collect(),
        deriver: info.deriver.as_ref().map(|d| sd.display(d)),
    }
}

/// Send one path of the cache as transfer `transfer`; false once the session is gone. Should a
/// NAR be unreadable, what arrives does not match its hash, and the agent says so.
fn send_cached(cache: &Cache, info: &NarInfo, transfer: u64, tx: &transport::Outbox) -> bool {
    let start = Message::NarStart { transfer, build: None, meta: meta(cache.store_dir(), info) };
    tx.blocking_send_bulk(Frame::new(start)).is_ok() && send_cached_body(cache, info, transfer, tx)
}

/// Take one path from upstream into the cache, sending it to the agent as transfer `transfer`
/// (when given) as it downloads; false once the session is gone.
fn send_upstream(
    cache: &Cache,
    from: &Substituter,
    found: &Found,
    transfer: Option<u64>,
    tx: &transport::Outbox,
    abandoned: &Abandoned,
    machine: &str,
) -> bool {
    let Some(transfer) = transfer else {
        // Only for the cache (the host has it): the cache keeps whole closures.
        if let Err(e) = from.substitute_teeing(found, cache, &mut io::sink()) {
            tracing::warn!(machine, "{}: from substituters: {e}", found.path());
        }
        return true;
    };
    let start = Message::NarStart { transfer, build: None, meta: meta(&found.info.store_dir, &found.info) };
    if tx.blocking_send_bulk(Frame::new(start)).is_err() {
        return false;
    }
    let mut forward = Forward {
        out: io::BufWriter::with_capacity(
            NAR_CHUNK,
            ChunkWriter::new(transfer, |message: &Message, payload: &[u8]| {
                let frame = Frame { message: message.clone(), payload: payload.to_vec() };
                tx.blocking_send_bulk(frame).map_err(|_| io::Error::other("the session ended"))
            }),
        ),
        gone: false,
    };
    let result = from.substitute_teeing(found, cache, &mut forward);
    let _ = forward.out.flush();
    let gone = forward.gone;
    drop(forward);
    match result {
        Ok(true) => {}
        // Another session took it into the cache meanwhile: send it from there.
        Ok(false) => match cache.narinfo(&found.path()) {
            Ok(Some(info)) => {
                return send_cached_body(cache, &info, transfer, tx);
            }
            Ok(None) => abandoned.insert(transfer, "it left the cache while being sent".to_owned()),
            Err(e) => abandoned.insert(transfer, format!("reading the cache: {e}")),
        },
        Err(e) => {
            tracing::warn!(machine, "{}: from substituters: {e}; it will be built", found.path());
            abandoned.insert(transfer, e);
        }
    }
    !gone && tx.blocking_send_bulk(Frame::new(Message::NarEnd { transfer })).is_ok()
}

/// The chunks and end of a transfer already started.
fn send_cached_body(cache: &Cache, info: &NarInfo, transfer: u64, tx: &transport::Outbox) -> bool {
    let sent = cache.open_nar(info).and_then(|mut nar| {
        cache::for_each_chunk(&mut nar, NAR_CHUNK, |chunk| {
            let message = Message::NarChunk { transfer, payload: chunk.len() as u64 };
            tx.blocking_send_bulk(Frame { message, payload: chunk }).is_ok()
        })
    });
    if let Err(e) = sent {
        tracing::error!("reading {} from the cache: {e}", info.url);
    }
    tx.blocking_send_bulk(Frame::new(Message::NarEnd { transfer })).is_ok()
}

/// Forwards to the agent until the session ends, then swallows: the cache's copy goes on.
struct Forward<W: Write> {
    out: W,
    gone: bool,
}

impl<W: Write> Write for Forward<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.gone && self.out.write_all(buf).is_err() {
            self.gone = true;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
