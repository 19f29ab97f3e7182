# Two entry points: `make bench` and `make test`. Both create .venv, reuse an
# installed torch (the venv sees the system site-packages) or else install
# torch==$(TORCH_VERSION), install the package, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-triton bench clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard CMakeLists.txt csrc/*)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton==$(TRITON_VERSION)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/triton
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/triton

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lstm_kernels/*.so
