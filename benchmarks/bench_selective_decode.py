"""GlowQ-S decode throughput at batch 1: an 8B-shaped Llama, compiled with glowq_backend.

Issue 6's GPU target: GlowQ-S at least 1.3x the decode throughput of independent per-linear
correction (the paper reports +37.4%). Shapes decide throughput, not values, so the model is a
Llama-3-8B-shaped ``LlamaForCausalLM`` (``--layers`` of 32, hidden 4096, MLP 14336, 32/8 heads,
vocab 128256) with random weights, quantized by ``quantize_`` itself from one random
calibration batch (one ``calibrate``, reused by every variant), W4 g128, rank 64, bf16:

- ``bf16``: the unquantized model;
- ``W4A16``: no correction (``method="none"``);
- ``independent``: QERA, one ``B_i`` / ``A_i`` per linear;
- ``GlowQ``: one ``B`` per input-sharing group;
- ``GlowQ-S``: GlowQ with ``selective=--keep`` (a fraction of the groups, best first);
- ``GlowQ rank --compare-rank``: every group at a lower rank, the other way to cut the
  correction's cost (on SmolLM2 it wins at equal bytes, GlowQ-S at equal CPU latency;
  ``benchmarks/results/selective.md``). Here: which wins at equal GPU decode throughput.

Each variant: ``model.forward`` compiled with ``glowq_backend`` and ``mode="reduce-overhead"`` (CUDA
graphs), ``generate()`` greedy with a static cache kept across calls and transformers' auto-
compilation off (``bench_decode.Decoder``). Decode time = from the first new token on the host to
the last, median of ``--repeats``; throughput = (new tokens - 1) / decode time. Checked first: the
compiled model's greedy tokens agree with the eager ones (bf16 kernels may flip near-ties on random
weights, so the agreement fraction is printed and must exceed 0.8). Writes JSON and a markdown
table.

python benchmarks/bench_selective_decode.py [--layers 32] [--keep 0.5] [--compare-rank 16] [--out
DIR] python benchmarks/bench_selective_decode.py --tiny # CPU smoke run of the same code"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers as T  # noqa: E402
from bench_decode import Decoder, _triton_version, model_config, random_model  # noqa: E402

from glowq_fx import GlowQConfig, calibrate, quantize_  # noqa: E402
from glowq_fx.backend import glowq_backend  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5, help="GlowQ-S: fraction of the groups kept")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--compare-rank", type=int, default=16, help="every group at this rank (0: leave the row out)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=65)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a small float32 model on the CPU: checks the code path")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not 0 <= args.compare_rank < args.rank:
        raise SystemExit(f"--compare-rank must lie in [0, --rank={args.rank}), got {args.compare_rank}")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("this benchmark times the GPU kernels: run it on a CUDA machine (or --tiny on the CPU)")
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    group_size = 32 if args.tiny else 128
    torch.manual_seed(0)
    base = random_model(model_config("llama3-8b", args.tiny, args.layers), dtype, device, seed=0)
    gen = torch.Generator(device=device).manual_seed(1)
    vocab = base.config.vocab_size
    calib = [{"input_ids": torch.randint(0, vocab, (1, 128), generator=gen, device=device)}]
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=gen, device=device)
    t0 = time.perf_counter()
    calibrated = calibrate(base, calib, GlowQConfig(group_size=group_size), progress=False)
    variants = {"bf16" if not args.tiny else "float32": None,
                "W4A16": GlowQConfig(group_size=group_size, method="none", rank=0),
                "independent (QERA)": GlowQConfig(group_size=group_size, method="qera", rank=args.rank),
                "GlowQ": GlowQConfig(group_size=group_size, method="glowq", rank=args.rank),
                f"GlowQ-S (keep {args.keep:g})": GlowQConfig(group_size=group_size, method="glowq", rank=args.rank,
                                                             selective=args.keep)}
    if args.compare_rank:
        variants[f"GlowQ rank {args.compare_rank} (every group)"] = GlowQConfig(group_size=group_size, method="glowq",
                                                                             rank=args.compare_rank)
    results = []
    for label, config in variants.items():
        model = copy.deepcopy(base)  # base stays uncompiled: a copy of a compiled forward would call base's
        report = quantize_(model, calibrated, config, progress=False) if config is not None else None
        decoder = Decoder(model, ids, args.new_tokens)
        eager_tokens, _ = decoder.generate()  # also fills the static cache outside the compiled graph
        model.forward = torch.compile(model.forward, backend=glowq_backend, mode="reduce-overhead", dynamic=False)
        tokens, _ = decoder.generate()  # warm-up: compiles, records the CUDA graphs
        seconds = statistics.median(decoder.timed()[1] for _ in range(args.repeats))
        agree = float((tokens == eager_tokens).float().mean())
        if agree <= 0.8:
            raise SystemExit(f"{label}: compiled greedy tokens agree with eager on only {agree:.0%}")
        row = {"variant": label, "decode_s": seconds, "tokens_per_s": (args.new_tokens - 1) / seconds,
               "agreement_with_eager": agree}
        if report is not None:
            row.update(groups_corrected=sum(g.restored and g.rank > 0 for g in report.groups),
                       groups=len(report.groups), factor_bytes=report.total("factor_bytes"))
        results.append(row)
        print(f"{label}: {row['tokens_per_s']:.1f} tokens/s (agreement {agree:.0%})", flush=True)
        del model, decoder
        # the variants share LlamaForCausalLM.forward's code: without a reset, Dynamo's cache keeps
        # guards on freed models and counts every variant against one recompile limit (then runs eager)
        torch.compiler.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    by = {r["variant"]: r for r in results}
    indep = by["independent (QERA)"]["tokens_per_s"]
    for r in results:
        r["vs_independent"] = r["tokens_per_s"] / indep
    meta = {"command": "python benchmarks/bench_selective_decode.py " + " ".join(argv or sys.argv[1:]),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU (smoke run)",
            "torch": torch.__version__, "triton": _triton_version(), "transformers": T.__version__,
            "layers": args.layers, "rank": args.rank, "group_size": group_size, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": results,
            "time_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    if not args.tiny:
        write(meta, args.out)
    return 0


def write(meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "selective_decode.json").write_text(json.dumps(meta, indent=1))
    lines = ["# GlowQ-S decode throughput, batch 1", "",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; "
             f"Llama-3-8B shapes, {meta['layers']} layers, W4 g{meta['group_size']}, rank {meta['rank']}, random "
             f"weights; prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new, median of {meta['repeats']}. "
             f"Command: `{meta['command']}`", "",
             "| variant | groups corrected | factor MB | tokens/s | vs independent |", "|---|---|---|---|---|"]
    for r in meta["rows"]:
        corrected = f"{r['groups_corrected']}/{r['groups']}" if "groups" in r else "-"
        mb = f"{r['factor_bytes'] / 2**20:.0f}" if "factor_bytes" in r else "-"
        lines.append(f"| {r['variant']} | {corrected} | {mb} | {r['tokens_per_s']:.1f} | {r['vs_independent']:.2f}x |")
    (out / "selective_decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
