"""The main job, as far as the library goes today: compare corrections on a small Llama.

Builds a randomly initialised Llama from a transformers config (no download), finds its
input-sharing groups from the captured graph, collects one ``S`` per group on random tokens, RTN-quantizes every
member and solves three corrections per group: none (RTN), independent QERA-exact and GlowQ.
Returns rows that ``glowq demo`` prints. The real-model demo (SmolLM2 and Wikipedia text)
replaces this one with the accuracy issue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glowq_fx.config import GlowQConfig
from glowq_fx.decompose import solve
from glowq_fx.capture import find_groups
from glowq_fx.hooks import collect_statistics
from glowq_fx.quant import quantization_error, quantize_rtn
from passes.grouping import InputGroup


@dataclass
class DemoRow:
    group: str
    members: int
    in_features: int
    out_features: int
    rtn_error: float
    qera_error: float
    glowq_error: float
    qera_bytes: int
    glowq_bytes: int


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 4-layer Llama with random weights; ``intermediate_size`` 688 exercises group padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def compare_corrections(
    model: nn.Module, groups: list[InputGroup], stats, config: GlowQConfig
) -> list[DemoRow]:
    modules = dict(model.named_modules())
    rows = []
    for g in groups:
        S = stats[g.name].value()
        errors = []
        for name in g.members:
            W = modules[name].weight.detach()
            errors.append(quantization_error(W, quantize_rtn(W, config.group_size, symmetric=config.symmetric)))
        rank = min(config.rank, min(g.out_features), g.in_features)
        kw = dict(shrinkage=config.shrinkage, mode=config.svd, oversample=config.oversample,
                  power_iters=config.power_iters, seed=config.seed)
        qera = solve("qera", errors, S, rank, **kw)
        glowq = solve("glowq", errors, S, rank, **kw)
        rows.append(DemoRow(g.name, len(g.members), g.in_features, sum(g.out_features),
                            qera.report.whitened_error_before, qera.report.whitened_error_after,
                            glowq.report.whitened_error_after, qera.nbytes(), glowq.nbytes()))
    return rows


def run_demo(config: GlowQConfig | None = None, *, n_batches: int = 8, seq_len: int = 128, seed: int = 0,
             progress=lambda it: it) -> list[DemoRow]:
    config = config or GlowQConfig(group_size=64, rank=32)
    model = tiny_llama(seed)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [{"input_ids": torch.randint(0, vocab, (2, seq_len), generator=gen),
                "attention_mask": torch.ones(2, seq_len, dtype=torch.long)} for _ in range(n_batches)]
    groups = find_groups(model, batches[0], config).groups  # the output head is left out by default
    stats = collect_statistics(model, groups, batches, lambda m, b: m(**b),
                               dtype=config.stats_dtype, progress=progress)
    return compare_corrections(model, groups, stats, config)
