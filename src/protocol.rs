//! The protocol between the coordinator and `gbc agent`, in one place: every message type, the
//! version, and the framing. Specified for people in docs/protocol.md.
//!
//! Framing: one JSON object per line (UTF-8, at most [`MAX_LINE`] bytes including the newline).
//! A message whose `"payload"` field is N is followed, right after its newline, by exactly N raw
//! bytes (at most [`MAX_PAYLOAD`]): NAR chunks and build log output travel this way, so they cost no
//! base64 and bytes that are not UTF-8 survive intact. Messages of different builds and transfers
//! interleave freely.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bumped on any incompatible change. Peers with different versions refuse each other in `hello`.
pub const PROTOCOL_VERSION: u32 = 3;
/// Longest JSON line accepted, newline included.
pub const MAX_LINE: usize = 4 << 20;
/// Largest binary payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The payload size senders use for NAR chunks. Measured with scripts/bench-agent over 1 MiB pipes,
/// 1 GiB NAR: 256 KiB and 512 KiB frames streamed at 1.06-1.20x the time of `cat`; 1 MiB frames at
/// 1.6x (a 1 MiB payload plus its header never fits the pipe at once, so writer and reader take turns).
pub const NAR_CHUNK: usize = 256 * 1024;

/// What a build host says about itself in `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub cores: u32,
    pub load1: f64,
    /// Free bytes on the file system of the agent's store.
    pub free_space: u64,
    /// Store dirs the agent accepts paths and derivations for.
    pub store_dirs: Vec<String>,
    /// The agent's signing key, Nix format (`name:base64`).
    pub signing_key: String,
}

/// A valid store path as one side describes it to the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathMeta {
    pub path: String,
    /// `sha256:<nix32>`
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<String>,
}

/// One built output, with the agent's signature over its Nix fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltOutput {
    pub name: String,
    pub meta: PathMeta,
    /// `keyname:base64`, over `1;<path>;<nar_hash>;<nar_size>;<references>`.
    pub signature: String,
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildStatus {
    Success,
    BuildFailure {
        exit_code: Option<i32>,
        reason: String,
    },
    TimedOut {
        seconds: u64,
    },
    SilentTooLong {
        seconds: u64,
    },
    SetupFailure {
        reason: String,
    },
    /// A failure that was not the derivation's doing as far as the host can tell (the builder
    /// killed by a signal, the store's disk full): worth another try, elsewhere if possible.
    TransientFailure {
        reason: String,
    },
    Canceled,
    MissingInputs {
        paths: Vec<String>,
    },
}

/// Every message, in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// First message of each side. The agent adds its host facts; the coordinator may say how
    /// long the agent should wait for its next message before taking it for gone.
    Hello {
        protocol: u32,
        gbc_version: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<HostFacts>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idle_secs: Option<u64>,
    },
    /// Coordinator → agent: build this derivation. `inputs` are the store paths it uses directly
    /// (input sources and the used outputs of input derivations); the agent takes their closure.
    Build {
        build: String,
        drv_path: String,
        /// The derivation in ATerm form.
        drv: String,
        inputs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_silent_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cores: Option<u32>,
    },
    /// Agent → coordinator: which paths of the build's input closure it lacks. The coordinator
    /// sends them (`nar_start`...) and then `start`.
    Inputs {
        build: String,
        missing: Vec<String>,
    },
    /// Coordinator → agent: start the build (its inputs should now all be valid).
    Start {
        build: String,
    },
    /// Coordinator → agent: stop a build, queued or running.
    Cancel {
        build: String,
    },
    /// Agent → coordinator: the builder is running.
    Started {
        build: String,
    },
    /// Agent → coordinator: build log bytes, in the payload.
    Log {
        build: String,
        payload: u64,
    },
    /// Agent → coordinator: the build is over. On success, each output's NAR follows as a
    /// transfer whose `build` is set.
    Finished {
        build: String,
        status: BuildStatus,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        outputs: Vec<BuiltOutput>,
    },
    /// Either way: a NAR follows in `nar_chunk` frames of this transfer, then `nar_end`.
    NarStart {
        transfer: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        build: Option<String>,
        meta: PathMeta,
    },
    NarChunk {
        transfer: u64,
        payload: u64,
    },
    NarEnd {
        transfer: u64,
    },
    /// Coordinator → agent: send the NAR of this valid path as transfer `transfer` (`nar_start`
    /// without `build`, chunks, `nar_end`), or an `error` naming the transfer.
    Fetch {
        transfer: u64,
        path: String,
    },
    /// Coordinator → agent: take `paths` (with the closure of each that the store lacks) from
    /// these binary caches yourself, trusting only these keys (Nix `NAME:base64` or a Guix
    /// `(public-key …)`); answered by `substituted`. For hosts with a good network of their own.
    Substitute {
        build: String,
        paths: Vec<String>,
        substituters: Vec<String>,
        keys: Vec<String>,
    },
    /// Agent → coordinator: the paths now valid (the closure included); `error` says why the rest
    /// are not (the coordinator then sends them itself).
    Substituted {
        build: String,
        added: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Coordinator → agent: how loaded is the host now? Answered by `pong`.
    Ping {},
    /// Agent → coordinator: the host's current 1-minute load and free bytes in the store.
    Pong {
        load1: f64,
        free_space: u64,
    },
    /// Agent → coordinator: a NAR sent to it checked out and its path is now valid.
    PathAdded {
        transfer: u64,
        path: String,
    },
    /// Either way: something the peer sent was refused; the session goes on.
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        build: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transfer: Option<u64>,
    },
}

impl Message {
    /// Length of the binary payload that follows this message, if any.
    pub fn payload_len(&self) -> u64 {
        match self {
            Message::Log { payload, .. } | Message::NarChunk { payload, .. } => *payload,
            _ => 0,
        }
    }

    pub fn error(message: impl Into<String>) -> Message {
        Message::Error { message: message.into(), build: None, transfer: None }
    }
}

/// A message and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub message: Message,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(message: Message) -> Frame {
        Frame { message, payload: Vec::new() }
    }
}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The line was read and skipped; the session can go on.
    #[error("line {line}: {reason}")]
    BadLine { line: u64, reason: String },
    /// The stream cannot be followed any more (a payload that cannot be skipped safely).
    #[error("line {line}: {reason}")]
    Fatal { line: u64, reason: String },
}

/// Write one frame. The caller flushes.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> io::Result<()> {
    debug_assert_eq!(frame.message.payload_len(), frame.payload.len() as u64);
    let mut line = serde_json::to_vec(&frame.message).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.write_all(&frame.payload)
}

/// Reads frames, refusing over-long lines, malformed JSON and unknown messages one line at a time.
pub struct FrameReader<R> {
    r: R,
    line_no: u64,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<BufReader<R>> {
    /// Read frames from `r` through a 16 KiB buffer: large enough for most message lines (longer ones
    /// take several reads), small enough that payloads are read from `r` straight into place rather
    /// than copied out of the buffer.
    pub fn from_read(r: R) -> FrameReader<BufReader<R>> {
        FrameReader::new(BufReader::with_capacity(16 * 1024, r))
    }
}

impl<R: BufRead> FrameReader<R> {
    pub fn new(r: R) -> FrameReader<R> {
        FrameReader { r, line_no: 0, buf: Vec::with_capacity(4096) }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub fn read(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let mut payload = Vec::new();
        Ok(self.read_message(&mut payload)?.map(|message| Frame { message, payload }))
    }

    /// The next message, its payload (if any) in `payload`, whose allocation is reused from frame to
    /// frame: the hot loop of a reader of large transfers.
    pub fn read_message(&mut self, payload: &mut Vec<u8>) -> Result<Option<Message>, ProtocolError> {
        self.buf.clear();
        self.line_no += 1;
        let line = self.line_no;
        let mut too_long = false;
        loop {
            let chunk = self.r.fill_buf()?;
            if chunk.is_empty() {
                if self.buf.is_empty() && !too_long {
                    return Ok(None);
                }
                return Err(ProtocolError::Fatal { line, reason: "stream ended inside a line".to_owned() });
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if !too_long {
                if self.buf.len() + take > MAX_LINE {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.r.consume(take);
            if done {
                break;
            }
        }
        if too_long {
            return Err(ProtocolError::BadLine { line, reason: format!("line longer than {MAX_LINE} bytes") });
        }
        let message: Message = match serde_json::from_slice(&self.buf) {
            Ok(m) => m,
            Err(e) => {
                // A line we cannot read might have announced a payload; if it plainly did, we can
                // no longer tell where the next line starts.
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.buf)
                    && v.get("payload").and_then(|p| p.as_u64()).is_some_and(|p| p > 0)
                {
                    return Err(ProtocolError::Fatal { line, reason: format!("bad message with a payload: {e}") });
                }
                return Err(ProtocolError::BadLine { line, reason: format!("bad message: {e}") });
            }
        };
        let len = message.payload_len();
        if len > MAX_PAYLOAD as u64 {
            return Err(ProtocolError::Fatal { line, reason: format!("payload of {len} bytes is over {MAX_PAYLOAD}") });
        }
        // With a reader buffer smaller than the payload (see `from_read`), `read_exact` copies what
        // is buffered and reads the rest straight into the payload; reusing the payload's allocation
        // saves zero-filling it.
        payload.resize(len as usize, 0);
        self.r.read_exact(payload).map_err(|e| ProtocolError::Fatal { line, reason: format!("payload: {e}") })?;
        Ok(Some(message))
    }
}

/// A writer that sends what is written to it as `nar_chunk` frames of `transfer`, each write as it
/// comes, split at [`NAR_CHUNK`]: wrap it in a `BufWriter` of `NAR_CHUNK` so that small writes are
/// gathered, while large ones go straight through.
pub struct ChunkWriter<F: FnMut(&Message, &[u8]) -> io::Result<()>> {
    transfer: u64,
    send: F,
}

impl<F: FnMut(&Message, &[u8]) -> io::Result<()>> ChunkWriter<F> {
    pub fn new(transfer: u64, send: F) -> ChunkWriter<F> {
        ChunkWriter { transfer, send }
    }
}

impl<F: FnMut(&Message, &[u8]) -> io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(NAR_CHUNK);
        if n > 0 {
            (self.send)(&Message::NarChunk { transfer: self.transfer, payload: n as u64 }, &data[..n])?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Output name → path, for building requests.
pub type OutputPaths = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Vec<Result<Frame, String>> {
        let mut r = FrameReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.read() {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => return out,
                Err(ProtocolError::BadLine { reason, .. }) => out.push(Err(reason)),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[test]
    fn frames_round_trip_with_binary_payloads() {
        let frames = vec![
            Frame::new(Message::Hello {
                protocol: PROTOCOL_VERSION,
                gbc_version: "0.1.0".into(),
                host: None,
                idle_secs: None,
            }),
            Frame { message: Message::Log { build: "b1".into(), payload: 4 }, payload: vec![0xff, b'\n', 0, 0xfe] },
            Frame::new(Message::Finished {
                build: "b1".into(),
                status: BuildStatus::BuildFailure { exit_code: Some(3), reason: "exit 3".into() },
                outputs: vec![],
            }),
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            write_frame(&mut bytes, f).ok();
        }
        let back: Vec<Frame> = read_all(&bytes).into_iter().flatten().collect();
        assert_eq!(back, frames);
    }

    #[test]
    fn bad_lines_are_skipped_and_the_stream_goes_on() {
        let ok = "{\"type\":\"start\",\"build\":\"x\"}\n";
        let long = format!("{}\n", "x".repeat(MAX_LINE + 10));
        let input = format!(
            "not json\n{{\"type\":\"frobnicate\"}}\n{long}{{\"type\":\"start\",\"build\":\"x\",\"extra\":1}}\n{ok}"
        );
        let got = read_all(input.as_bytes());
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[0].as_ref().is_err_and(|e| e.contains("bad message")));
        assert!(got[1].as_ref().is_err_and(|e| e.contains("unknown variant")));
        assert!(got[2].as_ref().is_err_and(|e| e.contains("longer than")));
        assert!(got[3].as_ref().is_err_and(|e| e.contains("unknown field")));
        assert_eq!(got[4].as_ref().ok(), Some(&Frame::new(Message::Start { build: "x".into() })));
    }

    #[test]
    fn oversized_or_truncated_payloads_end_the_stream() {
        let huge = format!("{{\"type\":\"nar_chunk\",\"transfer\":1,\"payload\":{}}}\n", MAX_PAYLOAD + 1);
        assert!(read_all(huge.as_bytes()).last().is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("over"))));
        let short = "{\"type\":\"nar_chunk\",\"transfer\":1,\"payload\":10}\nabc";
        assert!(read_all(short.as_bytes()).last().is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("payload"))));
    }

    #[test]
    fn chunk_writer_behind_a_buffer_sends_full_frames() {
        let mut sizes = Vec::new();
        {
            let w = ChunkWriter::new(7, |m: &Message, p: &[u8]| {
                assert_eq!(m.payload_len(), p.len() as u64);
                sizes.push(p.len());
                Ok(())
            });
            let mut w = io::BufWriter::with_capacity(NAR_CHUNK, w);
            for _ in 0..5 {
                w.write_all(&vec![1u8; MAX_PAYLOAD / 2 + 1]).ok();
            }
            w.flush().ok();
        }
        assert_eq!(sizes.iter().sum::<usize>(), 5 * (MAX_PAYLOAD / 2 + 1));
        assert!(sizes.iter().all(|&n| n <= NAR_CHUNK), "{sizes:?}");
    }
}
