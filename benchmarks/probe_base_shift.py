"""Probe: GPTQ-based against RTN-based GlowQ, on the calibration text's domain and on Wikipedia.

The peers benchmark's target "GPTQ-based GlowQ at least matches RTN-based" held at g128 and not
at g64 r5 on Wikipedia (issue 32). This probe asks whether GPTQ-fitted codes under the correction
are worse, or better on the calibration text's own domain and worse away from it: for each base
quantizer, GlowQ at ``--group-size`` and ``--rank`` on SmolLM2 (the peers' calibration: 32 x 512
tokens of news), then

- the whitened calibration error before and after the correction (the report's ``tr(E S E^T)``,
  summed over the groups),
- the NLL on held-out news windows (other seeded offsets, never seen by the calibration),
- the perplexity on the first 8,192 Wikipedia tokens (windows of 1024, no BOS: the peers' harness),
- the fraction of block weights the dequantized codes reproduce exactly (SmolLM2's weights are a
  dequantized Q4_1 grid: does a base quantizer find it again at this group size?).

Each run prints one JSON line per base quantizer; ``--collect`` renders such lines (from one or
more runs) into ``benchmarks/results/base_shift.{json,md}``, keeping the reading notes written under
an earlier rendering's table. ``--gptq-damp``, ``--gptq-act-order`` and
``--gptq-shrink`` set the GPTQ bases' options.

    python benchmarks/probe_base_shift.py --group-size 64 --rank 5 > g64.jsonl
    python benchmarks/probe_base_shift.py --group-size 128 --rank 1 > g128.jsonl
    python benchmarks/probe_base_shift.py --collect g64.jsonl g128.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glowq_fx import GlowQConfig, quantize_  # noqa: E402
from glowq_fx.data.batches import text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.evaluation.perplexity import perplexity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "base_shift"


def exact_fraction(model, floats: dict[str, torch.Tensor]) -> float:
    """Fraction of the float block weights that the quantized modules' dequantized codes (the
    correction left out) reproduce to float32 rounding."""
    exact = total = 0
    for name, W in floats.items():
        D = model.get_submodule(name).dequantized_weight(torch.float32)
        exact += int(((D - W).abs() <= 1e-5 * W.abs().clamp_min(1e-3)).sum())
        total += W.numel()
    return exact / total


def probe(args) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    calibration = text_calibration_batches(tokenizer, "news", 32, 512, bos="off")
    held_out = text_calibration_batches(tokenizer, "news", args.held_out_samples, 512, seed=1, bos="off")
    stream = torch.cat([b["input_ids"] for b in held_out]).reshape(-1)
    wikipedia = tokenize(tokenizer, load_text("wikipedia"))
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n}
    for quantizer in args.quantizers.split(","):
        subject = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = quantize_(subject, calibration, GlowQConfig(group_size=args.group_size, rank=args.rank,
                                                             quantizer=quantizer, output_head_bits=None,
                                                             gptq_damp=args.gptq_damp,
                                                             gptq_act_order=args.gptq_act_order,
                                                             gptq_shrink=args.gptq_shrink),
                           progress=False)
        quantize_s = time.perf_counter() - t0
        print(json.dumps({
            "quantizer": quantizer, "group_size": args.group_size, "rank": args.rank, "quantize_s": quantize_s,
            "gptq_damp": args.gptq_damp, "gptq_act_order": args.gptq_act_order, "gptq_shrink": args.gptq_shrink,
            "calibration_error_before": sum(g.error_before for g in report.groups),
            "calibration_error_after": sum(g.error_after for g in report.groups),
            "exact_fraction": exact_fraction(subject, floats),
            "held_out_news_nll": perplexity(subject, stream, 512, progress=False).nll,
            "wikipedia_ppl": perplexity(subject, wikipedia, 1024, max_tokens=8192, progress=False).perplexity,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        }), flush=True)


def gptq_settings(row: dict) -> str:
    """A GPTQ base's damping, column order and shrink toward ``diag(S)`` (lines from before these
    options: the defaults)."""
    if "gptq" not in row["quantizer"]:
        return ""
    order = "act-order" if row.get("gptq_act_order", False) else "in order"
    shrink = row.get("gptq_shrink", 0.0)
    return f"damp {row.get('gptq_damp', 0.01):g}, {order}" + (f", shrink {shrink:g}" if shrink else "")


def reading_notes(md: Path) -> list[str]:
    """The lines after the table of an earlier rendering (the hand-written reading of the rows),
    kept when the table is rendered again; none for a first rendering."""
    if not md.exists():
        return []
    lines = md.read_text().splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    return lines[table[-1] + 1:] if table else []


def collect(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"no result lines in {', '.join(paths)}: run the probe first (its stdout)")
    notes = reading_notes(RESULTS.with_suffix(".md"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["# GPTQ-based against RTN-based GlowQ: the calibration domain and Wikipedia (smollm2)", "",
             "`python benchmarks/probe_base_shift.py --group-size G --rank R`, collected with `--collect`", "",
             f"{rows[0]['machine']}, torch {rows[0]['torch']}, {', '.join(sorted({r['date'] for r in rows}))}; "
             "calibration 32 x 512 tokens of news; held-out news: other windows of the same text; Wikipedia: "
             "8,192 tokens in windows of 1024, no BOS. Calibration error: tr(E S E^T) summed over the groups.", "",
             "| base | GPTQ settings | group | rank | calib. error before | after | held-out news NLL "
             "| Wikipedia ppl | weights reproduced |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {gptq_settings(r)} | {r['group_size']} | {r['rank']} "
                     f"| {r['calibration_error_before']:.1f} "
                     f"| {r['calibration_error_after']:.1f} | {r['held_out_news_nll']:.4f} | {r['wikipedia_ppl']:.3f} "
                     f"| {100 * r['exact_fraction']:.3f}% |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines + notes) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--quantizers", default="fitted,fitted-gptq")
    p.add_argument("--gptq-damp", type=float, default=0.01, help="GlowQConfig.gptq_damp (GPTQ bases only)")
    p.add_argument("--gptq-act-order", action="store_true", help="GlowQConfig.gptq_act_order (GPTQ bases only)")
    p.add_argument("--gptq-shrink", type=float, default=0.0, help="GlowQConfig.gptq_shrink (GPTQ bases only)")
    p.add_argument("--held-out-samples", type=int, default=16)
    p.add_argument("--collect", nargs="+", metavar="JSONL", help="render earlier runs' lines into results/")
    args = p.parse_args(argv)
    if args.collect:
        collect(args.collect)
    else:
        probe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
