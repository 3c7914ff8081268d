#!/usr/bin/env bash
# Builds the pinned upstream control plane (kube-apiserver, kube-controller-manager, kubectl)
# and etcd from the Go module graph in go.mod/go.sum, into a cache outside the repository:
#
#   ${MESHLINK_CACHE:-$HOME/.cache/meshlink}/kube-<version>/
#
# It rebuilds only what is missing, so a warm run takes well under a second. It prints the
# directory on its last line. `--print-dir` prints it without building.
#
# Why a wrapper module: k8s.io/kubernetes requires its ~30 staging modules at v0.0.0 and replaces
# them with local paths, so `go install k8s.io/kubernetes/cmd/...@vX` cannot work. go.mod here
# replaces each one with its published v0.Y.Z (generated from the release's own go.mod by
# `./build.sh --regen`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The Kubernetes release the tests run; keep in step with go.mod and k8s-openapi's feature.
KUBE_VERSION=v1.36.3
cache_root=${MESHLINK_CACHE:-$HOME/.cache/meshlink}
out="$cache_root/kube-$KUBE_VERSION"

die() { echo "controlplane/build.sh: $*" >&2; exit 1; }

if [[ ${1:-} == --print-dir ]]; then echo "$out"; exit 0; fi

command -v go >/dev/null || die "Go is not installed (need Go >= 1.26 to build Kubernetes $KUBE_VERSION). Install it from https://go.dev/dl or your package manager."

if [[ ${1:-} == --regen ]]; then
  mod=$(cd "$here" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  minor=${KUBE_VERSION#v1.}
  {
    echo "// Wrapper module that pins and builds the upstream Kubernetes control plane and etcd for"
    echo "// meshlink's real-cluster tests. Regenerate with ./build.sh --regen."
    echo "module github.com/meshlink/meshlink/e2e/controlplane"
    echo
    echo "go $(sed -n 's/^go //p' "$mod")"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    grep -E '^\s+k8s.io/\S+ v0\.0\.0$' "$mod" | awk -v m="$minor" '{print "\t"$1" => "$1" v0."m}'
    echo ")"
  } >"$here/go.mod"
  (cd "$here" && go mod tidy)
  echo "regenerated go.mod/go.sum for $KUBE_VERSION" >&2
fi

major=${KUBE_VERSION#v}; major=${major%%.*}
minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
ldflags+=" -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
# client-go's copy of the version is what kubectl prints as its own.
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"

declare -A pkgs=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [etcd]=./etcd
)

mkdir -p "$out"
for bin in etcd kube-apiserver kube-controller-manager kubectl; do
  [[ -x "$out/$bin" ]] && continue
  echo "building $bin ($KUBE_VERSION) into $out (first time on this machine: a few minutes)" >&2
  start=$SECONDS
  # Build to a temporary name and rename, so an interrupted build never leaves a broken binary
  # that later runs would take for a good one.
  (cd "$here" && CGO_ENABLED=0 go build -trimpath -mod=readonly -buildvcs=false -ldflags "$ldflags" -o "$out/.$bin.tmp" "${pkgs[$bin]}") \
    || die "building $bin failed (see the Go errors above). The module downloads need the Go module proxy."
  mv -f "$out/.$bin.tmp" "$out/$bin"
  echo "built $bin in $((SECONDS - start))s" >&2
done
echo "$out"
