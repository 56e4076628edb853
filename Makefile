# key-evt-amqp: `make run` starts the proxy (and a local Redis/RabbitMQ when none answers),
# `make test` type-checks protocol/ (mypy, strict) and runs the whole test suite. Both set up the
# virtual environment first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Arguments for `make run` (default: forward every event of every key), e.g. make run ARGS="--keymask ^user: --events xe"
ARGS ?= --keymask ALL --events A
# Where `make run` expects Redis and RabbitMQ (started locally when nothing answers there).
REDIS_HOST ?= 127.0.0.1
REDIS_PORT ?= 6379
AMQP_HOST ?= 127.0.0.1
AMQP_PORT ?= 5672
PYTEST_ARGS ?=
# `make fuzz`: the differential fuzzer (tests/fuzz.py) for minutes; stops at whichever limit comes first.
FUZZ_SEED ?= 1
FUZZ_CASES ?= 100000
FUZZ_SECONDS ?= 300
FUZZ_LANES ?= 3
FUZZ_ARGS ?=

.PHONY: run test deps services clean fuzz

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

deps: $(VENV)/.installed

services:
	@REDIS_HOST=$(REDIS_HOST) REDIS_PORT=$(REDIS_PORT) AMQP_HOST=$(AMQP_HOST) AMQP_PORT=$(AMQP_PORT) \
		scripts/ensure-services.sh

run: deps services
	$(PY) -m proxy serve --upstream redis://$(REDIS_HOST):$(REDIS_PORT)/0 \
		--amqp amqp://$(AMQP_HOST):$(AMQP_PORT)/ $(ARGS)

test: deps
	$(PY) -m mypy protocol proxy
	$(PY) -m pytest $(PYTEST_ARGS)

fuzz: deps
	$(PY) tests/fuzz.py --seed $(FUZZ_SEED) --cases $(FUZZ_CASES) --seconds $(FUZZ_SECONDS) \
		--lanes $(FUZZ_LANES) $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .hypothesis *.egg-info .run

-include Makefile.bench
