"""Why GPTQ is worse than RTN on SmolLM2: a diagnosis, not a tuned setting.

GPTQ minimizes each layer's output error averaged over calibration tokens, ``tr(E S E^T)``. The
first position of every window is an attention sink: its input to ``k_proj`` / ``v_proj`` lies in
a direction other tokens rarely use, so it carries 1/``calib_len`` of ``S`` and GPTQ moves error
there; but every later query attends to that token's key and value. The script measures:

1. perplexity with GPTQ on each kind of linear alone (the rest RTN);
2. the per-token relative output error of ``k_proj`` / ``v_proj`` at the first position and at
   the others, RTN against GPTQ;
3. perplexity when the first position of each calibration window counts ``c`` times in ``S``
   (``c = 0`` leaves it out, ``c = 1`` is the reference behaviour), for GPTQ, RTN + GlowQ and
   GPTQ + GlowQ. The ``c`` values are probes on the evaluation text, not a validated default.

    python benchmarks/probe_gptq_sink.py        # about 15 minutes on 2 CPU cores

Writes benchmarks/results/gptq_sink.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from glowq_fx import GlowQConfig, calibrate, quantize_  # noqa: E402
from glowq_fx.calibration.collect import collect_statistics  # noqa: E402
from glowq_fx.calibration.moments import GroupStatistics  # noqa: E402
from glowq_fx.capture.run import run_batch  # noqa: E402
from glowq_fx.data.batches import text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.evaluation.perplexity import perplexity  # noqa: E402
from glowq_fx.quant import quantize_gptq, quantize_rtn  # noqa: E402

KINDS = {"q/k/v": r"self_attn\.(q|k|v)_proj", "o": r"o_proj", "gate/up": r"mlp\.(gate|up)_proj", "down": r"down_proj"}


def first_token_weighted(model, calibrated, batches, c: float) -> GroupStatistics:
    """Each group's ``S`` with the first position of every window counted ``c`` times (the library's
    ``first_position_weight``, here also at ``c = 0``: the first position left out)."""
    return collect_statistics(model, calibrated.groups, batches, run_batch, first_position_weight=c)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--weights", type=float, nargs="+", default=[0, 1, 32, 511])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gptq_sink")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    model.eval()
    wiki = tokenize(tokenizer, load_text("wikipedia"))
    batches = text_calibration_batches(tokenizer, "news", 32, 512)
    config = GlowQConfig(group_size=64, rank=64)
    calibrated = calibrate(model, batches, config, progress=False)
    ppl = lambda m: perplexity(m, wiki, args.seq_len, max_tokens=args.max_tokens, batch_size=4,
                               progress=False).perplexity
    members = {m: g for g in calibrated.groups for m in g.members}
    original = {m: model.get_submodule(m).weight.data.clone() for m in members}

    def quantized(S_of, gptq_for=lambda m: True):
        return {m: (quantize_gptq(original[m], S_of(g.name), 64) if gptq_for(m) else quantize_rtn(original[m], 64))
                .dequantize(torch.float32) for m, g in members.items()}

    def with_weights(weights):
        with torch.no_grad():
            for m, w in weights.items():
                model.get_submodule(m).weight.data.copy_(w)
        return model

    result: dict = {"per_kind": {}, "first_position_error": [], "first_token_weight": []}
    S = lambda name: calibrated.statistics[name].value()
    rtn, gptq = quantized(S, lambda m: False), quantized(S)
    result["per_kind"]["RTN"] = ppl(with_weights(rtn))
    result["per_kind"]["GPTQ"] = ppl(with_weights(gptq))
    for kind, pattern in KINDS.items():
        mixed = {m: gptq[m] if re.search(pattern, m) else rtn[m] for m in members}
        result["per_kind"][f"GPTQ on {kind} only"] = ppl(with_weights(mixed))
        print(kind, result["per_kind"][f"GPTQ on {kind} only"], flush=True)

    # 2. per-token output error at the first position vs the rest (two evaluation windows)
    with_weights(original)
    probe = [f"model.layers.{layer}.self_attn.{p}_proj" for layer in (5, 15, 25) for p in ("k", "v")]
    inputs = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach())) for n in probe]
    with torch.no_grad():
        model(torch.stack([wiki[5000:5000 + args.seq_len], wiki[90000:90000 + args.seq_len]]))
    for h in handles:
        h.remove()
    for n in probe:
        x, W = inputs[n], original[n]
        y = (x @ W.T).norm(dim=-1)
        row = {"linear": n}
        for name, deq in (("rtn", rtn[n]), ("gptq", gptq[n])):
            e = (x @ (W - deq).T).norm(dim=-1) / y
            row[f"{name}_first"], row[f"{name}_rest"] = float(e[:, 0].mean()), float(e[:, 1:].mean())
        result["first_position_error"].append(row)

    # 3. the first position weighted c times in S
    for c in args.weights:
        stats = first_token_weighted(model, calibrated, batches, c)
        row = {"c": c, "GPTQ": ppl(with_weights(quantized(lambda name: stats[name].value())))}
        with_weights(original)
        if c in (1, 32):
            weighted = dataclasses.replace(calibrated, statistics=stats)  # quantize_ reads a Calibration, keeps it
            for label, cfg in (("RTN + GlowQ r64", config),
                               ("GPTQ + GlowQ r64", dataclasses.replace(config, quantizer="gptq"))):
                m = copy.deepcopy(model)
                quantize_(m, weighted, cfg, progress=False)
                row[label] = ppl(m)
        result["first_token_weight"].append(row)
        print(row, flush=True)

    result.update(command="python benchmarks/probe_gptq_sink.py " + " ".join(argv or sys.argv[1:]),
                  machine=f"{platform.machine()}, {torch.get_num_threads()} threads (CPU), float32",
                  torch=torch.__version__, evaluated_tokens=args.max_tokens, seq_len=args.seq_len,
                  calibration="32 x 512 tokens of news", time_s=time.perf_counter() - t_start,
                  date=time.strftime("%Y-%m-%d"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = ["# GPTQ and the attention-sink token on smollm2", "", f"`{r['command'].strip()}`", "",
             f"W4 asymmetric group 64; calibration {r['calibration']}; perplexity over {r['evaluated_tokens']:,} "
             f"tokens of wikipedia (windows of {r['seq_len']}); {r['machine']}, torch {r['torch']}, {r['date']}.",
             "", "| quantizer | perplexity |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["per_kind"].items()]
    lines += ["", "Relative output error per token (two windows): first position vs the others.", "",
              "| linear | RTN first | GPTQ first | RTN others | GPTQ others |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {e['linear']} | {e['rtn_first']:.3f} | {e['gptq_first']:.3f} | {e['rtn_rest']:.3f} | "
              f"{e['gptq_rest']:.3f} |" for e in r["first_position_error"]]
    cols = ["GPTQ", "RTN + GlowQ r64", "GPTQ + GlowQ r64"]
    lines += ["", "First position of each calibration window counted c times in S (c = 1: the reference "
              "behaviour; the c values are probes on the evaluation text, not a validated setting).", "",
              "| c | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [f"| {w['c']:g} | " + " | ".join(f"{w[k]:.3f}" if k in w else "" for k in cols) + " |"
              for w in r["first_token_weight"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
