#!/usr/bin/env bash
# Fails when a crate declares a dependency it does not use.
#
# Uses cargo-machete at a pinned version (installed once, see lib.sh). It
# reads sources, not build output, so it needs no build and runs in well
# under a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"
bin=$(cargo_tool cargo-machete 0.9.2)

cd "$here/../.."
if ! "$bin" --with-metadata; then
  echo "error: a Cargo.toml above lists a dependency its crate does not use; remove it" >&2
  echo "(or, if it is used in a way the check cannot see, add it to" >&2
  echo " [package.metadata.cargo-machete] ignored = [...] with a comment saying why)." >&2
  exit 1
fi
