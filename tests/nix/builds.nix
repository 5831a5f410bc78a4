# Derivations for the build tests that Nix itself need not build: failures, timeouts, and probes of
# the sandbox. Builders are /bin/sh; host tools are called by absolute path (PATH is not set).
{ system ? builtins.currentSystem, salt ? "" }:
let
  sh = name: script: args: derivation ({
    inherit system name;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // args);
  input = sh "probe-input" "echo input ${salt} > $out" { };
in {
  # Two builds that take a while, to run at once over one agent session.
  pauseA = sh "pause-a" "echo 'a begins'; /bin/sleep 2; echo 'a ends'; echo a > $out" { inherit salt; };
  pauseB = sh "pause-b" "echo 'b begins'; /bin/sleep 2; echo 'b ends'; echo b > $out" { inherit salt; };

  # A fixed-output build keeps the host's network: it sees more interfaces than lo. Its output is
  # "networked" only then, and the declared hash is of that word.
  fixedNetwork = sh "fixed-network" ''
    n=$(/bin/cat /proc/net/dev | /usr/bin/tail -n +3 | /usr/bin/wc -l)
    if [ "$n" -gt 1 ]; then printf networked > $out; else printf isolated > $out; fi
  '' {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "networked";
    inherit salt;
  };

  failing = sh "failing" "echo 'failing on purpose' >&2; exit 3" { };

  noOutput = sh "no-output" "echo 'made nothing'" { };

  fixedWrong = sh "fixed-wrong" "printf hello > $out" {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "goodbye";
  };

  slow = sh "slow" "echo starting ${salt}; /bin/sleep 60; echo never > $out" { };

  silent = sh "silent" "echo 'about to go quiet' ${salt}; /bin/sleep 60; echo never > $out" { };

  # About 10 MB of log: 160,000 lines of 64 bytes, then a line that is not UTF-8.
  chatty = sh "chatty" ''
    i=0
    while [ $i -lt 160000 ]; do
      echo "log line $i: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
      i=$((i+1))
    done
    printf '\377\376 not UTF-8\n'
    echo done > $out
  '' { inherit salt; };

  # Tries to escape; records what happened in $out (the test checks every attempt was refused).
  escape = sh "escape" ''
    try() { if eval "$2" 2>/dev/null; then echo "$1: ALLOWED"; else echo "$1: refused"; fi; }
    {
      try write-input "echo x > ${input}"
      try write-input-dir-sibling "echo x > ${builtins.storeDir}/../gbc-escaped"
      try write-root "echo x > /gbc-escaped"
      # /tmp is the build's own (as in Nix's sandbox): writable, and not the host's.
      echo x > /tmp/gbc-escaped-${salt} && echo "tmp: own"
      try write-usr "echo x > /usr/gbc-escaped"
      try remount-input "/bin/mount -o remount,rw ${input}"
      echo "uid=$(/usr/bin/id -u) gid=$(/usr/bin/id -g)"
      echo "loopback: $(/bin/cat /proc/net/fib_trie | /bin/grep -c 'host LOCAL')"
      echo "interfaces:"; /bin/cat /proc/net/dev | /usr/bin/tail -n +3 | /usr/bin/cut -d: -f1
      echo "store:"; /bin/ls ${builtins.storeDir}
      echo "pid=$$"
      echo "hostname=$(/bin/hostname)"
    } > $out
  '' { inherit salt; };

  # The same probe as a fixed-output derivation would keep the network; this one lists interfaces.
  env = sh "env" "/usr/bin/env | /usr/bin/sort > $out" { inherit salt; passAsFile = [ "big" ]; big = "passed as a file"; };
}
