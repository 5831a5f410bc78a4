//! Guix's signature scheme (ECDSA over Ed25519, RFC 6979) against libgcrypt itself, through
//! Debian's guile-gcrypt: keys and signatures made by either side are the other's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::guile;
use gbc::formats::guix_ecdsa::{PublicKey, SecretKey};
use gbc::formats::hash::{hex, sha256};

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

/// Guix's `valid-narinfo?` (guix/narinfo.scm, guix/pki.scm, guix/records.scm' `recutils->alist`),
/// ported to a Guile program run with guile-gcrypt, on a narinfo's whole `text` and an ACL
/// (`/etc/guix/acl`'s text): `valid-signature`, `invalid-signature`, `hash-mismatch`,
/// `unauthorized-key`, `corrupt-signature`, or `unsigned` (no `Signature:`, or StorePath, NarHash
/// or References not above it). None when Guile or guile-gcrypt is missing.
fn guix_signature_status(text: &str, acl: &str) -> Option<String> {
    let program = format!(
        r#"{PRELUDE} (use-modules (gcrypt base64) (ice-9 match) (ice-9 rdelim) (srfi srfi-1) (srfi srfi-26))
         (define %recutils-field-charset
           (char-set-union char-set:upper-case char-set:lower-case (char-set #\%)))
         (define (recutils->alist port)
           (let loop ((line (read-line port)) (result '()))
             (cond ((eof-object? line) (reverse result))
                   ((string-null? line)
                    (if (null? result) (loop (read-line port) result) (reverse result)))
                   ((char-set-contains? %recutils-field-charset (string-ref line 0))
                    (let* ((colon (string-index line #\:))
                           (field (string-take line colon))
                           (value (string-trim (string-drop line (+ 1 colon)))))
                      (loop (read-line port) (alist-cons field value result))))
                   (else (error "unmatched line" line)))))
         (define contents {text:?})
         (define acl (string->canonical-sexp {acl:?}))
         (define (authorized-key? key)
           (let ((key (canonical-sexp->sexp key)))
             (match (canonical-sexp->sexp acl)
               (('acl ('entry subject-keys ('tag ('guix 'import))) ...)
                (not (not (member key subject-keys)))))))
         (define hash
           (match (string-contains contents "Signature:")
             (#f #f)
             (index
              (let* ((above (string-take contents index))
                     (fields (map car (call-with-input-string above recutils->alist))))
                (and (every (cut member <> fields) '("StorePath" "NarHash" "References"))
                     (sha256 (string->utf8 above)))))))
         (define signature
           (false-if-exception
            (match (string-split (assoc-ref (call-with-input-string contents recutils->alist) "Signature") #\;)
              ((version host-name sig)
               (and (= 1 (string->number version))
                    (string->canonical-sexp (utf8->string (base64-decode sig))))))))
         (display
          (if (and hash signature)
              (let ((subject (find-sexp-token signature 'public-key))
                    (data (find-sexp-token signature 'data)))
                (if (and data subject)
                    (if (authorized-key? subject)
                        (if (equal? (hash-data->bytevector data) hash)
                            (if (verify (find-sexp-token signature 'sig-val) data subject)
                                'valid-signature
                                'invalid-signature)
                            'hash-mismatch)
                        'unauthorized-key)
                    'corrupt-signature))
              'unsigned))"#
    );
    guile(&program)
}

/// An ACL authorizing `keys` (public-key s-expressions), as `guix archive --authorize` writes it.
fn acl(keys: &[&str]) -> String {
    let entries: Vec<String> = keys.iter().map(|k| format!("(entry {} (tag (guix import)))", k.trim())).collect();
    format!("(acl {})", entries.join(" "))
}

/// A key pair made as `guix archive --generate-key` makes it (libgcrypt's genkey, the two halves
/// written with `canonical-sexp->string`), in `dir`: (secret file, public file). None without
/// guile-gcrypt.
fn libgcrypt_key_pair(dir: &std::path::Path, name: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let (sec, public) = (dir.join(format!("{name}.sec")), dir.join(format!("{name}.pub")));
    let program = format!(
        "{PRELUDE}
         (let* ((pair (generate-key (string->canonical-sexp \"(genkey (ecdsa (curve Ed25519) (flags rfc6979)))\")))
                (write (lambda (file sexp) (call-with-output-file file (lambda (port) (display (canonical-sexp->string sexp) port))))))
           (write {public:?} (find-sexp-token pair 'public-key))
           (write {sec:?} (find-sexp-token pair 'private-key)))",
        public = public.to_str().unwrap(),
        sec = sec.to_str().unwrap()
    );
    guile(&program)?;
    std::fs::set_permissions(&sec, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    Some((sec, public))
}

/// `text` signed by libgcrypt with the secret key in `sec` as `guix publish` signs a narinfo
/// (`signed-string`, `signature-sexp`): the text, then `Signature: 1;HOST;BASE64`.
fn libgcrypt_signed_narinfo(text: &str, sec: &std::path::Path, public: &std::path::Path) -> String {
    let program = format!(
        "{PRELUDE} (use-modules (gcrypt base64) (ice-9 textual-ports))
         (define (read-sexp file) (string->canonical-sexp (call-with-input-file file get-string-all)))
         (define secret (read-sexp {sec:?}))
         (define public (read-sexp {public:?}))
         (define info {text:?})
         (define data (bytevector->hash-data (sha256 (string->utf8 info)) #:key-type (key-type public)))
         (define sig (string->canonical-sexp
                      (format #f \"(signature ~a ~a ~a)\" (canonical-sexp->string data)
                              (canonical-sexp->string (sign data secret)) (canonical-sexp->string public))))
         (format #t \"~aSignature: 1;~a;~a~%\" info \"libgcrypt.example\"
                 (base64-encode (string->utf8 (canonical-sexp->string sig))))",
        sec = sec.to_str().unwrap(),
        public = public.to_str().unwrap()
    );
    guile(&program).unwrap()
}

const NARINFO: &str = "StorePath: /gnu/store/6vza80pmr3wck2yvv8nwaphbnj11vrql-b
URL: nar/lzip/6vza80pmr3wck2yvv8nwaphbnj11vrql-b
Compression: lzip
FileSize: 90
NarHash: sha256:1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyl0h5h
NarSize: 120
References: 3pysdbjixd4amzidam0kp6vwzpqy58y3-a 6vza80pmr3wck2yvv8nwaphbnj11vrql-b
Deriver: h51sg24fc6mmgwnihsipf9ylc1w31byk-b.drv
";

/// `gbc verify` on `text` with `trusted` key files: Ok(stdout) or Err(its one-line error).
fn gbc_verify(dir: &std::path::Path, text: &str, trusted: &[&std::path::Path]) -> Result<String, String> {
    let file = dir.join("check.narinfo");
    std::fs::write(&file, text).unwrap();
    let mut cmd = common::gbc();
    cmd.arg("verify");
    for t in trusted {
        cmd.arg("--trusted").arg(t);
    }
    let out = common::run(cmd.arg(&file));
    if out.status.success() { Ok(String::from_utf8(out.stdout).unwrap()) } else { Err(common::stderr(&out)) }
}

/// Narinfos signed by libgcrypt (as guix publish signs them) and by `gbc sign` with a key
/// libgcrypt made (as `guix archive --generate-key` makes it) are accepted by both `gbc verify`
/// and Guix's `valid-narinfo?` (run on libgcrypt); a tampered narinfo, another key and a moved
/// line are refused by both.
#[test]
fn narinfo_signatures_by_either_side_are_checked_alike_by_both() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let Some((sec, public)) = libgcrypt_key_pair(dir, "signing-key") else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    let public_text = std::fs::read_to_string(&public).unwrap();
    let acl_file = dir.join("acl");
    std::fs::write(&acl_file, acl(&[&public_text])).unwrap();
    // Another key, made by gbc this time.
    let (other_sec, other_pub) = (dir.join("other.sec"), dir.join("other.pub"));
    common::run_ok(common::gbc().args(["keygen", "--format", "guix"]).arg(&other_sec).arg(&other_pub));
    let other_acl = acl(&[&std::fs::read_to_string(&other_pub).unwrap()]);
    // And a Nix key, for a narinfo signed for both kinds of client.
    let (nix_sec, nix_pub) = (dir.join("nix.secret"), dir.join("nix.public"));
    common::run_ok(common::gbc().args(["keygen", "farm-1"]).arg(&nix_sec).arg(&nix_pub));

    let by_libgcrypt = libgcrypt_signed_narinfo(NARINFO, &sec, &public);
    let ours = dir.join("ours.narinfo");
    std::fs::write(&ours, NARINFO).unwrap();
    common::run_ok(
        common::gbc().args(["sign", "--host", "farm.example", "--key"]).arg(&sec).arg("--key").arg(&nix_sec).arg(&ours),
    );
    let by_gbc = std::fs::read_to_string(&ours).unwrap();
    assert!(by_gbc.contains("\nSig: farm-1:") && by_gbc.contains("\nSignature: 1;farm.example;"), "{by_gbc}");
    assert!(gbc_verify(dir, &by_gbc, &[&nix_pub]).unwrap().contains("signed by farm-1"));

    for (who, text) in [("libgcrypt", &by_libgcrypt), ("gbc", &by_gbc)] {
        assert_eq!(guix_signature_status(text, &acl(&[&public_text])).unwrap(), "valid-signature", "{who}: {text}");
        for trusted in [&public, &acl_file] {
            let ok = gbc_verify(dir, text, &[trusted]).unwrap_or_else(|e| panic!("{who}: {e}"));
            assert!(ok.contains("signed by Guix key"), "{who}: {ok}");
        }
        // Tampered: the NAR's size changed after signing.
        let tampered = text.replace("NarSize: 120", "NarSize: 121");
        assert_eq!(guix_signature_status(&tampered, &acl(&[&public_text])).unwrap(), "hash-mismatch", "{who}");
        let e = gbc_verify(dir, &tampered, &[&public]).unwrap_err();
        assert!(e.contains("changed after it was signed"), "{who}: {e}");
        // Another key trusted, not the signer.
        assert_eq!(guix_signature_status(text, &other_acl).unwrap(), "unauthorized-key", "{who}");
        let e = gbc_verify(dir, text, &[&other_pub]).unwrap_err();
        assert!(e.contains("not trusted"), "{who}: {e}");
        // A line moved below the signature: References is no longer signed.
        let refs = text.lines().find(|l| l.starts_with("References: ")).unwrap();
        let moved = format!("{}{refs}\n", text.replace(&format!("{refs}\n"), ""));
        assert_eq!(guix_signature_status(&moved, &acl(&[&public_text])).unwrap(), "unsigned", "{who}");
        let e = gbc_verify(dir, &moved, &[&public]).unwrap_err();
        assert!(e.contains("after Signature:") || e.contains("not above Signature:"), "{who}: {e}");
        // A field added after the signature: Guix ignores it (it is not signed); gbc refuses it.
        let added = format!("{text}System: x86_64-linux\n");
        assert_eq!(guix_signature_status(&added, &acl(&[&public_text])).unwrap(), "valid-signature", "{who}");
        let e = gbc_verify(dir, &added, &[&public]).unwrap_err();
        assert!(e.contains("a field after Signature:"), "{who}: {e}");
    }
}

/// `gbc keygen --format guix` writes what libgcrypt reads as a key pair: a signature made with
/// the secret half verifies with the public half, through Guix's own check.
#[test]
fn gbc_keygen_guix_keys_are_libgcrypt_keys() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let (sec, public) = (dir.join("k.sec"), dir.join("k.pub"));
    common::run_ok(common::gbc().args(["keygen", "--format", "guix"]).arg(&sec).arg(&public));
    let Some(by_libgcrypt) =
        guile(&format!("{PRELUDE} (display 1)")).map(|_| libgcrypt_signed_narinfo(NARINFO, &sec, &public))
    else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    let public_text = std::fs::read_to_string(&public).unwrap();
    assert_eq!(guix_signature_status(&by_libgcrypt, &acl(&[&public_text])).unwrap(), "valid-signature");
    assert!(gbc_verify(dir, &by_libgcrypt, &[&public]).is_ok());
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
    let Some(out) = guix_signature_status(&format!("{signed}Signature: {value}\n"), &acl(&[&authorized])) else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    assert_eq!(out, "valid-signature", "authorized key, hash of the text above, valid signature");
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

/// A coordinator with a /gnu/store cache of lzip NARs, as guix publish serves them.
fn lzip_gnu_store_coordinator() -> common::Coordinator {
    common::Coordinator::start(&["--local-builds", "2", "--cache-store-dir", "/gnu/store", "--compression", "lzip"])
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
    let c = lzip_gnu_store_coordinator();
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
        let Some(verdict) = guix_signature_status(&text, &acl(&[&printed])) else {
            return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
        };
        assert_eq!(verdict, "valid-signature", "{}", p.display());
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

/// A Guix key written by libgcrypt (as `guix archive --generate-key` writes
/// /etc/guix/signing-key.sec) given with `--guix-signing-key` signs a /nix/store cache's narinfos
/// for Guix clients too; `gbc cache public-key --format guix` prints its public half, as
/// libgcrypt wrote it; Guix's check accepts the signatures, and real Nix still copies from the
/// cache (its `Sig:` checks; it ignores `Signature:`).
#[test]
fn a_libgcrypt_key_signs_a_nix_cache_that_nix_still_reads() {
    let tmp = common::tempdir();
    let Some((sec, public)) = libgcrypt_key_pair(tmp.path(), "signing-key") else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    let c = common::Coordinator::start(&["--local-builds", "1", "--guix-signing-key", sec.to_str().unwrap()]);
    let drv = common::instantiate("tests/nix/queue.nix", None, &["right"], &common::salt()).remove(0).1;
    let out = common::run(&mut c.gbc(&["build", &drv]));
    assert!(out.status.success(), "{}\n{}", common::stderr(&out), c.log());
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let printed = common::run_ok_str(&mut c.gbc(&[
        "cache",
        "public-key",
        "--format",
        "guix",
        "--signing-key",
        sec.to_str().unwrap(),
    ]));
    let theirs = std::fs::read_to_string(&public).unwrap();
    assert_eq!(
        gbc::formats::gcrypt::parse(printed.as_bytes()).unwrap(),
        gbc::formats::gcrypt::parse(theirs.as_bytes()).unwrap(),
        "the public key libgcrypt wrote: {printed} vs {theirs}"
    );
    let hash = &path.rsplit('/').next().unwrap()[..32];
    let text = std::fs::read_to_string(c.state.join(format!("cache/{hash}.narinfo"))).unwrap();
    assert!(text.contains("\nSig: ") && text.contains("\nSignature: 1;"), "{text}");
    assert_eq!(guix_signature_status(&text, &acl(&[&theirs])).unwrap(), "valid-signature", "{text}");

    let key = common::run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();
    let out = common::run(
        common::nix("nix")
            .args(["copy", "--from", &format!("file://{}", c.state.join("cache").display()), "--to"])
            .arg(tmp.path().join("fresh"))
            .args(["--option", "trusted-public-keys", &key, &path]),
    );
    assert!(out.status.success(), "nix copy: {}", common::stderr(&out));
    assert!(tmp.path().join("fresh").join(path.trim_start_matches('/')).exists());
}

/// A Guix upstream: /gnu/store narinfos whose only signature is a `Signature:` made by libgcrypt
/// (as guix publish signs), over lzip NARs. A coordinator given it and that Guix key builds the
/// diamond's top only: left and right come from upstream, checked as `guix substitute` would.
#[test]
fn a_guix_upstream_s_paths_are_taken_and_only_the_rest_is_built() {
    use gbc::formats::narinfo::NarInfo;
    let tmp = common::tempdir();
    let Some((sec, public)) = libgcrypt_key_pair(tmp.path(), "upstream") else {
        return common::skip("guile with guile-gcrypt is not installed (scripts/install-test-deps installs them)");
    };
    let drv = |name: &str| {
        std::fs::read_dir(common::repo_path("examples/diamond"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(&format!("-example-{name}.drv")))
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    // The upstream's contents: left and right (and base), built by another coordinator with lzip
    // NARs, then signed by libgcrypt alone.
    let up = lzip_gnu_store_coordinator();
    let out = common::run(&mut up.gbc(&["build", &drv("left"), &drv("right")]));
    assert!(out.status.success(), "{}\n{}", common::stderr(&out), up.log());
    let upstream_dir = up.state.join("cache");
    for entry in std::fs::read_dir(&upstream_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        let mut info = NarInfo::parse(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(info.compression.as_deref(), Some("lzip"));
        info.sigs.clear();
        info.guix_signature = None;
        std::fs::write(&p, libgcrypt_signed_narinfo(&info.to_string(), &sec, &public)).unwrap();
    }
    let files = common::files::Files::serve_dir(&upstream_dir);

    let c = common::Coordinator::start(&[
        "--local-builds",
        "1",
        "--cache-store-dir",
        "/gnu/store",
        "--substituter",
        &files.url(""),
        "--substituter-key",
        public.to_str().unwrap(),
    ]);
    let out = common::run(&mut c.gbc(&["submit", "--json", "--no-upload", &drv("top")]));
    assert!(out.status.success(), "{}", common::stderr(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["dependencies"].as_array().unwrap().len(), 0, "left and right come from upstream: {reply}");
    assert_eq!(reply["substitutable"].as_array().unwrap().len(), 2, "{reply}");
    let uuid = reply["builds"][0].as_str().unwrap().to_owned();
    let w = common::run(&mut c.gbc(&["watch", &uuid]));
    assert!(w.status.success(), "{}\n{}", common::stderr(&w), c.log());
    // The substitutes are in the cache, and top is signed for Guix clients by the cache's key.
    let guix_pub = std::fs::read_to_string(c.state.join("keys/guix-signing-key.pub")).unwrap();
    for p in reply["substitutable"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        let text = std::fs::read_to_string(c.state.join(format!("cache/{}.narinfo", &p["/gnu/store/".len()..][..32])));
        // Not signed by the cache (it was not told to sign substitutes): Guix's signature covered
        // upstream's text, which is not this one.
        let text = text.unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(!text.contains("Sig:") && !text.contains("Signature:"), "{text}");
    }
    let top = c.show(&uuid)["attempt_list"][0]["outputs"][0]["path"].as_str().unwrap().to_owned();
    let text =
        std::fs::read_to_string(c.state.join(format!("cache/{}.narinfo", &top["/gnu/store/".len()..][..32]))).unwrap();
    assert_eq!(guix_signature_status(&text, &acl(&[&guix_pub])).unwrap(), "valid-signature", "{text}");
}
