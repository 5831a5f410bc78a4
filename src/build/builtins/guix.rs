//! What Guix's `builtin:download` derivations say, read without evaluating anything: the URL list
//! (`url`), `mirror://` expansion with the mirrors file (`mirrors`), and the content-addressed
//! mirrors file, which holds Scheme *code* that `guix perform-download` evaluates. gbc evaluates
//! nothing: it recognises the form Guix's `guix/download.scm` writes (procedures of `(file algo
//! hash)` that `string-append` literals, the file name, the algorithm's name and the hash in
//! nix32 or hex) and skips anything else with a note for the build log.

use std::collections::BTreeMap;

use crate::formats::hash::Hash;
use crate::formats::nix32;
use crate::formats::sexp::{self, Sexp};

/// The URLs of `url` (a string or a list of strings, as Guile's `write` gives them), with
/// `mirror://KIND/PATH` expanded through `mirrors` (the mirrors file's text), in order.
/// Mirror kinds the file lacks are skipped with a note.
pub fn urls(url: &str, mirrors: Option<&str>, notes: &mut Vec<String>) -> Result<Vec<String>, String> {
    let listed = match sexp::parse(url).map_err(|e| format!("url: {e}"))? {
        Sexp::String(s) => vec![s],
        Sexp::List(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(|| format!("url: {i} is not a string")))
            .collect::<Result<_, _>>()?,
        other => return Err(format!("url: {other} is neither a string nor a list of strings")),
    };
    let mut table: Option<BTreeMap<String, Vec<String>>> = None;
    let mut out = Vec::new();
    for u in listed {
        let Some(rest) = u.strip_prefix("mirror://") else {
            out.push(u);
            continue;
        };
        if table.is_none() {
            table = Some(match mirrors {
                Some(text) => mirror_table(text)?,
                None => BTreeMap::new(),
            });
        }
        let (kind, path) = rest.split_once('/').unwrap_or((rest, ""));
        match table.as_ref().and_then(|t| t.get(kind)) {
            Some(bases) if !bases.is_empty() => {
                out.extend(
                    bases.iter().map(|b| format!("{}/{}", b.trim_end_matches('/'), path.trim_start_matches('/'))),
                );
            }
            _ => notes.push(format!("skipping {u}: no mirrors of kind {kind:?}")),
        }
    }
    Ok(out)
}

/// The mirrors file: `((KIND "URL" ...) ...)`.
fn mirror_table(text: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let bad = |why: String| format!("mirrors file: {why}");
    let parsed = sexp::parse(text).map_err(|e| bad(e.to_string()))?;
    let entries = parsed.as_list().ok_or_else(|| bad("not a list".into()))?;
    let mut table = BTreeMap::new();
    for entry in entries {
        let items = entry.as_list().unwrap_or_default();
        let kind = items.first().and_then(Sexp::as_symbol).ok_or_else(|| bad(format!("entry {entry}")))?;
        let urls =
            items[1..].iter().map(|u| u.as_str().map(str::to_owned).ok_or_else(|| bad(format!("entry {entry}"))));
        table.insert(kind.to_owned(), urls.collect::<Result<Vec<_>, _>>()?);
    }
    Ok(table)
}

/// One piece of a recognised content-addressed mirror URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// The output's file name without its store directory and hash.
    File,
    /// The hash algorithm's name, e.g. `sha256`.
    Algo,
    Nix32,
    Hex,
}

/// A recognised content-addressed mirror: a URL made of [`Part`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaMirror(Vec<Part>);

impl CaMirror {
    /// The URL for the file `name` whose hash is `hash`.
    pub fn url(&self, name: &str, hash: &Hash) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.clone(),
                Part::File => name.to_owned(),
                Part::Algo => hash.algo().name().to_owned(),
                Part::Nix32 => nix32::encode(hash.digest()),
                Part::Hex => hash.to_hex(),
            })
            .collect()
    }
}

/// The content-addressed mirrors in the file's `text` that gbc recognises; notes name the rest.
pub fn ca_mirrors(text: &str, notes: &mut Vec<String>) -> Result<Vec<CaMirror>, String> {
    let parsed = sexp::parse(text).map_err(|e| format!("content-addressed mirrors file: {e}"))?;
    let mut defines: BTreeMap<String, (Vec<String>, Sexp)> = BTreeMap::new();
    let list = if parsed.is_call("begin") {
        let forms = parsed.as_list().unwrap_or_default();
        let (last, body) = forms[1..].split_last().ok_or("content-addressed mirrors file: an empty (begin)")?;
        for form in body {
            if form.is_call("use-modules") {
                continue;
            }
            match define(form) {
                Some((name, params, value)) => {
                    defines.insert(name, (params, value));
                }
                None => notes.push(format!("content-addressed mirrors: ignoring {}", abbreviate(form))),
            }
        }
        last.clone()
    } else {
        parsed
    };
    let items: &[Sexp] = if list.is_call("list") {
        &list.as_list().unwrap_or_default()[1..]
    } else if list.is_call("quote") && list.as_list().and_then(|l| l.get(1)).and_then(Sexp::as_list) == Some(&[]) {
        &[]
    } else {
        notes.push(format!("content-addressed mirrors: not a list gbc recognises: {}", abbreviate(&list)));
        &[]
    };
    let mut out = Vec::new();
    for item in items {
        let recognised = match item {
            Sexp::List(call) if !item.is_call("lambda") => {
                let name = call.first().and_then(Sexp::as_symbol);
                let args: Option<Vec<&str>> = call[1..].iter().map(Sexp::as_str).collect();
                match (name.and_then(|n| defines.get(n)), args) {
                    (Some((params, body)), Some(args)) if params.len() == args.len() => {
                        let bindings = params.iter().cloned().zip(args.iter().map(|a| (*a).to_owned())).collect();
                        template(body, &bindings)
                    }
                    _ => None,
                }
            }
            _ => template(item, &BTreeMap::new()),
        };
        match recognised {
            Some(m) => out.push(m),
            None => notes
                .push(format!("content-addressed mirrors: skipping {} (not a form gbc recognises)", abbreviate(item))),
        }
    }
    Ok(out)
}

/// `(define (NAME PARAM ...) VALUE)`.
fn define(form: &Sexp) -> Option<(String, Vec<String>, Sexp)> {
    match form.as_list()? {
        [Sexp::Symbol(d), Sexp::List(head), value] if d == "define" => {
            let names: Option<Vec<String>> = head.iter().map(|s| s.as_symbol().map(str::to_owned)).collect();
            let mut names = names?;
            let name = names.remove(0);
            Some((name, names, value.clone()))
        }
        _ => None,
    }
}

/// `(lambda (FILE ALGO HASH) (string-append PART ...))` where each part is a string, a bound
/// name, `FILE`, `(symbol->string ALGO)`, `(bytevector->nix-base32-string HASH)` or
/// `(bytevector->base16-string HASH)`.
fn template(expr: &Sexp, bindings: &BTreeMap<String, String>) -> Option<CaMirror> {
    let [Sexp::Symbol(l), Sexp::List(params), body] = expr.as_list()? else { return None };
    if l != "lambda" {
        return None;
    }
    let [file, algo, hash] = params.as_slice() else { return None };
    let (file, algo, hash) = (file.as_symbol()?, algo.as_symbol()?, hash.as_symbol()?);
    if !body.is_call("string-append") {
        return None;
    }
    let mut parts = Vec::new();
    for p in &body.as_list()?[1..] {
        parts.push(match p {
            Sexp::String(s) => Part::Literal(s.clone()),
            Sexp::Symbol(s) if s == file => Part::File,
            Sexp::Symbol(s) => Part::Literal(bindings.get(s)?.clone()),
            Sexp::List(call) => match call.as_slice() {
                [Sexp::Symbol(f), Sexp::Symbol(a)] if f == "symbol->string" && a == algo => Part::Algo,
                [Sexp::Symbol(f), Sexp::Symbol(h)] if f == "bytevector->nix-base32-string" && h == hash => Part::Nix32,
                [Sexp::Symbol(f), Sexp::Symbol(h)] if f == "bytevector->base16-string" && h == hash => Part::Hex,
                _ => return None,
            },
            _ => return None,
        });
    }
    Some(CaMirror(parts))
}

fn abbreviate(x: &Sexp) -> String {
    let s = x.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::hash::HashAlgo;

    /// `(object->string %content-addressed-mirrors)` of Guix's guix/download.scm, as Guile
    /// writes it (one line, comments gone).
    const GUIX_CA_MIRRORS: &str = r#"(begin (use-modules (guix base16) (guix base32)) (define (guix-publish host) (lambda (file algo hash) (string-append "https://" host "/file/" file "/" (symbol->string algo) "/" (bytevector->nix-base32-string hash)))) (list (guix-publish "bordeaux.guix.gnu.org") (guix-publish "ci.guix.gnu.org") (lambda (file algo hash) (string-append "https://tarballs.nixos.org/" (symbol->string algo) "/" (bytevector->nix-base32-string hash))) (lambda (file algo hash) (string-append "https://archive.softwareheritage.org/api/1/content/" (symbol->string algo) ":" (bytevector->base16-string hash) "/raw/"))))"#;

    fn hash() -> Hash {
        let digest: Vec<u8> = (0..32).collect();
        Hash::new(HashAlgo::Sha256, &digest).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn recognises_guix_s_content_addressed_mirrors() {
        let mut notes = Vec::new();
        let mirrors = ca_mirrors(GUIX_CA_MIRRORS, &mut notes).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(notes.is_empty(), "{notes:?}");
        let h = hash();
        let n32 = nix32::encode(h.digest());
        let urls: Vec<String> = mirrors.iter().map(|m| m.url("hello-2.12.tar.gz", &h)).collect();
        assert_eq!(
            urls,
            [
                format!("https://bordeaux.guix.gnu.org/file/hello-2.12.tar.gz/sha256/{n32}"),
                format!("https://ci.guix.gnu.org/file/hello-2.12.tar.gz/sha256/{n32}"),
                format!("https://tarballs.nixos.org/sha256/{n32}"),
                format!("https://archive.softwareheritage.org/api/1/content/sha256:{}/raw/", h.to_hex()),
            ]
        );
    }

    #[test]
    fn skips_what_it_does_not_recognise_and_evaluates_nothing() {
        let mut notes = Vec::new();
        let text = r#"(begin (define (evil host) (lambda (file algo hash) (system "rm -rf /"))) (list (evil "x") (lambda (file algo hash) (string-append "https://ok/" file)) (lambda (f a h) (string-append (getenv "HOME") f))))"#;
        let mirrors = ca_mirrors(text, &mut notes).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(mirrors.len(), 1);
        assert_eq!(mirrors[0].url("a.tar", &hash()), "https://ok/a.tar");
        assert_eq!(notes.len(), 2, "{notes:?}");
        // Guix's empty-list file, `(object->string ''())`.
        assert_eq!(ca_mirrors("(quote ())", &mut notes), Ok(vec![]));
        assert_eq!(notes.len(), 2);
        assert!(ca_mirrors("(list", &mut notes).is_err());
    }

    #[test]
    fn expands_mirror_urls_in_order() {
        let mirrors = r#"((gnu "https://ftpmirror.gnu.org/gnu/" "https://ftp.gnu.org/gnu") (savannah "https://download.savannah.gnu.org/releases/"))"#;
        let mut notes = Vec::new();
        let got = urls(
            r#"("mirror://gnu/hello/hello-2.12.tar.gz" "https://example.org/hello.tar.gz" "mirror://nope/x")"#,
            Some(mirrors),
            &mut notes,
        );
        assert_eq!(
            got,
            Ok(vec![
                "https://ftpmirror.gnu.org/gnu/hello/hello-2.12.tar.gz".to_owned(),
                "https://ftp.gnu.org/gnu/hello/hello-2.12.tar.gz".to_owned(),
                "https://example.org/hello.tar.gz".to_owned(),
            ])
        );
        assert_eq!(notes.len(), 1);
        assert_eq!(urls(r#""https://a/b""#, None, &mut notes), Ok(vec!["https://a/b".to_owned()]));
        assert!(urls("(1 2)", None, &mut notes).is_err());
        assert!(urls("#.(x)", None, &mut notes).is_err());
    }
}
