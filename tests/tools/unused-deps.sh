#!/usr/bin/env bash
# Fails when a crate declares a dependency it does not use.
#
# Uses cargo-machete at a pinned version, installed once from crates.io into
# ${OPMESH_CACHE:-~/.cache/opmesh}/tools/ and reused. It reads sources, not
# build output, so it needs no build and runs in well under a second.
set -euo pipefail

version=0.9.2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${OPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opmesh}
root="$cache_root/tools/cargo-machete-$version"
bin="$root/bin/cargo-machete"

if [[ ! -x "$bin" ]]; then
  echo "installing cargo-machete $version into $root (once)..." >&2
  cargo install --quiet --locked --version "$version" --root "$root" cargo-machete
fi

cd "$here/../.."
if ! "$bin" --with-metadata; then
  echo "error: a Cargo.toml above lists a dependency its crate does not use; remove it" >&2
  echo "(or, if it is used in a way the check cannot see, add it to" >&2
  echo " [package.metadata.cargo-machete] ignored = [...] with a comment saying why)." >&2
  exit 1
fi
