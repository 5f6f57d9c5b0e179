# Quick start: `make demo` (the whole method on the bundled demo data) and `make test`.
# Both create .venv with everything needed; nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The whole method on the bundled digits: a teacher, its score maps, a student with token labels
# and the same student on plain labels, then the three eval figures. A rerun skips what is done
# (the trainer resumes from its checkpoints, labelgen keeps finished shards).
DEMO ?= workdir/demo
demo: $(STAMP)
	$(PY) main.py --config configs/demo.py:stage=teacher,root=$(DEMO) --workdir $(DEMO)/teacher
	$(PY) -m labelgen generate --teacher $(DEMO)/teacher --no-ema --stitch 2 --source digits:64 \
	  --data-dir $(DEMO)/data --out $(DEMO)/score_maps --size 64
	$(PY) main.py --config configs/demo.py:stage=student,root=$(DEMO) --workdir $(DEMO)/student
	$(PY) main.py --config configs/demo.py:stage=baseline,root=$(DEMO) --workdir $(DEMO)/baseline
	$(PY) -m labelgen show --source digits:64 --data-dir $(DEMO)/data --shards $(DEMO)/score_maps \
	  --image-size 64 --grid 8 --index 3 --augment --out $(DEMO)/token_labels.png
	$(PY) -m lvvit_jax.report teacher=$(DEMO)/teacher student=$(DEMO)/student \
	  baseline=$(DEMO)/baseline
	$(PY) -m lvvit_jax.plots $(DEMO)/curves.png "student (token labels)=$(DEMO)/student" \
	  "baseline (plain labels)=$(DEMO)/baseline" --title "make demo: eval top-1 of the two students"

# Test files run in parallel (pytest-xdist, one worker per core up to 4, a file per worker):
# most of the suite is compilation and process start-up, which one core does at a time.
XDIST := -n auto --maxprocesses=4 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $(XDIST)

# The suite without the slow end-to-end tests (CI runs everything via `make test`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST)

# Benchmarks are modules of the `benchmarks` package (they share helpers by import).
# One after another: they time the machine, so never in parallel.
bench: $(STAMP)
	$(PY) -m benchmarks.model_step --model lvvit_s --batch 8 --dtype bfloat16
	$(PY) -m benchmarks.train_step --model lvvit_s --batch 8
	$(PY) -m benchmarks.token_targets --model-batch 8
	$(PY) -m benchmarks.input_pipeline
	$(PY) -m benchmarks.labelgen --model lvvit_m --size 384 --batch 8 --images 32
	$(PY) -m benchmarks.checkpoint_save --model lvvit_s

clean:
	rm -rf $(VENV) workdir .pytest_cache
