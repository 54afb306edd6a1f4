# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Pinned for CPU machines: an unpinned torch pulls several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo serve clean

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
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The embedded default: tiny byte-level T5 -> k=4 plugin -> evaluation table (DESIGN §5).
demo: install
	$(PY) train.py --config=configs/demo.py --workdir=demo_workdir
	$(PY) eval.py --config=configs/demo.py --workdir=demo_workdir

# Adaptive plugin selection under a bursty load (benchmarks/README.md).
serve: install
	$(PY) -m benchmarks.serve

clean:
	rm -rf $(VENV) demo_workdir
