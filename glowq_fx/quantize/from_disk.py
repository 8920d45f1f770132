"""``quantize_checkpoint``: quantize a model larger than memory, from its checkpoint directory to a
quantized checkpoint, one block in memory at a time.

The float model is built without its weights (``data.lazy_model``); what lies outside the blocks
(embeddings, final norm, head) is read onto the CPU, and the groups there are found on the
model's graph with its blocks stubbed; then block by block (``calibration.blockwise``) each block
is read from the safetensors onto the compute device, its groups found on its own graph,
calibrated, quantized and corrected, written into the output shards (``checkpoint.CheckpointWriter``)
and released. An MoE block's experts are read the same way (their per-expert checkpoint keys merged
into the model's 3-D weights as transformers merges them, ``data.lazy_model.KeyConversions``),
their statistics collected with the block's and released with it. At any time memory holds the
outside weights, one block, its ``S`` (and its experts' statistics) and the cached block inputs.
The result loads with ``load_quantized`` and equals ``quantize_`` of the same model block by block,
bit for bit.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch

from glowq_fx._devices import check_device
from glowq_fx.calibration.blockwise import BlockwiseCalibration, BlockwiseUnsupported
from glowq_fx.capture.blocks import find_blocks
from glowq_fx.capture.run import Run, check_calibration, check_model, run_batch
from glowq_fx.checkpoint.quantized import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter
from glowq_fx.config import GlowQConfig, as_config
from glowq_fx.data.lazy_model import LazyCheckpoint, release
from glowq_fx.quantize.api import (
    ExpertsOutcome,
    blockwise_summary,
    experts_by_block,
    model_bytes,
    nothing_left,
    plan_embeddings,
    quantize_blockwise,
    quantize_embeddings,
    starts_with_bos,
    without_expert_weights,
)
from glowq_fx.quantize.experts import find_experts
from glowq_fx.report import GroupReport, QuantizationReport
from glowq_fx.selective.policy import attach_group


def _refuse_whole_model_options(config: GlowQConfig) -> None:
    if config.selective is not None:
        raise ValueError("quantize_checkpoint writes each block as soon as it is quantized, so GlowQ-S cannot choose "
                         "among all groups afterwards: use selective=None (or load the model and call quantize_)")
    if config.calibration == "model":
        raise ValueError("quantize_checkpoint calibrates block by block; calibration='model' needs the whole model in "
                         "memory (load it and call quantize_)")


def _open_blocks(directory: str | Path, dtype: torch.dtype | None, config: GlowQConfig):
    """``(lazy checkpoint, its blocks)``: everything outside the blocks and the first block loaded
    on the CPU (the first for the shape of a block's output), the other blocks left on disk."""
    lazy = LazyCheckpoint(directory, dtype)
    model = lazy.model
    blocks = find_blocks(model)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to read one at a time; load it with "
                         "from_pretrained and call quantize_")
    experts, experts_skipped = find_experts(model, config)
    experts_of, outside = experts_by_block(experts, blocks)
    if outside:
        raise ValueError(f"the experts modules {outside} lie outside the repeated blocks of {type(model).__name__}, "
                         "which quantizing from disk reads one at a time: load the model and call quantize_, or pass "
                         "GlowQConfig(experts=False) to keep them in floating point")
    lazy.load(torch.device("cpu"), exclude=blocks.names)  # embeddings, final norm, head
    lazy.load(torch.device("cpu"), [blocks.names[0]])
    return lazy, blocks, experts_of, experts_skipped


def quantize_checkpoint(directory: str | Path, out: str | Path, calibration: Iterable[object],
                        config: GlowQConfig | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, tokenizer=None,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, run: Run = run_batch,
                        progress: bool = True) -> QuantizationReport:
    """Quantize the transformers checkpoint in ``directory`` into ``out``, one block in memory.

    Args:
        directory: a float checkpoint (``config.json`` and safetensors, shards or one file).
        out: where the quantized checkpoint goes (``load_quantized(out)`` reads it).
        calibration: batches of model inputs on the CPU (``quantize_``'s batches).
        config: ``GlowQConfig``; every group keeps its correction (``selective`` must be None:
            each block is written as soon as it is done).
        device: where each block is computed and quantized.
        dtype: the model's dtype (default: the checkpoint config's).
        tokenizer: saved with the checkpoint when given.
        max_shard_size: bytes per output shard at most.
    """
    t0 = time.perf_counter()
    config = as_config(config)
    _refuse_whole_model_options(config)
    device = check_device(device)
    lazy, blocks, experts_of, experts_skipped = _open_blocks(directory, dtype, config)
    model = lazy.model
    check_model(model)
    tables = plan_embeddings(model, config)
    bytes_before = model_bytes(model)
    batches = check_calibration(model, calibration)
    try:  # the groups outside the blocks from the model's graph with its blocks stubbed; each block's from its own
        blockwise = BlockwiseCalibration(model, blocks, batches, run, device, None, stats_dtype=config.stats_dtype,
                                         first_position_weight=config.first_position_weight,
                                         block_inputs=config.block_inputs, activations=config.activations,
                                         offload_dir=config.offload_dir, find=config)
    except BlockwiseUnsupported as exc:
        raise ValueError(f"{type(model).__name__} cannot be quantized from disk block by block: {exc}") from None
    groups_of: list = [None] * len(blocks.names)
    writer = CheckpointWriter(out, max_shard_size)
    rows: dict[str, GroupReport] = {}
    factors: dict[str, list] = {}

    experts = ExpertsOutcome(keep_units=False)  # no GlowQ-S here: each block is written as it is done

    def load(i: int) -> None:
        if i > 0:
            lazy.load(device, [blocks.names[i]])

    def write(i: int) -> None:
        for g in groups_of[i]:
            attach_group(model, rows[g.name], factors.pop(g.name))  # written: the factors are not kept
        writer.add(model, blocks.names[i])
        release(model.get_submodule(blocks.names[i]))

    with blockwise, torch.no_grad():
        n_tokens = quantize_blockwise(model, blockwise, groups_of, config, progress, rows, factors,
                                      before_block=load, after_block=write, experts_of=experts_of, experts=experts)
        for g in (*blockwise.head_groups, *blockwise.tail_groups):
            attach_group(model, rows[g.name], factors.pop(g.name))
        breaks = blockwise.graph_breaks
        skipped = {**without_expert_weights(model, blockwise.skipped), **experts_skipped, **experts.skipped}
        embeddings = quantize_embeddings(model, tables, config, skipped)
    order = [*blockwise.head_groups, *(g for gs in groups_of for g in gs), *blockwise.tail_groups]
    if not order and not experts.rows:
        raise nothing_left(model, skipped)
    how = {**blockwise_summary(blockwise, groups_of, rows, config, device), "read_from": str(directory)}
    if (bos := starts_with_bos(model, batches)) is not None:
        how["windows_start_with_bos"] = bos
    report = QuantizationReport(config, [rows[g.name] for g in order] + experts.rows, skipped, breaks, len(batches),
                                n_tokens, time.perf_counter() - t0, None, how, embeddings,
                                (bytes_before, model_bytes(model)))
    writer.close(model, config=config, report=report, tokenizer=tokenizer)
    return report
