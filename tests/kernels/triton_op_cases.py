"""Cases for bisecting the Inductor lowering of our launches as ``triton_op``s (issue 21, point 4).

The ops are opaque ``custom_op``s because, on the H100 (torch 2.11, triton 3.6), the
Inductor-lowered ``triton_op`` form of these launches crashed the process. Each case here
registers a ``triton_op`` in the ``glowq_bisect`` namespace whose body is one of our launches
(``glowq_fx.kernels.launch``) with its path forced (the run-time timing of ``FASTEST`` cannot run
under tracing), compiles a function that calls it with Inductor, and compares the compiled
output with the eager op's (the launches the kernel tests verify). Dimensions: the kernel path
(``CASES``), the compile mode, and ``--single-config`` (each autotuned kernel cut to its first
configuration: is it the autotuner's lowering?). One case per process, so a crash ends only it:

    python tests/kernels/triton_op_cases.py CASE [--mode default|reduce-overhead] [--single-config]
    python tests/kernels/triton_op_cases.py CASE --eager-only   # the case's eager op alone (CPU: interpreter)

Prints one JSON line; exits 0 when compiled and eager agree, 1 when they do not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.library import triton_op, wrap_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16
K, NS, RANK, GROUP_SIZE, EXPERTS = 512, (256, 128), 16, 128, 4


@triton.jit
def _add_kernel(X, Y, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(OUT + offs, tl.load(X + offs, mask=mask) + tl.load(Y + offs, mask=mask), mask=mask)


def _group_op(name: str, **path):
    from glowq_fx.kernels.launch import launch_w4a16

    @triton_op(f"glowq_bisect::{name}", mutates_args=())
    def op(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Tensor],
           biases: list[Optional[Tensor]], As: list[Optional[Tensor]], R: Optional[Tensor]) -> list[Tensor]:
        return launch_w4a16(x, qweights, scales, zeros, biases, As, R, **path)

    return op


def _members(gen, bias: bool, rank: int = RANK):
    from tests_helpers import packed_member

    members = [packed_member(N, K, GROUP_SIZE, DTYPE, rank, bias, gen, DEVICE) for N in NS]
    return [[m[i] for m in members] for i in range(5)]  # qweights, scales, zeros, biases, As


def build(case: str):
    """(op, its arguments) of ``case``."""
    gen = torch.Generator().manual_seed(0)

    def rows(m):
        return torch.randn(m, K, generator=gen).to(device=DEVICE, dtype=DTYPE)

    def projection(x):
        return (torch.randn(x.shape[0], RANK, generator=gen) * 0.1).to(device=DEVICE, dtype=DTYPE)

    if case == "add":  # the control: a one-pointer kernel, nothing of ours
        @triton_op("glowq_bisect::add", mutates_args=())
        def add(x: Tensor, y: Tensor) -> Tensor:
            out = torch.empty_like(x)
            wrap_triton(_add_kernel)[(triton.cdiv(x.numel(), 256),)](x, y, out, x.numel(), BLOCK=256)
            return out

        x = torch.randn(1000, generator=gen).to(DEVICE)
        return add, (x, torch.randn(1000, generator=gen).to(DEVICE))
    paths = {
        "gemv": (1, dict(split_k=False), False),
        "gemv_bias": (1, dict(split_k=False), True),
        "split_k": (1, dict(split_k=True), False),
        "rows_gemv": (4, dict(rows_gemv=True), False),
        "small_m_gemm": (4, dict(rows_gemv=False), False),
        "gemm": (64, {}, False),
        "prefill": (256, {}, True),
    }
    if case in paths:
        m, path, bias = paths[case]
        x = rows(m)
        return _group_op(case, **path), (x, *_members(gen, bias), projection(x))
    if case == "gemv_projected":  # R made inside the GEMV's launch (atomic tickets, a bounded wait)
        from glowq_fx.kernels.launch import launch_w4a16_projected

        @triton_op("glowq_bisect::gemv_projected", mutates_args=())
        def projected(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Tensor],
                      biases: list[Optional[Tensor]], As: list[Tensor], B: Tensor) -> list[Tensor]:
            return launch_w4a16_projected(x, qweights, scales, zeros, biases, As, B, one_launch=True)

        x = rows(1)
        return projected, (x, *_members(gen, True), (torch.randn(RANK, K, generator=gen) * 0.05).to(DEVICE, DTYPE))
    if case == "projection":
        from glowq_fx.kernels.launch import launch_projection

        @triton_op("glowq_bisect::projection", mutates_args=())
        def proj(x: Tensor, B: Tensor) -> Tensor:
            return launch_projection(x, B, kernel=True)

        return proj, (rows(1), (torch.randn(RANK, K, generator=gen) * 0.05).to(device=DEVICE, dtype=DTYPE))
    if case == "experts":
        from glowq_fx.kernels.launch import launch_w4a16_experts
        from tests_helpers import packed_member

        @triton_op("glowq_bisect::experts", mutates_args=())
        def experts(x: Tensor, offsets: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, A: Tensor,
                    R: Tensor) -> Tensor:
            return launch_w4a16_experts(x, offsets, qweight, scales, zeros, None, A, R)

        stacked = [packed_member(NS[0], K, GROUP_SIZE, DTYPE, RANK, False, gen, DEVICE) for _ in range(EXPERTS)]
        qweight, scales, zeros, _, A = (torch.stack([m[i] for m in stacked]) if i != 3 else None for i in range(5))
        x = rows(24)
        offsets = torch.tensor([5, 5, 17, 24], device=DEVICE)
        return experts, (x, offsets, qweight, scales, zeros, A, projection(x))
    raise SystemExit(f"unknown case {case!r}: choose from {CASES}")


CASES = ("add", "gemv", "gemv_bias", "split_k", "gemv_projected", "rows_gemv", "small_m_gemm", "gemm", "prefill",
         "projection", "experts")


def _single_config() -> None:
    """Cut every autotuned kernel to its first configuration, in place of the module's kernels."""
    from glowq_fx.kernels import projection, w4a16, w4a16_experts

    for module in (w4a16, projection, w4a16_experts):
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.autotuner.Autotuner):
                setattr(module, name, triton.autotune(configs=value.configs[:1], key=value.keys)(value.fn))


def relative_error(got, want) -> float:
    got, want = (
        (got if isinstance(got, (list, tuple)) else [got]),
        (want if isinstance(want, (list, tuple)) else [want]),
    )
    return max(float((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)) for g, w in zip(got, want))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=CASES)
    p.add_argument("--mode", default="default", choices=("default", "reduce-overhead"))
    p.add_argument("--single-config", action="store_true")
    p.add_argument("--eager-only", action="store_true")
    args = p.parse_args(argv)
    if args.single_config:
        _single_config()
    op, inputs = build(args.case)
    want = op(*inputs)
    result = {
        "case": args.case,
        "mode": args.mode,
        "single_config": args.single_config,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
    }
    if args.eager_only:
        result["eager_finite"] = all(
            bool(torch.isfinite(t).all()) for t in (want if isinstance(want, list) else [want])
        )
        print(json.dumps(result), flush=True)
        return 0 if result["eager_finite"] else 1
    compiled = torch.compile(lambda *a: op(*a), mode=None if args.mode == "default" else args.mode, fullgraph=True)
    got = compiled(*inputs)
    got = compiled(*inputs)  # a second call: the replay under CUDA graphs
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    result["relative_error"] = relative_error(got, want)
    result["agree"] = result["relative_error"] < 1e-2
    print(json.dumps(result), flush=True)
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
