# An input source: nix-instantiate copies this file into the store and the derivation refers to it.
echo "built from a source file" > "$out"
