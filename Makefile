# The two commands a newcomer needs:
#   make demo   run the canary demo against a local control plane
#   make test   run the full test suite (what CI runs)

.PHONY: demo test control-plane

# Builds kube-apiserver and etcd from the Go module proxy once, then reuses
# the cache under ~/.cache/opmesh.
control-plane:
	bash tests/control-plane/build.sh

# The end-to-end tests start the manager, sidecar and example operator as
# real processes, so their binaries are built first.
# --locked: exactly the dependency versions in Cargo.lock, never newer ones.
test: control-plane
	cargo build --locked --workspace --bins --examples
	cargo test --locked --workspace

# Starts a local control plane, the manager and two operator versions, runs
# a canary, prints who handled what, and waits for Ctrl-C.
demo: control-plane
	cargo build --locked --workspace --bins --examples
	./target/debug/opmesh-demo
