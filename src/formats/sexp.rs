//! A reader for the Scheme data Guix writes into `builtin:download` derivations: `url` (a string or
//! a list of strings), the `mirrors` file (an alist of mirror lists), the content-addressed mirrors
//! file (code, which is only ever *read* here, never evaluated: see
//! `build::builtins::download`).
//!
//! It reads what Guile's `write` produces for such data: lists, strings (with Guile's escapes),
//! symbols, numbers, booleans, `'x` as `(quote x)`, and comments. Anything that would make Guile's
//! reader run code or build other objects (`#.`, `#(`, `#u8(`, `#:`, `#\`) is refused.

use std::fmt;

/// A datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sexp {
    List(Vec<Sexp>),
    String(String),
    Symbol(String),
    /// A number, as written.
    Number(String),
    Bool(bool),
}

impl Sexp {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Sexp::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_symbol(&self) -> Option<&str> {
        match self {
            Sexp::Symbol(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Sexp]> {
        match self {
            Sexp::List(l) => Some(l),
            _ => None,
        }
    }

    /// Whether this is the list `(HEAD ...)`.
    pub fn is_call(&self, head: &str) -> bool {
        matches!(self, Sexp::List(l) if l.first().and_then(Sexp::as_symbol) == Some(head))
    }
}

impl fmt::Display for Sexp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sexp::List(items) => {
                f.write_str("(")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str(")")
            }
            Sexp::String(s) => write!(f, "{s:?}"),
            Sexp::Symbol(s) | Sexp::Number(s) => f.write_str(s),
            Sexp::Bool(b) => f.write_str(if *b { "#t" } else { "#f" }),
        }
    }
}

/// Why text is not one datum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte {offset}: {msg}")]
pub struct SexpError {
    pub offset: usize,
    pub msg: String,
}

/// Lists nested deeper than this are refused (the reader recurses).
const MAX_DEPTH: usize = 256;

/// Read exactly one datum from `text` (comments and white space around it allowed).
pub fn parse(text: &str) -> Result<Sexp, SexpError> {
    let mut r = Reader { s: text.as_bytes(), pos: 0 };
    let datum = r.datum(0)?;
    r.skip_blank()?;
    if r.pos < r.s.len() {
        return Err(r.err("more than one datum"));
    }
    Ok(datum)
}

struct Reader<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn err(&self, msg: impl Into<String>) -> SexpError {
        SexpError { offset: self.pos, msg: msg.into() }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_blank(&mut self) -> Result<(), SexpError> {
        loop {
            match self.peek() {
                Some(c) if c.is_ascii_whitespace() => self.pos += 1,
                Some(b';') => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                Some(b'#') if self.s.get(self.pos + 1) == Some(&b'|') => {
                    let end = self.s[self.pos + 2..].windows(2).position(|w| w == b"|#");
                    match end {
                        Some(n) => self.pos += n + 4,
                        None => return Err(self.err("unterminated #| comment")),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn datum(&mut self, depth: usize) -> Result<Sexp, SexpError> {
        if depth > MAX_DEPTH {
            return Err(self.err("lists nested too deeply"));
        }
        self.skip_blank()?;
        match self.peek() {
            None => Err(self.err("unexpected end")),
            Some(b'(' | b'[') => {
                let close = if self.peek() == Some(b'(') { b')' } else { b']' };
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_blank()?;
                    match self.peek() {
                        None => return Err(self.err("unterminated list")),
                        Some(c) if c == close => {
                            self.pos += 1;
                            return Ok(Sexp::List(items));
                        }
                        Some(b')' | b']') => return Err(self.err("mismatched closing bracket")),
                        Some(b'.') if self.s.get(self.pos + 1).is_none_or(|c| delimiter(*c)) => {
                            return Err(self.err("dotted pairs are not supported"));
                        }
                        Some(_) => items.push(self.datum(depth + 1)?),
                    }
                }
            }
            Some(b')' | b']') => Err(self.err("unexpected closing bracket")),
            Some(b'\'') => {
                self.pos += 1;
                let quoted = self.datum(depth + 1)?;
                Ok(Sexp::List(vec![Sexp::Symbol("quote".into()), quoted]))
            }
            Some(b'"') => self.string(),
            Some(b'#') => match self.s.get(self.pos + 1) {
                Some(b't' | b'f') => {
                    let start = self.pos;
                    let atom = self.atom();
                    match atom {
                        "#t" | "#true" => Ok(Sexp::Bool(true)),
                        "#f" | "#false" => Ok(Sexp::Bool(false)),
                        _ => Err(SexpError { offset: start, msg: format!("unsupported syntax {atom:?}") }),
                    }
                }
                _ => Err(self.err("unsupported # syntax")),
            },
            Some(b'`' | b',') => Err(self.err("quasiquote is not supported")),
            Some(_) => {
                let start = self.pos;
                let atom = self.atom().to_owned();
                if atom.is_empty() {
                    return Err(SexpError { offset: start, msg: "unexpected character".into() });
                }
                let numeric = atom.starts_with(|c: char| c.is_ascii_digit())
                    || (atom.len() > 1
                        && atom.starts_with(['-', '+'])
                        && atom[1..].starts_with(|c: char| c.is_ascii_digit()));
                Ok(if numeric { Sexp::Number(atom) } else { Sexp::Symbol(atom) })
            }
        }
    }

    /// The characters up to the next delimiter.
    fn atom(&mut self) -> &str {
        let start = self.pos;
        while self.peek().is_some_and(|c| !delimiter(c)) {
            self.pos += 1;
        }
        // Delimiters are ASCII, so this cuts at character boundaries.
        std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("")
    }

    fn string(&mut self) -> Result<Sexp, SexpError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.err("unterminated string")) };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else { return Err(self.err("unterminated string")) };
                    self.pos += 1;
                    match e {
                        b'"' | b'\\' => out.push(e),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'a' => out.push(7),
                        b'f' => out.push(12),
                        b'v' => out.push(11),
                        b'b' => out.push(8),
                        b'0' => out.push(0),
                        b'\n' => {
                            // A line continuation: skip the next line's leading blanks.
                            while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
                                self.pos += 1;
                            }
                        }
                        b'x' | b'u' | b'U' => {
                            let ch = self.hex_escape(e)?;
                            let mut buf = [0; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(self.err(format!("unknown string escape \\{}", e as char))),
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map(Sexp::String).map_err(|_| self.err("string is not UTF-8"))
    }

    /// `\xHH;` (R7RS, what Guile writes), `\xHH` (two digits), `\uHHHH`, `\UHHHHHH`.
    fn hex_escape(&mut self, kind: u8) -> Result<char, SexpError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
            self.pos += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
        let ok_len = match kind {
            b'u' => digits.len() == 4,
            b'U' => digits.len() == 6,
            _ => !digits.is_empty(),
        };
        if kind == b'x' && self.peek() == Some(b';') {
            self.pos += 1;
        } else if kind == b'x' && digits.len() != 2 {
            return Err(self.err("bad \\x escape"));
        }
        let code = u32::from_str_radix(digits, 16).ok().filter(|_| ok_len);
        code.and_then(char::from_u32).ok_or_else(|| self.err("bad character escape"))
    }
}

fn delimiter(c: u8) -> bool {
    c.is_ascii_whitespace() || matches!(c, b'(' | b')' | b'[' | b']' | b'"' | b';' | b'\'')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Sexp {
        Sexp::String(x.into())
    }

    fn sym(x: &str) -> Sexp {
        Sexp::Symbol(x.into())
    }

    #[test]
    fn reads_what_guix_writes() {
        assert_eq!(parse("\"https://example.org/a.tar.gz\""), Ok(s("https://example.org/a.tar.gz")));
        assert_eq!(
            parse("(\"mirror://gnu/hello/hello-2.12.tar.gz\" \"https://x/y\")"),
            Ok(Sexp::List(vec![s("mirror://gnu/hello/hello-2.12.tar.gz"), s("https://x/y")]))
        );
        assert_eq!(
            parse(
                "((gnu \"https://ftpmirror.gnu.org/gnu/\" \"https://ftp.gnu.org/gnu/\")\n (cpan \"https://www.cpan.org/\"))"
            ),
            Ok(Sexp::List(vec![
                Sexp::List(vec![sym("gnu"), s("https://ftpmirror.gnu.org/gnu/"), s("https://ftp.gnu.org/gnu/")]),
                Sexp::List(vec![sym("cpan"), s("https://www.cpan.org/")]),
            ]))
        );
        assert_eq!(parse("(quote ())"), Ok(Sexp::List(vec![sym("quote"), Sexp::List(vec![])])));
        assert_eq!(parse("''()"), parse("(quote (quote ()))"));
        assert_eq!(
            parse("(a #t #f 12 -3 bytevector->nix-base32-string)").map(|x| x.to_string()),
            Ok("(a #t #f 12 -3 bytevector->nix-base32-string)".to_owned())
        );
    }

    #[test]
    fn string_escapes() {
        assert_eq!(parse(r#""a\"b\\c\nd\x41;\x42""#), Ok(s("a\"b\\c\ndAB")));
        assert_eq!(parse(r#""\u00e9""#), Ok(s("é")));
        assert_eq!(parse("\"é\""), Ok(s("é")));
        assert!(parse(r#""\q""#).is_err());
        assert!(parse(r#""\x41"#).is_err());
    }

    #[test]
    fn comments_and_blanks() {
        assert_eq!(parse("; note\n  (a ;x\n b) #| block |# "), Ok(Sexp::List(vec![sym("a"), sym("b")])));
    }

    #[test]
    fn refuses_what_could_run_code_or_is_not_one_datum() {
        for bad in [
            "#.(system \"id\")",
            "#(1 2)",
            "#u8(1)",
            "#:key",
            "#\\a",
            "`(a ,b)",
            "(a . b)",
            "(a",
            "a)",
            "a b",
            "",
            "(a]",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        let deep = "(".repeat(MAX_DEPTH + 2) + &")".repeat(MAX_DEPTH + 2);
        assert!(parse(&deep).is_err());
    }
}
