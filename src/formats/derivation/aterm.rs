//! The ATerm text form of derivations (`Derive(...)`), parsed and printed byte for byte.
//!
//! The parser accepts only the canonical form Nix writes: lists that Nix keeps in sorted maps and sets
//! (outputs, input derivations and their outputs, input sources, environment) must be strictly
//! increasing, and nothing may follow the closing parenthesis. So `print(parse(bytes)) == bytes` for
//! every accepted input.

use std::collections::{BTreeMap, BTreeSet};

use super::{Derivation, DrvError, Output};

pub(super) fn parse(input: &[u8]) -> Result<Derivation, DrvError> {
    let mut p = Parser { s: input, pos: 0 };
    if input.starts_with(b"DrvWithVersion(") {
        return Err(DrvError::Unsupported("dynamic derivations (DrvWithVersion) are not supported".to_owned()));
    }
    p.expect(b"Derive(")?;

    let mut outputs = BTreeMap::new();
    p.list(|p| {
        let at = p.pos;
        p.expect(b"(")?;
        let name = p.string()?;
        p.expect(b",")?;
        let path = p.string()?;
        p.expect(b",")?;
        let hash_algo = p.string()?;
        p.expect(b",")?;
        let hash = p.string()?;
        p.expect(b")")?;
        insert_sorted(&mut outputs, name, Output { path, hash_algo, hash }, at, "outputs")
    })?;
    p.expect(b",")?;

    let mut input_drvs = BTreeMap::new();
    p.list(|p| {
        let at = p.pos;
        p.expect(b"(")?;
        let path = p.string()?;
        p.expect(b",")?;
        if p.peek() == Some(b'(') {
            return Err(DrvError::Unsupported(format!(
                "input derivation {path:?} uses dynamic-derivation outputs, which are not supported"
            )));
        }
        let mut outs = BTreeSet::new();
        p.list(|p| {
            let at = p.pos;
            let o = p.string()?;
            insert_sorted_set(&mut outs, o, at, "the outputs of an input derivation")
        })?;
        p.expect(b")")?;
        insert_sorted(&mut input_drvs, path, outs, at, "input derivations")
    })?;
    p.expect(b",")?;

    let mut input_srcs = BTreeSet::new();
    p.list(|p| {
        let at = p.pos;
        let s = p.string()?;
        insert_sorted_set(&mut input_srcs, s, at, "input sources")
    })?;
    p.expect(b",")?;
    let system = p.string()?;
    p.expect(b",")?;
    let builder = p.string()?;
    p.expect(b",")?;
    let mut args = Vec::new();
    p.list(|p| {
        args.push(p.string()?);
        Ok(())
    })?;
    p.expect(b",")?;
    let mut env = BTreeMap::new();
    p.list(|p| {
        let at = p.pos;
        p.expect(b"(")?;
        let k = p.string()?;
        p.expect(b",")?;
        let v = p.string()?;
        p.expect(b")")?;
        insert_sorted(&mut env, k, v, at, "environment variables")
    })?;
    p.expect(b")")?;
    if p.pos != input.len() {
        return Err(DrvError::Syntax {
            offset: p.pos,
            msg: "unexpected bytes after the end of the derivation".to_owned(),
        });
    }
    Ok(Derivation { outputs, input_drvs, input_srcs, system, builder, args, env })
}

fn insert_sorted<V>(
    map: &mut BTreeMap<String, V>,
    key: String,
    value: V,
    offset: usize,
    what: &str,
) -> Result<(), DrvError> {
    if let Some((last, _)) = map.last_key_value()
        && *last >= key
    {
        return Err(DrvError::Syntax { offset, msg: format!("{what} are not strictly sorted at {key:?}") });
    }
    map.insert(key, value);
    Ok(())
}

fn insert_sorted_set(set: &mut BTreeSet<String>, key: String, offset: usize, what: &str) -> Result<(), DrvError> {
    if let Some(last) = set.last()
        && *last >= key
    {
        return Err(DrvError::Syntax { offset, msg: format!("{what} are not strictly sorted at {key:?}") });
    }
    set.insert(key);
    Ok(())
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn error(&self, msg: String) -> DrvError {
        DrvError::Syntax { offset: self.pos, msg }
    }

    fn expect(&mut self, token: &[u8]) -> Result<(), DrvError> {
        if self.s[self.pos..].starts_with(token) {
            self.pos += token.len();
            Ok(())
        } else if self.pos >= self.s.len() {
            Err(self.error(format!("unexpected end of input, expected {:?}", String::from_utf8_lossy(token))))
        } else {
            Err(self.error(format!("expected {:?}", String::from_utf8_lossy(token))))
        }
    }

    /// `[item,item,...]`
    fn list(&mut self, mut item: impl FnMut(&mut Self) -> Result<(), DrvError>) -> Result<(), DrvError> {
        self.expect(b"[")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error("expected ',' or ']'".to_owned())),
            }
        }
    }

    fn string(&mut self) -> Result<String, DrvError> {
        let start = self.pos;
        self.expect(b"\"")?;
        let mut out = Vec::new();
        loop {
            let rest = &self.s[self.pos..];
            let Some(stop) = rest.iter().position(|c| b"\"\\\n\r\t".contains(c)) else {
                return Err(DrvError::Syntax { offset: start, msg: "unterminated string".to_owned() });
            };
            out.extend_from_slice(&rest[..stop]);
            self.pos += stop;
            match rest[stop] {
                b'"' => {
                    self.pos += 1;
                    break;
                }
                b'\\' => {}
                _ => {
                    return Err(self.error("raw control character in a string (Nix writes it escaped)".to_owned()));
                }
            }
            self.pos += 1;
            out.push(match self.peek() {
                Some(b'n') => b'\n',
                Some(b'r') => b'\r',
                Some(b't') => b'\t',
                Some(c @ (b'"' | b'\\')) => c,
                Some(_) => {
                    return Err(self.error("escape other than \\\" \\\\ \\n \\r \\t in a string".to_owned()));
                }
                None => {
                    return Err(DrvError::Syntax { offset: start, msg: "unterminated string".to_owned() });
                }
            });
            self.pos += 1;
        }
        String::from_utf8(out)
            .map_err(|_| DrvError::Syntax { offset: start, msg: "string is not valid UTF-8".to_owned() })
    }
}

/// Print a derivation. `input_drvs` replaces the derivation's own input derivations (hash modulo
/// prints hashes in their place); `mask_outputs` blanks output paths and their environment variables.
pub(super) fn print(
    drv: &Derivation,
    mask_outputs: bool,
    input_drvs: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"Derive([");
    for (i, (name, o)) in drv.outputs.iter().enumerate() {
        sep(&mut out, i);
        out.push(b'(');
        string(&mut out, name);
        out.push(b',');
        string(&mut out, if mask_outputs { "" } else { &o.path });
        out.push(b',');
        string(&mut out, &o.hash_algo);
        out.push(b',');
        string(&mut out, &o.hash);
        out.push(b')');
    }
    out.extend_from_slice(b"],[");
    for (i, (path, outs)) in input_drvs.unwrap_or(&drv.input_drvs).iter().enumerate() {
        sep(&mut out, i);
        out.push(b'(');
        string(&mut out, path);
        out.extend_from_slice(b",[");
        for (j, o) in outs.iter().enumerate() {
            sep(&mut out, j);
            string(&mut out, o);
        }
        out.extend_from_slice(b"])");
    }
    out.extend_from_slice(b"],[");
    for (i, s) in drv.input_srcs.iter().enumerate() {
        sep(&mut out, i);
        string(&mut out, s);
    }
    out.extend_from_slice(b"],");
    string(&mut out, &drv.system);
    out.push(b',');
    string(&mut out, &drv.builder);
    out.extend_from_slice(b",[");
    for (i, a) in drv.args.iter().enumerate() {
        sep(&mut out, i);
        string(&mut out, a);
    }
    out.extend_from_slice(b"],[");
    for (i, (k, v)) in drv.env.iter().enumerate() {
        sep(&mut out, i);
        out.push(b'(');
        string(&mut out, k);
        out.push(b',');
        string(&mut out, if mask_outputs && drv.outputs.contains_key(k) { "" } else { v });
        out.push(b')');
    }
    out.extend_from_slice(b"])");
    out
}

fn sep(out: &mut Vec<u8>, i: usize) {
    if i > 0 {
        out.push(b',');
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &c in s.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c => out.push(c),
        }
    }
    out.push(b'"');
}
