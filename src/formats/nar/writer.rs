//! Writing NARs. The types enforce the grammar: [`begin`] writes the magic and gives the root
//! [`Node`]; a node is consumed by writing it; a [`Directory`] hands out one entry at a time, checks
//! that names are valid and strictly increasing, and must be closed.

use std::io::{self, Read, Write};

use super::{MAGIC, check_entry_name, check_symlink_target, padding};
use crate::formats::nix_wire::{write_string as write_str, write_u64};

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

fn write_strs<W: Write + ?Sized>(w: &mut W, strs: &[&[u8]]) -> io::Result<()> {
    strs.iter().try_for_each(|s| write_str(w, s))
}

/// Start a NAR: writes the magic and returns the root node.
pub fn begin<W: Write>(w: &mut W) -> io::Result<Node<'_, W>> {
    write_str(w, MAGIC)?;
    Ok(Node { w, entry_open: None })
}

/// A node not yet written. Writing it consumes it.
pub struct Node<'a, W: Write> {
    w: &'a mut W,
    /// Set when this node is the body of a directory entry, which the node's end also closes.
    entry_open: Option<&'a mut bool>,
}

impl<'a, W: Write> Node<'a, W> {
    fn finish(self) -> io::Result<()> {
        write_str(self.w, b")")?;
        if let Some(open) = self.entry_open {
            write_str(self.w, b")")?;
            *open = false;
        }
        Ok(())
    }

    /// A regular file of exactly `size` bytes read from `contents`. Fails if `contents` ends early.
    pub fn regular<R: Read>(self, executable: bool, size: u64, contents: R) -> io::Result<()> {
        write_strs(self.w, &[b"(", b"type", b"regular"])?;
        if executable {
            write_strs(self.w, &[b"executable", b""])?;
        }
        write_str(self.w, b"contents")?;
        write_u64(self.w, size)?;
        let copied = io::copy(&mut contents.take(size), self.w)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file contents ended after {copied} of {size} bytes (did the file change?)"),
            ));
        }
        self.w.write_all(&[0u8; 8][..padding(size)])?;
        self.finish()
    }

    /// A symbolic link to `target`.
    pub fn symlink(self, target: &[u8]) -> io::Result<()> {
        check_symlink_target(target).map_err(invalid)?;
        write_strs(self.w, &[b"(", b"type", b"symlink", b"target", target])?;
        self.finish()
    }

    /// A directory; add entries with [`Directory::entry`], then [`Directory::close`] it.
    pub fn directory(self) -> io::Result<Directory<'a, W>> {
        write_strs(self.w, &[b"(", b"type", b"directory"])?;
        Ok(Directory { w: self.w, entry_open: self.entry_open, last: None, child_open: false })
    }
}

/// A directory being written.
pub struct Directory<'a, W: Write> {
    w: &'a mut W,
    entry_open: Option<&'a mut bool>,
    last: Option<Vec<u8>>,
    child_open: bool,
}

impl<W: Write> Directory<'_, W> {
    /// Start the entry `name`, which must sort strictly after the previous entry's name.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<Node<'_, W>> {
        if self.child_open {
            return Err(invalid("the previous directory entry was never written"));
        }
        check_entry_name(name).map_err(|why| invalid(format!("{why}: {:?}", String::from_utf8_lossy(name))))?;
        if let Some(last) = &self.last
            && last.as_slice() >= name
        {
            return Err(invalid(format!(
                "directory entries out of order: {:?} after {:?}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(last)
            )));
        }
        self.last = Some(name.to_vec());
        write_strs(self.w, &[b"entry", b"(", b"name", name, b"node"])?;
        self.child_open = true;
        Ok(Node { w: self.w, entry_open: Some(&mut self.child_open) })
    }

    /// End the directory.
    pub fn close(self) -> io::Result<()> {
        if self.child_open {
            return Err(invalid("the last directory entry was never written"));
        }
        Node { w: self.w, entry_open: self.entry_open }.finish()
    }
}
