# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# The torch requirement is a variable so a machine can pick its build:
# CI pins the CPU wheel; on a GPU box use e.g. TORCH='torch>=2.2'.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bsmon-installed

.PHONY: demo test bench screenshots clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/bsmon demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/noise_overhead.py
	$(BIN)/python benchmarks/ddp_overhead.py

# The demo screenshots in docs/: update the snapshots (look at them before committing), copy them.
screenshots: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_screenshots.py -k test_demo_screen --snapshot-update
	for size in 80x24 120x40 200x60; do \
		cp "tests/__snapshots__/test_screenshots/test_demo_screen[$$size].svg" docs/screen-$$size.svg; done

clean:
	rm -rf $(VENV) *.egg-info
