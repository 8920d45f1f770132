#!/usr/bin/env bash
# The GPU work of issue 21 in the order it pays off, for a session that holds a GPU for minutes:
# each step has its own time limit and writes its log (and any results) under $OUT, so a step that
# runs long or fails costs only itself. Run from the repository root on the device machine:
#
#   OUT=$OUT bash benchmarks/gpu_session.sh 1     # correctness: kernels, ops, backend, triton_op cases
#   OUT=$OUT bash benchmarks/gpu_session.sh 1w    # the W4A16 kernel table
#   OUT=$OUT bash benchmarks/gpu_session.sh 2     # speed: end-to-end decode (Llama-3-8B shape)
#   OUT=$OUT bash benchmarks/gpu_session.sh 3     # the rest of the decode table: GlowQ-S, int4, batch 8
#   OUT=$OUT bash benchmarks/gpu_session.sh 4     # issue 19: an 8B-shaped model quantized block by block
#
# Each step is meant to fit one device call of ~8 minutes; a step cut by its limit leaves its log to
# say how far it got. Timed on the H200 (2026-12-04): the W4A16 table took 190 s on its own.
#
# The device image has no optimum (glowq_fx imports it): carry its wheel. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl optimum==2.3.0
# then name ".whl" in the run's carry; wheels found in .whl are installed below.
set -uo pipefail
OUT=${OUT:?set OUT to the folder whose files come back}
PY=${GPU_PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT/results"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    >>"$OUT/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, note the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name rc=$? ${limit}s-limit $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
}

case ${1:-1} in
1)
    # Fourteen workers: Triton's compiles dominate and run on the host's 16 cores side by side. -v names
    # each result as it comes (a run stopped by its limit still says which tests failed); a test that
    # hangs is stopped by pytest-timeout (in the device image) and named. The CPU kernels' tests are
    # CI's, not this step's. On the H200 (2026-12-04) 223 of these 224 tests finished in 225 s.
    step gpu-test 270 $PY -m pytest -v -p no:cacheprovider -n 14 --dist worksteal --timeout 120 -rfE tests/kernels \
        tests/test_ops.py tests/backend tests/passes/test_rewrite.py --ignore=tests/kernels/test_triton_op_lowering.py \
        --ignore=tests/kernels/test_cpu_gemv.py --ignore=tests/kernels/test_cpu_int4.py \
        --ignore=tests/backend/test_cpu_lowering.py
    step triton-op 150 $PY -m pytest -v -p no:cacheprovider tests/kernels/test_triton_op_lowering.py -k default
    ;;
1w)
    step w4a16 240 $PY benchmarks/bench_w4a16.py --layers 32 --rows 1,4,16,2048 --out "$OUT/results"
    ;;
2)
    step decode 330 $PY benchmarks/bench_decode.py --models llama3-8b --batches 1 --prompts 512 --new-tokens 128 \
        --repeats 3 --variants float,W4A16,independent,GlowQ --out "$OUT/results/decode-main"
    ;;
3)
    step decode-rest 450 $PY benchmarks/bench_decode.py --models llama3-8b --batches 1,8 --prompts 512 \
        --new-tokens 128 --repeats 3 --variants float,W4A16,int4\ tinygemm,independent,GlowQ,GlowQ-S \
        --out "$OUT/results/decode-all"
    ;;
4)
    step quantize-8b 450 $PY benchmarks/bench_quantize_gpu.py --samples 32 --seq-len 2048 --out "$OUT/results"
    ;;
*)
    echo "unknown step ${1}: 1, 1w, 2, 3 or 4" >&2
    exit 2
    ;;
esac
