# Set-up on a fresh machine is two commands: `make demo` and `make test`.
# Both create .venv on first use: torch 2.13.0 (CPU build) first, then this
# package with its extras, pinned to that torch by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pushforward-installed
EXTRAS := test,bench,demo,docs,hf,laplace,bo
# every warning an error (a broken cross-reference, an undocumented public name, an example
# that raises), all of them reported; the gallery's examples run on one torch thread
SPHINX := OMP_NUM_THREADS=1 $(PY) -m sphinx -b html -W --keep-going -n
DOCS_OUT := docs/_build/html

.PHONY: venv test demo demo-llm bench lint docs docs-full docs-serve browser dist clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# laplace-torch pulls torchvision, which does not import beside the CPU build
	# of torch 2.13.0 and is not needed at run time (torchmetrics skips it).
	$(PY) -m pip uninstall -y -q torchvision
	touch $(STAMP)

# the test suite builds the docs site (tests/test_docs_site.py) and opens it in Chromium
test: $(STAMP) browser
	$(PY) -m ruff check src tests benchmarks examples tools docs
	$(PY) tools/import_cycles.py src/pushforward
	$(PY) tools/import_rules.py src/pushforward
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

demo-llm: $(STAMP)
	$(PY) examples/laplace_lora.py --readme docs/guides/laplace_lora.md

bench: $(STAMP)
	$(PY) benchmarks/run.py --readme README.md
	$(PY) examples/bo_hartmann.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples tools docs
	$(PY) -m ruff format --check src tests benchmarks examples tools docs/conf.py docs/_ext docs/gallery

# the documentation site, its examples gallery at the reduced size (PUSHFORWARD_DOCS_SIZE=ci)
docs: $(STAMP)
	$(SPHINX) docs $(DOCS_OUT)

# the same with the gallery at its full size (the published figures)
docs-full: $(STAMP)
	PUSHFORWARD_DOCS_SIZE=full $(SPHINX) docs $(DOCS_OUT)

docs-serve: docs
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory $(DOCS_OUT)

# Debian's Chromium and its WebDriver for the docs' browser test (installed when missing and
# this is root, as on CI; otherwise that test is skipped and this says how to get them)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver > /dev/null; \
	else \
		echo "the docs' browser test needs Debian's chromium and chromium-driver:" \
			"sudo apt-get install chromium chromium-driver"; \
	fi

# the wheel and the source distribution, built with this environment's setuptools
dist: $(STAMP)
	$(PY) -m build --no-isolation --outdir dist

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache docs/_build \
		docs/api/generated docs/auto_examples docs/benchmarks/generated
