# The two commands of the README:  `make reproduce`  (main job)  and  `make test`.
# Both set up everything on a fresh machine: a virtual environment with torch, dampopt and
# its extras, and (for the main job) the Fashion-MNIST data from Debian's package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: reproduce test benchmark data

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,reference]"
	touch $@

data:
	@if [ -f $(DATA)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found under $(DATA) and apt-get is unavailable:" \
		"reproduce_paper.py will try --data-dir or torchvision's downloader"; fi

reproduce: $(VENV)/.installed data
	$(PY) reference/reproduce_paper.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q $(ARGS)

benchmark: $(VENV)/.installed
	$(PY) -m pytest benchmarks -q $(ARGS)
