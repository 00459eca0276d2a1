#!/usr/bin/env bash
# Checks the dependency graph against deny.toml with cargo-deny (pinned,
# installed once, see lib.sh): licenses, banned crates and duplicates,
# sources, and RustSec advisories.
#
# The advisory database is a git repository on GitHub. Where it cannot be
# fetched (an offline CI runner), the advisory check says so loudly and the
# other checks still run; OPMESH_REQUIRE_ADVISORIES=1 makes that an error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"
bin=$(cargo_tool cargo-deny 0.20.2)

cd "$here/../.."
checks=(bans licenses sources)
if timeout 60 "$bin" --log-level error fetch db >/dev/null 2>&1; then
  checks+=(advisories)
elif [[ "${OPMESH_REQUIRE_ADVISORIES:-0}" == 1 ]]; then
  echo "error: cannot fetch the RustSec advisory database (github.com/rustsec/advisory-db)" >&2
  exit 1
else
  echo "warning: RustSec advisory database unreachable; advisories NOT checked this run" >&2
  echo "         (run with network access, or set OPMESH_REQUIRE_ADVISORIES=1 to fail instead)" >&2
fi
if ! "$bin" --locked check --hide-inclusion-graph "${checks[@]}"; then
  echo "error: a dependency breaks deny.toml (see above): replace it, or change the policy" >&2
  echo "       in deny.toml with a comment saying why" >&2
  exit 1
fi
