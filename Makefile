# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench figures reproduce-cpu clean

setup: $(STAMP)

# Install the pinned CPU torch only when no torch is importable (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/transformer-ln train --cpu --overwrite

# two workers, one per core (tests/conftest.py: one thread each; a file's tests on one worker)
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

bench: setup
	$(PY) benchmarks/throughput.py --device cpu --steps 10

reproduce-cpu: setup
	PYTHON=$(PY) bash experiments/reproduce_cpu.sh runs/cpu_study

figures: setup
	$(PY) analysis/reproduce_figures.py --out figures

clean:
	rm -rf $(VENV) runs
