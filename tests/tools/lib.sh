# Shared by the dependency checks: installs a cargo tool at a pinned version
# from crates.io, once, into ${OPMESH_CACHE:-~/.cache/opmesh}/tools/, and
# prints the path of its binary.
#
#   bin=$(cargo_tool cargo-deny 0.20.2)
cargo_tool() {
  local name=$1 version=$2
  local cache_root=${OPMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opmesh}
  local root="$cache_root/tools/$name-$version"
  local bin="$root/bin/$name"
  if [[ ! -x "$bin" ]]; then
    echo "installing $name $version into $root (once)..." >&2
    cargo install --quiet --locked --version "$version" --root "$root" "$name" >&2
  fi
  echo "$bin"
}
