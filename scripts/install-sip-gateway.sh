#!/usr/bin/env bash
# Build services/sip (voicebus's own SIP gateway, Go: diago + sipgo) into a git-ignored cache
# and print the binary's path. Used by tests/integration/test_sip_gateway.py. Its dependencies
# are pinned by services/sip/go.mod and go.sum.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/services/sip"
DEST="$ROOT/.cache/sip-gateway"
BIN="$DEST/voicebus-sip"
# Rebuild when the source or its pins changed since the last build.
STAMP="$DEST/source.sha256"
SUM="$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC"/*.go | sha256sum | cut -d' ' -f1)"
if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$SUM" ]]; then
    echo "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "install-sip-gateway: Go is needed to build $SRC" >&2; exit 1; }
mkdir -p "$DEST"
echo "install-sip-gateway: building services/sip (first time only; a minute or two)" >&2
# -mod=readonly: go.sum must already hold every module (a missing pin fails the build).
(cd "$SRC" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
    go build -p 2 -trimpath -o "$BIN.tmp" .) >&2
mv "$BIN.tmp" "$BIN"
echo "$SUM" > "$STAMP"
echo "$BIN"
