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

demo: setup
	$(OFFLINE) $(VENV)/bin/em-fit fit --config configs/smoke.yaml

test: setup
	$(OFFLINE) $(PY) -m pytest -q

bench: setup
	$(OFFLINE) $(PY) scripts/bench_train.py

clean:
	rm -rf runs .pytest_cache
