# FlexyFace pipeline — set-up, demo and tests.
#   make demo   create .venv, install, and run an offline demo sweep on tiny models (CPU)
#   make test   create .venv, install, and run the test suite
#   make clean-demo   remove the demo sweep (only it) and refresh the export
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
REPO := $(CURDIR)
DEMO_SWEEP ?= demo

.PHONY: setup demo test test-fast dev clean-demo

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	# hpsv2 and simple-aesthetics-predictor declare pins that conflict with dagster/diffusers:
	# installed without their dependency lists (their real needs are in requirements.txt).
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	# hpsv2's wheel lacks its tokenizer vocabulary; copy open-clip-torch's identical file in.
	$(VENV)/bin/python -c "from flexyface_pipeline.lib.models.tokenizer import ensure_hpsv2_vocab; ensure_hpsv2_vocab()"
	@touch $(STAMP)

# .env: read by the dagster CLI, `dagster dev` and `flexyface`. Written once; edit it afterwards.
# An existing .env keeps its values; settings that .env.example has and it lacks (added by a newer
# version of the project) are appended with their defaults.
.env: .env.example
	@if [ -f .env ]; then \
	  added=""; \
	  for name in $$(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' .env.example); do \
	    grep -q "^$$name=" .env || { grep "^$$name=" .env.example | sed "s|@@REPO@@|$(REPO)|g" >> .env; added="$$added $$name"; }; \
	  done; \
	  if [ -n "$$added" ]; then echo ".env exists: keeping its values; added the new settings$$added"; \
	  else echo ".env exists: keeping it"; fi; touch .env; \
	else sed "s|@@REPO@@|$(REPO)|g" .env.example > .env; echo "wrote .env"; fi

# The Dagster instance under data/dagster/ (DAGSTER_HOME in .env): its dagster.yaml links to the
# settings chosen by FLEXYFACE_INSTANCE=sqlite|postgres (unset: keep the current link, else sqlite),
# then the gpu pool's limit is stored. `dagster instance concurrency set` does not read .env itself.
.PHONY: instance
instance: $(STAMP) .env
	@mkdir -p data/dagster data/exports
	@case "$(FLEXYFACE_INSTANCE)" in \
	  sqlite) ln -sfn ../../dagster.yaml data/dagster/dagster.yaml ;; \
	  postgres) ln -sfn ../../deploy/dagster-postgres.yaml data/dagster/dagster.yaml ;; \
	  "") [ -e data/dagster/dagster.yaml ] || ln -sfn ../../dagster.yaml data/dagster/dagster.yaml ;; \
	  *) echo "FLEXYFACE_INSTANCE must be sqlite or postgres, not '$(FLEXYFACE_INSTANCE)'" >&2; exit 2 ;; \
	esac
	@echo "data/dagster/dagster.yaml -> $$(readlink data/dagster/dagster.yaml)"
	@# Every FLEXYFACE_* setting and the instance's storage (a PostgreSQL server must answer), one line
	@# per problem, before Dagster is asked to store anything.
	$(VENV)/bin/flexyface check --no-pool-limit
	$(VENV)/bin/dotenv -f .env run -- $(VENV)/bin/dagster instance concurrency set gpu 1

setup: $(STAMP) .env instance

# Two engines, the same 64 prompts and seeds each (the analysis needs 60 images per metric and two
# bins of 20 to draw and to test effects; the engines are compared pair by pair) at 64x64 and
# 4-8 steps (within both engines' limits; flux1_schnell takes no guidance). One torch thread: the
# tiny models are too small for two threads to pay, and on a busy machine two spin-waiting threads
# made generation several times slower (OMP_NUM_THREADS set in the environment wins).
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/flexyface sweep $(DEMO_SWEEP) --images 64 --prompt-file demo.txt \
		--engine realvis_xl flux1_schnell --steps 4 8 --guidance 1.0 9.0 --width 64 --height 64 --seed 7
	@echo "Exports: $(REPO)/data/exports/sweep_results.parquet and $(REPO)/data/exports/sweep_results.csv"
	@echo "Report:  $(REPO)/data/exports/sweep_report.html"
	@echo "UI:      make dev, then open http://localhost:3000/assets/sweep_analysis (plots) and /assets/image_grid"

test: setup
	$(VENV)/bin/python -m pytest -ra

test-fast: setup
	$(VENV)/bin/python -m pytest -ra -m "not slow"

dev: setup
	$(VENV)/bin/flexyface check
	$(VENV)/bin/dagster dev

# Removes the demo sweep ($(DEMO_SWEEP)) and nothing else: its tables, images and contact sheets,
# and its partition in the instance; then the export is rebuilt without its rows. Other sweeps,
# the run history and data/models/ stay.
clean-demo:
	@case "$(DEMO_SWEEP)" in ""|.|..|*/*) echo "DEMO_SWEEP must be a sweep name, not '$(DEMO_SWEEP)'" >&2; exit 2 ;; esac
	rm -rf data/sweeps/$(DEMO_SWEEP) data/images/$(DEMO_SWEEP) data/exports/grids/$(DEMO_SWEEP)
	@if [ -x $(VENV)/bin/flexyface ] && [ -f .env ] && [ -e data/dagster/dagster.yaml ]; then \
	  $(VENV)/bin/dotenv -f .env run -- $(VENV)/bin/python -c "import sys, dagster as dg; \
	i = dg.DagsterInstance.get(); s = sys.argv[1]; \
	i.has_dynamic_partition('sweeps', s) and i.delete_dynamic_partition('sweeps', s)" "$(DEMO_SWEEP)" && \
	  echo "sweep partition $(DEMO_SWEEP) removed from the instance" && $(VENV)/bin/flexyface export; \
	else echo "no instance set up (make setup): only the files were removed"; fi
