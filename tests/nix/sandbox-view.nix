# What a build sees of its sandbox, written to $out: tests/nix_realise.rs compares gbc's with Nix's
# own sandbox (sandbox = true) given the same sandbox paths.
{ salt }:
{
  view = derivation {
  name = "sandbox-view"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" ''
    export PATH=/usr/bin:/bin
    {
      echo "== /"; ls -a /
      echo "== /dev"; ls -a /dev
      echo "== /dev/pts"; ls -a /dev/pts
      echo "== /etc"; ls -a /etc
      echo "== passwd"; cat /etc/passwd
      echo "== group"; cat /etc/group
      echo "== hosts"; cat /etc/hosts
      echo "== build dir"; pwd; ls -a .
      echo "== tmp"; stat -c '%a' /tmp; ls -a /tmp
      echo "== id"; id
      echo "== env"; env | sort
      echo "== hostname"; cat /proc/sys/kernel/hostname
    } > $out
  '' ];
  inherit salt;
  };
}
