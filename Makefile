# Set-up on a fresh machine is two commands: `make demo` and `make test`.
# Both create .venv on first use: torch 2.13.0 (CPU build) first, then this
# package with its extras, pinned to that torch by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pushforward-installed

.PHONY: venv test demo demo-llm bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench,demo,hf,laplace,bo]'
	# laplace-torch pulls torchvision, which does not import beside the CPU build
	# of torch 2.13.0 and is not needed at run time (torchmetrics skips it).
	$(PY) -m pip uninstall -y -q torchvision
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples tools
	$(PY) tools/import_cycles.py src/pushforward
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

demo-llm: $(STAMP)
	$(PY) examples/laplace_lora.py --readme README.md

bench: $(STAMP)
	$(PY) benchmarks/run.py --readme README.md
	$(PY) examples/bo_hartmann.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples tools
	$(PY) -m ruff format --check src tests benchmarks examples tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
