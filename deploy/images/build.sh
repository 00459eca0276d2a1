#!/usr/bin/env bash
# Builds the three opmesh images without a container engine, as OCI image
# archives (an OCI image layout in a tar file), with go-containerregistry's
# crane (built from the Go module proxy and cached, tests/tools/go-tool.sh):
#
#   opmesh-manager-<tag>.oci.tar       entrypoint opmesh-manager
#   opmesh-runtime-<tag>.oci.tar       entrypoint opmesh-runtime (the injected sidecar)
#   configmap-generator-<tag>.oci.tar  entrypoint configmap_generator (the example operator)
#
# Each image is one layer: the binary in /usr/local/bin, the C libraries it
# links (glibc, libgcc_s), CA certificates and a passwd naming the non-root
# user 65532 it runs as. No shell, no package manager.
#
# Usage: deploy/images/build.sh [--registry REGISTRY] [--tag TAG] [--out DIR]
#                               [--bin-dir DIR] [--push]
#
#   --registry REGISTRY  name the images REGISTRY/<name>:<tag> (default: no
#                        registry, i.e. docker.io/library/<name>:<tag>, what a
#                        node resolves an image imported under a bare name to)
#   --tag TAG            image tag (default: the workspace version, e.g. 0.1.0)
#   --out DIR            where the archives go (default: target/images)
#   --bin-dir DIR        take the binaries from DIR (with examples/ below it)
#                        instead of running `cargo build --release`
#   --push               also push each image to its name, with the
#                        credentials of ~/.docker/config.json (crane auth login)
#
# Then load an archive where your cluster's nodes find it (for example
# `ctr -n k8s.io images import`, `kind load image-archive`, `podman load`), or
# push, and set the chart's image.registry and image.tag (or the kustomize
# images: field) to match. With a container engine, deploy/images/Dockerfile
# builds the same images.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tag=$(awk -F'"' '/^version *=/ { print $2; exit }' "$repo/Cargo.toml")
out=$repo/target/images
bin_dir=
registry=
push=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --registry) registry=${2%/}; shift 2 ;;
    --push) push=true; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
  echo "error: '$tag' is not a valid image tag (letters, digits, _ . -; at most 128)" >&2
  exit 2
fi

if [[ "$push" == true && -z "$registry" ]]; then
  echo "error: --push needs --registry, the registry to push to" >&2
  exit 2
fi

if [[ -z "$bin_dir" ]]; then
  (cd "$repo" && cargo build --locked --release -p opmesh-manager -p opmesh-runtime \
    -p opmesh-sdk --example configmap_generator)
  bin_dir=$repo/target/release
fi
crane=$(bash "$repo/tests/tools/go-tool.sh" crane)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
registry_pid=
cleanup() {
  [[ -n "$registry_pid" ]] && kill "$registry_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# A registry on loopback, in memory, for the steps crane only does remotely.
"$crane" registry serve --address 127.0.0.1:0 >"$work/registry.log" 2>&1 &
registry_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$work/registry.log")
  [[ -n "$port" ]] && break
  kill -0 "$registry_pid" 2>/dev/null || { cat "$work/registry.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$port" ]] || { echo "error: crane's loopback registry did not start" >&2; exit 1; }
local_registry=127.0.0.1:$port

# crane logs every blob; show its output only when a step fails.
run_crane() {
  if ! "$crane" "$@" >"$work/crane.out" 2>&1; then
    cat "$work/crane.out" >&2
    echo "error: crane $1 failed" >&2
    exit 1
  fi
}

version=$(awk -F'"' '/^version *=/ { print $2; exit }' "$repo/Cargo.toml")
license=$(awk -F'"' '/^license *=/ { print $2; exit }' "$repo/Cargo.toml")
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)

# image NAME BINARY: builds NAME:TAG with BINARY as its entrypoint.
image() {
  local name=$1 binary=$2
  local src=$bin_dir/$binary
  [[ -x "$src" ]] || { echo "error: $src is missing; build it first (or drop --bin-dir)" >&2; exit 1; }
  local base
  base=$(basename "$binary")
  local root=$work/$name/rootfs
  mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp"
  chmod 1777 "$root/tmp"
  # Debug info stays in the build, not in the image.
  strip --strip-debug -o "$root/usr/local/bin/$base" "$src"
  # The shared libraries the binary links, at the paths it looks them up.
  ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  fi
  # Reproducible: same inputs, same layer digest.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$root" -cf "$work/$name/layer.tar" .

  local ref=$local_registry/$name:$tag
  run_crane append --oci-empty-base -f "$work/$name/layer.tar" -t "$ref"
  run_crane mutate "$ref" -t "$ref" \
    --set-platform linux/amd64 \
    --entrypoint "/usr/local/bin/$base" \
    --user 65532:65532 \
    --workdir / \
    -e PATH=/usr/local/bin \
    -l org.opencontainers.image.title="$name" \
    -l org.opencontainers.image.version="$version" \
    -l org.opencontainers.image.revision="$revision" \
    -l org.opencontainers.image.licenses="$license"
  local layout=$work/$name/layout
  rm -rf "$layout"
  run_crane pull --format oci "$ref" "$layout"
  # Name the image in the layout's index, so that importing the archive
  # (containerd, podman, skopeo) tags it.
  local full=${registry:-docker.io/library}/$name:$tag
  local digest size
  digest=$("$crane" digest "$ref")
  size=$("$crane" manifest "$ref" | wc -c)
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"%s","io.containerd.image.name":"%s"}}]}\n' \
    "$digest" "$size" "$tag" "$full" >"$layout/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$work/$name/layout" -cf "$out/$name-$tag.oci.tar" .
  if [[ "$push" == true ]]; then
    run_crane copy "$ref" "$full"
  fi
  echo "$full: $out/$name-$tag.oci.tar ($(du -h "$out/$name-$tag.oci.tar" | cut -f1))"
}

image opmesh-manager opmesh-manager
image opmesh-runtime opmesh-runtime
image configmap-generator examples/configmap_generator
