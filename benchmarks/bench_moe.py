"""MoE experts on real weights: SmolLM2-135M split into 8 experts per MLP (``smollm2_moe``).

Three models: every expert active (computes exactly the dense SmolLM2: same perplexity, checked
here), and top-2 and top-6 of 8 with neurons grouped and a router derived from data (each one's own
float perplexity is its reference; top-2 keeps a quarter of SmolLM2's neurons per token and no
longer models text, top-6 still does). On each, the experts quantized W4 (asymmetric, group 64,
RTN), the attention left in float so that only the experts differ between rows, calibrated block by
block on 32 x 512 news tokens; perplexity on the Wikipedia text in windows of 1024. Rows:

- float; RTN alone;
- independent per-expert QERA at rank r (each expert its own ``A_e, B_e``, whitened by its own
  tokens' ``S_e``);
- GlowQ across experts at rank r: plain (one ``B`` for the 8 experts' gate/up, whitened by
  every token's ``S``), usage-weighted, and with the ``A_e`` refit;
- GlowQ across experts at the rank whose correction bytes equal the per-expert QERA's;
- GlowQ-S with the automatic elbow, dropping each rarely used expert's ``A_e`` inside the kept
  corrections (``expert_selection="per-expert"``) and keeping or dropping each experts correction
  whole (the default).

Each expert's down projection gets its own QERA correction at rank r in every corrected row (it
reads its own input). Correction bytes are given for the experts' gate/up (where B is shared)
and in all; the whole-model bytes too. The arithmetic for Mixtral-8x7B and Qwen3-30B-A3B shapes
follows the table.

    python benchmarks/bench_moe.py            # writes benchmarks/results/moe.{json,md}
    python benchmarks/bench_moe.py --resume --only top-6 GlowQ-S   # the GlowQ-S rows of top-6 only
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_moe import dense_to_moe, router_key, sparse_moe  # noqa: E402

from glowq_fx import GlowQConfig, quantize_  # noqa: E402
from glowq_fx.data.batches import text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.evaluation.perplexity import perplexity  # noqa: E402
from glowq_fx.quantize.api import model_bytes  # noqa: E402


def equal_bytes_rank(rank: int, n_experts: int, out_features: int, in_features: int) -> int:
    """The shared-B rank whose factors (E N r' + r' H) hold as many values as E independent rank-r
    corrections (E r (N + H))."""
    return round(rank * n_experts * (out_features + in_features) / (n_experts * out_features + in_features))


def correction_arithmetic(rank: int = 64) -> list[dict]:
    """Factor values of the experts' gate/up per layer: independent vs one shared B, at equal rank."""
    shapes = {"Mixtral-8x7B": (8, 2 * 14336, 4096), "Qwen3-30B-A3B": (128, 2 * 768, 2048),
              "SmolLM2 split 8 ways": (8, 2 * 192, 576)}
    out = []
    for name, (E, N, H) in shapes.items():
        independent, shared = E * rank * (N + H), rank * (E * N + H)
        out.append({"model": name, "experts": E, "gate_up_out": N, "hidden": H, "rank": rank,
                    "independent_values": independent, "shared_values": shared,
                    "saving": 1 - shared / independent, "equal_bytes_rank": equal_bytes_rank(rank, E, N, H)})
    return out


def rows(rank: int, equal_rank: int) -> list[tuple[str, GlowQConfig | None]]:
    common = dict(group_size=64, exclude=(r"self_attn",))
    return [
        ("float", None),
        ("RTN", GlowQConfig(**common, method="none")),
        (f"per-expert QERA r{rank}", GlowQConfig(**common, method="qera", rank=rank)),
        (f"GlowQ across experts r{rank}", GlowQConfig(**common, rank=rank)),
        (f"GlowQ across experts r{rank}, usage-weighted", GlowQConfig(**common, rank=rank, expert_weighting="usage")),
        (f"GlowQ across experts r{rank}, A_e refit", GlowQConfig(**common, rank=rank, expert_refit=True)),
        (f"GlowQ-S across experts r{rank} (automatic elbow, per expert)",
         GlowQConfig(**common, rank=rank, selective="auto", expert_selection="per-expert")),
        (f"GlowQ-S across experts r{rank} (automatic elbow, whole experts groups)",
         GlowQConfig(**common, rank=rank, selective="auto", expert_selection="whole")),
        (
            f"GlowQ across experts r{equal_rank} (equal gate/up bytes)",
            GlowQConfig(**common, rank=equal_rank, expert_own_input_rank=rank),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--router-samples", type=int, default=16, help="windows of news text the sparse router is fit on")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 6], help="experts per token of each sparse model")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe")
    ap.add_argument("--resume", action="store_true", help="keep the rows the JSON already has, run the others")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="run only the rows whose model or row label contains every TEXT (with --resume: the others "
                         "stay as measured)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    dense, tokenizer = load_model("smollm2")
    tokens = tokenize(tokenizer, load_text("wikipedia"))
    calibration = text_calibration_batches(tokenizer, "news", args.calib_samples, args.calib_len)
    # the router is fit on other news windows than the calibration's (another seed)
    router_text = [b["input_ids"] for b in text_calibration_batches(tokenizer, "news", args.router_samples,
                                                                     args.calib_len, seed=1)]
    E, I, H = args.experts, dense.config.intermediate_size, dense.config.hidden_size
    key = router_key(dense, E, f"grouped:news:{args.router_samples}x{args.calib_len}:1")
    equal_rank = equal_bytes_rank(args.rank, E, 2 * I // E, H)
    models = {f"all {E} experts active (= dense)": lambda: dense_to_moe(dense, E),
              **{f"top-{k} of {E}, router from data": lambda k=k: sparse_moe(dense, router_text, E, k, key)
                 for k in args.top_k}}
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
            "torch": torch.__version__, "model": "smollm2 split into MoE", "experts": E, "top_k": args.top_k,
            "evaluated_tokens": int(min(tokens.numel(), args.max_tokens)), "seq_len": args.seq_len,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens of news", "rank": args.rank,
            "equal_bytes_rank": equal_rank, "quantization": "experts W4 asymmetric group 64 (RTN), attention in float",
            "date": time.strftime("%Y-%m-%d"), "arithmetic": correction_arithmetic()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    if args.resume and args.out.with_suffix(".json").is_file():
        done = json.loads(args.out.with_suffix(".json").read_text())["rows"]
    kept = {(r["model"], r["label"]) for r in done}

    dense_ppl = perplexity(dense, tokens, args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                           progress=False).perplexity
    meta["dense_float_ppl"] = dense_ppl
    print(f"dense SmolLM2: {dense_ppl:.4f}", flush=True)

    def write() -> None:
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": done}, indent=1))
        lines = [
            f"# MoE experts on real weights: SmolLM2-135M split into {E} experts per MLP",
            "",
            f"`{meta['command']}`",
            "",
            f"{meta['quantization']}; calibration {meta['calibration']}, block by block; perplexity over "
            f"{meta['evaluated_tokens']:,} Wikipedia tokens in windows of {args.seq_len}; {meta['machine']}, "
            f"torch {meta['torch']}, {meta['date']}. The dense SmolLM2 scores {dense_ppl:.4f} here.",
            "",
            "Rows may come from resumed runs of the script (`--resume` keeps the rows already measured): the "
            "perplexities are deterministic, the times depend on what else ran on the cores (indicative only).",
            "",
            "| model | row | perplexity | vs float | gate/up factor MB | all factor MB | whole-model MB | quantize s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in done:
            ref = next((x["ppl"] for x in done if x["model"] == r["model"] and x["label"] == "float"), None)
            vs = f"{(r['ppl'] / ref - 1) * 100:+.2f}%" if ref else ""
            lines.append(
                f"| {r['model']} | {r['label']} | {r['ppl']:.4f} | {vs} | {r['gate_up_factor_bytes'] / 1e6:.2f} | "
                f"{r['factor_bytes'] / 1e6:.2f} | {r['model_bytes'] / 1e6:.1f} | {r['quantize_s']:.0f} |"
            )
        lines += ["", f"Correction values of the experts' gate/up per layer at rank {meta['arithmetic'][0]['rank']} "
                      "(independent: E r (N + H); one shared B: r (E N + H)):", "",
                  "| shapes | E | N = 2I | H | independent | shared B | saving | shared rank at equal bytes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for a in meta["arithmetic"]:
            lines.append(f"| {a['model']} | {a['experts']} | {a['gate_up_out']} | {a['hidden']} | "
                         f"{a['independent_values']:,} | {a['shared_values']:,} | {a['saving']:.1%} | "
                         f"{a['equal_bytes_rank']} |")
        per = [r for r in done if r.get("per_expert")]
        if per:
            lines += ["", "GlowQ-S per expert (the experts' factors dropped inside the kept corrections):", ""]
            lines += [f"- {r['model']} | {r['label']}: {r['per_expert']['dropped']} of {r['per_expert']['experts']} "
                      f"experts' factors dropped, {r['per_expert']['bytes_saved'] / 1e6:.2f} MB"
                      + (f"; calibration loss {r['per_expert']['loss']:.4f} with them dropped, "
                         f"{r['per_expert']['loss_at_knee']:.4f} at the knee" if "loss" in r["per_expert"] else "")
                      for r in per]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    for model_label, build in models.items():
        model = build()
        for label, config in rows(args.rank, equal_rank):
            if (model_label, label) in kept or (args.only and not all(t in f"{model_label} | {label}"
                                                                           for t in args.only)):
                continue
            subject, report, t0 = model, None, time.perf_counter()
            if config is not None:
                subject = copy.deepcopy(model)
                report = quantize_(subject, calibration, config, progress=False)
            elapsed = time.perf_counter() - t0
            ppl = perplexity(subject, tokens, args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                             progress=False, desc=label).perplexity
            gate_up = (
                0 if report is None else sum(g.factor_bytes for g in report.groups if g.name.endswith("gate_up_proj"))
            )
            done.append({"model": model_label, "label": label, "config": None if config is None else config.to_dict(),
                         "ppl": ppl, "model_bytes": model_bytes(subject), "gate_up_factor_bytes": gate_up,
                         "factor_bytes": 0 if report is None else report.total("factor_bytes"), "quantize_s": elapsed,
                         "per_expert": ((report.selection or {}).get("per_expert") if report is not None else None)})
            write()
            print(f"{model_label} | {label}: {ppl:.4f}", flush=True)
            del subject
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
