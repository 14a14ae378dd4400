#!/usr/bin/env bash
# Install the pinned livekit-server once into a git-ignored cache and print its path.
# Used by `make up` and `make test`. LiveKit publishes no PyPI/npm package of the server, so it
# is built from its Go module at a pinned release (the Go module proxy is reachable here).
set -euo pipefail
VERSION=v1.13.5
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/livekit-$VERSION"
BIN="$DEST/livekit-server"
if [[ -x "$BIN" ]] && "$BIN" --version 2>/dev/null | grep -q "${VERSION#v}"; then
    echo "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "install-livekit: Go is needed to build livekit-server $VERSION" >&2; exit 1; }
mkdir -p "$DEST"
echo "install-livekit: building livekit-server $VERSION (first time only; a few minutes)" >&2
GOBIN="$DEST/tmp" GOFLAGS=-mod=mod go install "github.com/livekit/livekit-server/cmd/server@$VERSION" >&2
mv "$DEST/tmp/server" "$BIN"
rmdir "$DEST/tmp"
"$BIN" --version >&2
echo "$BIN"
