"""What a user's options cost on SmolLM2: BOS-started windows, the output head and the embedding
table quantized, 16-bit factors.

SmolLM2-135M (float32, tied embeddings), W4 asymmetric group 64, GlowQ rank 64, calibrated block
by block on 32 x 512 news tokens; perplexity on a prefix of the Wikipedia text in windows of
1024, scored twice: the GPTQ/GlowQ papers' protocol (windows cut from the stream, no BOS) and
lm-eval's (each window starts with the tokenizer's BOS token, for SmolLM2 ``<|im_start|>``,
id 1: its tokenizer adds none by default, so ``--bos auto`` is off for it). Rows:

- the float model and RTN alone;
- RTN + GlowQ and GPTQ + GlowQ calibrated without and with BOS-started windows;
- RTN + GlowQ with the factors in float32 (``factor_dtype="model"``) against the default
  bfloat16 (``"auto"`` for a float32 model);
- RTN + GlowQ with the output head quantized (its own correction) and, the weights being tied,
  the embedding table with it: one 4-bit table for both.

Every row gives the whole model's bytes (embeddings and everything left in float included).

    python benchmarks/bench_user_options.py            # writes benchmarks/results/user_options.{json,md}
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from glowq_fx import GlowQConfig, quantize_  # noqa: E402
from glowq_fx.data.batches import bos_token, text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.evaluation.perplexity import perplexity  # noqa: E402
from glowq_fx.quantize.api import model_bytes  # noqa: E402


def rows(group_size: int, rank: int) -> list[tuple[str, GlowQConfig | None, str]]:
    """(label, config or None for the float model, calibration BOS)."""
    glowq = dict(group_size=group_size, rank=rank, method="glowq")
    return [("float", None, "off"),
            ("RTN", GlowQConfig(group_size=group_size, method="none"), "off"),
            (f"RTN + GlowQ r{rank}", GlowQConfig(**glowq), "off"),
            (f"RTN + GlowQ r{rank}, calibrated with BOS", GlowQConfig(**glowq), "on"),
            (f"GPTQ + GlowQ r{rank}", GlowQConfig(**glowq, quantizer="gptq"), "off"),
            (f"GPTQ + GlowQ r{rank}, calibrated with BOS", GlowQConfig(**glowq, quantizer="gptq"), "on"),
            (f"RTN + GlowQ r{rank}, float32 factors", GlowQConfig(**glowq, factor_dtype="model"), "off"),
            (f"RTN + GlowQ r{rank}, head + tied embedding 4-bit", GlowQConfig(**glowq, quantize_output_head=True,
                                                                             embedding_bits=4), "off")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "user_options")
    ap.add_argument("--resume", action="store_true", help="keep the rows the JSON already has, run the others")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    tokens = tokenize(tokenizer, load_text("wikipedia"))
    bos = bos_token(tokenizer, "on")
    batches = {b: text_calibration_batches(tokenizer, "news", args.calib_samples, args.calib_len, bos=b)
               for b in ("off", "on")}
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
            "torch": torch.__version__, "model": "smollm2", "bos_token": tokenizer.convert_ids_to_tokens(bos),
            "bos_token_id": bos, "evaluated_tokens": int(min(tokens.numel(), args.max_tokens)),
            "seq_len": args.seq_len, "calibration": f"{args.calib_samples} x {args.calib_len} tokens of news",
            "quantization": f"W4 asymmetric group {args.group_size}", "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    if args.resume and args.out.with_suffix(".json").is_file():
        done = json.loads(args.out.with_suffix(".json").read_text())["rows"]
    kept = {r["label"] for r in done}

    def write() -> None:
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": done}, indent=1))
        float_bytes = next((r["model_bytes"] for r in done if r["label"] == "float"), None)
        lines = ["# Options on SmolLM2-135M: BOS, head and embedding, factor dtype (Wikipedia perplexity)", "",
                 f"`{meta['command']}`", "",
                 f"{meta['quantization']}; calibration {meta['calibration']}, block by block; perplexity over "
                 f"{meta['evaluated_tokens']:,} tokens in windows of {args.seq_len}, without a BOS (the papers' "
                 f"protocol) and with each window started by {meta['bos_token']!r} (id {bos}, lm-eval's protocol); "
                 f"{meta['machine']}, torch {meta['torch']}, {meta['date']}.", "",
                 "| model | ppl, no BOS | ppl, BOS-started | whole-model MB | vs float | factor MB | quantize s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in done:
            ratio = f"{r['model_bytes'] / float_bytes:.3f}" if float_bytes else ""
            lines.append(
                f"| {r['label']} | {r['ppl_no_bos']:.3f} | {r['ppl_bos']:.3f} | {r['model_bytes'] / 1e6:.1f} | "
                f"{ratio} | {r['factor_bytes'] / 1e6:.2f} | {r['quantize_s']:.0f} |"
            )
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    for label, config, calib_bos in rows(args.group_size, args.rank):
        if label in kept:
            continue
        subject, report, t0 = model, None, time.perf_counter()
        if config is not None:
            subject = copy.deepcopy(model)
            report = quantize_(subject, batches[calib_bos], config, progress=False)
        elapsed = time.perf_counter() - t0
        ppl = {b: perplexity(subject, tokens, args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                             bos=b, progress=False, desc=label).perplexity for b in (None, bos)}
        done.append(
            {
                "label": label,
                "config": None if config is None else config.to_dict(),
                "calibration_bos": calib_bos,
                "ppl_no_bos": ppl[None],
                "ppl_bos": ppl[bos],
                "model_bytes": model_bytes(subject),
                "factor_bytes": 0 if report is None else report.total("factor_bytes"),
                "quantize_s": elapsed,
                "windows_start_with_bos": None if report is None else report.calibration.get("windows_start_with_bos"),
            }
        )
        write()
        print(f"{label}: {ppl[None]:.3f} / {ppl[bos]:.3f} (BOS)", flush=True)
        del subject
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
