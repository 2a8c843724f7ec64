# dinokit: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: venv test demo bench lint soak data browser clean help

help:
	@echo "make demo   - set up, pretrain a small ViT on Fashion-MNIST (~10 min on 2 CPU cores), evaluate, report"
	@echo "make test   - set up and run the test suite"
	@echo "make bench  - speed benchmarks (side by side, as ratios)"
	@echo "make lint   - ruff"
	@echo "make soak   - long kill/resume soak test (not in CI)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e ".[dev,tensorboard]"
	touch $(STAMP)

# Fashion-MNIST: Debian's dataset-fashion-mnist when apt is available, else torchvision's download (needs internet).
data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  echo "Fashion-MNIST: installed $(FMNIST_DIR)"; \
	else $(MAKE) venv && $(PY) -m dinokit.data download-fashion-mnist data/fashion-mnist; fi

# Headless Chromium for the report test (Debian's package; skipped quietly where apt is not usable).
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)) >/dev/null 2>&1 \
	  || echo "warning: could not install chromium; the browser test will be skipped"; \
	else echo "warning: chromium missing; the browser test will be skipped"; fi

test: venv browser
	$(PY) -m pytest

demo: venv data
	@d="$(FMNIST_DIR)"; [ -f "$$d/train-images-idx3-ubyte.gz" ] || d=data/fashion-mnist; \
	$(VENV)/bin/dinokit train --config configs/fashion_mnist_demo.yaml --data "fashion-mnist:$$d" \
	  --knn-train "fashion-mnist:$$d" --knn-val "fashion-mnist:$$d" --output-dir $(DEMO_OUT) && \
	$(PY) -m dinokit.demo --run-dir $(DEMO_OUT) --data "fashion-mnist:$$d"

bench: venv
	$(PIP) install -q -e ".[dev,tensorboard,bench]"
	$(PY) benchmarks/run_all.py

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

soak: venv
	DINOKIT_SOAK=1 $(PY) -m pytest -m soak tests/test_soak.py -s

clean:
	rm -rf $(VENV) runs .pytest_cache
