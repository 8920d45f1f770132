"""Accuracy table: SmolLM2-135M on Wikipedia text, calibrated on news text, W4 group 64.

One calibration run (``calibrate``) serves every row; each row quantizes a fresh copy of the
model and measures perplexity with the WikiText-2 protocol (``glowq_fx.evaluation.perplexity``). Rows:
reference, RTN, GPTQ, RTN + plain SVD, + LQER, + independent QERA-exact, + GlowQ rank 64 and 32,
GPTQ + GlowQ, and GlowQ at the rank whose factor bytes match independent QERA at rank 64.

    python benchmarks/bench_accuracy.py                       # full text, seq_len 2048
    python benchmarks/bench_accuracy.py --seq-len 1024 --max-tokens 65536   # a CPU-sized prefix

Writes benchmarks/results/accuracy.{json,md} (after every row, so a stopped run keeps its rows)
and accuracy.png (perplexity against correction bytes).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from glowq_fx import GlowQConfig, calibrate  # noqa: E402
from glowq_fx.data.batches import text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.studies.accuracy import (  # noqa: E402
    Method,
    accuracy_table,
    compare_methods,
    equal_memory_rank,
    factor_bytes,
    plot_perplexity_vs_bytes,
)


def methods(groups, group_size: int, rank: int) -> list[Method]:
    base = dict(group_size=group_size, rank=rank)
    eq_rank = equal_memory_rank(groups, factor_bytes(groups, "qera", rank))
    return [
        Method("reference (dequantized GGUF)", None),
        Method("RTN", GlowQConfig(**base, method="none")),
        Method("GPTQ", GlowQConfig(**base, method="none", quantizer="gptq")),
        Method(f"RTN + SVD r{rank}", GlowQConfig(**base, method="svd")),
        Method(f"RTN + LQER r{rank}", GlowQConfig(**base, method="lqer")),
        Method(f"RTN + QERA-exact r{rank} (independent)", GlowQConfig(**base, method="qera")),
        Method(f"RTN + GlowQ r{rank}", GlowQConfig(**base, method="glowq")),
        Method(f"RTN + GlowQ r{rank // 2}", GlowQConfig(group_size=group_size, rank=rank // 2, method="glowq")),
        Method(f"GPTQ + GlowQ r{rank}", GlowQConfig(**base, method="glowq", quantizer="gptq")),
        Method(f"RTN + GlowQ r{eq_rank} (= QERA r{rank} bytes)",
               GlowQConfig(group_size=group_size, rank=eq_rank, method="glowq")),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="wikipedia")
    ap.add_argument("--calib-text", default="news")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate a prefix of the text (default: all)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--only", action="append", default=[], help="run rows whose label contains this (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "accuracy")
    args = ap.parse_args(argv)
    if args.group_size == 32:
        sys.exit("group 32 is meaningless on SmolLM2: its GGUF weights already lie on a group-32 grid")

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    tokens = tokenize(tokenizer, load_text(args.text))
    batches = text_calibration_batches(tokenizer, args.calib_text, args.calib_samples, args.calib_len)
    config = GlowQConfig(group_size=args.group_size, rank=args.rank)
    calibrated = calibrate(model, batches, config)
    specs = [m for m in methods(calibrated.groups, args.group_size, args.rank)
             if not args.only or m.config is None or any(s in m.label for s in args.only)
             or (m.config.method == "none" and m.config.quantizer == "rtn")]
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": args.model, "text": args.text, "text_tokens": int(tokens.numel()),
        "evaluated_tokens": int(min(tokens.numel(), args.max_tokens or tokens.numel())),
        "seq_len": args.seq_len, "calibration": f"{args.calib_samples} x {args.calib_len} tokens of {args.calib_text}",
        "calibration_time_s": calibrated.time_s, "groups": len(calibrated.groups),
        "linears": sum(len(g.members) for g in calibrated.groups),
        "quantization": f"W4 asymmetric group {args.group_size}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows) -> None:
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": [r.to_dict() for r in rows]}, indent=1))
        lines = [f"# Accuracy: {args.model} on {args.text}", "",
                 f"`{meta['command']}`", "",
                 f"{meta['quantization']}; calibration {meta['calibration']} ({meta['calibration_time_s']:.0f} s, "
                 f"shared by every row); perplexity over {meta['evaluated_tokens']:,} of {meta['text_tokens']:,} "
                 f"tokens, windows of {args.seq_len}; {meta['groups']} groups / {meta['linears']} linears; "
                 f"{meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}.", "",
                 "| method | perplexity | RTN gap closed % | correction MB (fp16) | quantize s |",
                 "|---|---:|---:|---:|---:|"]
        for r in rows:
            gap = "" if r.gap_closed is None else f"{r.gap_closed:.1f}"
            lines.append(f"| {r.label} | {r.perplexity:.3f} | {gap} | {r.factor_bytes / 2**20:.2f} | "
                         f"{r.quantize_time_s:.1f} |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    done = []
    rows = compare_methods(model, tokens, calibrated, specs, seq_len=args.seq_len, max_tokens=args.max_tokens,
                           batch_size=args.batch_size,
                           on_row=lambda r: (done.append(r), write(done), print(f"{r.label}: {r.perplexity:.3f}",
                                                                                  flush=True)))
    write(rows)
    plot_perplexity_vs_bytes(rows, args.out.with_suffix(".png"),
                             f"{args.model}, W4 g{args.group_size}, {meta['evaluated_tokens']:,} tokens of {args.text}")
    print(accuracy_table(rows))
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
