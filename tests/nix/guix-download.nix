# Guix's builtin:download derivations, in a /gnu/store, with the variables `url-fetch` of Guix's
# guix/download.scm gives them: `url` as Guile's `write` prints a list of strings, and the
# mirrors and content-addressed-mirrors files as sources. (Nix's `derivation` also puts
# outputHash* and builder/name/system into the environment, which Guix's does not; gbc reads the
# hash from the derivation's output, as guix perform-download does.) `base` is the test's server.
{ base, salt, hash }:
let
  mirrors = builtins.toFile "mirrors" ''
    ((gnu "https://ftpmirror.gnu.org/gnu/" "https://ftp.gnu.org/gnu/")
     (test "${base}/nope/" "${base}/mirror"))
  '';
  caMirrors = builtins.toFile "content-addressed-mirrors" ''
    (begin (use-modules (guix base16) (guix base32))
      (define (guix-publish host) (lambda (file algo hash) (string-append "https://" host "/file/" file "/" (symbol->string algo) "/" (bytevector->nix-base32-string hash))))
      (list (lambda (file algo hash) (string-append "${base}/ca/" (symbol->string algo) "/" (bytevector->nix-base32-string hash)))
            (lambda (file algo hash) (system* "touch" "/tmp/evaluated"))))
  '';
  noMirrors = builtins.toFile "no-content-addressed-mirrors" "(quote ())";
  disarchive = builtins.toFile "disarchive-mirrors" ''("https://disarchive.guix.gnu.org/")'';
  download = { name, url, ca }: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "builtin:download";
    inherit url mirrors;
    "content-addressed-mirrors" = ca;
    "disarchive-mirrors" = disarchive;
    impureEnvVars = [ "http_proxy" "https_proxy" "LC_ALL" "LC_MESSAGES" "LANG" "COLUMNS" ];
    preferLocalBuild = true;
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = hash;
    # Only so that each test run has derivations of its own (Guix's have no such variable).
    gbcTestSalt = salt;
  };
in {
  mirrored = download {
    name = "hello-${salt}.txt";
    url = ''("${base}/missing" "mirror://test/hello.txt")'';
    ca = noMirrors;
  };
  contentAddressed = download {
    name = "hello-ca-${salt}.txt";
    url = ''"${base}/missing"'';
    ca = caMirrors;
  };
}
