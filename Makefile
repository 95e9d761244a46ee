# `make demo` and `make test` are the two commands a fresh machine needs (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-peers bench-photos lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/pipeline run --force  # re-runnable: replaces models/digits and models/digits-dropout0

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# BENCH_ARGS=--quick (60 s of timing) or --peers-only; peers that need OpenVINO/NNCF are skipped with one line
# unless `make bench-peers` installed the optional extra (never a core dependency).
bench: install
	$(BIN)/python tools/bench.py $(BENCH_ARGS)

bench-peers: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench-peers]'
	$(BIN)/python tools/bench.py $(BENCH_ARGS)

# A generated photo folder (IMAGES 64x64 PNGs, ~1 GB at 100k under /tmp/photo-bench): memory, decode rate, cache.
IMAGES ?= 100000
bench-photos: install
	$(BIN)/python tools/photo_bench.py --images $(IMAGES) --json photo_bench.json --clean

lint: install
	$(BIN)/ruff check pipeline tests tools

clean:
	rm -rf $(VENV) .pytest_cache
