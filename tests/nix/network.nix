# Whether a build reaches a server on the host's loopback (tests/nix_realise.rs): a fixed-output
# build keeps the host's network, any other build has a loopback of its own.
{ salt, port, reachedHash }:
let
  probe = ''
    if /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/${port}' 2>/dev/null; then echo reached; else echo unreachable; fi > $out
  '';
in {
  plain = derivation {
    name = "network-plain-${salt}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" probe ];
  };
  fixed = derivation {
    name = "network-fixed-${salt}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" probe ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = reachedHash;
  };
}
