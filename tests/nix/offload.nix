# Derivations for the build hook tests (tests/offload.rs): a chain, a failure, and one that needs a
# feature no machine of the coordinator has (the daemon builds it itself). Builders are /bin/sh.
{ system ? builtins.currentSystem, salt ? "" }:
let
  sh = name: script: args: derivation ({
    inherit system name;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // args);
in rec {
  first = sh "hook-first" "echo building first ${salt}; echo first ${salt} > $out" { };
  second = sh "hook-second" "echo building second; echo ${first} > $out" { };
  third = sh "hook-third" "echo building third; /bin/cat ${second} > $out; echo ${second} >> $out" { };
  broken = sh "hook-broken" "echo 'breaking on purpose' ${salt}; exit 3" { };
  local = sh "hook-local" "echo local ${salt} > $out" { requiredSystemFeatures = [ "gbc-test-local" ]; };
}
