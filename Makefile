# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (torch and torch-xla pinned to the CI versions) when it is missing.
PYTHON ?= python3
# pytest-xdist workers: much of the suite waits on gloo and XLA subprocesses, so 2 suit 2 cores
TEST_WORKERS ?= 2
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.9.0 torch-xla==2.9.0
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)  # a Transformer LM on 4 CPU processes (dp x tp); --backend sim runs it in one
	$(VENV)/bin/torchrun --standalone --nproc-per-node 4 examples/train_lm.py --backend dist --mesh "dp:2;tp:2" --steps 300

test: $(STAMP)  # lint, format and type checks first (seconds), then the suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
