# Each target sets itself up on a fresh machine that has Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## Run the test suite (CPU, a few minutes).
test: $(STAMP)
	$(PY) -m pytest -q tests

## Bound a freshly initialized reference network: naive vs LipLT.
demo: $(STAMP)
	$(PY) examples/bounds_demo.py --arch 2C2F

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
