# Every target creates .venv when missing and installs the pinned torch first, from
# torch's CPU wheel index: on PyPI, torch for Linux is the CUDA build, which pulls about
# 4 GB of nvidia-* packages. The index is added only when it answers (a 5 s probe), so
# where only the default index is reachable pip takes what that offers (such as a local
# CPU wheel). Override either: make test TORCH_SPEC=torch==2.5.1 TORCH_INDEX=
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: demo test test-min lint format docs clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: $(BIN)/activate
	@index=""; \
	if [ -n "$(TORCH_INDEX)" ] && $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
		"$(TORCH_INDEX)/torch/" >/dev/null 2>&1; then index="--extra-index-url $(TORCH_INDEX)"; \
	else echo "torch's CPU index is not reachable: installing $(TORCH_SPEC) from the default index"; fi; \
	echo "$(PY) -m pip install --quiet \"$(TORCH_SPEC)\" $$index"; \
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $$index
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
	$(PY) docs/_ext/check_site.py site

format: $(VENV)/.installed-all
	$(BIN)/ruff check --fix src tests examples benchmarks setup.py
	$(BIN)/ruff format src tests examples benchmarks setup.py

clean:
	rm -rf $(VENV) .venv-test build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
