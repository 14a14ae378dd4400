# The two commands a newcomer needs: `make up` runs the product, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test install bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Run the offline stack on one spoken question: WAV=path/to/question.wav (default: Piper says one).
up: $(STAMP)
	$(BIN)/voicebus up $(if $(WAV),--wav $(WAV)) $(if $(OUT),--out $(OUT))

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/voicebus bench pipeline --sessions 1 --turns 5 --json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
