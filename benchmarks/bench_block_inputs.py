"""Which activations feed the next block: the float block's outputs or the quantized block's.

SmolLM2-135M, W4 asymmetric group 64, rank 64, calibrated block by block on 32 x 512 news tokens,
perplexity on a prefix of the Wikipedia text (the accuracy table's protocol). For RTN + GlowQ,
GPTQ + GlowQ and GPTQ alone, once with each ``GlowQConfig.block_inputs``. RTN alone uses no
statistics, so it is one row. With float inputs the rows equal the whole-model pass
(``benchmarks/results/accuracy.md``).

    python benchmarks/bench_block_inputs.py                       # 65,536 tokens, windows of 1024

Writes benchmarks/results/block_inputs.{json,md} (after every row).
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

from glowq_fx import GlowQConfig  # noqa: E402
from glowq_fx.data.batches import text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.studies.accuracy import AccuracyRow, Method, accuracy_table, compare_methods, fill_gap_closed  # noqa: E402


def methods(group_size: int, rank: int) -> list[Method]:
    rows = [Method("reference", None), Method("RTN", GlowQConfig(group_size=group_size, method="none"))]
    for label, kw in (("GPTQ", dict(method="none", quantizer="gptq")),
                      (f"RTN + GlowQ r{rank}", dict(method="glowq")),
                      (f"GPTQ + GlowQ r{rank}", dict(method="glowq", quantizer="gptq"))):
        for feed in ("float", "quantized"):
            rows.append(Method(f"{label}, {feed} inputs", GlowQConfig(group_size=group_size, rank=rank,
                                                                       calibration="blocks", block_inputs=feed, **kw)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "block_inputs")
    ap.add_argument("--resume", action="store_true", help="keep the rows the JSON already has, run the others")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    tokens = tokenize(tokenizer, load_text("wikipedia"))
    batches = text_calibration_batches(tokenizer, "news", args.calib_samples, args.calib_len)
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
            "torch": torch.__version__, "model": "smollm2",
            "evaluated_tokens": int(min(tokens.numel(), args.max_tokens)), "seq_len": args.seq_len,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens of news, block by block",
            "quantization": f"W4 asymmetric group {args.group_size}", "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows) -> None:
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": [r.to_dict() for r in rows]}, indent=1))
        lines = ["# Block inputs: float or quantized (SmolLM2-135M, Wikipedia text)", "", f"`{meta['command']}`", "",
                 f"{meta['quantization']}, rank {args.rank}; calibration {meta['calibration']}; perplexity over "
                 f"{meta['evaluated_tokens']:,} tokens, windows of {args.seq_len}; {meta['machine']}, torch "
                 f"{meta['torch']}, {meta['date']}. Quantize s includes the calibration (each row runs its own).", "",
                 "| method | perplexity | RTN gap closed % | quantize s |", "|---|---:|---:|---:|"]
        lines += [f"| {r.label} | {r.perplexity:.3f} | {'' if r.gap_closed is None else f'{r.gap_closed:.1f}'} | "
                  f"{r.quantize_time_s:.1f} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    done: list[AccuracyRow] = []
    if args.resume and args.out.with_suffix(".json").is_file():
        done = [AccuracyRow(**r) for r in json.loads(args.out.with_suffix(".json").read_text())["rows"]]
    kept = {r.label for r in done}

    def finished(row: AccuracyRow) -> None:
        done.append(row)
        fill_gap_closed(done)
        write(done)
        print(f"{row.label}: {row.perplexity:.3f}", flush=True)

    compare_methods(model, tokens, batches, [m for m in methods(args.group_size, args.rank) if m.label not in kept],
                    seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size, on_row=finished)
    print(accuracy_table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
