# Two entry points: `make bench` and `make test`. Both create .venv, reuse an
# installed torch (the venv sees the system site-packages) or else install
# torch==$(TORCH_VERSION), install the package, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The Triton a new .venv gets (an importable one is reused): the newest that setup.py declares.
TRITON_VERSION ?= 3.9.0
# `make test` runs the Triton kernels under the interpreter with the oldest and the newest Triton
# that setup.py declares (triton>=3.3,<3.10: launch_cooperative_grid came in 3.3). A version that
# is not the venv's own is installed into $(VENV)/triton-<version> and put first on PYTHONPATH.
TRITON_TEST_VERSIONS ?= 3.3.0 3.9.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-triton bench clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt constraints-test.txt $(wildcard CMakeLists.txt csrc/*)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton==$(TRITON_VERSION)
	$(PY) -m pip install -r requirements-dev.txt -c constraints-test.txt
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/triton
	for v in $(TRITON_TEST_VERSIONS); do $(MAKE) --no-print-directory test-triton TRITON_TEST_VERSION=$$v || exit 1; done

# The interpreter tests (tests/triton) with one Triton: `make test-triton TRITON_TEST_VERSION=3.3.0`
# (default: the venv's own Triton).
test-triton: $(STAMP)
	@set -e; v="$(TRITON_TEST_VERSION)"; have=$$($(PY) -c "import triton; print(triton.__version__)"); \
	dir=""; \
	if [ -n "$$v" ] && [ "$$v" != "$$have" ]; then \
	  dir="$(abspath $(VENV))/triton-$$v"; \
	  if [ ! -f "$$dir/.installed" ]; then \
	    rm -rf "$$dir"; $(PY) -m pip install --quiet --no-deps --target "$$dir" "triton==$$v"; touch "$$dir/.installed"; \
	  fi; \
	fi; \
	PYTHONPATH="$$dir" $(PY) -c "import sys, triton; v = '$$v' or triton.__version__; \
	print('tests/triton with triton', triton.__version__, 'from', triton.__file__); \
	sys.exit(0 if triton.__version__ == v else 'expected triton ' + v)"; \
	echo "TRITON_INTERPRET=1 PYTHONPATH=$$dir $(PY) -m pytest -q tests/triton"; \
	TRITON_INTERPRET=1 PYTHONPATH="$$dir" $(PY) -m pytest -q tests/triton

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lstm_kernels/*.so
