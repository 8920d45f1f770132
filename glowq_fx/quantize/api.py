"""``quantize_(model, calibration, GlowQConfig())``: the one verb before ``torch.compile``.

1. Capture the model's graph on the first calibration batch and find its input-sharing groups
   (``capture.groups.find_groups``; no per-architecture config). Block by block the whole model is
   never traced: the part outside the blocks is captured with the blocks stubbed, and each block
   on its own cached input at its turn (``BlockwiseCalibration.find_block_groups``).
2. Run every calibration batch once, accumulating one ``S = E[x x^T]`` per group from a
   pre-hook on the group's first member. Activations are never kept: the extra memory is the
   groups' ``S`` (d_in^2 each) plus one group's work while it is quantized.
3. Per group: quantize each member (RTN, or GPTQ driven by the same ``S``), solve the
   correction (``correction.decompose.solve``: GlowQ's shared ``B``, or QERA / LQER / SVD per member),
   and swap each member for a ``QuantizedLinear`` in place (``modules.install``); GlowQ-S decides
   which groups keep their correction (``selective.policy``). The group's ``SharedProjection``
   is registered once, under ``glowq_projections`` of the members' closest common ancestor.

Steps 1-2 are ``calibration.calibrate``; its ``Calibration`` can be passed to ``quantize_``
instead of the batches, so that several methods or ranks share one calibration run (the accuracy
benchmark does).

Ranks are capped at what a group's error can hold: ``min(rank, in_features, sum d_out)`` for
the shared ``B``, ``min(rank, in_features, d_out_i)`` per member for independent methods;
the report gives the rank each group got.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from glowq_fx._console import progress_bar
from glowq_fx._devices import check_device
from glowq_fx._heap import release_cycles, trim_heap
from glowq_fx.calibration.blockwise import BlockwiseCalibration, BlockwiseUnsupported
from glowq_fx.calibration.calibrate import Calibration, check_given_groups, discover_groups
from glowq_fx.calibration.collect import collect_statistics
from glowq_fx.calibration.moments import GroupStatistics
from glowq_fx.capture.blocks import Blocks, assign_groups, find_blocks
from glowq_fx.capture.groups import output_head, tied_embedding
from glowq_fx.capture.linears import linear_weight
from glowq_fx.capture.run import Run, check_calibration, check_model, model_device, run_batch
from glowq_fx.config import GlowQConfig, as_config
from glowq_fx.correction.decompose import solve, squared_norm
from glowq_fx.errors import warn
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.embedding import quantize_embedding, tie_to_int8_head
from glowq_fx.modules.experts import QuantizedExperts
from glowq_fx.modules.install import replace_module
from glowq_fx.modules.int8_linear import Int8Linear
from glowq_fx.modules.kernels import use_cpu_kernels
from glowq_fx.modules.linear import QuantizedLinear
from glowq_fx.quant import quantization_error
from glowq_fx.quantize.experts import experts_statistics, find_experts, joined_groups, quantize_experts
from glowq_fx.registry import CORRECTIONS, QUANTIZERS
from glowq_fx.report import GroupReport, QuantizationReport
from glowq_fx.selective.policy import (
    apply_selection,
    attach_group,
    check_auto_batches,
    detach_group,
    drop_expert_corrections,
)
from passes.groups import GroupFilter, InputGroup


def factor_dtype(config: GlowQConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the factors are stored in (``GlowQConfig.factor_dtype``)."""
    if config.factor_dtype == "model" or (config.factor_dtype == "auto" and model_dtype != torch.float32):
        return model_dtype
    return torch.bfloat16 if config.factor_dtype == "auto" else getattr(torch, config.factor_dtype)


def release_capture(model: nn.Module) -> None:
    """Give back what the graph capture left: its traces (Dynamo's shape environment, fake tensors,
    graphs: in size, about a layer's worth of Python objects per layer) are reference cycles that
    only a full collection frees, and the generational collector may not run one before the first
    block's peak; the second pass takes what the first one's finalizers released. Then the heap's
    free pages go back to the OS. A full collection walks every Python object (0.2-1 s), so a model
    under ``RELEASE_MIN_BYTES``, whose traces are a few MB and whose quantization takes seconds,
    skips it."""
    if model_bytes(model) >= RELEASE_MIN_BYTES:
        release_cycles()
    else:
        trim_heap()


RELEASE_MIN_BYTES = 64 << 20


def check_rank(groups: Sequence[InputGroup], config: GlowQConfig) -> None:
    """Warn when ``config.rank`` reaches a group's full rank: it is capped there, and a correction
    of full rank stores more values than the weights it corrects."""
    method = CORRECTIONS[config.method]
    if not method.corrects or config.rank == 0 or not groups:
        return
    over, shapes = [], []
    for g in groups:
        for m in ([sum(g.out_features)] if method.shared else list(g.out_features)):
            shapes.append((m, g.in_features))
            if config.rank >= min(m, g.in_features):
                over.append((g.name, m, g.in_features))
    if over:
        name, m, d = over[0]
        useful = min(m_ * d_ // (m_ + d_) for m_, d_ in shapes)
        warn(
            f"rank {config.rank} is at or above the full rank of {len(over)} of {len(groups)} groups (e.g. {name}: its "
            f"{m} x {d} error holds rank {min(m, d)} at most): those are capped to full rank, and their correction "
            f"stores more values than the weights it corrects; a rank below {useful} keeps every correction smaller "
            "than its weights"
        )


class RankCheck:
    """``check_rank`` over groups found block by block: said once per group shape."""

    def __init__(self, config: GlowQConfig):
        self.config, self.seen = config, set()

    def check(self, groups: Sequence[InputGroup]) -> None:
        new = {(g.in_features, tuple(g.out_features)): g for g in groups}
        check_rank([g for shape, g in new.items() if shape not in self.seen], self.config)
        self.seen.update(new)


def starts_with_bos(model: nn.Module, batches: Sequence[object]) -> bool | None:
    """Whether every calibration window starts with the model's BOS token (``config.bos_token_id``;
    recorded in the report and the checkpoint), None when that cannot be told."""
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    ids = [b.get("input_ids") for b in batches if isinstance(b, dict)]
    if not isinstance(bos, int) or not ids or len(ids) != len(batches) or any(t is None or t.dim() != 2 for t in ids):
        return None
    return all(bool((t[:, 0] == bos).all()) for t in ids)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what a checkpoint stores: not the copies a
    machine's kernels keep), each storage once (tied tables count once)."""
    storages = {}
    for t in model.state_dict(keep_vars=True).values():
        if t.device.type != "meta":
            storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        else:
            storages[id(t)] = t.numel() * t.element_size()
    return sum(storages.values())


def _input_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """The input embedding table (``get_input_embeddings()``), else every ``nn.Embedding``."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and (table is None or m is table)}


def _int8_head(model: nn.Module, config: GlowQConfig) -> str | None:
    """The output head ``config.output_head_bits`` stores in int8, or None."""
    head = output_head(model)
    if config.output_head_bits is None or config.quantize_output_head or head is None:
        return None
    if GroupFilter(include=config.include, exclude=config.exclude).reason(head, 1 << 30) is not None:
        return None  # the user's include/exclude patterns keep it in floating point
    if not isinstance(model.get_submodule(head), nn.Linear):
        raise ValueError(f"output_head_bits={config.output_head_bits}: the output head {head} is a "
                         f"{type(model.get_submodule(head)).__name__}, not an nn.Linear; leave output_head_bits=None")
    return head


def plan_embeddings(model: nn.Module, config: GlowQConfig) -> dict[str, str | None]:
    """For ``config.embedding_bits`` and ``config.output_head_bits``: each table to quantize and the
    output head sharing it (tied), or None; a ``ValueError`` before any work for a combination
    that cannot be stored. A table tied to an int8 head follows the head."""
    head = output_head(model)
    shared = tied_embedding(model, head)
    int8_head = _int8_head(model, config)
    if config.embedding_bits is None:
        return {shared: head} if shared is not None and int8_head is not None else {}
    tables = _input_embeddings(model)
    if not tables:
        raise ValueError(f"embedding_bits={config.embedding_bits}, but {type(model).__name__} has no nn.Embedding "
                         "table; leave embedding_bits=None")
    plan = {}
    for name in tables:
        if name != shared:
            plan[name] = None
            continue
        if int8_head is not None:
            if config.embedding_bits != 8:
                raise ValueError(f"{name} shares its table with the output head {head} (tied weights), which "
                                 f"output_head_bits=8 stores in int8: use embedding_bits=8 or None (the table follows "
                                 f"the head), not {config.embedding_bits}; or quantize_output_head=True with "
                                 "embedding_bits=4 (one 4-bit table serves both)")
        elif not config.quantize_output_head:
            raise ValueError(f"{name} shares its table with the output head {head} (tied weights): quantize both "
                             "(quantize_output_head=True, embedding_bits=4: one 4-bit table serves both; or "
                             "output_head_bits=8: one int8 table) or neither")
        elif config.embedding_bits != 4:
            raise ValueError(f"{name} shares its table with the output head {head} (tied weights), which is stored in "
                             f"the head's 4-bit layout: use embedding_bits=4, not {config.embedding_bits}")
        plan[name] = head
    return plan


def _quantize_head_int8(model: nn.Module, config: GlowQConfig) -> dict[str, dict]:
    """Swap the output head for an ``Int8Linear`` (``config.output_head_bits``); its report entry."""
    head = _int8_head(model, config)
    if head is None:
        return {}
    linear = model.get_submodule(head)
    new = Int8Linear.from_linear(linear)
    replace_module(model, head, new)
    W = linear.weight
    return {head: {"kind": "output head", "bits": 8, "group_size": new.in_features, "shape": list(W.shape),
                   "dense_bytes": W.numel() * W.element_size(), "bytes": new.qweight.nbytes + new.scales.nbytes,
                   "tied_head": None}}


def quantize_embeddings(model: nn.Module, plan: dict[str, str | None], config: GlowQConfig,
                        skipped: dict[str, str]) -> dict[str, dict]:
    """Store the output head in int8 (``config.output_head_bits``), then swap each planned table
    for a ``QuantizedEmbedding`` (sharing a tied head's quantized weight); the report's entry per
    table and int8 head."""
    done = _quantize_head_int8(model, config)
    for name, head in plan.items():
        table = model.get_submodule(name)
        before = table.weight.numel() * table.weight.element_size()
        if head is None:
            new = quantize_embedding(table, config.embedding_bits, config.group_size)
        else:
            linear = model.get_submodule(head)
            if isinstance(linear, Int8Linear):
                new = tie_to_int8_head(table, linear.qweight, linear.scales)
            elif isinstance(linear, QuantizedLinear):
                new = quantize_embedding(table, 4, config.group_size, packed=(linear.qweight, linear.scales,
                                                                              linear.zeros))
            else:
                raise ValueError(f"{name} shares its table with the output head {head}, which was not quantized "
                                 f"({skipped.get(head, 'not in any group')}); quantize the head too or leave "
                                 "embedding_bits=None")
        replace_module(model, name, new)
        after = sum(t.nbytes for t in (new.qweight, new.scales, new.zeros) if t is not None)
        done[name] = {"bits": new.bits, "group_size": new.group_size, "shape": [new.num_embeddings, new.embedding_dim],
                      "dense_bytes": before, "bytes": 0 if head is not None else after, "tied_head": head}
    return done


def _quantize_group(model: nn.Module, g: InputGroup, S: torch.Tensor,
                    config: GlowQConfig) -> tuple[GroupReport, list]:
    """Quantize the group's members in place (uncorrected) and solve its correction; the factors
    come back pending, to be attached once GlowQ-S has chosen (``selective.policy``)."""
    # the float linears are looked up here, not kept in a table: once swapped they are freed
    floats = {n: model.get_submodule(n) for n in g.members}
    Ws = [linear_weight(floats[n]).detach() for n in g.members]
    dtype, device = Ws[0].dtype, Ws[0].device
    S = S.to(device)
    t_quant = time.perf_counter()
    quantizer = QUANTIZERS[config.quantizer]
    qws = [quantizer(W, S, config.quantization) for W in Ws]
    errors = [quantization_error(W, qw) for W, qw in zip(Ws, qws)]
    quantize_time_s = time.perf_counter() - t_quant
    kw = dict(shrinkage=config.shrinkage, mode=config.svd, oversample=config.oversample,
              power_iters=config.power_iters, seed=config.seed,
              dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    # one solve per group: a shared B is capped by what the stacked error can hold, the
    # independent methods cap each member's rank (and whiten S once for the group)
    method = CORRECTIONS[config.method]
    rank = method.rank_for(config.rank, g.in_features, g.out_features)
    solve_group = functools.partial(solve, method.name, S=S, rank=rank, cap_rank=not method.shared, **kw)
    other_solves_s = 0.0  # the alternation's solves besides the one kept
    if config.alternations:  # the float weights are still needed: the solve comes before the swap
        qws, errors, corr, alternate_s, other_solves_s = alternate(Ws, S, qws, errors, solve_group(errors), quantizer,
                                                                   solve_group, config)
        quantize_time_s += alternate_s
    err_sq = sum(squared_norm(E) for E in errors)
    w_sq = sum(squared_norm(W) for W in Ws)
    # the members are swapped for their (uncorrected) quantized modules before the solve: the
    # float weights are dead once the errors exist, and their memory serves the solve's
    code_bytes = scale_bytes = dense_bytes = 0
    for name, W, qw in zip(g.members, Ws, qws):
        qlinear = QuantizedLinear(pack(qw), getattr(floats[name], "bias", None))  # correction attached later
        replace_module(model, name, qlinear)
        code_bytes += qlinear.qweight.nbytes
        scale_bytes += qlinear.scales.nbytes + qlinear.zeros.nbytes
        dense_bytes += W.numel() * W.element_size()
    del floats, Ws, qws, W, qw, qlinear
    trim_heap(dense_bytes)  # the quantizer's temporaries and the float weights, back to the OS (glowq_fx._heap)
    if not config.alternations:
        corr = solve_group(errors)
    solved = corr.report  # one solve for the whole group
    units = [(g.members, corr.B[0], corr.A)] if corr.shared else [
        ((name,), B, [A]) for name, A, B in zip(g.members, corr.A, corr.B)]
    stored = factor_dtype(config, dtype)
    pending = [(members, B.to(stored), [A.to(stored) for A in As])
               for members, B, As in units if B.shape[0] > 0]  # rank 0: nothing to store
    before, after = solved.whitened_error_before, solved.whitened_error_after
    report = GroupReport(
        name=g.name, members=g.members, in_features=g.in_features, out_features=g.out_features,
        rank=solved.rank, error_before=before, error_after=after,
        code_bytes=code_bytes, scale_bytes=scale_bytes, factor_bytes=0, dense_bytes=dense_bytes,
        solve_time_s=solved.time_s + other_solves_s, weight_error=(err_sq / w_sq) ** 0.5 if w_sq else 0.0,
        restore_gain=before - after,
        member_gains=tuple(b - a for b, a in zip(solved.member_errors_before, solved.member_errors_after)),
        candidate_factor_bytes=sum(B.nbytes + sum(A.nbytes for A in As) for _, B, As in pending),
        restored=False, quantize_time_s=quantize_time_s, whitening_time_s=solved.whitening_time_s,
    )
    return report, pending


def alternate(Ws: list[torch.Tensor], S: torch.Tensor, qws: list, errors: list[torch.Tensor], corr,
              quantizer, solve_group, config: GlowQConfig) -> tuple[list, list[torch.Tensor], object, float, float]:
    """``config.alternations`` rounds of LoftQ's alternation on one group: quantize ``W_i - A_i B_i``
    with the base quantizer, solve the correction of the new errors ``W_i - deq(Q_i)``; a round is
    kept only where the group's whitened error after correction goes down (else the alternation
    stops). Returns the kept (codes, errors, correction), the quantizer's time and the time of the
    solves not kept."""
    seconds = 0.0
    solves = corr.report.time_s
    for _ in range(config.alternations):
        t0 = time.perf_counter()
        targets = [W.float() - (A.float() @ B.float()) for W, (A, B) in
                   zip(Ws, (corr.factors(i) for i in range(len(Ws))))]
        new_qws = [quantizer(T.to(W.dtype), S, config.quantization) for T, W in zip(targets, Ws)]
        seconds += time.perf_counter() - t0
        new_errors = [quantization_error(W, qw) for W, qw in zip(Ws, new_qws)]
        new_corr = solve_group(new_errors)
        solves += new_corr.report.time_s
        if not new_corr.report.whitened_error_after < corr.report.whitened_error_after:
            break
        qws, errors, corr = new_qws, new_errors, new_corr
    return qws, errors, corr, seconds, solves - corr.report.time_s


def _quantize_groups(model: nn.Module, groups: Sequence[InputGroup],
                     stats: GroupStatistics, config: GlowQConfig, rows: dict, factors: dict, *,
                     keep: bool = False) -> None:
    """Quantize each group from its ``S`` in ``stats`` (released unless ``keep``), filling ``rows``
    and ``factors`` by group name."""
    for g in groups:
        S = stats[g.name].value() if keep else stats.pop(g.name)
        rows[g.name], factors[g.name] = _quantize_group(model, g, S, config)
        # the solve's temporaries (a few times S and the group's weights), back to the OS
        trim_heap(S.nbytes + rows[g.name].dense_bytes)
        del S


@dataclass
class ExpertsOutcome:
    """What quantizing the experts gave: their report rows and each row's correction as a GlowQ-S
    unit (``factors``, [] where the row is no unit of its own), the modules left in floating point
    (why), the dense groups solved with them (``quantize_experts.joined_groups``: GlowQ-S ranks them
    with the experts' unit) and the rows that follow each unit's fate."""

    rows: list = field(default_factory=list)
    factors: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    joined: set = field(default_factory=set)
    followers: dict = field(default_factory=dict)
    keep_units: bool = True  # False where no GlowQ-S follows (from disk): ``factors`` then hold [], not the tensors


def _quantize_with_experts(model: nn.Module, groups: Sequence[InputGroup], stats: GroupStatistics,
                           config: GlowQConfig, rows: dict, factors: dict, outcome: ExpertsOutcome) -> None:
    """The groups of ``stats`` and its experts modules (released as they are done): the dense groups
    that read the experts' very input are solved with them; a traced module whose use of its
    weights could not be read stays in floating point, with the reason."""
    joins = joined_groups(groups, stats, stats.experts, config)
    joined = {g.name for gs in joins.values() for g in gs}
    _quantize_groups(model, [g for g in groups if g.name not in joined], stats, config, rows, factors)
    for name in list(stats.experts):
        found = stats.experts.pop(name)
        layout = found.layout() if hasattr(found, "layout") else None
        if isinstance(layout, str):
            outcome.skipped[name] = f"3-D weights glowq-fx cannot run quantized: {layout}"
            warn(f"leaving {name} in floating point: {outcome.skipped[name]}")
            continue
        dtype = next(p for p in model.get_submodule(name).parameters() if p.dim() == 3).dtype
        with_it = joins.get(name, [])
        for g in with_it:
            stats.pop(g.name)  # released: a joined group's S is the experts' own (the very same input)
        done = quantize_experts(model, name, found, config, factor_dtype(config, dtype), with_it)
        outcome.rows.extend(done.rows)
        outcome.factors.extend(done.factors if outcome.keep_units else [[] for _ in done.factors])
        outcome.followers.update(done.followers)
        for g in with_it:
            rows[g.name], factors[g.name] = done.joined_rows[g.name], []
            outcome.joined.add(g.name)


def without_expert_weights(model: nn.Module, skipped: dict[str, str]) -> dict[str, str]:
    """``skipped`` less the 3-D weights of quantized experts modules: the graph pass lists them as
    not linears, and ``quantize_experts`` took them."""
    done = [n for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    return {k: v for k, v in skipped.items() if not any(k.startswith(n + ".") for n in done)}


def experts_by_block(experts: dict, blocks: Blocks) -> tuple[list[dict], list[str]]:
    """Each block's experts modules (by name prefix), and those outside every block."""
    of = [{} for _ in blocks.names]
    outside = []
    for name, protocol in experts.items():
        i = next((i for i, b in enumerate(blocks.names) if name.startswith(b + ".")), None)
        if i is None:
            outside.append(name)
        else:
            of[i][name] = protocol
    return of, outside


def _block_label(blocks: Blocks, i: int, groups: Sequence[InputGroup]) -> str:
    prefix = blocks.names[i] + "."
    return " ".join(g.name.removeprefix(prefix) for g in groups)


def quantize_blockwise(model: nn.Module, blockwise: BlockwiseCalibration, groups_of: list[list[InputGroup] | None],
                       config: GlowQConfig, progress: bool, rows: dict, factors: dict, *,
                       before_block: Callable[[int], None] | None = None,
                       after_block: Callable[[int], None] | None = None,
                       experts_of: list[dict] | None = None, experts: ExpertsOutcome | None = None) -> int:
    """Every group, block by block (``calibration.blockwise``), filling ``rows`` and ``factors`` by
    group name; ``groups_of[i]``: block ``i``'s groups, or None: found from its own graph at its
    turn (``BlockwiseCalibration.find_block_groups``; filled in). ``before_block(i)`` /
    ``after_block(i)`` run around block ``i`` (load it, write it). ``experts_of[i]``: block ``i``'s
    experts modules (name -> protocol), quantized with its groups into ``experts``. Returns the
    tokens each ``S`` saw."""
    n_tokens = max((blockwise.head_stats[g.name].n_tokens for g in blockwise.head_groups), default=0)
    _quantize_groups(model, blockwise.head_groups, blockwise.head_stats, config, rows, factors)
    ranked = RankCheck(config)  # the groups found here (given ones were checked by the caller)
    if any(gs is None for gs in groups_of):
        ranked.check([*blockwise.head_groups, *blockwise.tail_groups])
    bar = progress_bar(progress, f"blocks of {blockwise.blocks.container}", len(groups_of))(range(len(groups_of)))
    for i in bar:
        if before_block is not None:
            before_block(i)
        if groups_of[i] is None:
            groups_of[i] = blockwise.find_block_groups(i)
            ranked.check(groups_of[i])
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(_block_label(blockwise.blocks, i, groups_of[i]))
        block_experts = experts_of[i] if experts_of else {}
        stats = blockwise.block_statistics(i, groups_of[i], experts_statistics(model, block_experts, config))
        trim_heap()  # the block's forward temporaries
        n_tokens = max([n_tokens, *(stats[g.name].n_tokens for g in groups_of[i]),
                        *(getattr(e.S, "n_tokens", 0) for e in stats.experts.values())])
        experts = experts if experts is not None else ExpertsOutcome()
        _quantize_with_experts(model, groups_of[i], stats, config, rows, factors, experts)
        if config.block_inputs == "quantized":  # the next block sees this one quantized and corrected
            pending = [g for g in groups_of[i] if g.name not in experts.joined]  # those are corrected already
            for g in pending:
                attach_group(model, rows[g.name], factors[g.name])
            blockwise.advance(i)
            for g in pending:
                detach_group(model, rows[g.name], factors[g.name])
        else:
            blockwise.advance(i)
        if after_block is not None:
            after_block(i)
        trim_heap()  # what this block freed, back to the OS before the next one allocates
    tail = blockwise.tail_statistics()
    n_tokens = max([n_tokens, *(tail[g.name].n_tokens for g in blockwise.tail_groups)])
    _quantize_groups(model, blockwise.tail_groups, tail, config, rows, factors)
    return n_tokens


def blockwise_summary(blockwise: BlockwiseCalibration, groups_of: list[list[InputGroup]], rows: dict,
                      config: GlowQConfig, device: torch.device) -> dict:
    """The report's ``calibration`` entry of a block-by-block run, with the time per block."""
    return {
        "mode": "blocks",
        "blocks": blockwise.blocks.container,
        "n_blocks": len(blockwise.blocks.names),
        "block_inputs": config.block_inputs,
        "activations": blockwise.place,
        "activation_bytes": blockwise.needed_bytes,
        "device": str(device),
        "times": {
            **blockwise.times,
            "quantize_s": [sum(rows[g.name].quantize_time_s for g in gs) for gs in groups_of],
            "solve_s": [sum(rows[g.name].solve_time_s for g in gs) for gs in groups_of],
        },
    }


def nothing_left(model: nn.Module, skipped: dict[str, str]) -> ValueError:
    """The error for a model none of whose linears or experts is quantized, naming the first reasons."""
    return ValueError(f"nothing of {type(model).__name__} is left to quantize: "
                      + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:4]))


def _blockwise(model: nn.Module, blocks: Blocks, batches: list, run: Run, device: torch.device,
               given: list[InputGroup] | None, config: GlowQConfig) -> BlockwiseCalibration | None:
    """The block-by-block calibration (the blocks' inputs recorded; without ``given`` groups, those
    outside the blocks found from the model's graph with its blocks stubbed), or None where the
    model cannot be calibrated so (said in a warning; an error with ``calibration="blocks"``)."""
    outside = None if given is None else assign_groups(given, blocks)[1]
    try:
        return BlockwiseCalibration(model, blocks, batches, run, device, outside, stats_dtype=config.stats_dtype,
                                    first_position_weight=config.first_position_weight,
                                    block_inputs=config.block_inputs, activations=config.activations,
                                    offload_dir=config.offload_dir, find=config if given is None else None)
    except BlockwiseUnsupported as exc:
        if config.calibration == "blocks":
            raise ValueError(f"calibration='blocks' is not possible for {type(model).__name__}: {exc}; "
                             "use calibration='model'") from None
        warn(f"calibrating {type(model).__name__} whole, not block by block: {exc}")
        return None


def quantize_(
    model: nn.Module,
    calibration: Iterable[object] | Calibration,
    config: GlowQConfig | None = None,
    *,
    groups: Sequence[InputGroup] | None = None,
    run: Run = run_batch,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place: 4-bit weights plus a low-rank correction per ``config``.

    Args:
        model: a floating-point model on any device (one dtype per group); its weights may stay
            on the CPU while blocks compute on ``device``.
        calibration: batches of model inputs on the model's device: mappings of keyword
            arguments (``{"input_ids": (B, T) int64, "attention_mask": (B, T)}``; the mask
            excludes padding from ``S``), tuples of positional arguments, or tensors. Or a
            ``Calibration`` from ``calibrate`` (of this model's weights), reused without running
            the model again.
        config: ``GlowQConfig`` (default: GlowQ, rank 64, RTN W4 g128, block by block when the
            model has repeated blocks: ``GlowQConfig.calibration``).
        groups: precomputed groups (``find_groups(model, batch, config).groups``) to skip the
            graph capture.
        run: ``run(model, batch)`` does one forward pass (default ``capture.run.run_batch``).
        progress: show tqdm bars over calibration batches, blocks and groups.
        device: where the blocks compute, block by block (default: where the model is); each
            block moves there, is calibrated and quantized, and moves back.

    Returns:
        ``QuantizationReport``; ``print(report)`` shows the per-group table.
    """
    t0 = time.perf_counter()
    config = as_config(config)
    if device is not None:
        device = check_device(device, "device")
    if not isinstance(calibration, Calibration):
        check_model(model)
    tables = plan_embeddings(model, config)  # before any work: a table that cannot be stored is refused
    bytes_before = model_bytes(model)
    done = _Done()
    if isinstance(calibration, Calibration):
        if groups is not None:
            raise ValueError("pass groups to calibrate(), not to quantize_() with a Calibration")
        _quantize_calibrated(model, calibration, config, done)
    else:
        done.batches = check_calibration(model, calibration)
        if config.selective == "auto":
            check_auto_batches(done.batches)  # before any work
        was_training = model.training
        model.eval()  # calibration statistics without dropout
        try:
            _calibrate_and_quantize(model, groups, run, device, config, progress, done)
        finally:
            model.train(was_training)
    return _finish(model, done, tables, config, progress, bytes_before, t0)


@dataclass
class _Done:
    """What the quantization stages of ``quantize_`` hand on to its report."""

    batches: list = field(default_factory=list)
    order: list = field(default_factory=list)  # the dense groups, in model order
    rows: dict = field(default_factory=dict)  # group name -> GroupReport
    factors: dict = field(default_factory=dict)  # group name -> its factors, for GlowQ-S
    experts: ExpertsOutcome = field(default_factory=ExpertsOutcome)
    skipped: dict = field(default_factory=dict)
    breaks: list = field(default_factory=list)
    n_tokens: int = 0
    how: dict = field(default_factory=dict)


def _quantize_calibrated(model: nn.Module, calibration: Calibration, config: GlowQConfig, done: _Done) -> None:
    """A ``Calibration`` reused: its statistics, no forward pass."""
    calibration.check_belongs_to(model)
    if config.selective == "auto":
        check_auto_batches(calibration.batches)
    done.batches, done.order, done.breaks = calibration.batches, calibration.groups, calibration.graph_breaks
    done.n_tokens, done.how = calibration.n_tokens, {"mode": "model", "reused": True}
    done.skipped = dict(calibration.skipped)
    done.skipped.update({name: "MoE experts need the calibration batches (a Calibration holds no expert "
                               "statistics); pass the batches to quantize_" for name in find_experts(model, config)[0]})
    check_rank(done.order, config)
    with torch.no_grad():
        _quantize_groups(model, done.order, calibration.statistics, config, done.rows, done.factors, keep=True)


def _calibrate_and_quantize(model: nn.Module, groups, run: Run, device, config: GlowQConfig, progress: bool,
                            done: _Done) -> None:
    """Calibration batches: block by block where the model has repeated blocks (and the config
    allows), else the whole model at once."""
    blocks = None if config.calibration == "model" else find_blocks(model)
    if config.calibration == "blocks" and blocks is None:
        raise ValueError(f"calibration='blocks', but {type(model).__name__} has no list of repeated blocks holding "
                         "linears; use calibration='model' (or 'auto')")
    home = model_device(model)
    device = home if device is None else torch.device(device)
    if blocks is None and device != home:
        raise ValueError(f"device={device} computes blocks away from the model ({home}), but the model is calibrated "
                         "whole; move the model there, or use calibration='blocks'")
    experts, experts_skipped = find_experts(model, config)
    unusual = {k: v for k, v in experts_skipped.items() if "cannot run" in v}
    if unusual:
        warn(f"leaving {len(unusual)} modules with 3-D weights in floating point: "
             + "; ".join(f"{k}: {v}" for k, v in list(unusual.items())[:2]))
    given = None if groups is None else check_given_groups(model, groups)
    blockwise, experts_of = None, None
    if blocks is not None:
        experts_of, experts_outside = experts_by_block(experts, blocks)
        if experts_outside and config.calibration == "blocks":
            raise ValueError(f"the experts modules {experts_outside} lie outside the repeated blocks of "
                             f"{blocks.container}; use calibration='model'")
        if experts_outside:
            warn(f"calibrating {type(model).__name__} whole, not block by block: the experts modules "
                 f"{experts_outside} lie outside its repeated blocks")
        else:
            blockwise = _blockwise(model, blocks, done.batches, run, device, given, config)
    if blockwise is not None:
        _quantize_by_blocks(model, blockwise, blocks, given, experts_of, device, config, progress, done)
    else:
        _quantize_whole(model, given, experts, run, config, progress, done)
    done.skipped.update(experts_skipped)
    if not done.order and not experts:  # nothing was changed
        raise nothing_left(model, done.skipped)


def _quantize_by_blocks(model: nn.Module, blockwise: BlockwiseCalibration, blocks, given, experts_of, device,
                        config: GlowQConfig, progress: bool, done: _Done) -> None:
    # given groups are split by block; found ones come from each block's own graph at its turn
    groups_of, split = [None] * len(blocks.names), []
    if given is not None:
        check_rank(given, config)
        groups_of, _, split = assign_groups(given, blocks)
    if split:
        warn(f"{len(split)} input-sharing groups span several blocks of {blocks.container} "
             f"({', '.join(split[:3])}{' ...' if len(split) > 3 else ''}); each is split into one group per "
             "block, sharing B within the block only (GlowQConfig(calibration='model') keeps them whole)")
    with blockwise, torch.no_grad():
        done.n_tokens = quantize_blockwise(model, blockwise, groups_of, config, progress, done.rows, done.factors,
                                           experts_of=experts_of, experts=done.experts)
    done.order = [g for part in ([blockwise.head_groups], groups_of, [blockwise.tail_groups]) for gs in part
                  for g in gs]
    done.skipped, done.breaks = dict(blockwise.skipped), blockwise.graph_breaks
    done.how = blockwise_summary(blockwise, groups_of, done.rows, config, device)


def _quantize_whole(model: nn.Module, given, experts, run: Run, config: GlowQConfig, progress: bool,
                    done: _Done) -> None:
    done.order, skipped, done.breaks = discover_groups(model, done.batches, config, given, run)
    if given is None:  # a graph was captured
        release_capture(model)
    done.skipped = dict(skipped)
    if not done.order and not experts:
        return  # the caller says why nothing was quantized
    check_rank(done.order, config)
    stats = collect_statistics(model, done.order, done.batches, run, dtype=config.stats_dtype,
                               first_position_weight=config.first_position_weight,
                               progress=progress_bar(progress, "calibration", len(done.batches)),
                               experts=experts_statistics(model, experts, config))
    done.n_tokens = max([*(stats[g.name].n_tokens for g in done.order),
                         *(getattr(e.S, "n_tokens", 0) for e in stats.experts.values())], default=0)
    with torch.no_grad():
        _quantize_with_experts(model, done.order, stats, config, done.rows, done.factors, done.experts)
    done.how = {"mode": "model"}


def _select(model: nn.Module, rows: list, factors: list, done: _Done, config: GlowQConfig, progress: bool):
    """GlowQ-S over the dense groups and the experts' units together. The experts' corrections were
    attached as they were solved: taken off first, for the policy to put back those it keeps. A
    row that follows a unit (another weight, or a dense group, sharing its ``B``) keeps its
    correction exactly when the unit does."""
    experts = done.experts
    by_name = {r.name: r for r in (*experts.rows, *(done.rows[g] for g in experts.joined))}
    kept = {name: (by_name[name].error_after, by_name[name].rank, by_name[name].factor_bytes)
            for names in experts.followers.values() for name in names}
    own = {leader: by_name[leader].factor_bytes for leader in experts.followers}  # B and the leader's own A_e
    for row, unit in zip(experts.rows, experts.factors):
        if unit:
            detach_group(model, row, unit)
    selection = apply_selection(model, [*rows, *experts.rows], [*factors, *experts.factors], config.selective,
                                done.batches, progress)
    for leader, names in experts.followers.items():
        if by_name[leader].restored:  # attach_group counted the whole unit's bytes, which its rows share
            by_name[leader].factor_bytes = own[leader]
        for name in names:
            row = by_name[name]
            if by_name[leader].restored:
                row.error_after, row.rank, row.factor_bytes = kept[name]
                row.restored = True
            else:
                row.error_after, row.rank, row.factor_bytes, row.restored = row.error_before, 0, 0, False
    if config.selective is not None and config.expert_selection == "per-expert" and experts.rows:
        per_expert = drop_expert_corrections(model, [*rows, *experts.rows], [*factors, *experts.factors],
                                             done.batches, selection)
        if per_expert is not None and per_expert["experts"]:
            selection = {**(selection or {"policy": config.selective}), "per_expert": per_expert}
    return selection


def _finish(model: nn.Module, done: _Done, tables, config: GlowQConfig, progress: bool, bytes_before: int,
            t0: float) -> QuantizationReport:
    """GlowQ-S, the embedding tables, the checkpoint attachment and the report."""
    ranked = [g for g in done.order if g.name not in done.experts.joined]
    with torch.no_grad():
        selection = _select(model, [done.rows[g.name] for g in ranked], [done.factors[g.name] for g in ranked],
                            done, config, progress)
        embeddings = quantize_embeddings(model, tables, config, dict(done.skipped))
    skipped = without_expert_weights(model, {**done.skipped, **done.experts.skipped})
    bos = starts_with_bos(model, done.batches)
    how = done.how if bos is None else {**done.how, "windows_start_with_bos": bos}
    from glowq_fx.checkpoint.transformers import attach  # transformers' save_pretrained then writes our format

    attach(model, config.to_dict())
    bytes_after = model_bytes(model)  # the stored model, before the machine's kernel copies below
    return QuantizationReport(
        config=config, groups=[done.rows[g.name] for g in done.order] + done.experts.rows, skipped=skipped,
        graph_breaks=list(done.breaks), n_batches=len(done.batches), n_tokens=done.n_tokens,
        time_s=time.perf_counter() - t0, selection=selection, calibration=how, embeddings=embeddings,
        model_bytes=(bytes_before, bytes_after), kernels=use_cpu_kernels(model))
