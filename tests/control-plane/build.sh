#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd from the Go module
# proxy at the versions pinned in go.mod next to this script, and caches them
# outside the repo.
#
#   tests/control-plane/build.sh            build (or reuse) and print the bin dir
#   tests/control-plane/build.sh --print-dir print the bin dir without building
#
# The cache lives in ${OPMESH_CACHE:-~/.cache/opmesh}/control-plane/<version>/,
# keyed by both pins, so a second run returns in well under a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
min_go_minor=26

pin() { awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$here/go.mod"; }
k8s_version=$(pin k8s.io/kubernetes)
etcd_version=$(pin go.etcd.io/etcd/server/v3)
if [[ -z "$k8s_version" || -z "$etcd_version" ]]; then
  echo "error: could not read the kubernetes/etcd pins from $here/go.mod" >&2
  exit 1
fi

cache_root=${OPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opmesh}
# Bump when the way the binaries are built changes, so old caches are not reused.
recipe=3
dir="$cache_root/control-plane/k8s-$k8s_version-etcd-$etcd_version-r$recipe"

if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$dir"
  exit 0
fi

if [[ -x "$dir/kube-apiserver" && -x "$dir/kube-controller-manager" && -x "$dir/etcd" && -f "$dir/.complete" ]]; then
  echo "$dir"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  cat >&2 <<MSG
error: the Go toolchain is not installed, and it is needed once to build the
test control plane (kube-apiserver $k8s_version, etcd $etcd_version).
Install Go 1.$min_go_minor or newer (https://go.dev/doc/install, or your
distribution's golang package) so that 'go' is on PATH, then run this again.
MSG
  exit 1
fi

go_version=$(GOTOOLCHAIN=local go env GOVERSION)  # e.g. go1.26.8
go_minor=$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$go_version")
if ! [[ "$go_minor" =~ ^[0-9]+$ ]] || (( go_minor < min_go_minor )); then
  echo "error: found $go_version, but kube-apiserver $k8s_version needs Go 1.$min_go_minor or newer." >&2
  echo "Install a newer Go toolchain and put it first on PATH, then run this again." >&2
  exit 1
fi

mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "building kube-apiserver and kube-controller-manager $k8s_version and etcd $etcd_version with $go_version (cold builds take a while)..." >&2
start=$(date +%s)
(
  cd "$here"
  export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
  # The version stamps that the Kubernetes release build sets; without them
  # the apiserver reports v0.0.0-master and its version-gated defaults drift.
  minor=$(cut -d. -f2 <<<"$k8s_version")
  v=k8s.io/component-base/version
  k8s_ldflags="-s -w -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
  go build -trimpath -ldflags "$k8s_ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -trimpath -ldflags "$k8s_ldflags" -o "$tmp/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager
  go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
)
mv "$tmp/kube-apiserver" "$tmp/kube-controller-manager" "$tmp/etcd" "$dir/"
printf 'kubernetes %s\netcd %s\ngo %s\n' "$k8s_version" "$etcd_version" "$go_version" >"$dir/.complete"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$dir"
