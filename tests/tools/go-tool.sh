#!/usr/bin/env bash
# Builds one Go command-line tool from the Go module proxy at the version
# pinned in this repo, once, and prints the path of its binary:
#
#   tests/tools/go-tool.sh helm      Helm, pinned in tests/tools/go.mod
#   tests/tools/go-tool.sh crane     go-containerregistry's crane, same file
#   tests/tools/go-tool.sh kubectl   kubectl of the test control plane's
#                                    Kubernetes (tests/control-plane/go.mod), so
#                                    client and apiserver are the same version
#   tests/tools/go-tool.sh cert-manager-crds | prometheus-operator-crds
#                                    a directory with that project's CRDs, from
#                                    its Go module at the version pinned below,
#                                    so the chart's objects of those kinds are
#                                    validated by the apiserver too
#
# Binaries are cached in ${OPMESH_CACHE:-~/.cache/opmesh}/tools/<name>-<version>/.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${1:-}
cache_root=${OPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opmesh}

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    cat >&2 <<MSG
error: the Go toolchain is not installed, and it is needed once to fetch
$1 for the install tests. Install Go 1.26 or newer
(https://go.dev/doc/install, or your distribution's golang package) so that
'go' is on PATH, then run this again.
MSG
    exit 1
  fi
}

# CRD manifests only: not requirements of tests/tools/go.mod, where they
# would move Helm's dependencies.
crds() {
  local module=$1 version=$2 subdir=$3
  local dir="$cache_root/tools/$name-$version"
  if [[ ! -f "$dir/.complete" ]]; then
    need_go "$module $version's CRDs"
    local tmp src
    tmp=$(mktemp -d)
    src=$(cd "$tmp" && GOTOOLCHAIN=local GOFLAGS=-mod=mod \
      go mod download -json "$module@$version" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    rm -rf "$tmp"
    [[ -d "$src/$subdir" ]] || { echo "error: no $subdir in $module $version" >&2; exit 1; }
    mkdir -p "$dir"
    cp "$src/$subdir"/*.yaml "$dir/"
    touch "$dir/.complete"
  fi
  echo "$dir"
}
case "$name" in
  cert-manager-crds)
    crds github.com/cert-manager/cert-manager v1.21.2 deploy/crds
    exit 0 ;;
  prometheus-operator-crds)
    crds github.com/prometheus-operator/prometheus-operator v0.85.0 example/prometheus-operator-crd
    exit 0 ;;
esac

case "$name" in
  helm) moddir=$here; module=helm.sh/helm/v4; package=helm.sh/helm/v4/cmd/helm ;;
  crane) moddir=$here; module=github.com/google/go-containerregistry; package=$module/cmd/crane ;;
  kubectl) moddir=$here/../control-plane; module=k8s.io/kubernetes; package=k8s.io/kubernetes/cmd/kubectl ;;
  *) echo "usage: $0 helm|crane|kubectl|cert-manager-crds|prometheus-operator-crds" >&2; exit 2 ;;
esac

version=$(awk -v m="$module" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$moddir/go.mod")
if [[ -z "$version" ]]; then
  echo "error: $module is not pinned in $moddir/go.mod" >&2
  exit 1
fi
dir="$cache_root/tools/$name-$version"
if [[ -x "$dir/$name" ]]; then
  echo "$dir/$name"
  exit 0
fi

need_go "$name $version"
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "building $name $version from the Go module proxy (once)..." >&2
ldflags="-s -w"
if [[ "$name" == kubectl ]]; then
  minor=$(cut -d. -f2 <<<"$version")
  v=k8s.io/component-base/version
  ldflags+=" -X $v.gitVersion=$version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
fi
(
  cd "$moddir"
  GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0 \
    go build -trimpath -ldflags "$ldflags" -o "$tmp/$name" "$package"
)
mv "$tmp/$name" "$dir/$name"
echo "$dir/$name"
