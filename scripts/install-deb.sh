#!/usr/bin/env bash
# Usage: install-deb.sh PACKAGE BINARY
# Make sure Debian's PACKAGE is installed (apt-get, as root or with sudo) and print the path of
# BINARY. The SIP peers (sip-tester, baresip-core) and redis-server come from Debian this way:
# never a build of our own.
set -euo pipefail
PACKAGE="$1" BINARY="$2"
if ! command -v "$BINARY" >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo -n);
  else echo "install-deb: $BINARY is missing; install Debian's $PACKAGE package" >&2; exit 1; fi
  command -v apt-get >/dev/null || { echo "install-deb: no apt-get; install $PACKAGE by hand" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deb: apt-get install $PACKAGE" >&2
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$PACKAGE" >&2 \
    || { "${SUDO[@]}" apt-get update -q >&2 && "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$PACKAGE" >&2; }
fi
command -v "$BINARY"
