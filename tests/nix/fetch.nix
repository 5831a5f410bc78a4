# Derivations of Nix's builtin:fetchurl, as <nix/fetchurl.nix> writes them, against a loopback
# server at `base` (tests/builtins.rs). Each test run serves files with contents of its own.
{ base, salt, flatHash, exeHash, narHash, wrongHash }:
{
  flat = import <nix/fetchurl.nix> { url = "${base}/hello.txt"; sha256 = flatHash; };
  exe = import <nix/fetchurl.nix> { url = "${base}/tool.sh"; sha256 = exeHash; executable = true; };
  unpacked = import <nix/fetchurl.nix> { url = "${base}/tree.nar"; sha256 = narHash; unpack = true; };
  unpackedXz = import <nix/fetchurl.nix> {
    url = "${base}/tree.nar.xz"; sha256 = narHash; unpack = true; name = "tree-xz";
  };
  wrong = import <nix/fetchurl.nix> { url = "${base}/hello.txt"; sha256 = wrongHash; name = "wrong-${salt}"; };
  # Nix's builtin reads only `url`; gbc also tries `urls` in order (here: a 404, then a redirect).
  fallsThrough = derivation {
    name = "falls-through"; builder = "builtin:fetchurl"; system = "builtin";
    url = "${base}/missing"; urls = [ "${base}/missing" "${base}/redirect/hello.txt" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = flatHash;
  };
  # The server fails the first try (503): tried again.
  flaky = import <nix/fetchurl.nix> { url = "${base}/flaky/hello.txt"; sha256 = flatHash; name = "flaky-${salt}"; };
  # Through the proxy that http_proxy names (impureEnvVars): the host does not exist.
  proxied = import <nix/fetchurl.nix> { url = "http://gbc-test.invalid/hello.txt"; sha256 = flatHash; name = "proxied-${salt}"; };
  fileUrl = import <nix/fetchurl.nix> { url = "file:///etc/hostname"; sha256 = wrongHash; name = "file-url-${salt}"; };
}
