# The two commands: `make demo` (install + run the demo) and `make test` (install + run the tests).
PY ?= python3
VENV ?= .venv
SHARED ?= ../shared
# the offline CXR weights beside the checkout, when present
WEIGHTS ?= $(if $(wildcard $(SHARED)/weights),$(SHARED)/weights,)

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/featstore demo $(if $(WEIGHTS),--weights-dir $(WEIGHTS),)

test: install
	$(VENV)/bin/python -m pytest

# every performance figure, side by side, into benchmarks/RESULTS.md (about 20 min on 2 cores)
bench: install
	$(VENV)/bin/python benchmarks/run_all.py

.PHONY: install demo test bench
