#!/usr/bin/env bash
# Build services/sip (voicebus's own SIP gateway, Go: diago + sipgo) and the benchmarks' phone
# (services/sip/cmd/phone) into a git-ignored cache and print a binary's path: the gateway's by
# default (the last line printed, as callers read it), the phone's with the argument `phone`.
# Used by the launcher, tests/integration/test_sip_gateway.py and `voicebus bench sip`. Their
# dependencies are pinned by services/sip/go.mod and go.sum.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/services/sip"
DEST="$ROOT/.cache/sip-gateway"
BIN="$DEST/voicebus-sip"
PHONE="$DEST/voicebus-phone"
case "${1:-gateway}" in
    gateway) WANTED="$BIN" ;;
    phone) WANTED="$PHONE" ;;
    *) echo "usage: $0 [gateway|phone]" >&2; exit 2 ;;
esac
# Rebuild when the source (the gateway's and its commands', cmd/) or its pins changed since the
# last build. One stamp for both binaries: they share the module.
STAMP="$DEST/source.sha256"
SUM="$(cd "$SRC" && { cat go.mod go.sum; find . -name '*.go' -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)"
built() { [[ -x "$BIN" && -x "$PHONE" && -f "$STAMP" && "$(cat "$STAMP")" == "$SUM" ]]; }
if built; then
    echo "$WANTED"
    exit 0
fi
command -v go >/dev/null || { echo "install-sip-gateway: Go is needed to build $SRC" >&2; exit 1; }
mkdir -p "$DEST"
# One build at a time (two `voicebus up`s, or two test workers, after a change to the source):
# whoever waited finds it built.
exec 9>"$DEST/.lock"
flock 9
if built; then
    echo "$WANTED"
    exit 0
fi
echo "install-sip-gateway: building services/sip and its phone (first time only; a minute or two)" >&2
# -mod=readonly: go.sum must already hold every module (a missing pin fails the build).
build() {
    (cd "$SRC" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
        go build -p 2 -trimpath -o "$1.tmp" "$2") >&2
}
build "$BIN" .
build "$PHONE" ./cmd/phone
mv "$BIN.tmp" "$BIN"
mv "$PHONE.tmp" "$PHONE"
echo "$SUM" > "$STAMP"
echo "$WANTED"
