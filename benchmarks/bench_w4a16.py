"""W4A16 + low-rank correction kernels against bf16 cuBLAS and PyTorch's int4 kernel, on the GPU.

A stack of ``--layers`` (default 32) decoder layers of Llama-3-8B projection shapes with random
weights (distinct per layer, so nothing stays in L2): q/k/v (4096 -> 4096, 1024, 1024), o
(4096 -> 4096), gate/up (4096 -> 14336 x 2), down (14336 -> 4096). Rank-64 factors, group size
128, bfloat16 activations. Rows (each runs all projections of every layer):

- ``bf16``: ``F.linear``, cuBLAS.
- ``int4 tinygemm``: ``aten._weight_int4pack_mm`` (PyTorch's int4 kernel, same group size).
- ``ours W4A16``: ``glowq::w4a16_linear`` per member, no correction.
- ``ours W4A16 group``: ``glowq::w4a16_group``, one launch per group, no correction.
- ``indep unfused``: ours + ``(x B_i^T) A_i^T`` as two cuBLAS matmuls and an add per member.
- ``indep fused``: per member its own ``R_i = x B_i^T`` and the W4A16 kernel with ``A_i R_i``
  in the epilogue.
- ``GlowQ fused``: per group one ``R = x B^T`` (``glowq::shared_projection``: a Triton GEMV or
  cuBLAS, whichever the op measured faster on the shape) and one ``w4a16_group`` launch with
  every member's ``A_i R`` in its epilogue (what ``glowq_backend`` emits).
- ``GlowQ one launch``: at one row, ``R`` made inside the group's launch
  (``launch_w4a16_projected(one_launch=True)``, the form the op may choose); other rows as above.

Where an op has several kernels for a shape it times them once and keeps the fastest that agrees
with its verified path: one row, the split-K or the plain GEMV; 2-16 rows, the several-row GEMV or
the small-M GEMM; the projection, the Triton GEMV or cuBLAS. The JSON and the table list what was
chosen, per kind and row count.

Every row is captured once in a CUDA graph (launch overhead as in serving) and replayed; time
is per layer (stack time / layers). Bandwidth is the row's weight (+ factor) bytes over its time,
as a fraction of a device-to-device copy measured in the same run. Before timing, layer 0 of
every row is checked against a float32 reference. Writes JSON and a markdown table.

    python benchmarks/bench_w4a16.py [--layers 32] [--rows 1,4,16,512,2048] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glowq_fx import ops
from glowq_fx.kernels import launch
from glowq_fx.kernels.fastest_path import FASTEST
from glowq_fx.kernels.layout import dequantize_packed
from glowq_fx.kernels.timing import graph_time_ms

GROUPS = [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096]), ("gate_up", 4096, [14336, 14336]),
          ("down", 14336, [4096])]
GROUP_SIZE, RANK = 128, 64


def make_layer(gen, dev):
    """Random weights of one layer in every format the rows need."""
    layer = []
    for name, K, Ns in GROUPS:
        g = {"K": K, "B": (torch.randn(RANK, K, generator=gen, device=dev) * 0.02).to(torch.bfloat16), "members": []}
        for N in Ns:
            codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32, device=dev)
            scales = (torch.rand(K // GROUP_SIZE, N, generator=gen, device=dev) * 0.002 + 0.001).to(torch.bfloat16)
            zeros = torch.full((K // GROUP_SIZE, N), 8.0, device=dev).to(torch.bfloat16)
            words = codes.T.reshape(K // 8, 8, N).to(torch.int64) << (4 * torch.arange(8, device=dev)).view(1, 8, 1)
            words = words.sum(1)
            qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
            m = {"qweight": qweight.to(dev), "scales": scales.to(dev), "zeros": zeros.to(dev),
                 "A": (torch.randn(N, RANK, generator=gen, device=dev) * 0.02).to(torch.bfloat16),
                 "B_own": (torch.randn(RANK, K, generator=gen, device=dev) * 0.02).to(torch.bfloat16)}
            m["W"] = dequantize_packed(m["qweight"], m["scales"], m["zeros"], GROUP_SIZE, K, torch.bfloat16)
            # tinygemm: uint8 (N, K/2) of two codes, scales and zeros interleaved (K/gs, N, 2);
            # its dequantization is (q - 8) * s + zero_point, so zero_point = (8 - z) * s
            u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            m["tiny"] = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
            m["tiny_sz"] = torch.stack([m["scales"], (8 - m["zeros"]) * m["scales"]], dim=2).contiguous()
            g["members"].append(m)
        layer.append(g)
    return layer


def row_fns():
    def bf16(xs, layer):
        return [F.linear(x, m["W"]) for x, g in zip(xs, layer) for m in g["members"]]

    def tinygemm(xs, layer):
        return [torch.ops.aten._weight_int4pack_mm(x, m["tiny"], GROUP_SIZE, m["tiny_sz"])
                for x, g in zip(xs, layer) for m in g["members"]]

    def ours(xs, layer):
        return [ops.w4a16_linear(x, m["qweight"], m["scales"], m["zeros"], None, None, None)
                for x, g in zip(xs, layer) for m in g["members"]]

    def group_args(g, key):
        return [[m[k] for m in g["members"]] for k in ("qweight", "scales", "zeros")] + [
            [None] * len(g["members"]), [m["A"] for m in g["members"]] if key else [None] * len(g["members"])]

    def ours_group(xs, layer):
        return [y for x, g in zip(xs, layer) for y in ops.w4a16_group(x, *group_args(g, False), None)]

    def indep_unfused(xs, layer):
        return [ops.w4a16_linear(x, m["qweight"], m["scales"], m["zeros"], None, None, None)
                + F.linear(F.linear(x, m["B_own"]), m["A"]) for x, g in zip(xs, layer) for m in g["members"]]

    def indep_fused(xs, layer):
        return [ops.w4a16_linear(x, m["qweight"], m["scales"], m["zeros"], None, m["A"],
                                 ops.shared_projection(x, m["B_own"])) for x, g in zip(xs, layer) for m in g["members"]]

    def glowq(xs, layer):
        return [y for x, g in zip(xs, layer)
                for y in ops.w4a16_group(x, *group_args(g, True), ops.shared_projection(x, g["B"]))]

    def glowq_one_launch(xs, layer):  # R made inside the group's launch (one row only)
        if xs[0].shape[0] != 1:
            return glowq(xs, layer)
        return [y for x, g in zip(xs, layer)
                for y in launch.launch_w4a16_projected(x, *group_args(g, True)[:4], [m["A"] for m in g["members"]],
                                                       g["B"], one_launch=True)]

    return {"bf16 cuBLAS": bf16, "int4 tinygemm": tinygemm, "ours W4A16": ours, "ours W4A16 group": ours_group,
            "indep unfused": indep_unfused, "indep fused": indep_fused, "GlowQ fused": glowq,
            "GlowQ one launch": glowq_one_launch}


def reference(name, xs, layer):
    """float32 outputs of layer 0 for row ``name``."""
    out = []
    for x, g in zip(xs, layer):
        for m in g["members"]:
            y = x.float() @ m["W"].float().T
            if name in ("indep unfused", "indep fused"):
                y += (x.float() @ m["B_own"].float().T) @ m["A"].float().T
            elif name in ("GlowQ fused", "GlowQ one launch"):
                y += (x.float() @ g["B"].float().T) @ m["A"].float().T
            out.append(y)
    return out


def weight_bytes(name):
    total = 0
    for _, K, Ns in GROUPS:
        for N in Ns:
            total += N * K * 2 if name == "bf16 cuBLAS" else N * K // 2 + 2 * (K // GROUP_SIZE) * N * 2
            if name in ("indep unfused", "indep fused"):
                total += (N + K) * RANK * 2
            elif name in ("GlowQ fused", "GlowQ one launch"):
                total += N * RANK * 2
        if name in ("GlowQ fused", "GlowQ one launch"):
            total += K * RANK * 2
    return total


def copy_bandwidth():
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = graph_time_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() / (ms * 1e-3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", default="1,4,16,512,2048", help="token counts M")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--skip", default="", help="comma-separated row names to leave out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_w4a16 needs a CUDA GPU")
    import triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    layers = [make_layer(gen, "cuda") for _ in range(args.layers)]
    print(f"built {args.layers} layers in {time.time() - t0:.0f}s", flush=True)
    bw = copy_bandwidth()
    fns = {k: v for k, v in row_fns().items() if k not in args.skip.split(",")}
    Ms = [int(m) for m in args.rows.split(",")]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
               "layers": args.layers, "rank": RANK, "group_size": GROUP_SIZE, "copy_bandwidth_GBps": bw / 1e9,
               "rows": {}}
    for M in Ms:
        xs = [torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16) for _, K, _ in GROUPS]
        for name, fn in fns.items():
            if name == "int4 tinygemm" and M > 64:
                n_layers = 1  # tinygemm takes tens of ms per layer at prefill sizes
            else:
                n_layers = args.layers
            outs = fn(xs, layers[0])
            refs = reference(name, xs, layers[0])
            err = max(float((o.float() - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs))
            ms = graph_time_ms(lambda: [fn(xs, layer) for layer in layers[:n_layers]], 10 if M <= 16 else 3)
            us = ms * 1e3 / n_layers
            entry = {"us_per_layer": us, "layers_timed": n_layers, "max_rel_error": err,
                     "bandwidth_fraction": weight_bytes(name) / (us * 1e-6) / bw}
            results["rows"].setdefault(name, {})[M] = entry
            print(f"M={M:5d} {name:18s} {us:9.1f} us/layer  bw {entry['bandwidth_fraction']:.2f}  err {err:.1e}",
                  flush=True)
            if err > 2e-2:
                print(f"  !! {name} at M={M}: relative error {err:.2e} exceeds 2e-2", flush=True)
    results["chosen_paths"] = chosen_paths()
    write(results, Path(args.out))


def chosen_paths(chosen: dict[tuple, str] | None = None):
    """{"kind M=rows": {path: how many shapes chose it}} from the launchers' per-shape choices
    (``FASTEST.chosen()`` by default); the GEMV keys carry no row count (one row)."""
    counts = {}
    for key, path in (FASTEST.chosen() if chosen is None else chosen).items():
        kind = key[0] if key[0] == "gemv" else f"{key[0]} M={key[3]}"
        counts.setdefault(kind, {}).setdefault(path, 0)
        counts[kind][path] += 1
    return counts


def write(results, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "w4a16_gpu.json").write_text(json.dumps(results, indent=1))
    rows = results["rows"]
    Ms = sorted({m for r in rows.values() for m in r})
    base = rows.get("bf16 cuBLAS", {})
    plain = rows.get("ours W4A16 group", {})
    lines = [f"# W4A16 + low-rank kernels, Llama-3-8B projection shapes ({results['layers']} layers)", "",
             f"{results['device']}, torch {results['torch']}, triton {results['triton']}; rank {results['rank']}, "
             f"group size {results['group_size']}, bf16; copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s "
             "(read + write). Command: `" + results["command"] + "`", "",
             "Microseconds per layer (all 7 projections), CUDA-graph replay; `bw` = weight bytes / time as a "
             "fraction of the copy bandwidth; `x bf16` = bf16 time / row time; `vs plain` = row time / "
             "`ours W4A16 group` time.", "",
             "| row | " + " | ".join(f"M={m}" for m in Ms) + " |", "|---|" + "---|" * len(Ms)]
    for name, r in rows.items():
        cells = []
        for m in Ms:
            e = r.get(m)
            if e is None:
                cells.append("")
                continue
            cell = f"{e['us_per_layer']:.1f} us, bw {e['bandwidth_fraction']:.2f}"
            if m in base:
                cell += f", {base[m]['us_per_layer'] / e['us_per_layer']:.2f}x bf16"
            if m in plain and name != "ours W4A16 group":
                cell += f", {e['us_per_layer'] / plain[m]['us_per_layer']:.3f} vs plain"
            if e["layers_timed"] != results["layers"]:
                cell += f" ({e['layers_timed']} layer)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    chosen = results.get("chosen_paths", {})
    if chosen:
        lines += ["", "Kernels the ops chose (shapes per path): " + "; ".join(
            f"{kind}: " + ", ".join(f"{path} {n}" for path, n in sorted(paths.items()))
            for kind, paths in sorted(chosen.items())) + "."]
    (out / "w4a16_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
