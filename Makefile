# Each target sets itself up on a fresh machine that has Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_WORKDIR ?= runs/fashion_mnist_quick

.PHONY: test demo bounds-demo install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## Run the test suite (CPU, several minutes); CI runs exactly this.
test: $(STAMP)
	$(PY) -m pytest -q tests

## Train a certifiably robust Fashion-MNIST model on CPU, then certify it.
## Offline when TFDS_DATA_DIR holds the prepared dataset; otherwise installs
## the `prepare` extra (TensorFlow) and downloads it.
demo: $(STAMP)
	@$(PY) -c "import sys; from lipjax import data; sys.exit(not data.is_prepared('fashion_mnist'))" \
	  || $(PY) -m pip install --quiet -e ".[prepare]"
	$(PY) train.py --config configs/fashion_mnist.py:quick --workdir $(DEMO_WORKDIR)
	$(PY) certify.py --workdir $(DEMO_WORKDIR)

## Bound a freshly initialized reference network: naive vs LipLT.
bounds-demo: $(STAMP)
	$(PY) examples/bounds_demo.py --arch 2C2F

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
