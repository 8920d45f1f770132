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


def _static_cache(model: nn.Module, batch: int, length: int):
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


def compile_model(model: nn.Module, backend: object = "inductor", **options) -> Callable:
    """The decode step of ``model`` compiled with ``backend`` (static shapes)."""
    return torch.compile(decode_step(model), backend=backend, dynamic=False, **options)


@torch.no_grad()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, step: Callable | None = None,
                repeats: int = 3, warmup: int = 1) -> DecodeTiming:
    """Greedy decoding of ``new_tokens`` after ``prompt`` (batch, T) token ids with ``step``
    (default: the eager step), ``warmup`` untimed runs (compilation) then ``repeats`` timed."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, tokens) with at least one token, got {tuple(prompt.shape)}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the first token is timed apart), got {new_tokens}")
    step = step or decode_step(model)
    batch, T = prompt.shape
    cache = _static_cache(model, batch, T + new_tokens)
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
    return DecodeTiming(statistics.median(ttft), statistics.median(rates), tokens)
