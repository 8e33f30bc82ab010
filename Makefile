# Two entry points that work on a fresh machine with only Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test test-slow test-all bench kill-resume clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt examples/isthmus-backend-example/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[torch,mindspore,onnx,plots,dev]'
	$(PIP) install -c constraints.txt -e examples/isthmus-backend-example
	touch $(STAMP)

DEMO_RUN := runs/demo

# The main job: train tiny-captioner on the best available backend, evaluate it on held-out
# scenes, export it to ONNX and check the same weights on every usable backend.
demo: $(STAMP)
	$(BIN)/isthmus train output_dir=$(DEMO_RUN) --overwrite
	$(BIN)/isthmus export --checkpoint $(DEMO_RUN) --output $(DEMO_RUN)/model.onnx
	$(BIN)/isthmus portability --checkpoint $(DEMO_RUN) --backends cpu,cpu:mindspore,onnxruntime,reference --out $(DEMO_RUN)/portability

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"
	cd examples/isthmus-backend-example && ../../$(BIN)/python -m pytest -q --isthmus-backend=example --isthmus-quick

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/coldstart.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/mfu.py

kill-resume: $(STAMP)
	$(BIN)/python bench/kill_resume.py --trials 20

clean:
	rm -rf $(VENV) build *.egg-info
