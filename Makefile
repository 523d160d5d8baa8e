# metatrain: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: help install test lint format train clean smoke repro-omniglot repro-miniimagenet \
	ablation-mamlpp summarize plot slurm-start slurm-stop

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install metatrain with its dev, scale-out and plot extras

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev,scale,plot]"
	touch $(STAMP)

test: install lint ## lint, then run the test suite (installs first if needed)
	$(PY) -m pytest -q

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check metatrain tests scripts
	$(VENV)/bin/ruff format --check metatrain tests scripts

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix metatrain tests scripts
	$(VENV)/bin/ruff format metatrain tests scripts

EXPERIMENT ?= quickstart
train: install ## meta-train a preset: quickstart (minutes on a laptop CPU) unless EXPERIMENT=<name> (a published row, e.g. maml_omniglot_5w1s); ARGS="..." adds overrides
	$(VENV)/bin/metatrain experiment=$(EXPERIMENT) $(ARGS)

.PHONY: bench
bench: install ## metatrain vs a naive loop (and the MAML++ authors' code: AUTHORS_DIR=checkout) in one run -> bench.json + table; ARGS="--threads 2 ..."
	$(PY) scripts/bench.py $(if $(AUTHORS_DIR),--authors-dir $(AUTHORS_DIR)) $(ARGS)

SEEDS ?= 0,1,2
METATRAIN := $(VENV)/bin/metatrain

smoke: install ## run every experiment preset for two iterations (outputs/multirun/smoke)
	$(PY) scripts/smoke.py --out outputs/multirun/smoke

repro-omniglot: install ## every Omniglot row of the published tables, SEEDS seeds each; then the table
	$(METATRAIN) -m 'experiment=glob(*_omniglot_*)' seed=$(SEEDS) sweep_name=repro-omniglot $(ARGS)
	$(VENV)/bin/metatrain-summarize outputs/multirun/repro-omniglot

repro-miniimagenet: install ## every MiniImageNet row of the published tables; then the table
	$(METATRAIN) -m 'experiment=glob(*_miniimagenet_*)' seed=$(SEEDS) sweep_name=repro-miniimagenet $(ARGS)
	$(VENV)/bin/metatrain-summarize outputs/multirun/repro-miniimagenet

ablation-mamlpp: install ## MAML++ switches added to MAML and removed from MAML++, one at a time; BNRS under running statistics
	$(METATRAIN) experiment=ablation_maml_plus_one $(ARGS)
	$(METATRAIN) experiment=ablation_mamlpp_minus_one $(ARGS)
	$(METATRAIN) experiment=ablation_bnrs $(ARGS)
	$(VENV)/bin/metatrain-summarize outputs/multirun/ablation-maml-plus-one
	$(VENV)/bin/metatrain-summarize outputs/multirun/ablation-mamlpp-minus-one
	$(VENV)/bin/metatrain-summarize outputs/multirun/ablation-bnrs

summarize: install ## table of a sweep beside the published numbers: make summarize SWEEP=outputs/multirun/NAME
	$(VENV)/bin/metatrain-summarize $(SWEEP)

plot: install ## learning curves and test-accuracy bars (PNG) of a sweep or run folder: make plot SWEEP=outputs/multirun/NAME
	$(VENV)/bin/metatrain-plot $(SWEEP)

slurm-start: ## install (apt) and start a one-node Slurm cluster on this machine
	bash scripts/local_slurm.sh install
	bash scripts/local_slurm.sh start

slurm-stop: ## stop the local Slurm cluster
	bash scripts/local_slurm.sh stop

clean: ## remove the virtual environment and caches (not outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache
