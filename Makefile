# Every target creates .venv when missing and installs the pinned CPU torch first,
# so that pip never resolves torch to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: demo test test-min lint format docs clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: $(BIN)/activate
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-%: $(VENV)/.torch pyproject.toml setup.py $(wildcard src/convexmix/_kernels/*.c)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m convexmix demo

# TEST_EXTRA picks the extra `test` installs: every one by default.
TEST_EXTRA ?= all
test: $(VENV)/.installed-$(TEST_EXTRA)
	$(PY) -m pytest -q

# The suite with the [test] extra only, in its own .venv-test: what a user who runs
# `pip install ".[test]" && pytest` gets (optional extras' tests skip, nothing fails).
test-min:
	$(MAKE) test VENV=.venv-test TEST_EXTRA=test

lint: $(VENV)/.installed-all
	$(BIN)/ruff check src tests examples benchmarks setup.py
	$(BIN)/ruff format --check src tests examples benchmarks setup.py
	$(BIN)/mypy

# The docs site (mkdocs-material + mkdocstrings), into site/; any warning fails the build.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: $(VENV)/.installed-all
	$(BIN)/ruff check --fix src tests examples benchmarks setup.py
	$(BIN)/ruff format src tests examples benchmarks setup.py

clean:
	rm -rf $(VENV) .venv-test build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
