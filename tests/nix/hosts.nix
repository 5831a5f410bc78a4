# Derivations for the SSH host tests: plain ones any x86_64 host builds, ones that need the `big`
# feature, ones for i686-linux, and slow ones (to lose a host under). Builders are /bin/sh.
{ salt ? "", n ? 12 }:
let
  sh = system: name: script: args: derivation ({
    inherit system name;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // args);
in {
  plain = builtins.genList (i: sh "x86_64-linux" "plain-${toString i}" "/bin/sleep 0.3; echo ${toString i} ${salt} > $out" { }) n;
  big = builtins.genList (i: sh "x86_64-linux" "big-${toString i}" "echo big ${toString i} ${salt} > $out" {
    requiredSystemFeatures = [ "big" ];
  }) 2;
  i686 = builtins.genList (i: sh "i686-linux" "i686-${toString i}" "/bin/mkdir -p $out/bin; echo ${toString i} ${salt} > $out/bin/x" { }) 2;
  slow = sh "x86_64-linux" "slow" "echo starting ${salt}; /bin/sleep 4; echo done > $out" { };
}
