"""The ``triton_op`` lowering reproduction (issue 21, point 4): each case of ``triton_op_cases.py``
compiled by Inductor in its own process, on the GPU. A case that crashes or disagrees fails with
its output. On the CPU only the cases' eager ops run (in Triton's interpreter), which checks that
the reproduction itself is sound."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("triton_op_cases.py")
_spec = importlib.util.spec_from_file_location("triton_op_cases", SCRIPT)
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
CASES = _cases.CASES


def _run(*args: str, timeout: int = 600) -> tuple[int, str]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    return done.returncode, (done.stdout + done.stderr)[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the eager check is the CPU stand-in for the GPU runs")
@pytest.mark.parametrize("case", ["add", "gemv", "split_k", "gemv_projected", "experts"])
def test_cases_run_eagerly_in_the_interpreter(case):
    rc, out = _run(case, "--eager-only")
    assert rc == 0, out
    assert json.loads(out.strip().splitlines()[-1])["eager_finite"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor lowers user Triton kernels for GPUs only")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("case", CASES)
def test_triton_op_lowered_by_inductor_agrees_with_eager(case, mode):
    rc, out = _run(case, "--mode", mode)
    if rc < 0:
        pytest.fail(f"{case} ({mode}) crashed the process (signal {-rc}):\n{out}")
    assert rc == 0, f"{case} ({mode}):\n{out}"
