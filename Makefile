# kamal-proxy for Python: the everyday commands.
VENV ?= .venv
PYTHON ?= python3
HTTP_PORT ?= 8080
HTTPS_PORT ?= 8443
BIN := $(VENV)/bin

.PHONY: all install run test lint format bench docker clean

all: install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A normal (non-editable) install, so that twistd finds the kamal-proxy plugin.
install: $(BIN)/python
	rm -rf build
	$(BIN)/python -m pip install -q '.[test]'

run: install
	$(BIN)/kamal-proxy run --http-port $(HTTP_PORT) --https-port $(HTTPS_PORT)

# The end-to-end tests run twice: one process (--workers 1), then a main process and two
# workers (KAMAL_PROXY_IT_WORKERS=2).
test: install
	$(BIN)/ruff check kamal_proxy tests twisted bench
	$(BIN)/python -m twisted.trial -j 4 tests
	KAMAL_PROXY_IT_WORKERS=2 $(BIN)/python -m twisted.trial -j 4 tests.integration

lint: install
	$(BIN)/ruff check kamal_proxy tests twisted bench
	$(BIN)/ruff format --check kamal_proxy tests twisted bench

format: install
	$(BIN)/ruff format kamal_proxy tests twisted bench

bench: install
	$(BIN)/python bench/run.py

docker:
	docker build -t kamal-proxy .

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp*
