# A Guix builtin:git-download derivation in a /gnu/store, with the variables Guix's `git-fetch/lfs`
# (guix/git-download.scm) gives it: `url` as Guile writes a string, `commit`, `recursive?`.
# (Nix's `derivation` adds outputHash* and builder/name/system, which Guix's does not have.)
{ url, commit, hash, salt }:
{
  checkout = derivation {
    name = "example-checkout-${salt}";
    system = builtins.currentSystem;
    builder = "builtin:git-download";
    url = ''"${url}"'';
    inherit commit;
    "recursive?" = "#f";
    impureEnvVars = [ "http_proxy" "https_proxy" "LC_ALL" "LC_MESSAGES" "LANG" "COLUMNS" ];
    preferLocalBuild = true;
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = hash;
  };
}
