# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?= --durations=15

.PHONY: demo test test-fast prometheus protos lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The Prometheus server the integration tests start on 127.0.0.1 (Debian package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Debian package prometheus"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/gradleak run

test: $(STAMP) prometheus
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

lint: $(STAMP)
	$(VENV)/bin/ruff check gradleak p2p attacker tests benchmarks scripts
	$(VENV)/bin/mypy gradleak p2p attacker

clean:
	rm -rf runs .pytest_cache .mypy_cache
