# Quick start: `make demo` (runs the main job on the embedded demo data) and `make test`.
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

demo: $(STAMP)
	$(PY) main.py --config configs/demo.py --workdir workdir/demo

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15

# The suite without the slow end-to-end tests (CI runs everything via `make test`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Benchmarks are modules of the `benchmarks` package (they share helpers by import).
bench: $(STAMP)
	$(PY) -m benchmarks.model_step --model lvvit_s --batch 8 --dtype bfloat16
	$(PY) -m benchmarks.input_pipeline

clean:
	rm -rf $(VENV) workdir .pytest_cache
