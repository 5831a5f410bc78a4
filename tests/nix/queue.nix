# Derivations for the coordinator tests: a diamond, a failure and its dependents, builds that take a
# while (to fill a slot, to cancel, to follow a log), and `many` trivial ones. Builders are /bin/sh.
{ system ? builtins.currentSystem, salt ? "", n ? 0 }:
let
  sh = name: script: args: derivation ({
    inherit system name;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // args);
in rec {
  base = sh "base" "echo base ${salt} > $out" { };
  left = sh "left" "read x < ${base}; echo \"$x left\" > $out" { };
  right = sh "right" "read x < ${base}; /bin/mkdir -p $out/share; echo \"$x right\" > $out/share/right" { };
  top = sh "top" "echo building top; /bin/cat ${left} ${right}/share/right > $out" { };
  # Its output refers to base's.
  refsBase = sh "refs-base" "echo ${base} > $out" { };
  usesRefsBase = sh "uses-refs-base" "/bin/cat ${refsBase} > $out" { };

  broken = sh "broken" "echo 'breaking on purpose' ${salt}; exit 1" { };
  afterBroken = sh "after-broken" "/bin/cat ${broken} > $out" { };
  alsoAfterBroken = sh "also-after-broken" "/bin/cat ${afterBroken} > $out" { };

  blocker = sh "blocker" "echo blocking ${salt}; /bin/sleep 3; echo done > $out" { };
  slow = sh "slow" "echo starting ${salt}; /bin/sleep 60; echo never > $out" { };
  afterSlow = sh "after-slow" "/bin/cat ${slow} > $out" { };
  ticker = sh "ticker" ''
    for i in 1 2 3 4 5 6; do echo "tick $i ${salt}"; /bin/sleep 0.5; done
    echo done > $out
  '' { };

  # About 40 MB of log unless it is stopped.
  chatty = sh "chatty" ''
    i=0; while [ $i -lt 1000000 ]; do echo "line $i of a chatty build ${salt}"; i=$((i+1)); done
    echo done > $out
  '' { };

  # 7 MB that do not compress, each.
  large = map (i: sh "large-${toString i}" "echo ${salt} > /dev/null; /bin/head -c 7000000 /dev/urandom > $out" { }) [ 1 2 3 4 ];

  # About 40 MB that do not compress.
  huge = sh "huge" "echo ${salt} > /dev/null; /bin/head -c 40000000 /dev/urandom > $out" { };

  # For a system no machine here has.
  otherSystem = derivation { system = "riscv64-linux"; name = "other-system"; builder = "/bin/sh"; args = [ "-c" "echo ${salt} > $out" ]; };

  # A fixed-output build (it keeps the host's network) that connects to an abstract Unix socket
  # of the host, whose owner sees the builder's host uid.
  fodProbe = sh "fod-probe" ''
    /usr/bin/perl -e 'use Socket; socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die; connect($s, pack_sockaddr_un("\0gbc-fod-probe-${salt}")) or die "connect: $!"; syswrite($s, "hello\n");'
    echo fixed > $out
  '' { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = builtins.hashString "sha256" "fixed\n"; };

  # Derivations that can never build: no other try would do better.
  noBuilder = derivation { inherit system; name = "no-builder"; builder = "/nonexistent/builder-${salt}"; };
  badExport = sh "bad-export" "echo ${salt} > $out" { exportReferencesGraph = [ "../escape" base ]; };
  fifoOutput = sh "fifo-output" "echo ${salt}; /bin/mkfifo $out" { };

  # Tries to leave a setuid copy of id(1) where others could run it while the build lasts.
  setuidProbe = sh "setuid-probe" ''
    /bin/cp /bin/id $out; /bin/chmod 6755 $out; echo "chmod exited $? ${salt}"; /bin/sleep 4; /bin/chmod 0755 $out
  '' { };

  p1 = sh "prio-1" "echo 1 ${salt} > $out" { };
  p2 = sh "prio-2" "echo 2 ${salt} > $out" { };
  p3 = sh "prio-3" "echo 3 ${salt} > $out" { };

  # Its builder script is an input source, which no build host has: a text file that refers to
  # another text file and to a directory added to the store.
  sourceData = builtins.toFile "needs-source-data" "data ${salt}";
  sourceDir = builtins.path { path = ./source-dir; name = "needs-source-dir"; };
  needsSource = sh "needs-source" ". ${builtins.toFile "needs-source.sh" ''
    read x < ${sourceData}; echo "$x" > $out; /bin/cat ${sourceDir}/file >> $out
  ''}" { };

  # Its output refers to an input source that is the same in every run (no salt).
  sharedSource = builtins.toFile "shared-source" "the same in every run";
  refsSharedSource = sh "refs-shared-source" "echo ${salt} ${sharedSource} > $out" { };

  many = builtins.genList (i: sh "trivial-${toString i}" "echo ${toString i} ${salt} > $out" { }) n;

  # For the build hook tests (tests/offload.rs): a chain, a failure, and one that needs a feature
  # no machine of the coordinator has (the daemon builds it itself).
  hookFirst = sh "hook-first" "echo building first ${salt}; echo first ${salt} > $out" { };
  hookSecond = sh "hook-second" "echo building second; echo ${hookFirst} > $out" { };
  hookThird = sh "hook-third" "echo building third; /bin/cat ${hookSecond} > $out; echo ${hookSecond} >> $out" { };
  hookBroken = sh "hook-broken" "echo 'breaking on purpose' ${salt}; exit 3" { };
  hookLocal = sh "hook-local" "echo local ${salt} > $out" { requiredSystemFeatures = [ "gbc-test-local" ]; };
}
