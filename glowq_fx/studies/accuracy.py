"""Perplexity of several quantization methods from one calibration run: the accuracy table.

Every method reads the same ``S`` of the unquantized model's group inputs, so the model is
calibrated once (``calibration.calibrate``) and each row quantizes a fresh copy with that
``Calibration``. Shared by ``benchmarks/bench_accuracy.py`` and ``glowq demo``.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from glowq_fx._console import format_table
from glowq_fx.calibration.calibrate import Calibration
from glowq_fx.config import GlowQConfig
from glowq_fx.evaluation.perplexity import perplexity
from glowq_fx.modules.linear import QuantizedLinear
from glowq_fx.quantize import quantize_
from glowq_fx.registry import CORRECTIONS
from passes.groups import InputGroup

FP16_BYTES = 2  # correction factors are reported as stored for an fp16/bf16 model


@dataclass
class Method:
    label: str
    config: GlowQConfig | None  # None: the unquantized reference


@dataclass
class AccuracyRow:
    label: str
    method: str
    quantizer: str
    rank: int
    perplexity: float
    nll: float
    gap_closed: float | None  # percent of RTN's perplexity gap to the reference that the row removes
    factor_bytes: int  # correction factors at fp16
    quantize_time_s: float  # quantization + solve, the shared calibration excluded

    def to_dict(self) -> dict:
        return asdict(self)


def factor_bytes(groups: Sequence[InputGroup], method: str, rank: int) -> int:
    """Bytes (fp16) of the correction factors ``method`` stores at ``rank``, ranks capped as in
    ``quantize_``: one ``B`` (r x d_in) per group plus ``A_i`` for GlowQ, ``B_i`` and ``A_i`` per
    member for the independent methods."""
    total, handler = 0, CORRECTIONS[method]
    for g in groups:
        if handler.shared:
            r = handler.rank_for(rank, g.in_features, g.out_features)
            total += r * (g.in_features + sum(g.out_features))
        elif handler.corrects:
            total += sum(min(rank, g.in_features, n) * (g.in_features + n) for n in g.out_features)
    return total * FP16_BYTES


def equal_memory_rank(groups: Sequence[InputGroup], budget_bytes: int) -> int:
    """The largest GlowQ rank whose factors fit in ``budget_bytes`` (e.g. independent QERA's)."""
    rank = 0
    limit = max((g.in_features for g in groups), default=0)
    while rank < limit and factor_bytes(groups, "glowq", rank + 1) <= budget_bytes:
        rank += 1
    return rank


def compare_methods(model: nn.Module, tokens: Tensor, calibrated: Calibration | Sequence[object],
                    methods: Sequence[Method], *,
                    seq_len: int = 2048, max_tokens: int | None = None, batch_size: int = 1,
                    progress: bool = True, on_row: Callable[[AccuracyRow], None] | None = None,
                    on_model: Callable[[Method, nn.Module], None] | None = None) -> list[AccuracyRow]:
    """One row per method: quantize a copy of ``model`` with ``calibrated`` and measure perplexity.

    ``calibrated`` is a ``Calibration`` (one whole-model calibration shared by every row) or the
    calibration batches (each row calibrates itself, as its config says: block by block, and fed
    the quantized blocks' outputs with ``block_inputs="quantized"``).

    ``on_row(row)`` sees each row when it is done; ``on_model(method, model)`` each quantized copy
    (keep a reference to use it after the call; otherwise it is freed).

    ``gap_closed`` needs a reference row (config None) and an RTN row without correction
    (quantizer rtn, method none); it is filled once both are known.
    """
    rows: list[AccuracyRow] = []
    for spec in methods:
        if spec.config is None:
            subject, elapsed, fbytes, cfg = model, 0.0, 0, None
        else:
            cfg = spec.config
            subject = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = quantize_(subject, calibrated, cfg, progress=False)
            elapsed = time.perf_counter() - t0
            factors = [m.A for m in subject.modules() if isinstance(m, QuantizedLinear) and m.A is not None]
            element = factors[0].element_size() if factors else FP16_BYTES
            fbytes = report.total("factor_bytes") * FP16_BYTES // element  # as fp16, whatever they are stored in
        result = perplexity(subject, tokens, seq_len, batch_size=batch_size, max_tokens=max_tokens,
                            progress=progress, desc=spec.label)
        rows.append(AccuracyRow(spec.label, "reference" if cfg is None else cfg.method,
                                "" if cfg is None else cfg.quantizer, 0 if cfg is None else cfg.rank,
                                result.perplexity, result.nll, None, fbytes, elapsed))
        fill_gap_closed(rows)
        if on_row is not None:
            on_row(rows[-1])
        if on_model is not None and subject is not model:
            on_model(spec, subject)
        del subject
    return rows


def fill_gap_closed(rows: list[AccuracyRow]) -> None:
    """Set each row's ``gap_closed`` from the reference row and the plain RTN row, when both are there."""
    ref = next((r for r in rows if r.method == "reference"), None)
    # the gap is RTN's by definition (the papers' baseline): the uncorrected round-to-nearest row
    rtn = next((r for r in rows if r.method in CORRECTIONS and not CORRECTIONS[r.method].corrects
                and r.quantizer == "rtn"), None)
    if ref is None or rtn is None or rtn.perplexity == ref.perplexity:
        return
    for r in rows:
        r.gap_closed = 100.0 * (rtn.perplexity - r.perplexity) / (rtn.perplexity - ref.perplexity)


def accuracy_table(rows: Sequence[AccuracyRow]) -> str:
    body = [[r.label, f"{r.perplexity:.3f}", "" if r.gap_closed is None else f"{r.gap_closed:.1f}",
             f"{r.factor_bytes / 2**20:.2f}", f"{r.quantize_time_s:.1f}"] for r in rows]
    return format_table(["method", "perplexity", "RTN gap closed %", "correction MB (fp16)", "quantize s"], body)


def plot_perplexity_vs_bytes(rows: Sequence[AccuracyRow], path, title: str) -> None:
    """PNG: perplexity against correction bytes, one labelled point per row, the reference as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))  # no pyplot: no global figure state, no display backend
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        if r.method == "reference":
            ax.axhline(r.perplexity, color="gray", linestyle="--", label=f"reference {r.perplexity:.2f}")
            continue
        ax.scatter(r.factor_bytes / 2**20, r.perplexity, s=36)
        ax.annotate(r.label, (r.factor_bytes / 2**20, r.perplexity), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("correction factors (MB, fp16)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
