# Everything a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The demo's data: cifar10 (downloaded on first use) or a local copy, e.g.
#   make demo DATA=../shared/data/cifar10-subset/cifar-10-batches-py
DATA   ?= cifar10

.PHONY: install browser demo test clean

install: $(VENV)/.installed

# pip takes torch/torchvision from this machine's local copy when one is there.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(PY) -m cnnkit demo --data $(DATA)

# The report test renders report.html in headless Chromium (Debian's package).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium (for the report test)"; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# One pytest worker per core (at most 4), each test file kept on one worker so that its
# module fixtures are built once; tests/conftest.py shares the cores out among them.
test: install browser
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=20

clean:
	rm -rf $(VENV) runs .pytest_cache
