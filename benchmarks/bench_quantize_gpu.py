"""Quantize an 8B-shaped model block by block on the GPU with its weights on the CPU: wall time
and peak GPU memory, and what that projects to for a 70B-shaped model (issue 19, point 8).

A Llama-3-8B-shaped ``LlamaForCausalLM`` (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab
128256) in bf16 with random weights (drawn on the GPU, kept on the CPU) is quantized by
``quantize_(model, batches, GlowQConfig(group_size=128, rank=64), device="cuda")``: every block
moves to the GPU, is calibrated on ``--samples`` x ``--seq-len`` random tokens, quantized and
solved, and moves back. Reported: wall time, per-block time by part, and the peak GPU memory
(``torch.cuda.max_memory_allocated``, from a reset just before the call); target: under 24 GB,
so that an 8B model quantizes on a consumer GPU.

The 70B figures are projections, not measurements: per block, the memory that scales with the
block (its bf16 weights, its float32 ``S``, the solve's float32 factor of the widest ``S``) is
scaled by the 70B / 8B ratio of those sizes, the cached activations by the width, and the time
per block by the ratio of the block's weights (calibration forwards and the quantizer scale with
them; the solve with the widest ``S``'s cube, reported apart).

    python benchmarks/bench_quantize_gpu.py [--layers 32] [--samples 32] [--seq-len 2048] [--out DIR]
    python benchmarks/bench_quantize_gpu.py --tiny   # a small float32 model on the CPU: checks the code path
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import transformers as T  # noqa: E402

from glowq_fx import GlowQConfig, quantize_  # noqa: E402

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2),
}


def block_sizes(shape: dict) -> dict:
    """Bytes of one block's bf16 weights, its groups' float32 ``S`` and the widest ``S``'s
    float32 factor (what the solve holds), from the shape."""
    H, I, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    d = H // heads
    weights = 2 * (H * H + 2 * H * kv * d + H * H + 3 * H * I)
    S = 4 * (3 * H * H + I * I)  # q/k/v, o and gate/up read H; down reads I
    return {"weights": weights, "S": S, "factor": 4 * max(H, I) ** 2, "hidden": H, "widest": max(H, I)}


def random_model(shape: dict, layers: int | None, dtype: torch.dtype, draw_on: str) -> torch.nn.Module:
    """The model on the CPU, its weights drawn on ``draw_on`` (N(0, 0.02); norms 1) and copied back:
    drawing 8B values on the GPU takes seconds, on the CPU minutes."""
    config = T.LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})},
                           max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator(device=draw_on).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=dtype, device=draw_on).normal_(0, 0.02, generator=gen))
    for name, module in list(model.named_modules()):  # rotary frequencies: a fresh module computes them
        if hasattr(module, "inv_freq"):
            parent, _, child = name.rpartition(".")
            with torch.device("cpu"):
                setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=config))
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (a quicker check)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="a small float32 model on the CPU: checks the code path")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results (with --tiny: nowhere)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("this benchmark measures the GPU: run it on a CUDA machine (or --tiny on the CPU)")
    device, dtype, shape = ("cpu", torch.float32, SHAPES["tiny"]) if args.tiny else ("cuda", torch.bfloat16,
                                                                                     SHAPES["8b"])
    t0 = time.perf_counter()
    model = random_model(shape, args.layers, dtype, device)
    built_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, shape["vocab_size"], (1, args.seq_len), generator=gen)}
               for _ in range(args.samples)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    group_size = 32 if args.tiny else 128
    report = quantize_(model, batches, GlowQConfig(group_size=group_size, rank=args.rank, calibration="blocks"),
                       device=device, progress=True)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    calib = report.calibration
    times = calib["times"]
    n = len(times["forward_s"])
    per_block = {"forwards_s": sum(times["forward_s"]) / n, "S_s": sum(times["statistics_s"]) / n,
                 "quantizer_s": sum(times["quantize_s"]) / n, "solve_s": sum(times["solve_s"]) / n}
    measured, big = block_sizes(shape), block_sizes(SHAPES["70b"])
    activations = calib.get("activation_bytes", 0)
    row = {"shape": "8B" if not args.tiny else "tiny", "layers": n, "samples": args.samples, "seq_len": args.seq_len,
           "rank": args.rank, "build_s": built_s, "wall_s": wall, "per_block": per_block,
           # the recording pass (the model where it is, its blocks stubbed), the captures (each block's on the
           # GPU), the first block's inputs
           "outside_blocks_s": wall - n * (per_block["forwards_s"] + per_block["quantizer_s"] + per_block["solve_s"]),
           "peak_gpu_bytes": peak, "activation_bytes": activations, "activations_on": calib.get("activations"),
           "block_sizes": measured, "dtype": str(dtype).removeprefix("torch."), "group_size": group_size,
           "quantized": type(model.model.layers[0].self_attn.q_proj).__name__,
           "weights_after_on": str(next(model.parameters()).device)}
    if peak is not None:
        scaled = {k: measured[k] for k in ("weights", "S", "factor")}
        rest = max(peak - sum(scaled.values()) - activations, 0)
        row["projection_70b"] = {
            "peak_gpu_bytes": sum(big[k] for k in scaled) + activations * big["hidden"] / measured["hidden"] + rest,
            "wall_s": SHAPES["70b"]["num_hidden_layers"] * (
                (per_block["forwards_s"] + per_block["quantizer_s"]) * big["weights"] / measured["weights"]
                + per_block["solve_s"] * (big["widest"] / measured["widest"]) ** 3),
            "how": "block sizes from the shapes; time: forwards and quantizer by weight bytes, solve by widest S cubed"}
    meta = {
        "command": "python benchmarks/bench_quantize_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU (smoke run)",
        "torch": torch.__version__,
        "transformers": T.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "row": row,
    }
    print(json.dumps(row, indent=1), flush=True)
    out = args.out if args.out is not None or args.tiny else Path(__file__).parent / "results"
    if out is not None:
        write(meta, out)
    return 0


def write(meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_gpu.json").write_text(json.dumps(meta, indent=1))
    r = meta["row"]
    gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"  # noqa: E731
    lines = ["# Block-by-block quantization on the GPU, weights on the CPU", "",
             f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}. "
             f"{r['shape']}-shaped Llama, {r['layers']} layers, {r['dtype']} random weights (on "
             f"{r['weights_after_on']} after quantizing); {r['samples']} x {r['seq_len']} calibration tokens; GlowQ "
             f"rank {r['rank']}, W4 g{r['group_size']}. Command: `{meta['command']}`", "",
             "| model | wall s | per block s (forwards / of them S / quantizer / solve) | peak GPU GiB |",
             "|---|---:|---|---:|",
             f"| {r['shape']} (measured) | {r['wall_s']:.0f} | {r['per_block']['forwards_s']:.2f} / "
             f"{r['per_block']['S_s']:.2f} / {r['per_block']['quantizer_s']:.2f} / {r['per_block']['solve_s']:.2f} | "
             f"{gib(r['peak_gpu_bytes'])} |"]
    if "projection_70b" in r:
        lines.append(f"| 70B (projected) | {r['projection_70b']['wall_s']:.0f} | - | "
                     f"{gib(r['projection_70b']['peak_gpu_bytes'])} |")
        lines += ["", f"Projection: {r['projection_70b']['how']}."]
    lines += ["", f"Cached block inputs: {gib(r['activation_bytes'])} GiB on {r['activations_on']}. Outside the blocks "
              f"(the recording pass and the capture outside the blocks, run where the model is; each block's "
              f"capture; the first block's inputs): "
              f"{r['outside_blocks_s']:.0f} s."]
    (out / "quantize_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
