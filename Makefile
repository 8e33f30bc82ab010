# Two entry points that work on a fresh machine with only Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo demo-t2i test lint test-slow test-all tutorials bench kill-resume clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt examples/isthmus-backend-example/pyproject.toml examples/isthmus-model-example/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[torch,mindspore,onnx,plots,dev,hf]'
	$(PIP) install -c constraints.txt -e examples/isthmus-backend-example
	$(PIP) install -c constraints.txt -e examples/isthmus-model-example
	touch $(STAMP)

DEMO_RUN := runs/demo

# The main job: train tiny-captioner on the best available backend, evaluate it on held-out
# scenes, export it to ONNX and check the same weights on every usable backend.
demo: $(STAMP)
	$(BIN)/isthmus train output_dir=$(DEMO_RUN) --overwrite
	$(BIN)/isthmus export --checkpoint $(DEMO_RUN) --output $(DEMO_RUN)/model.onnx
	$(BIN)/isthmus portability --checkpoint $(DEMO_RUN) --backends cpu,cpu:mindspore,onnxruntime,reference --out $(DEMO_RUN)/portability

T2I_RUN := runs/t2i
T2I_PROMPT := a red circle left of a blue square

# Text to image: train tiny-t2i, read its images back with the demo's captioner (trained first when
# runs/demo has none), draw one prompt, export the generator to ONNX and check it on every backend.
demo-t2i: $(STAMP)
	test -d $(DEMO_RUN)/checkpoints || $(BIN)/isthmus train output_dir=$(DEMO_RUN) --overwrite
	$(BIN)/isthmus train model=tiny-t2i train=t2i model.judge=$(DEMO_RUN) output_dir=$(T2I_RUN) --overwrite
	$(BIN)/isthmus generate --checkpoint $(T2I_RUN) --prompt "$(T2I_PROMPT)" --count 4 --out $(T2I_RUN)/prompt.png
	$(BIN)/isthmus export --checkpoint $(T2I_RUN) --output $(T2I_RUN)/model.onnx
	$(BIN)/isthmus portability --checkpoint $(T2I_RUN) --backends cpu,cpu:mindspore,onnxruntime,reference --out $(T2I_RUN)/portability

# The suites run in WORKERS pytest-xdist processes, a test file to each at a time, so a file's
# module fixtures are built once. Where the slow tests run, files go in collection order: xdist's
# default sends the files with most tests first, which left the one-test slow fuzz file for last.
WORKERS ?= 2
PARALLEL := -n $(WORKERS) --dist loadfile

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=15 $(PARALLEL)
	cd examples/isthmus-backend-example && ../../$(BIN)/python -m pytest -q --isthmus-backend=example --isthmus-quick -n $(WORKERS)
	cd examples/isthmus-model-example && ../../$(BIN)/python -m pytest -q

# ruff over the code, mypy over the contracts and the plugin API (pyproject's [tool.mypy] files).
lint: $(STAMP)
	$(BIN)/ruff check core backends plugins
	$(BIN)/mypy

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=15 $(PARALLEL) --no-loadscope-reorder

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL) --no-loadscope-reorder

# The README's "Add your model" and "Add your backend" sections, each run line by line in a fresh
# virtual environment and a copy of the repository, as a new user would follow them.
tutorials:
	$(PYTHON) examples/follow_readme.py README.md add-your-model add-your-backend bring-your-own-model

# The benchmarks' own environment: the project plus the tools it is compared with (Lightning
# Fabric, Accelerate), which are not dependencies of the package.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml constraints.txt bench/requirements.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip --disable-pip-version-check -q install -c constraints.txt -e '.[torch,mindspore]' -r bench/requirements.txt
	touch $(BENCH_STAMP)

# Each benchmark exits non-zero when it misses its target; '-' lets the rest run and the summary
# (bench/README.md's table, rewritten from bench/results/*.json) still be written.
bench: $(BENCH_STAMP)
	-$(BENCH_VENV)/bin/python bench/coldstart.py
	-$(BENCH_VENV)/bin/python bench/overhead.py
	-$(BENCH_VENV)/bin/python bench/peers.py
	-$(BENCH_VENV)/bin/python bench/module_overhead.py
	-$(BENCH_VENV)/bin/python bench/mindspore_overhead.py
	-$(BENCH_VENV)/bin/python bench/mfu.py --json bench/results/mfu.json
	-$(BENCH_VENV)/bin/python bench/generation.py --backends cpu,cpu:mindspore
	-$(BENCH_VENV)/bin/python bench/conversion_memory.py
	-$(BENCH_VENV)/bin/python bench/dump_cost.py
	-$(BENCH_VENV)/bin/python bench/sharding.py --agreement
	$(BENCH_VENV)/bin/python bench/summary.py

kill-resume: $(STAMP)
	$(BIN)/python bench/kill_resume.py --trials 20

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info
