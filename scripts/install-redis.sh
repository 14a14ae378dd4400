#!/usr/bin/env bash
# Multi-node LiveKit shares its rooms through Redis: the launcher and the test fixtures start
# Debian's redis-server (never a build of our own). Installs the `redis-server` package when
# the binary is missing; needs root or sudo. Prints the binary's path.
set -euo pipefail
if ! command -v redis-server >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo -n);
  else echo "install-redis: redis-server is missing; install Debian's redis-server package" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  echo "install-redis: apt-get install redis-server" >&2
  "${SUDO[@]}" apt-get install -y --no-install-recommends redis-server >&2 \
    || { "${SUDO[@]}" apt-get update >&2 && "${SUDO[@]}" apt-get install -y --no-install-recommends redis-server >&2; }
fi
command -v redis-server
