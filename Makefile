# Each target sets itself up on a fresh machine that has Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_WORKDIR ?= runs/fashion_mnist_quick
RESULTS_DIR ?= runs/fmnist_cpu
SWEEP_DIR ?= runs/fmnist_sweep

.PHONY: test demo fmnist-sweep fmnist-results bounds-demo install fashion-mnist-data clean

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
## the `prepare` extra (TensorFlow) and prepares it (see fashion-mnist-data).
demo: fashion-mnist-data
	$(PY) train.py --config configs/fashion_mnist.py:quick --workdir $(DEMO_WORKDIR)
	$(PY) certify.py --workdir $(DEMO_WORKDIR)

## The README's Fashion-MNIST results: the CRM validation sweep (7 points x
## 5 epochs), then CRM, GloRo and cross-entropy (4C3F, 25 epochs each),
## certified at eps 0.1/0.25/0.5/1. Hours on a 2-core CPU; both resume.
fmnist-sweep: fashion-mnist-data
	PYTHON=$(PY) experiments/fashion_mnist/sweep.sh $(SWEEP_DIR)
	$(PY) -m experiments.fashion_mnist.summarize sweep $(SWEEP_DIR)

fmnist-results: fashion-mnist-data
	PYTHON=$(PY) experiments/fashion_mnist/results.sh $(RESULTS_DIR)

# Nothing to do when TFDS_DATA_DIR (default ~/tensorflow_datasets) holds the
# prepared dataset. Otherwise install TensorFlow (the `prepare` extra) and
# prepare it there: downloaded, or without network from the original files
# in FASHION_MNIST_FILES (e.g. /usr/share/datasets/fashion-mnist from
# Debian's dataset-fashion-mnist package).
FASHION_MNIST_FILES ?=
fashion-mnist-data: $(STAMP)
	@$(PY) -c "import sys; from lipjax.training import data; sys.exit(not data.is_prepared('fashion_mnist'))" \
	  || { $(PY) -m pip install --quiet -e ".[prepare]" \
	       && $(PY) -m lipjax.training.data prepare fashion_mnist \
	            $(if $(FASHION_MNIST_FILES),--from_dir $(FASHION_MNIST_FILES)); }

## Bound a freshly initialized reference network: naive vs LipLT.
bounds-demo: $(STAMP)
	$(PY) examples/bounds_demo.py --arch 2C2F

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
