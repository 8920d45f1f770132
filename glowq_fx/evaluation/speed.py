"""Greedy decoding speed of a causal LM: time to first token and decode tokens per second.

The step is what a serving loop runs, with as little per-token overhead as transformers allows:
a static KV cache (fixed shapes, so a compiled step compiles once for the prompt and once for the
one-token step and never again), the model's forward called directly with ``cache_position``
(``generate``'s per-token bookkeeping is not part of the model's speed), greedy argmax, and the
logits of the last position only. ``compile_model`` compiles that step with any backend
(``glowq_backend`` for a quantized model, Inductor for a float one).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DecodeTiming:
    """Medians over the timed runs.

    Attributes:
        ttft_s: the prompt's forward and its first token (``batch x prompt`` tokens).
        decode_tokens_per_s: ``batch x (new_tokens - 1)`` generated tokens over the time after
            the first token.
        tokens: the greedy tokens of the last run, (batch, new_tokens).
    """

    ttft_s: float
    decode_tokens_per_s: float
    tokens: torch.Tensor


def _static_cache(model: nn.Module, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def decode_step(model: nn.Module) -> Callable:
    """``step(ids, cache, position) -> next ids``: one forward over ``ids`` (batch, t) at
    positions ``position`` (t,), the greedy token after the last one."""
    def step(ids, cache, position):
        out = model(input_ids=ids, past_key_values=cache, cache_position=position, use_cache=True,
                    logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)
    return step


def compile_model(model: nn.Module, backend: object = "inductor", *, skip_module_guards: bool = True,
                  **options) -> Callable:
    """The decode step of ``model`` compiled with ``backend`` (static shapes).

    ``skip_module_guards``: a serving loop does not change the model between steps, so Dynamo's
    guards on the modules' attributes (checked before every step: ~2 ms per token for SmolLM2's
    30 layers on the 2-core machine, 12% of a 4-bit step) are left out, as gpt-fast-style loops
    do (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``); guards on the inputs stay. Pass
    False where the model's modules change between calls (then the step recompiles).
    """
    if skip_module_guards:
        compile_options = dict(options.pop("options", None) or {})
        compile_options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        options["options"] = compile_options
    return torch.compile(decode_step(model), backend=backend, dynamic=False, **options)


@torch.no_grad()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, step: Callable | None = None,
                repeats: int = 3, warmup: int = 2) -> DecodeTiming:
    """Greedy decoding of ``new_tokens`` after ``prompt`` (batch, T) token ids with ``step``
    (default: the eager step), ``warmup`` untimed runs then ``repeats`` timed. Two warm-up runs: a
    compiled step compiles its prompt shape twice, before and after the cache holds its first tokens."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, tokens) with at least one token, got {tuple(prompt.shape)}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the first token is timed apart), got {new_tokens}")
    step = step or decode_step(model)
    batch, T = prompt.shape
    cache = _static_cache(model, T + new_tokens)  # sized for the batch on its first update
    ttft, rates, tokens = [], [], None
    for run in range(warmup + repeats):
        cache.reset()
        out = []
        t0 = time.perf_counter()
        ids = step(prompt, cache, torch.arange(T, device=prompt.device))
        out.append(ids)
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            ids = step(ids, cache, torch.tensor([T + i], device=prompt.device))
            out.append(ids)
        torch.cat(out, 1).tolist()  # the tokens reach the host (a device sync)
        t2 = time.perf_counter()
        if run >= warmup:
            ttft.append(t1 - t0)
            rates.append(batch * (new_tokens - 1) / (t2 - t1))
            tokens = torch.cat(out, 1)
    if not repeats:
        return DecodeTiming(float("nan"), float("nan"), torch.cat(out, 1))
    return DecodeTiming(statistics.median(ttft), statistics.median(rates), tokens)


@dataclass
class EagerVsCompiled:
    """``time_decode`` of one model eager and under ``glowq_backend``, on one prompt."""

    eager: DecodeTiming
    compiled: DecodeTiming
    compile_s: float  # the warm-up runs of the compiled step (compilation, mostly)

    @property
    def decode_speedup(self) -> float:
        return self.compiled.decode_tokens_per_s / self.eager.decode_tokens_per_s

    @property
    def tokens_agree(self) -> float:
        """Fraction of greedy tokens the compiled run shares with the eager run."""
        return (self.eager.tokens == self.compiled.tokens).float().mean().item()

    def rows(self) -> list[list[str]]:
        """Table rows: run, decode tokens/s, time to first token, ratio to eager."""
        return [["eager", f"{self.eager.decode_tokens_per_s:.1f}", f"{self.eager.ttft_s:.3f}", "1.00x"],
                ["torch.compile(backend=glowq_backend)", f"{self.compiled.decode_tokens_per_s:.1f}",
                 f"{self.compiled.ttft_s:.3f}", f"{self.decode_speedup:.2f}x"]]


def decode_eager_vs_compiled(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                             repeats: int = 3) -> EagerVsCompiled:
    """Greedy decoding of a quantized model, eager and compiled with ``glowq_backend``."""
    from glowq_fx.backend import glowq_backend

    eager = time_decode(model, prompt, new_tokens, repeats=repeats)
    step = compile_model(model, glowq_backend)
    t0 = time.perf_counter()
    time_decode(model, prompt, new_tokens, step=step, repeats=0)  # the warm-up alone: compiles
    compile_s = time.perf_counter() - t0
    compiled = time_decode(model, prompt, new_tokens, step=step, repeats=repeats, warmup=0)
    return EagerVsCompiled(eager, compiled, compile_s)
