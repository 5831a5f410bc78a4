//! Guix's signature scheme (ECDSA over Ed25519, RFC 6979) against libgcrypt itself, through
//! Debian's guile-gcrypt: keys and signatures made by either side are the other's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use gbc::formats::guix_ecdsa::{PublicKey, SecretKey};
use gbc::formats::hash::{hex, sha256};

/// Run a Guile program with guile-gcrypt; None when Guile or guile-gcrypt is missing.
fn guile(program: &str) -> Option<String> {
    let out = Command::new("guile").args(["--no-auto-compile", "-c", program]).output().ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no code for module"), "guile failed: {err}");
        return None;
    }
    Some(String::from_utf8(out.stdout).unwrap())
}

const PRELUDE: &str =
    "(use-modules (gcrypt pk-crypto) (gcrypt hash) (gcrypt base16) (rnrs bytevectors) (ice-9 format))";

#[test]
fn libgcrypt_s_keys_and_signatures_are_ours() {
    // Five keys made by libgcrypt; each signs one message: print d, q, the hash, r and s.
    let program = format!(
        "{PRELUDE}
         (define (token-hex sexp name) (bytevector->base16-string (canonical-sexp-nth-data (find-sexp-token sexp name) 1)))
         (do ((i 0 (+ i 1))) ((= i 5))
           (let* ((pair (generate-key (string->canonical-sexp \"(genkey (ecdsa (curve Ed25519) (flags rfc6979)))\")))
                  (sec (find-sexp-token pair 'private-key))
                  (hash (sha256 (string->utf8 (format #f \"message ~a\" i))))
                  (sig (sign (bytevector->hash-data hash #:key-type 'ecc) sec)))
             (format #t \"~a ~a ~a ~a ~a~%\" (token-hex sec 'd) (token-hex sec 'q) (bytevector->base16-string hash)
                     (token-hex sig 'r) (token-hex sig 's))))"
    );
    let Some(out) = guile(&program) else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for line in lines {
        let f: Vec<Vec<u8>> = line.split(' ').map(|h| hex::decode(h).unwrap()).collect();
        let key = SecretKey::from_d(&f[0]).unwrap();
        assert_eq!(key.public().q().to_vec(), f[1], "q from d: {line}");
        let hash: [u8; 32] = f[2].clone().try_into().unwrap();
        let (r, s) = key.sign(&hash);
        // libgcrypt writes the integers without leading zero bytes.
        let strip = |v: &[u8]| v.iter().skip_while(|b| **b == 0).copied().collect::<Vec<u8>>();
        assert_eq!((strip(&r), strip(&s)), (strip(&f[3]), strip(&f[4])), "the same deterministic signature: {line}");
        assert!(PublicKey::from_q(&f[1]).unwrap().verify(&hash, &f[3], &f[4]));
    }
}

#[test]
fn libgcrypt_verifies_our_signatures_and_refuses_altered_ones() {
    for i in 0..5 {
        let key = SecretKey::generate().unwrap();
        let hash = sha256(format!("narinfo {i}").as_bytes());
        let (r, s) = key.sign(&hash);
        let mut bad_s = s;
        bad_s[31] ^= 1;
        let h = |b: &[u8]| hex::encode(b);
        let verify = |s: &[u8]| {
            format!(
                "(verify (string->canonical-sexp \"(sig-val (ecdsa (r #{r}#) (s #{s}#)))\")
                         (bytevector->hash-data (base16-string->bytevector \"{hash}\") #:key-type 'ecc)
                         (string->canonical-sexp \"(public-key (ecc (curve Ed25519) (q #{q}#)))\"))",
                r = h(&r),
                s = h(s),
                hash = h(&hash),
                q = h(key.public().q())
            )
        };
        let program = format!("{PRELUDE} (format #t \"~a ~a~%\" {} {})", verify(&s), verify(&bad_s));
        let Some(out) = guile(&program) else {
            return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
        };
        assert_eq!(out.trim(), "#t #f", "libgcrypt's verdict on a good and an altered signature");
    }
}

/// libgcrypt's verdict on a narinfo's `Signature:` field `value` over `signed` (the text above it),
/// reached as `guix substitute` reaches it (guix/narinfo.scm, guix/pki.scm): whether the signature's
/// key is `authorized` (compared as s-expressions), whether its data hash is the SHA-256 of `signed`,
/// and whether it verifies: "#t #t #t" when all hold. None when Guile or guile-gcrypt is missing.
fn libgcrypt_verdict(signed: &str, value: &str, authorized: &str) -> Option<String> {
    let b64 = value.rsplit(';').next().unwrap();
    let program = format!(
        "{PRELUDE} (use-modules (gcrypt base64))
         (define sig (string->canonical-sexp (utf8->string (base64-decode \"{b64}\"))))
         (define data (find-sexp-token sig 'data))
         (format #t \"~a ~a ~a~%\"
           (equal? (canonical-sexp->sexp (find-sexp-token sig 'public-key)) (canonical-sexp->sexp (string->canonical-sexp {authorized:?})))
           (equal? (hash-data->bytevector data) (sha256 (string->utf8 {signed:?})))
           (verify (find-sexp-token sig 'sig-val) data (find-sexp-token sig 'public-key)))"
    );
    guile(&program).map(|out| out.trim().to_owned())
}

/// A narinfo's `Signature:` field made by gbc, checked the way `guix substitute` checks one
/// (guix/narinfo.scm, guix/pki.scm) with libgcrypt: the base64 is a signature s-expression whose
/// data hash is the SHA-256 of the text above the field, whose public key is the authorized key
/// (compared as s-expressions), and which libgcrypt verifies.
#[test]
fn libgcrypt_accepts_our_narinfo_signatures() {
    use gbc::formats::gcrypt::{narinfo_signature, public_key_sx};
    let key = SecretKey::generate().unwrap();
    let signed = "StorePath: /gnu/store/6vza80pmr3wck2yvv8nwaphbnj11vrql-b\nNarHash: sha256:1b2n9shnb3zwfjcra3n3wnn1whq0akc8xbrfihdjmb2hwa2s0fqi\nNarSize: 120\nReferences: \nSig: x:y\n";
    let value = narinfo_signature(signed, &key, "gbc.example");
    let authorized = public_key_sx(key.public()).to_text();
    let Some(out) = libgcrypt_verdict(signed, &value, &authorized) else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    assert_eq!(out, "#t #t #t", "authorized key, hash of the text above, valid signature");
}

/// The SHA-256 (hex) and size of what lzlib, through Debian's guile-lzlib (the binding `guix
/// substitute` decompresses lzip with), reads out of an lzip file. None when it is missing.
fn lzlib_decompressed_sha256(file: &std::path::Path) -> Option<(String, u64)> {
    let program = format!(
        "{PRELUDE} (use-modules (lzlib) (ice-9 binary-ports))
         (call-with-input-file {:?}
           (lambda (port)
             (let ((nar (get-bytevector-all (make-lzip-input-port port))))
               (format #t \"~a ~a~%\" (bytevector->base16-string (sha256 nar)) (bytevector-length nar))))
           #:binary #t)",
        file.to_str().unwrap()
    );
    let out = guile(&program)?;
    let (hash, size) = out.trim().split_once(' ').unwrap();
    Some((hash.to_owned(), size.parse().unwrap()))
}

/// A coordinator with a /gnu/store cache signs every narinfo for Guix clients too, with a Guix key
/// of its own: Nix's `Sig:` lines, then `Signature:` last; the key `gbc cache public-key --format
/// guix` prints is the one in the signatures, and libgcrypt verifies them. Its NARs, lzip-compressed
/// as guix publish serves them, decompress with lzlib (guile-lzlib, as `guix substitute` does) to
/// the NarHash and NarSize their narinfos give.
#[test]
fn a_gnu_store_cache_signs_its_narinfos_for_guix() {
    use gbc::formats::gcrypt::{parse_public_key, verify_narinfo_signature};
    use gbc::formats::narinfo::NarInfo;
    let c = common::Coordinator::start(&[
        "--local-builds",
        "2",
        "--cache-store-dir",
        "/gnu/store",
        "--compression",
        "lzip",
    ]);
    let diamond = common::repo_path("examples/diamond");
    let top = std::fs::read_dir(&diamond)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-example-top.drv"))
        .unwrap();
    let out = common::run(&mut c.gbc(&["build", top.to_str().unwrap()]));
    assert!(out.status.success(), "{}\n{}", common::stderr(&out), c.log());
    let printed = common::run_ok_str(&mut c.gbc(&["cache", "public-key", "--format", "guix"]));
    assert_eq!(printed, std::fs::read_to_string(c.state.join("keys/guix-signing-key.pub")).unwrap());
    let key = parse_public_key(printed.as_bytes()).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(c.state.join("cache")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let at = text.find("Signature: ").unwrap_or_else(|| panic!("no Signature: {text}"));
        let (signed, field) = text.split_at(at);
        assert!(signed.contains("\nSig: "), "Nix's signatures come first: {text}");
        let value = field.strip_prefix("Signature: ").unwrap().trim_end();
        assert!(!value.contains('\n'), "Signature: is the last field: {text}");
        verify_narinfo_signature(signed, value, std::slice::from_ref(&key)).unwrap();
        // libgcrypt's verdict, as guix substitute would reach it.
        let Some(verdict) = libgcrypt_verdict(signed, value, &printed) else {
            return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
        };
        assert_eq!(verdict, "#t #t #t", "{}", p.display());
        let info = NarInfo::parse(&text).unwrap();
        assert_eq!(info.compression.as_deref(), Some("lzip"));
        let Some((sha256, size)) = lzlib_decompressed_sha256(&c.state.join("cache").join(&info.url)) else {
            return common::skip("guile-lzlib is not installed (scripts/install-test-deps installs it)");
        };
        assert_eq!((sha256, size), (hex::encode(info.nar_hash.digest()), info.nar_size), "{}", p.display());
        checked += 1;
    }
    assert_eq!(checked, 4, "the diamond's four outputs");
}
