# The two commands: `make demo` (install + run the demo) and `make test` (install + run the tests; `make test-fast`
# leaves out the scale-out, kill -9, browser, fuzz and slow tests).
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

# the scale-out tests start a throwaway PostgreSQL; install Debian's when we can (root + apt), else they skip
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q postgresql >/dev/null 2>&1 \
	      || (timeout 300 apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive timeout 600 \
	          apt-get install -y -q postgresql >/dev/null 2>&1)) ; } \
	  || echo "PostgreSQL not installed: the PostgreSQL sweep tests will skip"

# the browser tests (tests/test_ui_browser.py) drive headless Chromium; install Debian's the same way, else they skip
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null && (DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q chromium \
	      >/dev/null 2>&1 || (timeout 300 apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	          timeout 900 apt-get install -y -q chromium >/dev/null 2>&1)) ; } \
	  || echo "Chromium not installed: the browser tests (tests/test_ui_browser.py) will skip"

# the tests run in parallel (pytest-xdist): WORKERS processes, one per core this process may use (on 2 cores,
# 2 workers took 514-530 s against 550-552 s with 3, alternating: benchmarks/RESULTS.md, issue 23, 12th session);
# `make test WORKERS=0` runs them in one process, as a plain `python -m pytest` does
WORKERS ?= $(shell $(PY) -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || echo 2)
XDIST = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup)

# bytecode caches written (Python's default) even where the environment sets PYTHONDONTWRITEBYTECODE: without
# a __pycache__ (git ignores it) every process the tests start compiles featstore's modules again (0.2-0.3 CPU s
# each) and every xdist worker rewrites every test module's asserts (benchmarks/RESULTS.md, issue 23, 11th session)
PYTEST = PYTHONDONTWRITEBYTECODE= $(VENV)/bin/python -m pytest

test: install postgres chromium
	$(PYTEST) $(XDIST)

# the edit-test loop (<= 3 min on 2 cores): everything but the scale-out, kill -9, browser, fuzz and slow tests;
# `slow` marks each test that took >= 8 s in a whole-suite run (`make test` runs them all)
test-fast: install
	$(PYTEST) $(XDIST) -m "not scale and not kill and not browser and not fuzz and not slow"

# every performance figure, side by side, into benchmarks/RESULTS.md, above its KEEP line (on 2 cores about 2 h
# without scale.py, whose stages stop at an hour each: with it, most of a day)
bench: install
	$(VENV)/bin/python benchmarks/run_all.py

.PHONY: install demo test test-fast bench postgres chromium
