# The two commands a newcomer needs: `make up` runs the product, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LIVEKIT := .cache/livekit-v1.13.5/livekit-server
WEB := web/node_modules/.package-lock.json
HELM := .cache/helm-v4.3.2/helm
COMPOSECHECK := .cache/composecheck/composecheck
SIP := .cache/sip-gateway/voicebus-sip

.PHONY: up test install bench bench-livekit chromium clean

# The suite on two workers, each running one test file at a time (pytest-xdist). Most of its
# time is real time (audio played at its own pace, servers starting), so two files share two
# cores well: ~10 min instead of ~18. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# livekit-server has no PyPI/npm package: built once from its pinned Go module into .cache/.
$(LIVEKIT): scripts/install-livekit.sh
	scripts/install-livekit.sh >/dev/null

# What CI checks the deployment files with (tests/deploy): helm from its pinned Go module, and
# compose-go's loader (deploy/composecheck); both built once into .cache/.
$(HELM): scripts/install-helm.sh
	scripts/install-helm.sh >/dev/null
$(COMPOSECHECK): scripts/install-composecheck.sh $(wildcard deploy/composecheck/*)
	scripts/install-composecheck.sh >/dev/null

# voicebus's own SIP gateway (Go: diago, sipgo), pinned by services/sip/go.mod and go.sum.
$(SIP): scripts/install-sip-gateway.sh $(wildcard services/sip/*)
	scripts/install-sip-gateway.sh >/dev/null

# The web page's livekit-client comes from npm at install time (never committed).
$(WEB): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error

chromium:
	scripts/install-chromium.sh

install: $(STAMP) $(LIVEKIT) $(WEB) $(SIP)

# The whole offline stack; open the printed URL. SAY="What time is it?" also asks once (WAV=
# a recorded question, TEXT= a typed one).
up: install
	$(BIN)/voicebus up $(if $(SAY),--say "$(SAY)") $(if $(WAV),--wav $(WAV)) $(if $(TEXT),--text "$(TEXT)")

test: install chromium $(HELM) $(COMPOSECHECK)
	scripts/install-redis.sh >/dev/null
	scripts/install-sipp.sh >/dev/null
	scripts/install-baresip.sh >/dev/null
	cd services/sip && GOFLAGS=-mod=readonly go test -count=1 ./...
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install
	$(BIN)/voicebus bench pipeline --sessions 1 --turns 5 --json

bench-livekit: install
	$(BIN)/voicebus bench livekit --turns 5 --json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info web/node_modules .cache
