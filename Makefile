# meshlink's two set-up commands are `make demo` and `make test`; everything else here is a step
# of theirs or a convenience. Each target installs or builds what it needs, or says what is
# missing and how to get it.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
KUBE_BUILD := e2e/controlplane/build.sh
KUBE_BIN = $(shell bash $(KUBE_BUILD) --print-dir)
KUBECTL = $(KUBE_BIN)/kubectl
COREDNS_BUILD := e2e/coredns/build.sh
COREDNS_BIN = $(shell bash $(COREDNS_BUILD) --print-dir)
CLUSTERS_DIR ?= $(HOME)/.cache/meshlink/clusters
export MESHLINK_CLUSTERS_DIR := $(CLUSTERS_DIR)
DEMO_KUBECONFIG = $(CLUSTERS_DIR)/east/kubeconfig:$(CLUSTERS_DIR)/west/kubeconfig

.PHONY: help
help:
	@echo "make demo           two local clusters, linked: a client Pod in west calls web-east by name with curl"
	@echo "make test           formatting, lints and every test (real clusters included)"
	@echo "make clusters       start clusters east and west; make clusters-down stops them"
	@echo "make bench          the service-mirror benchmark (SERVICES=1000 by default)"
	@echo "make bench-gateway  the gateway against direct TCP and HAProxy (root; GATEWAY_BENCH_ARGS)"
	@echo "make bench-proxy    the sidecar proxy pair against direct TCP and an HAProxy pair (root; PROXY_BENCH_ARGS)"
	@echo "make bench-destination  update latency, memory per stream and CPU of the destination service"
	@echo "make crds           regenerate manifests/crds/link.yaml from the Rust types"
	@echo "make fuzz           fuzz the parsers of network bytes: transport header, protocol detection, ClientHello (FUZZ_SECONDS=600 each)"
	@echo "make kube-binaries  build the pinned Kubernetes control plane and CoreDNS (cached by version)"

.PHONY: prerequisites
prerequisites:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found. Install Rust with rustup (https://rustup.rs); rust-toolchain.toml pins the version." >&2; exit 1; }
	@command -v go >/dev/null || { echo "error: go not found. Install Go 1.21 or newer (https://go.dev/dl); it fetches the Go 1.26 toolchain that Kubernetes needs by itself." >&2; exit 1; }
	@# What the end-to-end tests run, as root: test hosts in network namespaces (iproute2), Pods'
	@# redirect rules with both iptables back ends (iptables), the proxy as its own user (setpriv,
	@# util-linux), an unmodified HTTP client in a Pod (curl). Missing Debian packages are installed
	@# in one go when this runs as root with apt-get.
	@missing=""; for pair in ip:iproute2 iptables-legacy-restore:iptables iptables-nft-restore:iptables setpriv:util-linux curl:curl; do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (the end-to-end tests' network namespaces, redirect rules and clients)"; \
	    apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "error: missing Debian packages:$$missing; install them (apt-get install$$missing); the end-to-end tests need them, as root" >&2; exit 1; fi; }

.PHONY: kube-binaries
kube-binaries: prerequisites
	@start=$$SECONDS; bash $(KUBE_BUILD) >/dev/null; echo "control plane ready in $(KUBE_BIN) ($$((SECONDS - start))s)"
	@# Each test cluster's DNS (e2e/src/coredns.rs).
	@start=$$SECONDS; bash $(COREDNS_BUILD) >/dev/null; echo "CoreDNS ready in $(COREDNS_BIN) ($$((SECONDS - start))s)"

.PHONY: crds
crds:
	$(CARGO) run --quiet -p link-crd --bin crdgen > manifests/crds/link.yaml

.PHONY: check-crypto
# One rustls crypto provider (ring) for the whole workspace: aws-lc-rs or OpenSSL creeping in
# through a dependency's default features is an error.
check-crypto:
	@if $(CARGO) tree --workspace --locked --prefix none --format '{p}' | grep -E '^(aws-lc-(rs|sys)|openssl(-sys)?) '; then \
	  echo "error: a second crypto provider is in the dependency tree (above); disable that dependency's default features" >&2; exit 1; fi

.PHONY: test
test: prerequisites kube-binaries
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(MAKE) --no-print-directory check-crypto
	@mkdir -p target
	@# The end-to-end tests run meshlink's programs as processes: build them first.
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked 2>&1 | tee target/test.log
	@# One closing line for the whole run (cargo's own last line is that of the last crate).
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "all tests: %d passed, %d failed\n", p, f }' target/test.log | tee target/test-summary.txt

.PHONY: bench
# Measurements, not tests: release builds against real clusters. SERVICES=10000 by hand.
SERVICES ?= 1000
bench: prerequisites kube-binaries
	$(CARGO) build --release --workspace --bins --locked
	@# --workspace: the same feature set as the build above, so nothing is compiled twice.
	$(CARGO) bench --locked --workspace --bench mirror -- --services $(SERVICES)

.PHONY: bench-destination
# The destination service: 1,000 Services of 10 endpoints, 1,000 streams, 100 Services changing
# each second for 20 s, beside a plain watch of the same writes (DESTINATION_BENCH_ARGS, e.g.
# "--services 5000 --streams 5000 --seconds 60").
DESTINATION_BENCH_ARGS ?=
bench-destination: prerequisites kube-binaries
	$(CARGO) build --release --workspace --bins --locked
	$(CARGO) bench --locked --workspace --bench destination -- $(DESTINATION_BENCH_ARGS)

.PHONY: haproxy
# The proxy benchmarks' baseline (Debian's HAProxy); they run as root (network namespaces).
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing haproxy (the proxy benchmarks' baseline)"; \
	    apt-get update -qq && apt-get install -y -qq haproxy >/dev/null; \
	  else echo "error: haproxy is missing: install it (sudo apt-get install haproxy) and run this target as root (network namespaces)" >&2; exit 1; fi; }

.PHONY: bench-gateway
# The gateway beside direct TCP and HAProxy (Debian's, on the same mTLS) in one topology: HTTP
# and bulk TCP at 1 and 16 connections, RSS, an idle-connection flood. About three minutes with
# the defaults; e.g. GATEWAY_BENCH_ARGS="--seconds 20 --rounds 10" by hand (--help lists them).
GATEWAY_BENCH_ARGS ?=
bench-gateway: prerequisites kube-binaries haproxy
	$(CARGO) build --release --workspace --bins --locked
	@# The gateway as it ships: the `dist` profile (whole-program optimised; see Cargo.toml).
	$(CARGO) build --profile dist -p gateway --bin meshlink-gateway --locked
	$(CARGO) bench --locked --workspace --bench gateway -- $(GATEWAY_BENCH_ARGS)

.PHONY: bench-proxy
# Two meshlink-proxy sidecars (client pod and server pod, mTLS between them) beside direct TCP
# and a pair of HAProxy (Debian's, on the same mTLS) in one topology: HTTP/1.1, gRPC and bulk TCP
# at 1 and 16 connections, each proxy's RSS. About four minutes with the defaults; e.g.
# PROXY_BENCH_ARGS="--seconds 20 --rounds 10 --cores 2" by hand (--help lists them).
PROXY_BENCH_ARGS ?=
bench-proxy: prerequisites kube-binaries haproxy
	$(CARGO) build --release --workspace --bins --locked
	@# The proxy as it ships: the `dist` profile (whole-program optimised; see Cargo.toml).
	$(CARGO) build --profile dist -p proxy-sidecar --bin meshlink-proxy --locked
	$(CARGO) bench --locked --workspace --bench proxy -- $(PROXY_BENCH_ARGS)

.PHONY: fuzz
# The parsers of network bytes under libFuzzer (nightly; cargo-fuzz is installed on first use):
# the transport-header decoder, the protocol detector and the ClientHello look, FUZZ_SECONDS each
# (600 by default);
# the corpora stay in each crate's fuzz/corpus.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= proxy/transport-header:decode proxy/http:detect proxy/sidecar:client_hello
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@for t in $(FUZZ_TARGETS); do dir=$${t%%:*}; name=$${t##*:}; \
	  mkdir -p $$dir/fuzz/corpus/$$name; \
	  echo "fuzzing $$name in $$dir for $(FUZZ_SECONDS)s"; \
	  (cd $$dir && $(CARGO) +nightly fuzz run $$name fuzz/corpus/$$name fuzz/seeds/$$name -- -max_total_time=$(FUZZ_SECONDS)) || exit 1; \
	done

.PHONY: clusters
clusters: kube-binaries
	$(CARGO) run --quiet -p e2e --bin e2e -- up east west

.PHONY: clusters-down
clusters-down:
	$(CARGO) run --quiet -p e2e --bin e2e -- down east west

.PHONY: demo
demo: prerequisites kube-binaries
	$(CARGO) build --quiet --workspace --bins --locked
	./target/debug/e2e demo
