# Derivations for the SSH host tests: plain ones any x86_64 host builds, ones that need the `big`
# feature, ones for i686-linux, slow ones (to lose a host under), and a chain across hosts.
# Builders are /bin/sh.
{ salt ? "", n ? 12 }:
let
  sh = system: name: script: args: derivation ({
    inherit system name;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // args);
in rec {
  plain = builtins.genList (i: sh "x86_64-linux" "plain-${toString i}" "/bin/sleep 0.3; echo ${toString i} ${salt} > $out" { }) n;
  big = builtins.genList (i: sh "x86_64-linux" "big-${toString i}" "echo big ${toString i} ${salt} > $out" {
    requiredSystemFeatures = [ "big" ];
  }) 2;
  i686 = builtins.genList (i: sh "i686-linux" "i686-${toString i}" "/bin/mkdir -p $out/bin; echo ${toString i} ${salt} > $out/bin/x" { }) 2;
  fourSeconds = builtins.genList (i: sh "x86_64-linux" "four-seconds-${toString i}" "echo starting ${salt}; /bin/sleep 4; echo ${toString i} > $out" { }) 4;
  slow = sh "x86_64-linux" "slow" "echo starting ${salt}; /bin/sleep 4; echo done > $out" { };

  # A chain whose steps only fit different hosts: x86_64-linux, i686-linux, then the `big` feature.
  chainA = sh "x86_64-linux" "chain-a" "echo a ${salt} > $out" { };
  chainB = sh "i686-linux" "chain-b" "read x < ${chainA}; echo \"$x b\" > $out" { };
  chainC = sh "x86_64-linux" "chain-c" "read x < ${chainB}; echo \"$x c\" > $out; echo ${chainB} >> $out" {
    requiredSystemFeatures = [ "big" ];
  };
}
