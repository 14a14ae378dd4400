#!/usr/bin/env bash
# The benchmarks' SIP phone (services/sip/cmd/phone), built with the gateway by
# scripts/install-sip-gateway.sh; prints its path last.
exec "$(dirname "$0")/install-sip-gateway.sh" phone
