"""End-to-end greedy decoding: time to first token, decode throughput and peak memory of 4-bit
models against bf16 and PyTorch's int4 kernel, on the GPU.

Models: Llama-3-8B- and Qwen2.5-7B-shaped ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` built from
a transformers config with random bf16 weights (shapes decide speed, not values). Each is
calibrated once on random tokens (``--calib-batches`` x ``--calib-tokens``) and every 4-bit
variant is quantized from that one ``Calibration`` (W4, group size 128, rank ``--rank``). Rows:

- ``bf16 eager`` / ``bf16 compiled``: the float model, eager and ``torch.compile`` (Inductor,
  CUDA graphs: ``mode="reduce-overhead"``);
- ``int4 tinygemm compiled``: torchao-style int4, ``aten._weight_int4pack_mm`` on the same codes
  as ``W4A16`` (``benchmarks/tinygemm.py``), compiled like bf16;
- ``W4A16 compiled``: ours without correction (``method="none"``), ``glowq_backend``;
- ``independent compiled``: one ``B_i`` / ``A_i`` per linear (QERA), ``glowq_backend``;
- ``GlowQ eager``: per-linear wrappers, each computing its group's ``x B^T`` itself (the
  reference code's style);
- ``GlowQ compiled``: ``glowq_backend`` (one ``x B^T`` per group, fused kernels);
- ``GlowQ-S compiled``: ``selective=--selective`` (default the automatic elbow).

Every compiled row: ``model.forward`` compiled with ``mode="reduce-overhead"``; transformers'
own auto-compilation is disabled (``disable_compile=True``) so that each row runs what it says.
Each (batch, prompt) shape: a static KV cache of prompt + new tokens, kept across its runs;
one warm-up ``generate`` (compiles, records graphs), then ``--repeats`` timed ones, greedy,
``--new-tokens`` new tokens, EOS disabled. Time to first token: from the call until the first
new token reaches the host. Decode throughput: ``batch x (new tokens - 1)`` over the rest.
Medians. Peak memory: the most allocated during the timed runs beyond what was allocated before
the variant was built (its weights, caches, activations, CUDA-graph pools).

Checked before timing, on the first shape: each compiled row's first-step logits against the
same variant run eagerly, and the tinygemm model's against ``W4A16``'s (same codes); the greedy
tokens' agreement is printed. The float model compiled by stock Inductor measures how far
compiled rounding alone drifts on this model: it must stay under 4x the base tolerance (``1e-3``
in float32, ``5e-2`` in bf16; a wrong graph is off by order 1), every other row under twice the
float row's drift and never under the base tolerance.

Writes ``decode.json``, ``decode.md`` and ``decode.png`` (bars of decode throughput) to ``--out``.

    python benchmarks/bench_decode.py [--models llama3-8b,qwen2.5-7b] [--batches 1,8] [--prompts 512,2048]
    python benchmarks/bench_decode.py --tiny   # a small float32 model on the CPU: checks the code path
"""
from __future__ import annotations

import argparse
import copy
import gc
import inspect
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
from tinygemm import swap_to_tinygemm  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from glowq_fx import GlowQConfig, calibrate, quantize_  # noqa: E402
from glowq_fx.backend import glowq_backend  # noqa: E402

MODELS = {
    "llama3-8b": (T.LlamaConfig, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      rope_theta=500000.0)),
    "qwen2.5-7b": (T.Qwen2Config, dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       rope_theta=1000000.0)),
}
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
ROWS = ("{float} eager", "{float} compiled", "int4 tinygemm compiled", "W4A16 compiled", "independent compiled",
        "GlowQ eager", "GlowQ compiled", "GlowQ-S compiled")


def model_config(name: str, tiny: bool, layers: int | None) -> T.PretrainedConfig:
    cls, shape = MODELS[name]
    shape = {**shape, **(TINY if tiny else {})}
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return cls(**shape, max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(config: T.PretrainedConfig, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    """Random weights (the model's own initialisation), drawn on the device in ``dtype``; EOS off,
    so that every run generates exactly the tokens asked for."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if device == "cuda":
            torch.cuda.manual_seed(seed)
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def variants(args, group_size: int) -> list[tuple[str, GlowQConfig | None, list[tuple[str, str | None]]]]:
    """(name, quantization config, [(row, compiler)]) in building order; compiler None is eager."""
    def cfg(**kw):
        return GlowQConfig(group_size=group_size, **kw)
    float_name = "fp32" if args.tiny else "bf16"
    return [
        ("float", None, [(ROWS[0].format(float=float_name), None), (ROWS[1].format(float=float_name), "inductor")]),
        ("W4A16", cfg(method="none", rank=0), [(ROWS[3], "glowq")]),
        ("int4 tinygemm", cfg(method="none", rank=0), [(ROWS[2], "inductor")]),
        ("independent", cfg(method="qera", rank=args.rank), [(ROWS[4], "glowq")]),
        ("GlowQ", cfg(method="glowq", rank=args.rank), [(ROWS[5], None), (ROWS[6], "glowq")]),
        ("GlowQ-S", cfg(method="glowq", rank=args.rank, selective=args.selective), [(ROWS[7], "glowq")]),
    ]


class FirstTokenClock(BaseStreamer):
    """Notes when the first new token reaches the host (``generate`` streams the prompt first)."""

    def __init__(self, sync):
        self.sync, self.calls, self.first = sync, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.sync()
            self.first = time.perf_counter()

    def end(self):
        pass


class Decoder:
    """``generate`` on one (batch, prompt) shape with one static cache kept across calls (a new
    cache per call would move the CUDA graphs' inputs and make them re-record)."""

    def __init__(self, model, ids: torch.Tensor, new_tokens: int):
        self.model, self.ids, self.new_tokens = model, ids, new_tokens
        params = inspect.signature(type(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers < 5.20 says the latter
        self.cache = T.StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
        self.sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def generate(self, new_tokens: int | None = None, logits: bool = False, streamer=None):
        self.cache.reset()
        out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                                  max_new_tokens=new_tokens or self.new_tokens, pad_token_id=0, disable_compile=True,
                                  streamer=streamer, return_dict_in_generate=logits, output_logits=logits,
                                  **{self.cache_kw: self.cache})
        return (out.sequences, out.logits[0].float()) if logits else (out, None)

    def timed(self) -> tuple[float, float]:
        """(time to first token, time of the remaining new tokens), seconds."""
        clock = FirstTokenClock(self.sync)
        self.sync()
        t0 = time.perf_counter()
        tokens, _ = self.generate(streamer=clock)
        self.sync()
        t1 = time.perf_counter()
        if tokens.shape[1] != self.ids.shape[1] + self.new_tokens or clock.first is None:
            raise RuntimeError(f"generate made {tokens.shape[1] - self.ids.shape[1]} tokens, not {self.new_tokens}")
        return clock.first - t0, t1 - clock.first


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_model(name: str, args, device: str, dtype: torch.dtype) -> list[dict]:
    group_size = 32 if args.tiny else 128
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    base = random_model(model_config(name, args.tiny, args.layers), dtype, device, seed=0)
    gen = torch.Generator(device=device).manual_seed(1)
    vocab = base.config.vocab_size
    calib = [{"input_ids": torch.randint(0, vocab, (1, args.calib_tokens), generator=gen, device=device)}
             for _ in range(args.calib_batches)]
    shapes = [(b, p) for b in args.batches for p in args.prompts]
    prompts = {s: torch.randint(0, vocab, s, generator=gen, device=device) for s in shapes}
    t0 = time.perf_counter()
    calibrated = calibrate(base, calib, GlowQConfig(group_size=group_size), progress=False)
    print(f"{name}: calibrated {len(calibrated.groups)} groups in {time.perf_counter() - t0:.0f}s", flush=True)
    rows, reference = [], {}  # reference: variant -> (tokens, first-step logits) of the eager model on shapes[0]
    drift = {}  # "float" -> stock Inductor's first-step logits error against the eager float model
    for variant, config, modes in variants(args, group_size):
        if variant not in args.variants:
            continue
        gc.collect()
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        t0 = time.perf_counter()
        model = copy.deepcopy(base)  # base stays uncompiled: a copy of a compiled forward would call base's
        report = quantize_(model, calibrated, config, progress=False) if config is not None else None
        if variant == "int4 tinygemm":
            swap_to_tinygemm(model)
        built_s = time.perf_counter() - t0
        eager_forward = model.forward
        info = {"weights_mib": model_bytes(model) / 2**20, "build_s": built_s}
        if report is not None:
            info.update(groups_corrected=sum(g.restored and g.rank > 0 for g in report.groups),
                        groups=len(report.groups))
        for row, compiler in modes:
            for shape in shapes:
                decoder = Decoder(model, prompts[shape], args.new_tokens)
                check = shape == shapes[0]
                if compiler is not None:  # an eager call fills the cache outside the compiled graph
                    if check and variant not in reference:
                        reference[variant] = decoder.generate(logits=True)
                    else:
                        decoder.generate(new_tokens=1)
                    # a fresh Dynamo cache: what the process compiled before (other rows, other callers of
                    # this forward code) must not count against this row's recompile limit
                    torch.compiler.reset()
                    # compiled per shape, specialised (dynamic=False): one prefill and one decode graph
                    model.forward = torch.compile(eager_forward, mode="reduce-overhead", dynamic=False,
                                                  **({"backend": glowq_backend} if compiler == "glowq" else {}))
                stats = {k: dict(v) for k, v in counters.items()}
                t_warm = time.perf_counter()
                tokens, logits = decoder.generate(logits=check)
                warm_s = time.perf_counter() - t_warm
                entry = {"model": name, "row": row, "variant": variant, "batch": shape[0], "prompt": shape[1],
                         "new_tokens": args.new_tokens, "warmup_s": warm_s, **info,
                         # what the warm-up compiled: a compiled row that ran eager would show 0 graphs
                         "graphs_compiled": counters["stats"]["unique_graphs"] - stats.get("stats", {}).get(
                             "unique_graphs", 0),
                         "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - stats.get("inductor", {}).get(
                             "cudagraph_skips", 0)}
                if check:
                    if variant not in reference:
                        reference[variant] = (tokens, logits)
                    ref_tokens, ref_logits = reference[variant]
                    err = entry["logits_error_vs_eager"] = relative_error(logits, ref_logits)
                    entry["tokens_agree_with_eager"] = float((tokens == ref_tokens).float().mean())
                    if compiler is not None:
                        # Stock Inductor on the float model measures how far compiled rounding alone drifts
                        # on this model (6.4e-2 on the random 32-layer bf16 Llama-3-8B, H200): the float row
                        # only has to be far from a wrong graph (off by order 1); every other row may drift
                        # up to twice what the float row did, and never less than the base tolerance.
                        limit = 4 * tol if variant == "float" else max(tol, 2 * drift.get("float", 0.0))
                        entry["logits_tolerance"] = limit
                        if variant == "float":
                            drift["float"] = err
                        if err > limit:
                            raise SystemExit(f"{name} {row}: first-step logits differ from the eager model's by "
                                             f"{err:.2e} (relative), over {limit:.2g}")
                    if variant == "int4 tinygemm" and "W4A16" in reference:
                        err = relative_error(logits, reference["W4A16"][1])
                        entry["logits_error_vs_w4a16"] = err
                        # on the CPU W4A16 runs PyTorch's CPU int4 kernel on bf16 activations
                        limit = 2e-2 if device == "cpu" else max(tol, 2 * drift.get("float", 0.0))
                        if err > limit:
                            raise SystemExit(f"{name}: tinygemm's logits differ from W4A16's (same codes) by "
                                             f"{err:.2e} (relative), over {limit:.2g}")
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times = [decoder.timed() for _ in range(args.repeats)]
                ttft = statistics.median(t for t, _ in times)
                decode = statistics.median(d for _, d in times)
                entry.update(
                    ttft_ms=ttft * 1e3,
                    decode_s=decode,
                    decode_tokens_per_s=shape[0] * (args.new_tokens - 1) / decode,
                    peak_mib=(torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else None,
                )
                rows.append(entry)
                print(
                    f"{name} b{shape[0]} p{shape[1]} {row}: ttft {entry['ttft_ms']:.1f} ms, "
                    f"{entry['decode_tokens_per_s']:.1f} tokens/s"
                    + (f", peak {entry['peak_mib']:.0f} MiB" if entry["peak_mib"] is not None else "")
                    + (f", agreement {entry['tokens_agree_with_eager']:.0%}" if check else "")
                    + (f", {entry['graphs_compiled']} graphs" if compiler else "")
                    + (f", {entry['cudagraph_skips']} CUDA-graph skips" if entry["cudagraph_skips"] else ""),
                    flush=True,
                )
                del decoder
                if compiler is not None:
                    model.forward = eager_forward
                    # the rows share the model class's forward code: without a reset, Dynamo's cache keeps
                    # guards on freed models and counts every compile against one recompile limit
                    torch.compiler.reset()
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each row's decode throughput and time to first token against the float compiled row and the
    independent compiled row of the same model and shape."""
    def key(r):
        return r["model"], r["batch"], r["prompt"]
    by = {(key(r), r["row"]): r for r in rows}
    for r in rows:
        for ref_row, tag in ((ROWS[1].format(float="bf16"), "float"), (ROWS[1].format(float="fp32"), "float"),
                             (ROWS[4], "independent")):
            ref = by.get((key(r), ref_row))
            if ref is not None:
                r[f"decode_vs_{tag}_compiled"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
                r[f"ttft_vs_{tag}_compiled"] = r["ttft_ms"] / ref["ttft_ms"]
                if r["peak_mib"] is not None and ref["peak_mib"] is not None:
                    r[f"peak_vs_{tag}_compiled"] = r["peak_mib"] / ref["peak_mib"]


def row_order(r: dict) -> int:
    """The rows in the order of ``ROWS`` (they are built in another: tinygemm after W4A16)."""
    labels = [label.format(float="fp32" if r["row"].startswith("fp32") else "bf16") for label in ROWS]
    return labels.index(r["row"])


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def write(meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(meta, indent=1))
    lines = ["# End-to-end greedy decoding", "",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; "
             f"random weights, W4 g{meta['group_size']}, rank {meta['rank']}, GlowQ-S `selective={meta['selective']}`; "
             f"{meta['new_tokens']} new tokens, greedy, static cache, median of {meta['repeats']} after a warm-up. "
             f"Decode tokens/s counts every sequence of the batch. Peak: beyond what was allocated before the "
             f"variant was built. Command: `{meta['command']}`", ""]
    head = (
        "| row | weights MiB | TTFT ms | TTFT vs float compiled | TTFT vs independent | decode tokens/s "
        "| vs float compiled | vs independent | peak MiB | peak vs float compiled |"
    )
    for model in dict.fromkeys(r["model"] for r in meta["rows"]):
        for shape in dict.fromkeys((r["batch"], r["prompt"]) for r in meta["rows"] if r["model"] == model):
            lines += [f"## {model}, batch {shape[0]}, prompt {shape[1]}", "", head, "|---" * 10 + "|"]
            for r in sorted((r for r in meta["rows"] if (r["model"], r["batch"], r["prompt"]) == (model, *shape)),
                            key=row_order):
                corrected = (
                    f" ({r['groups_corrected']}/{r['groups']} groups corrected)" if "GlowQ-S" in r["row"] else ""
                )
                lines.append(
                    f"| {r['row']}{corrected} | {r['weights_mib']:.1f} | {r['ttft_ms']:.1f} | "
                    f"{_fmt(r.get('ttft_vs_float_compiled'), '.2f', 'x')} | "
                    f"{_fmt(r.get('ttft_vs_independent_compiled'), '.2f', 'x')} | {r['decode_tokens_per_s']:.1f} | "
                    f"{_fmt(r.get('decode_vs_float_compiled'), '.2f', 'x')} | "
                    f"{_fmt(r.get('decode_vs_independent_compiled'), '.2f', 'x')} | {_fmt(r['peak_mib'], '.0f')} | "
                    f"{_fmt(r.get('peak_vs_float_compiled'), '.2f', 'x')} |")
            lines.append("")
    skipped = sorted({r["row"] for r in meta["rows"] if r.get("cudagraph_skips")})
    if skipped and "CPU" not in meta["device"]:
        lines += [f"Inductor skipped CUDA graphs in: {', '.join(skipped)} (`cudagraph_skips` in the JSON).", ""]
    (out / "decode.md").write_text("\n".join(lines))
    chart(meta, out / "decode.png")


def chart(meta: dict, path: Path) -> None:
    """Decode throughput relative to the float compiled row, one group of bars per shape."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (rerun with --write-only {path.with_suffix('.json')})")
        return
    shapes = list(dict.fromkeys((r["model"], r["batch"], r["prompt"]) for r in meta["rows"]))
    names = list(dict.fromkeys(r["row"] for r in sorted(meta["rows"], key=row_order)))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r.get("decode_vs_float_compiled", float("nan")) for r in meta["rows"]
                        if (r["model"], r["batch"], r["prompt"]) == s and r["row"] == name), float("nan"))
                  for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{m}\nb{b} p{p}" for m, b, p in shapes], fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("decode tokens/s vs float compiled")
    ax.set_title(meta["device"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama3-8b,qwen2.5-7b")
    p.add_argument("--layers", type=int, default=None, help="override the models' depth (default: theirs)")
    p.add_argument("--batches", type=_ints, default=[1, 8])
    p.add_argument("--prompts", type=_ints, default=[512, 2048])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--selective", default="auto", help="GlowQ-S: 'auto' (the elbow) or a fraction of the groups")
    p.add_argument("--variants", default="float,int4 tinygemm,W4A16,independent,GlowQ,GlowQ-S",
                   help="comma-separated subset of the variants")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="a small float32 model on the CPU: checks the code path")
    p.add_argument("--out", type=Path, default=None, help="where the results go (default benchmarks/results; "
                   "with --tiny, nowhere unless given)")
    p.add_argument("--write-only", type=Path, default=None, help="rewrite the table and chart from this JSON")
    args = p.parse_args(argv)
    if args.write_only is not None:
        write(json.loads(args.write_only.read_text()), args.out or args.write_only.parent)
        return 0
    args.models = [m for m in args.models.split(",") if m]
    args.variants = set(v for v in args.variants.split(",") if v)
    known = {v for v, _, _ in variants(argparse.Namespace(tiny=False, rank=1, selective=None), 128)}
    for what, given, allowed in (("model", args.models, MODELS), ("variant", args.variants, known)):
        unknown = [g for g in given if g not in allowed]
        if unknown or not given:
            raise SystemExit(f"unknown or no {what}s {unknown}: choose from {sorted(allowed)}")
    if "int4 tinygemm" in args.variants and "W4A16" not in args.variants:
        raise SystemExit("the int4 tinygemm row is checked against W4A16 (the same codes): keep both variants")
    if args.new_tokens < 2 or args.repeats < 1 or not args.batches or not args.prompts:
        raise SystemExit("--new-tokens must be >= 2, --repeats >= 1, --batches and --prompts non-empty")
    if args.selective != "auto":
        args.selective = float(args.selective)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("this benchmark times the GPU: run it on a CUDA machine (or --tiny on the CPU)")
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    t0 = time.perf_counter()
    rows = [r for name in args.models for r in run_model(name, args, device, dtype)]
    add_ratios(rows)
    meta = {"command": "python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU (smoke run)",
            "torch": torch.__version__, "triton": _triton_version(), "transformers": T.__version__,
            "group_size": 32 if args.tiny else 128, "rank": args.rank, "selective": args.selective,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows,
            "time_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    out = args.out if args.out is not None or args.tiny else Path(__file__).parent / "results"
    if out is not None:
        write(meta, out)
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
