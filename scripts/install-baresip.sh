#!/usr/bin/env bash
# baresip (Debian's baresip-core: aufile, sndfile, g711), the softphone of
# tests/integration/test_sip_softphone.py; prints its path.
exec "$(dirname "$0")/install-deb.sh" baresip-core baresip
