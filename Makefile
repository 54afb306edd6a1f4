# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SERVE_STAMP := $(VENV)/.installed-serve
PORT ?= 8000
# Pinned for CPU machines: an unpinned torch pulls several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist; one file stays in one process): much of the suite is
# compilation and subprocess start-up, which one core does alone.
TEST_WORKERS ?= 2

.PHONY: install test demo serve simulate reproduce clean

# The library, and PyTorch for the README's export example: what `make demo` needs. No
# TensorFlow: tfds datasets (GLUE, SQuAD) are opt-in, `pip install -e ".[tfds]"`.
install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch]"
	touch $(STAMP)

# The tests also read tfds mock data and run under pytest: the tfds and dev extras.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[all]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

# The embedded default (docs/DESIGN.md §5): a small T5 pre-trained on CPython's docs, fine-tuned to tell
# which stdlib package a docstring comes from, a k=4 plugin, and their test accuracy (~5 min).
demo: install
	$(PY) -m variator_jax.stages --preset=demo

$(SERVE_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[serve]"
	touch $(SERVE_STAMP)

# What `make demo` trained, behind Ray Serve on http://127.0.0.1:$(PORT) (variator-serve; Ctrl-C
# stops it): POST /v1/generate and /v1/classify, GET /healthz and /v1/models.
serve: $(SERVE_STAMP)
	@test -f demo_workdir/adapt-k4/result.json || { \
		echo "make serve: nothing to serve yet; run 'make demo' first"; exit 1; }
	$(VENV)/bin/variator-serve --backbone demo_workdir/finetune/backbone \
		--plugins demo_workdir/adapt-k4/plugin --task stdlib_docs --lengths 32,64 --truncate \
		--port $(PORT)

# Adaptive plugin selection on a simulated clock (benchmarks/README.md).
simulate: install
	$(PY) -m benchmarks.serve

# The paper's experiment in miniature (variator_jax/stages.py): it prints its time estimate first
# (README's run: 27 min of training on a 2-core AMD EPYC; more when other jobs share the cores).
# Cached and resumable; the results land beside the committed ones.
reproduce: install
	$(PY) -m variator_jax.stages --out=benchmarks/results

clean:
	rm -rf $(VENV) demo_workdir quality_workdir serve_workdir
