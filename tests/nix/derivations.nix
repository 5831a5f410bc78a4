# Derivations the tests instantiate with the real Nix (`nix-instantiate tests/nix/derivations.nix`) and
# compare gbc against. Builders are /bin/sh so that later issues can build them without Nix or Guix.
{ system ? builtins.currentSystem, salt ? "" }:
let
  sh = script: args: derivation ({
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // args);
in rec {
  single = sh "echo single ${salt} > $out" { name = "single"; };

  multi = sh ''
    echo out > $out
    echo dev > $dev
    /bin/mkdir -p $doc/share; echo doc > $doc/share/readme
  '' { name = "multi"; outputs = [ "out" "dev" "doc" ]; };

  chainA = sh "echo a ${salt} > $out" { name = "chain-a"; };
  chainB = sh "read x < ${chainA}; echo \"$x b\" > $out" { name = "chain-b"; };
  chainC = sh "read x < ${chainB}; echo \"$x c\" > $out; echo ${multi.dev} > /dev/null"
    { name = "chain-c"; };

  fixedFlat = sh "printf hello > $out" {
    name = "fixed-flat";
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello";
  };

  fixedRecursive = sh "/bin/mkdir $out; printf hello > $out/file" {
    name = "fixed-recursive";
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "sha256-eusw8ttI+DNQtZwhsfZJlnBhBBacdCj+plT6W3SG+G4=";
  };

  fixedSha1 = sh "printf hello > $out" {
    name = "fixed-sha1";
    outputHashAlgo = "sha1";
    outputHash = builtins.hashString "sha1" "hello";
  };

  # A fixed output whose builder sees an impure variable of the caller's environment (set to
  # "proxy.example:3128" by the test).
  fixedImpure = sh "echo \"$GBC_TEST_PROXY $NIX_OUTPUT_CHECKED\" > $out" {
    name = "fixed-impure";
    impureEnvVars = [ "GBC_TEST_PROXY" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "proxy.example:3128 1\n";
    inherit salt;
  };

  # An output whose contents name another store path, so it has a reference.
  refersToChainA = sh "echo ${chainA} > $out" { name = "refers-to-chain-a"; };

  usesFixed = sh "read x < ${fixedFlat}; echo \"$x\" > $out" { name = "uses-fixed"; };

  passAsFile = sh "/bin/cp $textPath $out" {
    name = "pass-as-file";
    passAsFile = [ "text" ];
    text = "line one\nline \"two\"\twith a tab\\ and a backslash\n";
  };

  withSource = sh ". ${./builder.sh}" { name = "with-source"; };

  unicode = sh "echo $greeting > $out" { name = "unicode"; greeting = "grüße, 世界 ✓"; };

  # Output placeholders in a variable, in a passAsFile file and in the arguments.
  placeholders = sh ''
    echo "$flag" > $out
    /bin/cat $textPath >> $out
    echo ${builtins.placeholder "dev"} > $dev
  '' {
    name = "placeholders";
    outputs = [ "out" "dev" ];
    flag = "--prefix=${builtins.placeholder "out"}";
    passAsFile = [ "text" ];
    text = "dev is ${builtins.placeholder "dev"}";
  };

  # The closure of refers-to-chain-a (it and chain-a), written by Nix into the build directory.
  exportGraph = sh "/bin/cp graph $out; echo ${salt} >> $out" {
    name = "export-graph";
    exportReferencesGraph = [ "graph" refersToChainA ];
  };

  # The same with structured attributes (as nixpkgs' closureInfo does): path infos in .attrs.json.
  exportGraphStructured = derivation {
    inherit system;
    name = "export-graph-structured";
    builder = "/bin/bash";
    args = [ "-c" "source \"$NIX_ATTRS_SH_FILE\"; /bin/cp \"$NIX_ATTRS_JSON_FILE\" \${outputs[out]}" ];
    __structuredAttrs = true;
    exportReferencesGraph.closure = [ refersToChainA ];
    inherit salt;
  };

  # Output checks that pass: refers to chain-a only, which is allowed (by path), and its closure
  # holds nothing disallowed.
  checksPass = sh "echo ${chainA} > $out" {
    name = "checks-pass";
    allowedReferences = [ chainA ];
    allowedRequisites = [ chainA ];
    disallowedRequisites = [ single ];
  };
  # Output checks that fail, in Nix and in gbc.
  checksSelf = sh "echo ${salt} $out > $out" { name = "checks-self"; allowedReferences = [ ]; };
  checksDisallowed = sh "echo ${refersToChainA} > $out" { name = "checks-disallowed"; disallowedRequisites = [ chainA ]; };
  checksIllegal = sh "echo ${salt} > $out" { name = "checks-illegal"; allowedReferences = [ "nonsense" ]; };
  checksTooLarge = derivation {
    inherit system;
    name = "checks-too-large";
    builder = "/bin/bash";
    args = [ "-c" "source \"$NIX_ATTRS_SH_FILE\"; echo ${salt} ${chainA} > \${outputs[out]}; echo dev > \${outputs[dev]}" ];
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    outputChecks.out = { allowedReferences = [ "dev" chainA ]; maxSize = 64; };
  };

  # Structured attributes: the builder gets .attrs.json and .attrs.sh, not variables; its output
  # keeps both, so their bytes are compared with what Nix wrote.
  structured = derivation {
    inherit system;
    name = "structured";
    builder = "/bin/bash";
    args = [ "-c" ''
      source "$NIX_ATTRS_SH_FILE"
      /bin/mkdir ''${outputs[out]}
      /bin/cp "$NIX_ATTRS_JSON_FILE" "$NIX_ATTRS_SH_FILE" ''${outputs[out]}/
      echo ''${outputs[dev]} "$str" "''${list[@]}" "''${obj[k]}" > ''${outputs[dev]}
    '' ];
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    str = "a 'quoted' \"string\"\n with\ttab, ünïcode and ${salt}";
    int = 42;
    float = 1.5;
    whole = 2.0;
    yes = true;
    no = false;
    nothing = null;
    list = [ "a" "b c" 3 ];
    nested = [ [ 1 ] ];
    obj = { k = "v"; n = 1; "key with 'quote'" = "x"; };
    deep = { a = { b = 1; }; };
    "not-a-name" = "x";
    self = builtins.placeholder "out";
  };
}
