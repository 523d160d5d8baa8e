# metatrain: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: help install test lint format train clean smoke repro-omniglot repro-miniimagenet \
	ablation-mamlpp summarize plot slurm-start slurm-stop gpu-wheels gpu-data gpu-authors \
	gpu-prepare gpu-check

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

# The GPU check (README, "The GPU check"): prepare here, run on a lent GPU machine.
OMNIGLOT_SRC ?= /work/shared/data/omniglot/omniglot-py
AUTHORS_GIT ?= /work/.mirror/AntreasAntoniou+HowToTrainYourMAMLPytorch/repo

gpu-wheels: ## wheels the GPU machine's python 3.12 lacks (hydra-core, omegaconf, antlr4) -> .whl/
	bash scripts/gpu_wheels.sh

gpu-data: ## copy Omniglot (OMNIGLOT_SRC) into .gpudata/omniglot/omniglot-py, for the device call to carry
	mkdir -p .gpudata/omniglot/omniglot-py
	cp $(OMNIGLOT_SRC)/images_background.zip $(OMNIGLOT_SRC)/images_evaluation.zip .gpudata/omniglot/omniglot-py/
	chmod -R u+w .gpudata

gpu-authors: ## the MAML++ authors' code (AUTHORS_GIT: the git dir that fetch made) -> .authors_maml/, code only
	rm -rf .authors_maml && mkdir -p .authors_maml
	git --git-dir=$(AUTHORS_GIT) archive HEAD -- LICENSE experiment_config utils \
	  $$(git --git-dir=$(AUTHORS_GIT) ls-tree --name-only HEAD | grep '\.py$$') | tar -x -C .authors_maml
	test -f .authors_maml/few_shot_learning_system.py

gpu-prepare: gpu-wheels gpu-data gpu-authors ## all three, then the size the device call carries
	@du -shc .whl .gpudata .authors_maml

gpu-check: ## the GPU check (scripts/gpu_check.sh; on the GPU machine; DEVICE=cpu BUDGET=150 for a dry run)
	bash scripts/gpu_check.sh

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
