#!/usr/bin/env bash
# Make sure SIPp (Debian's sip-tester) is installed, for tests/integration/test_sip_gateway.py,
# and print the path of its binary. Installs it with apt-get when missing (root, or sudo).
set -euo pipefail
if command -v sipp >/dev/null; then
    command -v sipp
    exit 0
fi
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { echo "install-sipp: need root or sudo for apt-get" >&2; exit 1; }
    SUDO="sudo -n"
fi
command -v apt-get >/dev/null || { echo "install-sipp: no apt-get; install SIPp by hand" >&2; exit 1; }
echo "install-sipp: installing sip-tester (SIPp) with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends sip-tester >&2 \
    || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q --no-install-recommends sip-tester >&2; }
command -v sipp
