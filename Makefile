# The two commands of the README. Each creates .venv on first use and reuses it after.
#   make demo   simulate -> train -> broker -> agent -> replay with faults -> live alerts
#   make test   the test suite against a private mosquitto (unit, integration, parity, CLI)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test bench eval clean help
help:
	@echo "make demo   - set up .venv and run the end-to-end demo"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - performance benchmarks (bench/)"
	@echo "make eval   - detector evaluation suite vs baselines (bench/)"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgewatch needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV) || { echo "error: cannot create a venv (on Debian: sudo apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned (a CPU build); deploy/constraints.txt pins the tested versions (see README "Installing").
	$(PY) -m pip install --quiet -c deploy/constraints.txt -e ".[trainer,dev]"
	@touch $@

demo: $(VENV)/.installed
	$(PY) -m trainer.demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench.run_all

eval: $(VENV)/.installed
	$(PY) -m bench.detection

clean:
	rm -rf $(VENV) demo-out bench/out .pytest_cache
