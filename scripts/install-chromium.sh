#!/usr/bin/env bash
# The browser test drives Debian's Chromium (never a browser downloaded by a test tool).
# Installs the `chromium` package when /usr/bin/chromium is missing; needs root or sudo.
set -euo pipefail
[[ -x /usr/bin/chromium ]] && exit 0
if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo -n);
else echo "install-chromium: /usr/bin/chromium is missing; install Debian's chromium package" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
echo "install-chromium: apt-get install chromium" >&2
"${SUDO[@]}" apt-get install -y --no-install-recommends chromium >&2 \
  || { "${SUDO[@]}" apt-get update >&2 && "${SUDO[@]}" apt-get install -y --no-install-recommends chromium >&2; }
