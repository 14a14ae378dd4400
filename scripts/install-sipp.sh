#!/usr/bin/env bash
# SIPp (Debian's sip-tester), the SIP peer of tests/integration/test_sip_*.py; prints its path.
exec "$(dirname "$0")/install-deb.sh" sip-tester sipp
