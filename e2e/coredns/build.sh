#!/usr/bin/env bash
# Builds the pinned upstream CoreDNS (github.com/coredns/coredns in go.mod/go.sum, with only the
# plugins main.go imports) into a cache outside the repository:
#
#   ${MESHLINK_CACHE:-$HOME/.cache/meshlink}/coredns-<version>/coredns
#
# It builds only when the binary is missing or was built from other sources (main.go, go.mod and
# go.sum are hashed into a stamp beside it: adding a plugin must not leave a stale binary), so a
# warm run takes well under a second. It prints the directory on its last line. `--print-dir`
# prints it without building.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "coredns/build.sh: $*" >&2; exit 1; }

# The version is go.mod's, so the two cannot disagree.
version=$(sed -n 's/^require github.com\/coredns\/coredns \(v[^ ]*\)$/\1/p' "$here/go.mod")
[[ -n $version ]] || die "no 'require github.com/coredns/coredns vX.Y.Z' line in $here/go.mod"
out="${MESHLINK_CACHE:-$HOME/.cache/meshlink}/coredns-$version"

if [[ ${1:-} == --print-dir ]]; then echo "$out"; exit 0; fi

stamp=$(cd "$here" && cat main.go go.mod go.sum | sha256sum | cut -d' ' -f1)
if [[ -x "$out/coredns" && "$(cat "$out/.sources" 2>/dev/null)" == "$stamp" ]]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || die "Go is not installed (need Go >= 1.25 to build CoreDNS $version). Install it from https://go.dev/dl or your package manager."
echo "building coredns ($version) into $out (first time on this machine: a few minutes)" >&2
start=$SECONDS
mkdir -p "$out"
# A temporary name per build, renamed at the end: an interrupted build never leaves a broken
# binary, and two builds at once (two test binaries) never write the same file.
tmp="$out/.coredns.$$.tmp"
trap 'rm -f "$tmp"' EXIT
(cd "$here" && CGO_ENABLED=0 go build -trimpath -mod=readonly -buildvcs=false -ldflags "-s -w" -o "$tmp" .) \
  || die "building coredns failed (see the Go errors above). The module downloads need the Go module proxy."
mv -f "$tmp" "$out/coredns"
echo "$stamp" >"$out/.sources"
echo "built coredns in $((SECONDS - start))s" >&2
echo "$out"
