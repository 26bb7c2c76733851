# kamal-proxy for Python: the everyday commands.
VENV ?= .venv
PYTHON ?= python3
HTTP_PORT ?= 8080
HTTPS_PORT ?= 8443
BIN := $(VENV)/bin
# The dependency versions to install (those of the image); empty for the newest releases.
CONSTRAINTS ?= constraints.txt

# The image: Kamal reads the proxy's version from its tag, so it is tagged v<version>.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' kamal_proxy/__init__.py)
IMAGE ?= kamal-proxy
# OCI labels: where the source is (the git remote, without credentials) and which commit.
SOURCE ?= $(shell git config --get remote.origin.url 2>/dev/null | sed -e 's|://[^/@]*@|://|')
REVISION ?= $(shell git rev-parse --verify -q HEAD 2>/dev/null)

.PHONY: all install run test lint format bench docker constraints clean

all: install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A normal (non-editable) install, so that twistd finds the kamal-proxy plugin. The dependency
# versions are those of constraints.txt, which the image installs too.
install: $(BIN)/python
	rm -rf build
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) '.[test]'

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
	docker build --build-arg VERSION=$(VERSION) --build-arg SOURCE=$(SOURCE) \
		--build-arg REVISION=$(REVISION) -t $(IMAGE):v$(VERSION) -t $(IMAGE):latest .

# Regenerate constraints.txt from the tested install: the runtime dependencies of the package
# at the versions installed in $(VENV). To move to the newest releases:
# `make test CONSTRAINTS=` and, when it passes, `make constraints`; commit the file.
constraints: $(BIN)/python
	rm -rf build/constraints
	mkdir -p build
	$(BIN)/python -m pip freeze --exclude kamal-proxy > build/tested.txt
	$(PYTHON) -m venv build/constraints
	build/constraints/bin/python -m pip install -q -c build/tested.txt .
	{ echo "# The image's dependency versions, from a tested install (make constraints)."; \
	  build/constraints/bin/python -m pip freeze --exclude kamal-proxy; } > constraints.txt
	rm -rf build/constraints build/tested.txt

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp*
