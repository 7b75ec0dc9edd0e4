# Everything a new user types. `make demo` and `make test` set up a fresh machine themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
SEQSHARE := $(VENV)/bin/seqshare
STAMP := $(VENV)/.installed
NATIVE := $(wildcard native/*.cpp native/*.h native/*.pyi) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=

.PHONY: setup sysdeps install model demo test test-slow test-all test-aarch64 lint bench bench-matrix clean

setup: model

sysdeps:
	@scripts/sysdeps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch is pinned to the CPU build (only a test reference); build deps are installed first so that
# the editable install can skip build isolation and rebuild in seconds.
$(STAMP): $(NATIVE) | $(PY)
	@$(MAKE) --no-print-directory sysdeps
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.13" torch==2.13.0
	$(PIP) install --no-build-isolation -e '.[test]'
	@touch $@

install: $(STAMP)

model: install
	$(SEQSHARE) model fetch-default --quiet

# DEMO_ARGS="--docs 1 --questions 2" runs a smaller set; see scripts/demo.py --help.
demo: model
	$(PY) scripts/demo.py $(DEMO_ARGS)

# pytest exits 5 when it collects nothing; that is a failure of the suite, not a pass.
test: model
	@$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# The ARM kernels under qemu-user in an arm64 Debian rootfs (root, x86-64 Debian host; about 11 minutes
# the first time, about 5 once the rootfs is cached): kernel tests and a greedy answer under three
# emulated CPUs.
test-aarch64: model
	scripts/test-aarch64.sh

test-slow: model
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-all: model
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# mypy checks the package as it is imported (seqshare.daemon, .jobqueue, .worker, .bundle, ._native):
# a tree of links under build/ gives it that layout without an install it cannot follow.
MYPY_TREE := build/mypy/seqshare
lint: install
	$(VENV)/bin/ruff check daemon jobqueue worker bundle tests bench scripts
	@rm -rf build/mypy && mkdir -p $(MYPY_TREE) && touch $(MYPY_TREE)/__init__.py $(MYPY_TREE)/py.typed
	@for p in daemon jobqueue worker bundle; do ln -s $(CURDIR)/$$p $(MYPY_TREE)/$$p; done
	@ln -s $(CURDIR)/native/_native.pyi $(MYPY_TREE)/_native.pyi
	cd build/mypy && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p seqshare

# The peers: llama.cpp through llama-cpp-python (compiled here, several minutes the first time).
bench: model
	$(PIP) install "llama-cpp-python>=0.3"
	$(PY) bench/engine.py
	$(PY) bench/docqa.py
	$(PY) bench/queue_roundtrip.py
	$(PY) bench/bundle.py
	$(PY) bench/agreement.py

# seqshare vs llama.cpp at the shapes of real edge models in every common GGUF format (hours on 2
# cores for the whole matrix; MATRIX_ARGS="--shapes qwen2.5-0.5b --formats Q4_0" runs a part).
bench-matrix: model
	$(PIP) install "llama-cpp-python>=0.3"
	$(PY) bench/matrix.py $(MATRIX_ARGS)

clean:
	rm -rf build $(VENV) .pytest_cache .mypy_cache .ruff_cache
