#!/usr/bin/env bash
# Build deploy/composecheck (compose-go's loader: validates a compose file against the Compose
# Specification without Docker) into a git-ignored cache and print its path. Used by
# tests/deploy. Its dependencies are pinned by deploy/composecheck/go.mod and go.sum.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/deploy/composecheck"
DEST="$ROOT/.cache/composecheck"
BIN="$DEST/composecheck"
# Rebuild when the source or its pins changed since the last build.
STAMP="$DEST/source.sha256"
SUM="$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC"/*.go | sha256sum | cut -d' ' -f1)"
if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$SUM" ]]; then
    echo "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "install-composecheck: Go is needed to build $SRC" >&2; exit 1; }
mkdir -p "$DEST"
echo "install-composecheck: building deploy/composecheck (first time only; under a minute)" >&2
# -mod=readonly: go.sum must already hold every module (a missing pin fails the build).
(cd "$SRC" && GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -o "$BIN.tmp" .) >&2
mv "$BIN.tmp" "$BIN"
echo "$SUM" > "$STAMP"
echo "$BIN"
