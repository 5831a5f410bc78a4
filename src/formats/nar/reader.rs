//! Reading NARs: a streaming pull parser.
//!
//! [`NarReader::next_event`] yields one [`Event`] at a time. A regular file's contents are read through the
//! event's [`Contents`] (or skipped if left unread). Everything is validated as it streams: the magic,
//! the grammar, entry names (no empty, `.`, `..`, `/` or NUL), strictly increasing entry order (which
//! also rules out duplicates), zero padding, length limits, nesting depth, truncation and trailing
//! bytes. After an error the reader refuses to go on.

use std::io::{self, BufRead, BufReader, Read, Write};

use thiserror::Error;

use super::{MAGIC, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, check_entry_name, check_symlink_target, padding};

/// The longest grammar token ("directory", "executable", ...).
const MAX_TOKEN_LEN: usize = 16;
/// Regular files larger than this are refused as absurd (2^53 bytes: 8 PiB).
pub const MAX_FILE_SIZE: u64 = 1 << 53;

#[derive(Debug, Error)]
pub enum NarError {
    #[error("NAR byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("NAR is truncated at byte {offset}")]
    Truncated { offset: u64 },
    #[error("not a NAR: bad magic at byte 0")]
    BadMagic,
    #[error("NAR byte {offset}: expected {expected}, found {found}")]
    Unexpected { offset: u64, expected: &'static str, found: String },
    #[error("NAR byte {offset}: {what} is {len} bytes long, more than the limit of {max}")]
    TooLong { offset: u64, what: &'static str, len: u64, max: u64 },
    #[error("NAR byte {offset}: non-zero padding")]
    NonZeroPadding { offset: u64 },
    #[error("NAR byte {offset}: {why}: {name}")]
    BadName { offset: u64, why: &'static str, name: String },
    #[error("NAR byte {offset}: entry {name} is not after {previous} (entries must be sorted and unique)")]
    Unsorted { offset: u64, name: String, previous: String },
    #[error("NAR byte {offset}: directories nested deeper than {MAX_DEPTH} levels")]
    TooDeep { offset: u64 },
    #[error("NAR byte {offset}: trailing bytes after the end of the archive")]
    TrailingBytes { offset: u64 },
    #[error("the NAR reader was used after an error")]
    Poisoned,
}

fn io_error(offset: u64) -> impl FnOnce(io::Error) -> NarError {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            NarError::Truncated { offset }
        } else {
            NarError::Io { offset, source: e }
        }
    }
}

fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// One step through a NAR. Names are empty for the root node. `C` is how a regular file's contents
/// are reached: [`Contents`] for callers, nothing inside the parser.
pub enum Event<C> {
    Directory {
        name: Vec<u8>,
    },
    /// The end of the innermost open directory.
    EndDirectory,
    Symlink {
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Regular {
        name: Vec<u8>,
        executable: bool,
        size: u64,
        contents: C,
    },
}

/// An event as [`NarReader::next_event`] yields it, borrowing the reader for the file contents.
pub type NarEvent<'a, R> = Event<Contents<'a, R>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Contents { remaining: u64 },
    AfterNode,
    InDirectory,
    Done,
    Failed,
}

/// A streaming NAR parser over any reader.
pub struct NarReader<R: Read> {
    r: BufReader<R>,
    pos: u64,
    state: State,
    /// One entry per open directory: the name of its latest entry.
    stack: Vec<Option<Vec<u8>>>,
    size: u64,
}

impl<R: Read> NarReader<R> {
    pub fn new(r: R) -> NarReader<R> {
        NarReader {
            r: BufReader::with_capacity(256 * 1024, r),
            pos: 0,
            state: State::Start,
            stack: Vec::new(),
            size: 0,
        }
    }

    /// The underlying reader. Bytes it delivered beyond the NAR's end are lost, so call this after
    /// [`NarReader::next_event`] has returned `None` (which checks that there were none).
    pub fn into_inner(self) -> R {
        self.r.into_inner()
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next event, or `None` after the root node has ended (and the input with it).
    pub fn next_event(&mut self) -> Result<Option<NarEvent<'_, R>>, NarError> {
        if self.state == State::Failed {
            return Err(NarError::Poisoned);
        }
        let parsed = match self.advance().and_then(|()| self.parse_event()) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.state = State::Failed;
                return Err(e);
            }
        };
        Ok(parsed.map(|p| match p {
            Event::Directory { name } => Event::Directory { name },
            Event::EndDirectory => Event::EndDirectory,
            Event::Symlink { name, target } => Event::Symlink { name, target },
            Event::Regular { name, executable, size, contents: () } => {
                Event::Regular { name, executable, size, contents: Contents { nar: self } }
            }
        }))
    }

    /// Read everything up to the next event, leaving `state` where the next event starts.
    fn advance(&mut self) -> Result<(), NarError> {
        loop {
            match self.state {
                State::Start | State::InDirectory | State::Done | State::Failed => return Ok(()),
                State::Contents { remaining } => {
                    self.skip(remaining)?;
                    self.read_padding(self.size)?;
                    self.expect(b")", "\")\" after file contents")?;
                    self.state = State::AfterNode;
                }
                State::AfterNode => {
                    if self.stack.is_empty() {
                        if !self.r.fill_buf().map_err(io_error(self.pos))?.is_empty() {
                            return Err(NarError::TrailingBytes { offset: self.pos });
                        }
                        self.state = State::Done;
                    } else {
                        self.expect(b")", "\")\" closing a directory entry")?;
                        self.state = State::InDirectory;
                    }
                    return Ok(());
                }
            }
        }
    }

    fn parse_event(&mut self) -> Result<Option<Event<()>>, NarError> {
        match self.state {
            State::Start => {
                // What is not the magic is not a NAR; a failure to read it is the reader's error
                // (a full disk under a tee, say), not the bytes'.
                let magic = match self.read_string(MAGIC.len(), "the magic") {
                    Ok(magic) => magic,
                    Err(e @ NarError::Io { .. }) => return Err(e),
                    Err(_) => return Err(NarError::BadMagic),
                };
                if magic != MAGIC {
                    return Err(NarError::BadMagic);
                }
                self.node(Vec::new())
            }
            State::InDirectory => {
                let offset = self.pos;
                let token = self.read_token()?;
                match token.as_slice() {
                    b")" => {
                        self.stack.pop();
                        self.state = State::AfterNode;
                        Ok(Some(Event::EndDirectory))
                    }
                    b"entry" => {
                        self.expect(b"(", "\"(\" after \"entry\"")?;
                        self.expect(b"name", "\"name\"")?;
                        let offset = self.pos;
                        let name = self.read_string(MAX_NAME_LEN, "an entry name")?;
                        check_entry_name(&name).map_err(|why| NarError::BadName { offset, why, name: show(&name) })?;
                        let last = self.stack.last_mut().and_then(Option::take);
                        if let Some(previous) = last
                            && previous >= name
                        {
                            return Err(NarError::Unsorted { offset, name: show(&name), previous: show(&previous) });
                        }
                        if let Some(slot) = self.stack.last_mut() {
                            *slot = Some(name.clone());
                        }
                        self.expect(b"node", "\"node\"")?;
                        self.node(name)
                    }
                    other => Err(NarError::Unexpected { offset, expected: "\"entry\" or \")\"", found: show(other) }),
                }
            }
            _ => Ok(None),
        }
    }

    fn node(&mut self, name: Vec<u8>) -> Result<Option<Event<()>>, NarError> {
        self.expect(b"(", "\"(\" starting a node")?;
        self.expect(b"type", "\"type\"")?;
        let offset = self.pos;
        let ty = self.read_token()?;
        match ty.as_slice() {
            b"regular" => {
                let offset = self.pos;
                let mut token = self.read_token()?;
                let executable = token == b"executable";
                if executable {
                    self.expect(b"", "an empty string after \"executable\"")?;
                    token = self.read_token()?;
                }
                if token != b"contents" {
                    return Err(NarError::Unexpected { offset, expected: "\"contents\"", found: show(&token) });
                }
                let offset = self.pos;
                let size = self.read_u64()?;
                if size > MAX_FILE_SIZE {
                    return Err(NarError::TooLong { offset, what: "a file", len: size, max: MAX_FILE_SIZE });
                }
                self.size = size;
                self.state = State::Contents { remaining: size };
                Ok(Some(Event::Regular { name, executable, size, contents: () }))
            }
            b"symlink" => {
                self.expect(b"target", "\"target\"")?;
                let offset = self.pos;
                let target = self.read_string(MAX_TARGET_LEN, "a symlink target")?;
                check_symlink_target(&target).map_err(|why| NarError::BadName { offset, why, name: show(&target) })?;
                self.expect(b")", "\")\" after a symlink target")?;
                self.state = State::AfterNode;
                Ok(Some(Event::Symlink { name, target }))
            }
            b"directory" => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(NarError::TooDeep { offset });
                }
                self.stack.push(None);
                self.state = State::InDirectory;
                Ok(Some(Event::Directory { name }))
            }
            other => Err(NarError::Unexpected { offset, expected: "a node type", found: show(other) }),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        self.r.read_exact(buf).map_err(io_error(self.pos))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let mut pad = [0u8; 8];
        let n = padding(len);
        let offset = self.pos;
        self.read_exact(&mut pad[..n])?;
        if pad[..n].iter().any(|&b| b != 0) {
            return Err(NarError::NonZeroPadding { offset });
        }
        Ok(())
    }

    /// A length-prefixed string of at most `max` bytes.
    fn read_string(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, NarError> {
        let offset = self.pos;
        let len = self.read_u64()?;
        if len > max as u64 {
            return Err(NarError::TooLong { offset, what, len, max: max as u64 });
        }
        let mut s = vec![0u8; len as usize];
        self.read_exact(&mut s)?;
        self.read_padding(len)?;
        Ok(s)
    }

    fn read_token(&mut self) -> Result<Vec<u8>, NarError> {
        self.read_string(MAX_TOKEN_LEN, "a token")
    }

    fn expect(&mut self, token: &[u8], expected: &'static str) -> Result<(), NarError> {
        let offset = self.pos;
        let found = self.read_token()?;
        if found != token {
            return Err(NarError::Unexpected { offset, expected, found: show(&found) });
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> Result<(), NarError> {
        while n > 0 {
            let buf = self.r.fill_buf().map_err(io_error(self.pos))?;
            if buf.is_empty() {
                return Err(NarError::Truncated { offset: self.pos });
            }
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.r.consume(k);
            self.pos += k as u64;
            n -= k as u64;
        }
        self.state = State::Contents { remaining: 0 };
        Ok(())
    }
}

/// The contents of the current regular file; read it, or leave it and the reader skips it.
pub struct Contents<'a, R: Read> {
    nar: &'a mut NarReader<R>,
}

impl<R: Read> Contents<'_, R> {
    fn remaining(&self) -> u64 {
        match self.nar.state {
            State::Contents { remaining } => remaining,
            _ => 0,
        }
    }

    /// Copy the rest of the contents to `w` straight from the reader's buffer.
    pub fn copy_to<W: Write + ?Sized>(&mut self, w: &mut W) -> io::Result<u64> {
        let mut total = 0;
        loop {
            let buf = self.fill_buf()?;
            if buf.is_empty() {
                return Ok(total);
            }
            let n = buf.len();
            w.write_all(buf)?;
            self.consume(n);
            total += n as u64;
        }
    }
}

impl<R: Read> Read for Contents<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Contents<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let remaining = self.remaining();
        if remaining == 0 {
            return Ok(&[]);
        }
        let offset = self.nar.pos;
        let buf = self.nar.r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, NarError::Truncated { offset }));
        }
        let n = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
        Ok(&buf[..n])
    }

    fn consume(&mut self, n: usize) {
        let remaining = self.remaining();
        let n = (n as u64).min(remaining);
        self.nar.r.consume(n as usize);
        self.nar.pos += n;
        self.nar.state = State::Contents { remaining: remaining - n };
    }
}
