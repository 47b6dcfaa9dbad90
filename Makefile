# facegate: two commands matter. `make run` serves the default model; `make test` passes the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PART   ?= all

.PHONY: run test lint setup setup-server system-deps bench default-model clean image image-gpu image-base

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The server needs no torch: `make run` installs the base dependencies only.
$(VENV)/.server-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[train,dev]"
	# insightface only for its bundled test photo and as a benchmark peer; without its
	# dependencies, because it pulls the GUI opencv-python over the headless cv2.
	$(PIP) install -q --no-deps "insightface==2.1"
	touch $@ $(VENV)/.server-installed

setup-server: $(VENV)/.server-installed
setup: $(STAMP)

run: $(VENV)/.server-installed
	$(VENV)/bin/facegate serve --bundle models/default --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Debian packages that real-part tests need (a browser, a database server): scripts/system-deps.
system-deps:
	@for script in scripts/system-deps/*.sh; do [ ! -e "$$script" ] || bash "$$script" || exit 1; done

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) -m bench --part $(PART)

default-model: $(STAMP)
	bash train/default_model.sh

# Container images with podman or docker (docs/deploy.md): from python:3.11-slim by default;
# BASE=local makes a Debian base with mmdebstrap where no registry is reachable.
image:
	bash scripts/image.sh cpu

image-gpu:
	bash scripts/image.sh gpu

image-base:
	bash scripts/container-base.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
