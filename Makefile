# nlpserve: the commands a newcomer needs. `make test` and `make run` set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Data root: the shared copy on these machines when present, else ./data (never committed).
DATA ?= $(if $(wildcard ../shared/data),../shared/data,data)
MODELS ?= models
SEED ?= 13
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install run test test-all lint format models models-lstm clean

help:
	@echo "make run        serve every model in $(MODELS)/ on http://127.0.0.1:8000"
	@echo "make test       lint-free fast test suite (what CI runs)"
	@echo "make test-all   also the slow tests (real-data training)"
	@echo "make models     retrain the starter models from DATA=$(DATA)"
	@echo "make lint       ruff check + format check"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/nlpserve serve --models $(MODELS)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Starter LSTM models (under 10 minutes on a 2-core CPU).
models-lstm: $(BIN)/.installed
	@echo "filled in when the trainers land"

models: models-lstm

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Deployment and benchmark (docs/deploy.md, bench/). `e2e` needs redis-server and nginx.
.PHONY: e2e bench
e2e: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/e2e tests/test_compose.py

bench: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run --models $(MODELS) --data $(DATA) $(BENCH_ARGS)
