# Two entry points that work on a fresh machine with only Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test test-slow test-all bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt examples/isthmus-backend-example/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[torch,mindspore,onnx,plots,dev]'
	$(PIP) install -c constraints.txt -e examples/isthmus-backend-example
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/isthmus doctor
	$(BIN)/isthmus kernels --backend auto --check

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/coldstart.py

clean:
	rm -rf $(VENV) build *.egg-info
