# Developer commands for `laplace` (distribution `laplace-bdl`).
#
#   make demo       install, then run the offline digits demo
#   make test       install, then run the default test suite (slow tests deselected)
#   make test-all   install, then run every test, slow ones included
#   make lint       ruff check + ruff format --check
#   make format     ruff format + ruff check --fix
#   make docs       build the documentation site with mkdocs --strict
#   make bench      run the core benchmarks (REFERENCE_PYTHON=/path/to/python to compare)
#   make agreement  compare numbers with a reference library (REFERENCE_PYTHON required)
#   make accuracy   float32 models against float64 truth (REFERENCE_PYTHON optional)
#
# Override the interpreter with `make test PYTHON=/path/to/python`.

PYTHON ?= python3
PYTEST_WORKERS ?= 2
LINT_PATHS ?= laplace tests benchmarks examples
REFERENCE_PYTHON ?=

.PHONY: install install-docs demo test test-all lint format docs bench agreement accuracy

install:
	$(PYTHON) -m pip install -e ".[dev,hf]"

install-docs:
	$(PYTHON) -m pip install -e ".[docs]"

demo: install
	$(PYTHON) examples/demo_digits.py

test: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -q

test-all: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -q -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

format:
	$(PYTHON) -m ruff format $(LINT_PATHS)
	$(PYTHON) -m ruff check --fix $(LINT_PATHS)

docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

bench: install
	$(PYTHON) benchmarks/bench_core.py $(if $(REFERENCE_PYTHON),--reference-python $(REFERENCE_PYTHON))

agreement: install
	$(PYTHON) benchmarks/check_agreement.py --reference-python $(REFERENCE_PYTHON)

accuracy: install
	$(PYTHON) benchmarks/check_accuracy.py $(if $(REFERENCE_PYTHON),--reference-python $(REFERENCE_PYTHON))
