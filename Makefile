# mmray developer entry points. `make quickstart` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data/synth
STORAGE ?= runs

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# A 5-minute sweep of the built-in space on the built-in data; its first trial is jobs/quickstart.yaml itself
# (the baseline). The single-run path is `mmray train jobs/quickstart.yaml`.
quickstart: $(STAMP)
	$(BIN)/mmray data synth --out $(DATA) --rows 3000 --shards 4 --seed 0
	$(BIN)/mmray tune jobs/quickstart.yaml --time-budget 5m --storage $(STORAGE) \
	  --set scaling.num_workers=1 --set train.batch_size=64

# The whole suite, as CI runs it: lint first (seconds), then every test (about 20 min on 2 cores; a per-test hang guard of 40 min).
test: $(STAMP) lint
	$(BIN)/python -m pytest -q --timeout=2400 tests

# The everyday loop (under 2 minutes): no Ray cluster, no full training runs.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q --timeout=2400 -m "not slow and not ray" tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf runs data/synth .pytest_cache
