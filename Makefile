# The two commands a newcomer needs:
#   make demo   run the canary demo against a local control plane
#   make test   run the full test suite (what CI runs)

.PHONY: demo test control-plane tools

# Builds kube-apiserver and etcd from the Go module proxy once, then reuses
# the cache under ~/.cache/opmesh.
control-plane:
	bash tests/control-plane/build.sh

# Helm, kubectl and crane for the install and image tests, and the
# cert-manager and prometheus-operator CRDs they validate against, from the
# Go module proxy at pinned versions, cached under ~/.cache/opmesh/tools.
tools:
	for t in helm kubectl crane cert-manager-crds prometheus-operator-crds; do \
	  bash tests/tools/go-tool.sh $$t >/dev/null || exit 1; done

# The end-to-end tests start the manager, sidecar and example operator as
# real processes, so their binaries are built first.
# --locked: exactly the dependency versions in Cargo.lock, never newer ones.
test: control-plane tools
	cargo build --locked --workspace --bins --examples
	cargo test --locked --workspace

# Starts a local control plane, the manager and two operator versions, runs
# a canary, prints who handled what, and waits for Ctrl-C.
demo: control-plane
	cargo build --locked --workspace --bins --examples
	./target/debug/opmesh-demo
