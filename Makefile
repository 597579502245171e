# vitserve — every target creates its venv (.venv; .venv-serve for serve) and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test lint audit demo-model clean-venv bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Serving has a venv of its own with only the server's dependencies (no torch): on Linux x86-64 ONNX Runtime's
# OpenVINO build (bf16 on CPUs that multiply bf16; the default image installs the same), elsewhere the
# CPU build. SERVE_EXTRA=cpu serves on the CPU build on x86-64 too.
SERVE_VENV  ?= .venv-serve
SERVE_PY    := $(SERVE_VENV)/bin/python
SERVE_EXTRA ?= $(if $(and $(filter Linux,$(shell uname -s)),$(filter x86_64,$(shell uname -m))),openvino,cpu)
SERVE_STAMP := $(SERVE_VENV)/.installed-$(SERVE_EXTRA)
$(SERVE_STAMP): pyproject.toml
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade pip
	$(SERVE_PY) -m pip install -q -e '.[$(SERVE_EXTRA)]'
	touch $@

# Tests, training and export need everything.
$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[cpu,train,dev]'
	touch $@

# The OpenVINO build of ONNX Runtime (what `pip install -e '.[openvino]'` gives a server venv) cannot
# share a venv with the CPU build, so tests and benchmarks keep it in its own folder and put that first
# on PYTHONPATH for the server processes that use it (its dependencies are all in the dev venv).
# The same build the default image ships on amd64 (requirements/server-openvino.lock).
ORT_OPENVINO_VERSION := $(shell sed -n 's/^onnxruntime-openvino==\([^ ]*\).*/\1/p' requirements/server-openvino.lock)
OPENVINO_DIR := $(abspath $(VENV))/openvino
OPENVINO_STAMP := $(OPENVINO_DIR)/.installed-$(ORT_OPENVINO_VERSION)
$(OPENVINO_STAMP): | $(PY)
	rm -rf $(OPENVINO_DIR)
	if [ "$$(uname -m)" = x86_64 ]; then \
		$(PIP) install -q --no-deps --target $(OPENVINO_DIR) onnxruntime-openvino==$(ORT_OPENVINO_VERSION); \
	else echo "no OpenVINO build of ONNX Runtime for $$(uname -m): its tests and benchmarks are skipped"; fi
	mkdir -p $(OPENVINO_DIR) && touch $@

serve: $(SERVE_STAMP)
	$(SERVE_PY) -m server --model-repo model_repo --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint $(OPENVINO_STAMP)
	VITSERVE_TEST_ORT_OPENVINO=$(OPENVINO_DIR) VITSERVE_BENCH_ORT_OPENVINO=$(OPENVINO_DIR) $(PY) -m pytest

# Known-vulnerability audit of requirements/*.lock from PyPI's advisory data (SECURITY.md, "Dependencies").
audit: $(VENV)/.dev
	$(PY) -m tools.audit_lock

# DEMO_ARGS=--scratch also trains the from-scratch baseline the README compares with (~5 min more).
demo-model: $(VENV)/.dev
	$(PY) -m training demo --repo model_repo $(DEMO_ARGS)

# The full benchmark suite (~25 min on 2 cores; run it on a quiet machine). It builds the competitors'
# venvs under benchmarks/.venvs/ on first use and rewrites the table in benchmarks/RESULTS.md.
# BENCH_ARGS=--quick for the seconds-long smoke run.
bench: $(VENV)/.dev $(OPENVINO_STAMP)
	VITSERVE_BENCH_ORT_OPENVINO=$(OPENVINO_DIR) $(PY) -m benchmarks --update-results $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV) $(SERVE_VENV)
