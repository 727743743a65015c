# Set-up and entry points. `make demo` and `make test` each install what they need first
# (a virtualenv in .venv with the pinned stack, and Debian's Fashion-MNIST package).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ktray-installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install data demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-test-servers.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CUDA 2.14.1 build lies on the local disk; the stack below accepts it.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]' -r requirements-test-servers.txt
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: install data
	$(VENV)/bin/ktray demo $(ARGS)

test: install data
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The library-level tests: no Ray, no servers, nothing slow (about a minute here).
test-fast: install data
	$(PY) -m pytest -q -m "not ray and not servers and not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install data
	$(PY) benchmarks/logits_bench.py
	$(PY) benchmarks/train_bench.py

clean:
	rm -rf $(VENV) ktray-out
