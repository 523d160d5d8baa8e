# metatrain: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: help install test lint format train clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install metatrain with its dev and scale-out extras

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev,scale]"
	touch $(STAMP)

test: install lint ## lint, then run the test suite (installs first if needed)
	$(PY) -m pytest -q

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check metatrain tests scripts
	$(VENV)/bin/ruff format --check metatrain tests scripts

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix metatrain tests scripts
	$(VENV)/bin/ruff format metatrain tests scripts

train: install ## meta-train with the defaults (MAML, Omniglot 5-way 1-shot); ARGS="..." adds overrides
	$(VENV)/bin/metatrain $(ARGS)

clean: ## remove the virtual environment and caches (not outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache
