#!/usr/bin/env bash
# Multi-node LiveKit shares its rooms through Redis: the launcher and the test fixtures start
# Debian's redis-server. Prints its path.
exec "$(dirname "$0")/install-deb.sh" redis-server redis-server
