//! The builtin builders: Nix's `builtin:fetchurl` against Nix's own realisation of the same
//! derivations, fetching from a server on loopback, through `gbc realise` and the coordinator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;

use common::files::Files;
use common::{Coordinator, gbc, nix, nix_realise, run, run_ok, run_ok_str, salt, stderr, tempdir};

/// The files the server gives, and the hashes Nix computes for them.
struct Served {
    files: Files,
    drvs: BTreeMap<String, String>,
    flat_hash: String,
    wrong_hash: String,
}

const ATTRS: [&str; 9] =
    ["flat", "exe", "unpacked", "unpackedXz", "wrong", "fallsThrough", "flaky", "proxied", "fileUrl"];

fn nix_hash(path: &Path, flat: bool) -> String {
    let mut c = nix("nix-hash");
    c.args(["--type", "sha256", "--base32"]);
    if flat {
        c.arg("--flat");
    }
    run_ok_str(c.arg(path)).trim().to_owned()
}

fn serve() -> Served {
    let salt = salt();
    let tmp = tempdir();
    let hello = tmp.path().join("hello.txt");
    fs::write(&hello, format!("hello {salt}\n")).unwrap();
    let tool = tmp.path().join("tool.sh");
    fs::write(&tool, format!("#!/bin/sh\necho {salt}\n")).unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("README"), format!("a tree {salt}\n")).unwrap();
    fs::copy(&tool, tree.join("bin/tool")).unwrap();
    std::os::unix::fs::symlink("bin/tool", tree.join("link")).unwrap();
    let nar = run_ok(nix("nix-store").arg("--dump").arg(&tree));
    let nar_file = tmp.path().join("tree.nar");
    fs::write(&nar_file, &nar).unwrap();
    run_ok(std::process::Command::new("xz").args(["-k", "-T1"]).arg(&nar_file));
    let wrong = tmp.path().join("wrong");
    fs::write(&wrong, format!("not hello {salt}\n")).unwrap();

    let flat_hash = nix_hash(&hello, true);
    let wrong_hash = nix_hash(&wrong, true);
    let files: BTreeMap<String, Vec<u8>> = [
        ("/hello.txt", fs::read(&hello).unwrap()),
        ("/tool.sh", fs::read(&tool).unwrap()),
        ("/tree.nar", nar),
        ("/tree.nar.xz", fs::read(tmp.path().join("tree.nar.xz")).unwrap()),
    ]
    .into_iter()
    .map(|(p, b)| (p.to_owned(), b))
    .collect();
    let files = Files::start(files);
    let mut cmd = nix("nix-instantiate");
    cmd.arg(common::repo_path("tests/nix/fetch.nix"));
    for (name, value) in [
        ("base", files.url("")),
        ("salt", salt.clone()),
        ("flatHash", flat_hash.clone()),
        ("exeHash", nix_hash(&tool, false)),
        ("narHash", nix_hash(&tree, false)),
        ("wrongHash", wrong_hash.clone()),
    ] {
        cmd.args(["--argstr", name, &value]);
    }
    for a in ATTRS {
        cmd.args(["-A", a]);
    }
    let out = run_ok_str(&mut cmd);
    let drvs = ATTRS.iter().map(|a| a.to_string()).zip(out.lines().map(str::to_owned)).collect();
    Served { files, drvs, flat_hash, wrong_hash }
}

fn realise(root: &Path, drv: &str) -> Output {
    run(gbc().arg("realise").arg("--store-root").arg(root).arg(drv))
}

fn recorded_nar_hash(root: &Path, path: &str) -> String {
    let base = Path::new(path).file_name().unwrap().to_str().unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join(".gbc-db").join(format!("{base}.json"))).unwrap()).unwrap();
    rec["nar_hash"].as_str().unwrap().to_owned()
}

#[test]
fn nix_fetchurl_outputs_equal_nix_s() {
    let s = serve();
    let tmp = tempdir();
    let root = tmp.path().join("store");
    for attr in ["flat", "exe", "unpacked", "unpackedXz"] {
        let drv = &s.drvs[attr];
        let ours = realise(&root, drv);
        assert!(ours.status.success(), "{attr}: {}", stderr(&ours));
        let path = String::from_utf8_lossy(&ours.stdout).trim().to_owned();
        let theirs = nix_realise(&[drv], &[]);
        assert_eq!(path, theirs.trim(), "{attr}: output path");
        let hash = run_ok_str(nix("nix-store").args(["-q", "--hash", &path]));
        assert_eq!(recorded_nar_hash(&root, &path), hash.trim(), "{attr}: NarHash of {path}");
        let log = stderr(&ours);
        assert!(log.contains("downloading '"), "{attr}: the build log shows the download: {log}");
    }
}

#[test]
fn a_wrong_hash_fails_naming_both_hashes() {
    let s = serve();
    let tmp = tempdir();
    let ours = realise(&tmp.path().join("store"), &s.drvs["wrong"]);
    assert_eq!(ours.status.code(), Some(1), "{}", stderr(&ours));
    let why = stderr(&ours);
    assert!(why.contains(&s.wrong_hash) && why.contains(&s.flat_hash), "{why}");
    // Nix fails too.
    let theirs = common::reference(|| {
        let mut c = nix("nix-store");
        c.args(["--realise", &s.drvs["wrong"]]);
        c
    });
    assert!(!theirs.status.success());
    assert!(stderr(&theirs).contains("hash mismatch"), "{}", stderr(&theirs));
}

#[test]
fn a_404_falls_through_to_the_next_url_and_file_urls_are_refused() {
    let s = serve();
    let tmp = tempdir();
    let root = tmp.path().join("store");
    let ours = realise(&root, &s.drvs["fallsThrough"]);
    assert!(ours.status.success(), "{}", stderr(&ours));
    let requests = s.files.requests.lock().unwrap().clone();
    assert_eq!(requests, ["/missing", "/redirect/hello.txt", "/hello.txt"], "tried in order, redirect followed");

    let refused = realise(&root, &s.drvs["fileUrl"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let why = stderr(&refused);
    assert!(why.contains("file:///etc/hostname") && why.contains("refused"), "{why}");
}

#[test]
fn a_transient_failure_is_tried_again() {
    let s = serve();
    let tmp = tempdir();
    let out = realise(&tmp.path().join("store"), &s.drvs["flaky"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(*s.files.requests.lock().unwrap(), ["/flaky/hello.txt", "/flaky/hello.txt"]);
    assert!(stderr(&out).contains("HTTP 503") && stderr(&out).contains("again in 1s"), "{}", stderr(&out));
}

#[test]
fn downloads_go_through_the_proxy_the_environment_names() {
    let s = serve();
    let tmp = tempdir();
    let out = run(gbc()
        .arg("realise")
        .arg("--store-root")
        .arg(tmp.path().join("store"))
        .arg(&s.drvs["proxied"])
        .env("http_proxy", s.files.url("")));
    assert!(out.status.success(), "{}", stderr(&out));
    let requests = s.files.requests.lock().unwrap().clone();
    assert_eq!(requests, ["CONNECT gbc-test.invalid:80", "/hello.txt"]);
    assert!(stderr(&out).contains("through http://127.0.0.1:"), "{}", stderr(&out));
}

#[test]
fn the_coordinator_builds_builtin_fetches() {
    let s = serve();
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = [&s.drvs["flat"], &s.drvs["unpacked"]];
    let uuids = c.submit(&drvs, &[]);
    c.watch_ok(&uuids);
    let mut ours = Vec::new();
    for uuid in &uuids {
        let build = c.show(uuid);
        let attempt = build["attempt_list"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(attempt["status"], "success", "{build}");
        for o in attempt["outputs"].as_array().unwrap() {
            let path = o["path"].as_str().unwrap().to_owned();
            ours.push((path, o["nar_hash"].as_str().unwrap().to_owned()));
        }
    }
    let theirs: Vec<String> = nix_realise(&[drvs[0], drvs[1]], &[]).lines().map(str::to_owned).collect();
    assert_eq!(ours.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), theirs);
    for (path, hash) in ours {
        let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", &path]));
        assert_eq!(hash, nix_hash.trim(), "NarHash of {path}");
    }
}

/// A `builtin:download` derivation exactly as Guix's `url-fetch` writes it (guix/download.scm's
/// `built-in-download`: `url` as Guile writes it, the mirror files as text sources, Guix's leaked
/// variables, `preferLocalBuild`; no `outputHash*`, `builder`, `name` or `system` in the
/// environment, unlike Nix's `derivation`), written with its sources into `dir`; its .drv file.
/// The mirrors file names `base` (the test's server) for `mirror://test/...`.
fn guix_download_drv(
    dir: &Path,
    base: &str,
    name: &str,
    url: &str,
    ca_mirrors: &str,
    flat_hash: &str,
) -> std::path::PathBuf {
    use gbc::formats::derivation::{Derivation, Output};
    use gbc::formats::hash::{Hash, sha256};
    use gbc::formats::store_path::StoreDir;
    let sd = StoreDir::new("/gnu/store").unwrap();
    let source = |name: &str, text: &str| {
        let path = sd.display(&sd.make_text_path(name, &sha256(text.as_bytes()), []).unwrap());
        fs::write(dir.join(Path::new(&path).file_name().unwrap()), text).unwrap();
        path
    };
    let mirrors = source(
        "mirrors",
        &format!(
            "((gnu \"https://ftpmirror.gnu.org/gnu/\" \"https://ftp.gnu.org/gnu/\") (test \"{base}/nope/\" \"{base}/mirror\"))"
        ),
    );
    let ca = source("content-addressed-mirrors", ca_mirrors);
    let disarchive = source("disarchive-mirrors", "(\"https://disarchive.guix.gnu.org/\")");
    let hash = Hash::parse(&format!("sha256:{flat_hash}")).unwrap();
    let out = sd.display(&sd.make_fixed_output_path(false, &hash, name).unwrap());
    let env = [
        ("content-addressed-mirrors", ca.as_str()),
        ("disarchive-mirrors", &disarchive),
        ("impureEnvVars", "http_proxy https_proxy LC_ALL LC_MESSAGES LANG COLUMNS"),
        ("mirrors", &mirrors),
        ("out", &out),
        ("preferLocalBuild", "1"),
        ("url", url),
    ];
    let drv = Derivation {
        outputs: [("out".to_owned(), Output { path: out.clone(), hash_algo: "sha256".into(), hash: hash.to_hex() })]
            .into(),
        input_drvs: Default::default(),
        input_srcs: [mirrors.clone(), ca.clone(), disarchive.clone()].into(),
        system: format!("{}-linux", std::env::consts::ARCH),
        builder: "builtin:download".into(),
        args: vec![],
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    let path = sd.display(&drv.drv_path(&sd, name).unwrap());
    let file = dir.join(Path::new(&path).file_name().unwrap());
    fs::write(&file, drv.to_aterm()).unwrap();
    file
}

#[test]
fn guix_download_tries_urls_then_mirrors_then_content_addressed_mirrors() {
    let salt = salt();
    let contents = format!("hello from guix {salt}\n");
    let tmp = tempdir();
    let hello = tmp.path().join("hello.txt");
    fs::write(&hello, &contents).unwrap();
    let hash = nix_hash(&hello, true);
    let files = Files::start(
        [
            ("/mirror/hello.txt".to_owned(), contents.clone().into_bytes()),
            (format!("/ca/sha256/{hash}"), contents.clone().into_bytes()),
        ]
        .into_iter()
        .collect(),
    );
    let base = files.url("");
    // Guix's own content-addressed mirrors (ci's `guix publish` and the rest) are unreachable from
    // here; the test's server is one more of the same form, and a procedure gbc must not run.
    let ca_mirrors = format!(
        r#"(begin (use-modules (guix base16) (guix base32)) (define (guix-publish host) (lambda (file algo hash) (string-append "https://" host "/file/" file "/" (symbol->string algo) "/" (bytevector->nix-base32-string hash)))) (list (lambda (file algo hash) (string-append "{base}/ca/" (symbol->string algo) "/" (bytevector->nix-base32-string hash))) (lambda (file algo hash) (system* "touch" "/tmp/evaluated"))))"#
    );
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    let drvs = [
        guix_download_drv(
            &real,
            &base,
            &format!("hello-{salt}.txt"),
            &format!(r#"("{base}/missing" "mirror://test/hello.txt")"#),
            "(quote ())",
            &hash,
        ),
        guix_download_drv(
            &real,
            &base,
            &format!("hello-ca-{salt}.txt"),
            &format!(r#""{base}/missing""#),
            &ca_mirrors,
            &hash,
        ),
    ];
    // Their names are the paths their contents give (gbc's derivation code is checked against
    // Nix's by tests/nix_drv.rs).
    for drv in &drvs {
        let shown = run_ok_str(gbc().args(["drv", "path"]).arg(drv));
        assert!(
            shown.starts_with("/gnu/store/")
                && shown.lines().next().unwrap().ends_with(&*drv.file_name().unwrap().to_string_lossy()),
            "{shown}"
        );
    }
    let root = tmp.path().join("gbc");
    let tried = [
        vec!["/missing".to_owned(), "/nope/hello.txt".to_owned(), "/mirror/hello.txt".to_owned()],
        vec!["/missing".to_owned(), format!("/ca/sha256/{hash}")],
    ];
    for (file, expected) in drvs.iter().zip(tried) {
        let built = realise(&root, file.to_str().unwrap());
        assert!(built.status.success(), "{}: {}", file.display(), stderr(&built));
        let path = String::from_utf8_lossy(&built.stdout).trim().to_owned();
        assert!(path.starts_with("/gnu/store/"), "{path}");
        let base = Path::new(&path).file_name().unwrap();
        assert_eq!(fs::read_to_string(root.join(base)).unwrap(), contents);
        let requests = std::mem::take(&mut *files.requests.lock().unwrap());
        assert_eq!(requests, expected, "{}: tried in Guix's order", file.display());
        // The content-addressed mirror of a form gbc does not recognise was skipped, and said so.
        if file.to_string_lossy().contains("hello-ca") {
            assert!(stderr(&built).contains("skipping (lambda"), "{}", stderr(&built));
        }
    }
    assert!(!Path::new("/tmp/evaluated").exists(), "nothing in the mirrors file was evaluated");
}

/// Every file under `dir`, as server path (under `prefix`) → contents.
fn files_under(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        if entry.file_type().unwrap().is_dir() {
            files_under(&entry.path(), &name, out);
        } else {
            out.insert(name, fs::read(entry.path()).unwrap());
        }
    }
}

#[test]
fn guix_git_download_checks_out_one_commit_without_dot_git() {
    let salt = salt();
    let tmp = tempdir();
    let git = |dir: &Path, args: &[&str]| {
        run_ok_str(
            std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", dir),
        )
    };
    // A repository with two commits; the first is fetched.
    let work = tmp.path().join("work");
    fs::create_dir_all(work.join("src")).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    fs::write(work.join("README"), format!("first {salt}\n")).unwrap();
    fs::write(work.join("src/tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(work.join("src/tool.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    git(&work, &["add", "."]);
    git(&work, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first"]);
    let commit = git(&work, &["rev-parse", "HEAD"]).trim().to_owned();
    fs::write(work.join("README"), "second\n").unwrap();
    git(&work, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "second"]);
    // What the checkout must be: the first commit's tree, without .git; its hash by Nix.
    let expected = tmp.path().join("expected");
    git(tmp.path(), &["clone", "-q", work.to_str().unwrap(), expected.to_str().unwrap()]);
    git(&expected, &["checkout", "-q", &commit]);
    fs::remove_dir_all(expected.join(".git")).unwrap();
    let hash = nix_hash(&expected, false);
    // Served over git's "dumb" HTTP protocol by the test's file server.
    let bare = tmp.path().join("repo.git");
    git(tmp.path(), &["clone", "-q", "--bare", work.to_str().unwrap(), bare.to_str().unwrap()]);
    git(&bare, &["update-server-info"]);
    let mut served = BTreeMap::new();
    files_under(&bare, "/repo.git", &mut served);
    let files = Files::start(served);

    let (store, real) = common::gnu_store(tmp.path());
    let mut cmd = nix("nix-instantiate");
    cmd.args(["--store", &store]).arg(common::repo_path("tests/nix/guix-git.nix"));
    cmd.args(["--argstr", "url", &files.url("/repo.git")]).args(["--argstr", "commit", &commit]);
    cmd.args(["--argstr", "hash", &hash]).args(["--argstr", "salt", &salt]);
    let drv = run_ok_str(cmd.args(["-A", "checkout"])).trim().to_owned();
    let file = real.join(Path::new(&drv).file_name().unwrap());
    let root = tmp.path().join("gbc");
    let built = realise(&root, file.to_str().unwrap());
    assert!(built.status.success(), "{}", stderr(&built));
    let path = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    let out = root.join(Path::new(&path).file_name().unwrap());
    assert_eq!(fs::read_to_string(out.join("README")).unwrap(), format!("first {salt}\n"));
    assert!(!out.join(".git").exists());
    // A recursive SHA-256 fixed output: its NarHash is the declared hash, checked by the build.
    assert_eq!(recorded_nar_hash(&root, &path), format!("sha256:{hash}"));
}

/// An HTTPS server on loopback (Python's, with a certificate of a CA made here), serving `dir`.
struct Https {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn https_server(tmp: &Path, dir: &Path) -> Https {
    let openssl = |args: &[&str]| run_ok(std::process::Command::new("openssl").args(args).current_dir(tmp));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ed25519",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=gbc test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ed25519",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    fs::write(tmp.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    let (port, _) = common::free_addr();
    let script = format!(
        "import http.server, ssl, functools\n\
         h = functools.partial(http.server.SimpleHTTPRequestHandler, directory={dir:?})\n\
         s = http.server.HTTPServer(('127.0.0.1', {port}), h)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain({cert:?}, {key:?})\n\
         s.socket = c.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()\n",
        dir = dir.display().to_string(),
        cert = tmp.join("server.pem").display().to_string(),
        key = tmp.join("server.key").display().to_string(),
    );
    let child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the HTTPS server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Https { child, port, ca: tmp.join("ca.pem") }
}

#[test]
fn https_downloads_check_the_server_s_certificate() {
    let salt = salt();
    let tmp = tempdir();
    let www = tmp.path().join("www");
    fs::create_dir(&www).unwrap();
    fs::write(www.join("hello.txt"), format!("hello over tls {salt}\n")).unwrap();
    let hash = nix_hash(&www.join("hello.txt"), true);
    let server = https_server(tmp.path(), &www);
    let expr = format!(
        "import <nix/fetchurl.nix> {{ url = \"https://127.0.0.1:{}/hello.txt\"; sha256 = \"{hash}\"; name = \"tls-{salt}\"; }}",
        server.port
    );
    let drv = run_ok_str(nix("nix-instantiate").args(["-E", &expr])).trim().to_owned();
    let realise_with = |ca: &Path, root: &str| {
        run(gbc()
            .arg("realise")
            .arg("--store-root")
            .arg(tmp.path().join(root))
            .arg(&drv)
            .env("NIX_SSL_CERT_FILE", ca)
            .env("SSL_CERT_FILE", ca))
    };
    // Trusting the test's CA, the download is made.
    let ok = realise_with(&server.ca, "a");
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Trusting only another CA bundle (Debian's), the server is refused.
    let system = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !system.exists() {
        return common::skip("no /etc/ssl/certs/ca-certificates.crt to distrust the test's CA with");
    }
    let refused = realise_with(system, "b");
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let why = stderr(&refused);
    assert!(why.contains("certificate") && !why.contains("again"), "refused at once: {why}");
}
