# Everything a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The demo's data: cifar10 (downloaded on first use) or a local copy, e.g.
#   make demo DATA=../shared/data/cifar10-subset/cifar-10-batches-py
DATA   ?= cifar10

.PHONY: install demo test clean

install: $(VENV)/.installed

# pip takes torch/torchvision from this machine's local copy when one is there.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(PY) -m cnnkit demo --data $(DATA)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
