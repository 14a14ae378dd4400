#!/usr/bin/env bash
# Install the pinned helm once into a git-ignored cache and print its path.
# Used by tests/deploy (helm lint, helm template of deploy/helm/voicebus). Built from helm's Go
# module at a pinned release, like livekit-server (scripts/install-livekit.sh): no download of
# a release binary and no chart repository is needed.
set -euo pipefail
VERSION=v4.3.2
MODULE=helm.sh/helm/v4
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/helm-$VERSION"
BIN="$DEST/helm"
if [[ -x "$BIN" ]] && "$BIN" version --template '{{.Version}}' 2>/dev/null | grep -qx "$VERSION"; then
    echo "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "install-helm: Go is needed to build helm $VERSION" >&2; exit 1; }
mkdir -p "$DEST"
echo "install-helm: building helm $VERSION (first time only; a few minutes)" >&2
# helm prints its version from a variable set at link time; without it `helm version` says
# the main module's (devel) version.
GOBIN="$DEST/tmp" GOFLAGS=-mod=mod go install \
    -ldflags "-X $MODULE/internal/version.version=$VERSION" "$MODULE/cmd/helm@$VERSION" >&2
mv "$DEST/tmp/helm" "$BIN"
rmdir "$DEST/tmp"
"$BIN" version >&2
echo "$BIN"
