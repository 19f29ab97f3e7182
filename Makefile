# Two entry points: `make bench` and `make test`. Both create .venv, reuse an
# installed torch (the venv sees the system site-packages) or else install
# torch==$(TORCH_VERSION), install the package, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The Triton a new .venv gets (an importable one is reused): the newest that setup.py declares.
TRITON_VERSION ?= 3.9.0
# The ends of the Triton range setup.py declares (triton>=3.6,<3.10) are the Tritons the ends of the
# torch range pin (3.6.0 with torch 2.11, 3.9.0 with torch 2.15): `make test` compiles the Triton
# kernels for sm_80 / sm_90 and runs them under the interpreter with each, in test-torch.
STAMP := $(VENV)/.installed
# The ends of the torch range setup.py declares (torch>=2.11,<2.16; TORCH_VERSION above is the
# middle): `make test` runs the tests of the module, the CPU native path, torch.compile, the Triton
# kernels compiled ahead of time (their structure read from the cubins) and the Triton kernels under
# the interpreter with each, in a venv of its own (.venv-torch-<version>: torch from PyPI with the
# Triton it pins, and the pinned test set) that imports the package from this checkout.
TORCH_TEST_VERSIONS ?= 2.11.0 2.15.0
TORCH_RANGE_TESTS := tests/test_module.py tests/test_module_parity.py tests/test_validation.py \
	tests/test_native_path.py tests/test_compile.py tests/test_compile_fresh_process.py tests/test_autotune.py \
	tests/test_resets.py tests/test_gru.py tests/test_triton_aot.py tests/test_triton_step_budget.py

.PHONY: install test test-fast test-triton test-torch bench clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt constraints-test.txt CMakeLists.txt $(shell find csrc -type f)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton==$(TRITON_VERSION)
	$(PY) -m pip install -r requirements-dev.txt -c constraints-test.txt
	$(PY) -m pip install --no-build-isolation -e .
	$(PY) -m lstm_kernels.build_info
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/triton
	$(PY) -m lstm_kernels check --out $(VENV)/check
	for v in $(TORCH_TEST_VERSIONS); do $(MAKE) --no-print-directory test-torch TORCH_TEST_VERSION=$$v || exit 1; done

# The torch-range tests with one torch: `make test-torch TORCH_TEST_VERSION=2.11.0`. PIP_CONSTRAINT
# puts the test set's pins in place of any pip-wide constraints file, so the version asked for is
# the version installed.
test-torch: $(STAMP)
	@set -e; v="$(TORCH_TEST_VERSION)"; venv="$(abspath .venv-torch-$(TORCH_TEST_VERSION))"; \
	test -n "$$v" || { echo "usage: make test-torch TORCH_TEST_VERSION=<version>"; exit 2; }; \
	if [ ! -f "$$venv/.installed" ] || [ constraints-test.txt -nt "$$venv/.installed" ]; then \
	  rm -rf "$$venv"; $(PYTHON) -m venv "$$venv"; \
	  PIP_CONSTRAINT="$(abspath constraints-test.txt)" "$$venv/bin/python" -m pip install --quiet \
	    "torch==$$v" numpy pytest pytest-timeout; \
	  touch "$$venv/.installed"; \
	fi; \
	"$$venv/bin/python" -c "import sys, torch, triton; print('torch-range tests with torch', torch.__version__, \
	'and triton', triton.__version__); sys.exit(0 if torch.__version__.split('+')[0] == '$$v' else 'expected torch $$v')"; \
	echo "PYTHONPATH=$(CURDIR) $$venv/bin/python -m pytest -q $(TORCH_RANGE_TESTS)"; \
	PYTHONPATH="$(CURDIR)" "$$venv/bin/python" -m pytest -q $(TORCH_RANGE_TESTS); \
	echo "TRITON_INTERPRET=1 PYTHONPATH=$(CURDIR) $$venv/bin/python -m pytest -q tests/triton"; \
	TRITON_INTERPRET=1 PYTHONPATH="$(CURDIR)" "$$venv/bin/python" -m pytest -q tests/triton

# The interpreter tests (tests/triton) with one Triton: `make test-triton TRITON_TEST_VERSION=3.6.0`
# (default: the venv's own Triton; another is installed into $(VENV)/triton-<version>, first on PYTHONPATH).
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
	rm -rf $(VENV) .venv-torch-* build *.egg-info lstm_kernels/*.so lstm_kernels/_build_info.json
