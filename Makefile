# longcat-ray: `make demo` runs the mission end to end on the tiny model; `make test` runs the suite.
# Works on a fresh Debian machine with Python 3.11 and no GPU: everything is installed into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
DEMO   ?= /tmp/longcat-ray-demo
# torch + torchvision: pip takes these from the machine's local disk (transformers' Qwen2-VL processors
# need torchvision, and PyPI's torchvision does not import beside the CPU-only torch file).
TORCH  := torch==2.14.1 torchvision==0.29.1

# Debian's Chromium drives the web page in the Serve tests (a test tool never downloads its own browser).
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt setuptools wheel
	$(PIP) install -c constraints.txt $(TORCH)
	# deepspeed is an sdist: build it against the torch above, not a fresh multi-GB one.
	$(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) DEMO=$(DEMO) bash scripts/demo.sh

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q

test-fast: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO)
