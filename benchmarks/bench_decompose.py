"""Randomized SVD (member by member, and the paper's QR-reduced one) vs exact SVD of the stacked
whitened error, Llama-3-8B groups.

For q/k/v (4096 -> 4096, 1024, 1024) and gate/up (4096 -> 14336 x 2) with a synthetic ``S`` of
LLM-like spectrum (power-law eigenvalues in a random basis plus a few outlier channels) and
the RTN errors of random weights, one run measures:

- core time: the factorization alone, given the whitening (exact: SVD of ``E_cat H``;
  randomized: the sketch of ``E_cat H`` through member products, ``correction.decompose``;
  QR-reduced, the paper's: thin QR of ``E_cat``, then the same sketch on the d x d core ``R_e H``,
  lifted by ``Q_e``: the same ``A B`` in exact arithmetic);
- solve time: ``correction.decompose.solve`` end to end (whitening by float64 eigh included);
- residual: whitened error after correction, randomized over exact.

Rows: exact, randomized with our default sketch (oversample r/2 + 10), the paper's setting
(oversample 10), and the paper's QR-reduced algorithm with our sketch (core only: the solver does
not run it). Writes JSON and a markdown table to benchmarks/results/.

    python benchmarks/bench_decompose.py [--device cuda] [--rank 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from glowq_fx.correction.decompose import (
    default_oversample,
    factor_whitening,
    randomized_svd,
    scaled_lowrank,
    shrink,
    solve,
    whitened_error,
    whitening,
)
from glowq_fx.quant import quantization_error, quantize_rtn

GROUPS = {"q/k/v": (4096, [4096, 1024, 1024]), "gate/up": (4096, [14336, 14336])}


def synthetic_second_moment(d: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Power-law spectrum (lambda_i ~ i^-1.6) in a random basis, plus 4 outlier channels."""
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -1.6
    S = (basis * lam) @ basis.T
    outliers = torch.randperm(d, generator=gen)[:4]
    S[outliers, outliers] += 50 * lam[0]
    return S.to(device)


def synthetic_errors(d_in: int, outs: list[int], gen: torch.Generator, device: str) -> list[torch.Tensor]:
    errors = []
    for m in outs:
        W = torch.randn(m, d_in, generator=gen) * 0.02
        W[:, torch.randperm(d_in, generator=gen)[:8]] *= 10  # outlier input columns
        W = W.to(device=device, dtype=torch.bfloat16)
        errors.append(quantization_error(W, quantize_rtn(W, 128)))
    return errors


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (cuSOLVER handles, workspace)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def qr_reduced(E_cat: torch.Tensor, whitened, rank: int, oversample: int, generator: torch.Generator):
    """The paper's algorithm: ``E_cat = Q_e R_e``, the sketch on ``R_e H``, ``U = Q_e U'``; (A, B)."""
    Q_e, R_e = torch.linalg.qr(E_cat)
    U, s, Vh = randomized_svd(whitened.scale(R_e), rank, oversample=oversample, power_iters=2, generator=generator)
    root = s.sqrt()
    return (Q_e @ U) * root, whitened.unscale(root.unsqueeze(1) * Vh)


def run(device: str, rank: int, repeats: int, shrinkage: float, scale: int = 1) -> dict:
    """``scale`` divides every dimension (a quick smoke run); 1 gives the real 8B shapes."""
    gen = torch.Generator().manual_seed(0)
    rows, whitenings = [], []
    variants = {"exact": dict(mode="exact"), "randomized (ours)": dict(mode="randomized"),
                "randomized (paper: oversample 10)": dict(mode="randomized", oversample=10)}
    for name, (d_in, outs) in GROUPS.items():
        d_in, outs = d_in // scale, [m // scale for m in outs]
        S = synthetic_second_moment(d_in, gen, device)
        errors = synthetic_errors(d_in, outs, gen, device)
        E_cat = torch.cat(errors)
        S_a = shrink(S, shrinkage)
        whitened = factor_whitening(S_a, torch.float32)
        eigh_s, _ = timed(lambda: whitening(S_a), device, repeats)  # S^{1/2} and S^{-1/2}, as before
        factor_s, _ = timed(lambda: factor_whitening(S_a, torch.float32), device, repeats)
        whitenings.append(dict(group=name, d_in=d_in, eigh_s=eigh_s, factor_s=factor_s, kind=whitened.kind))
        results = {}
        for label, kw in variants.items():
            over = kw.get("oversample", default_oversample(rank))
            core_s, _ = timed(lambda: scaled_lowrank(
                [E.float() for E in errors], whitened, rank, mode=kw["mode"], oversample=over, power_iters=2,
                generator=torch.Generator(device=device).manual_seed(0)), device, repeats)
            solve_s, corr = timed(lambda: solve("glowq", errors, S, rank, shrinkage=shrinkage, **kw), device, repeats)
            results[label] = dict(core_s=core_s, solve_s=solve_s,
                                  error_after=corr.report.whitened_error_after,
                                  objective_after=corr.report.objective_after)
        over = default_oversample(rank)
        core_s, (A, B) = timed(lambda: qr_reduced(E_cat.float(), whitened, rank, over,
                                                 torch.Generator(device=device).manual_seed(0)), device, repeats)
        D = E_cat.float() - A @ B
        results["QR-reduced (paper's algorithm, our sketch)"] = dict(
            core_s=core_s, solve_s=float("nan"), error_after=whitened_error(D, S.float()),
            objective_after=whitened_error(D, S_a.float()))
        del D, A, B
        exact = results["exact"]
        for label, r in results.items():
            rows.append(dict(group=name, shape=f"{sum(outs)}x{d_in}", variant=label, **r,
                             core_speedup=exact["core_s"] / r["core_s"],
                             solve_speedup=exact["solve_s"] / r["solve_s"],
                             objective_ratio=r["objective_after"] / exact["objective_after"],
                             raw_ratio=r["error_after"] / exact["error_after"]))
        print(f"{name}: done", file=sys.stderr)
    return dict(
        rows=rows,
        whitenings=whitenings,
        rank=rank,
        shrinkage=shrinkage,
        repeats=repeats,
        device=device_name(device),
        torch=torch.__version__,
        triton=_triton_version(),
        python=platform.python_version(),
        command="python " + " ".join(sys.argv),
    )


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def to_markdown(res: dict) -> str:
    lines = [
        f"# Randomized vs exact SVD (rank {res['rank']}, shrinkage {res['shrinkage']})", "",
        f"Device: {res['device']}; torch {res['torch']}; triton {res['triton']}; "
        f"median of {res['repeats']} after a warm-up.", f"Command: `{res['command']}`", "",
        "| group | E_cat | variant | core s | core speedup | solve s | solve speedup "
        "| objective / exact | raw-S error / exact |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        solved = r["solve_s"] == r["solve_s"]  # nan: a core the solver does not run
        solve = f"{r['solve_s']:.3f} | {r['solve_speedup']:.1f}x" if solved else "- | -"
        lines.append(f"| {r['group']} | {r['shape']} | {r['variant']} | {r['core_s']:.3f} | {r['core_speedup']:.1f}x "
                     f"| {solve} | {r['objective_ratio']:.4f} | {r['raw_ratio']:.4f} |")
    lines += ["", "| group | d_in | S^{1/2} by float64 eigh (s) | the solver's factor (s) | factor | speedup |",
              "|---|---:|---:|---:|---|---:|"]
    lines += [f"| {w['group']} | {w['d_in']} | {w['eigh_s']:.3f} | {w['factor_s']:.3f} | {w['kind']} | "
              f"{w['eigh_s'] / w['factor_s']:.1f}x |" for w in res.get("whitenings", [])]
    lines += ["", "core: the factorization given the whitening factor; solve: decompose.solve end to end "
              "(the factorization of S and the error reports included, the same for every variant).",
              "objective: tr(D S_a D^T) with the shrunk S_a that the solver minimizes (exact SVD is "
              "optimal here); raw-S error: tr(D S D^T), what the output sees."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shrinkage", type=float, default=0.05)
    ap.add_argument("--scale", type=int, default=1, help="divide all shapes by this (smoke runs)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    res = run(args.device, args.rank, args.repeats, args.shrinkage, args.scale)
    tag = ("gpu" if args.device.startswith("cuda") else "cpu") + (f"_scale{args.scale}" if args.scale > 1 else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decompose_{tag}.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (args.out / f"decompose_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
