# make demo: set up and run the offline smoke config. make test: set up and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulled by another package can be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The smoke run plus the live stack: adapter trajectory + phase metrics, and in-loop sampling judged by an
# offline demo judge (plumbing only: its scores mean nothing). Then: tensorboard --logdir runs/
demo: setup
	$(OFFLINE) $(VENV)/bin/em-fit fit --config configs/smoke.yaml \
		--config callbacks/phase_transition.yaml --config callbacks/demo_eval.yaml

# One torch thread per process: the suite runs several processes at once on 2 cores.
test: setup
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: setup
	$(OFFLINE) $(PY) scripts/bench_train.py
	$(OFFLINE) $(PY) scripts/bench_trajectory.py
	$(OFFLINE) $(PY) scripts/bench_eval_point.py
	$(OFFLINE) $(PY) scripts/bench_judge.py

clean:
	rm -rf runs .pytest_cache
