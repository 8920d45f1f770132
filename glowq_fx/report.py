"""What ``quantize_`` did, per group and in total: ``QuantizationReport``."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from glowq_fx._console import format_table
from glowq_fx.config import GlowQConfig
from glowq_fx.registry import CORRECTIONS

KERNEL_NAMES = {"cpu_gemv": "glowq's 4-bit CPU GEMV", "cpu_int4": "PyTorch's int4 kernel",
                "cpu_gemv8": "glowq's int8 CPU GEMV", "cpu_int8": "PyTorch's int8 kernel"}


@dataclass
class GroupReport:
    """One group's outcome.

    ``error_before`` / ``error_after`` are the whitened errors ``tr(E S E^T)`` (raw ``S``,
    i.e. the mean squared output error per token) summed over members, before and after the
    correction. Bytes are those stored: packed 4-bit codes, scales plus zeros, and the
    correction factors (every ``A_i`` and the group's ``B``, or each member's ``B_i``).
    """

    name: str
    members: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    rank: int
    error_before: float
    error_after: float
    code_bytes: int
    scale_bytes: int
    factor_bytes: int
    dense_bytes: int
    solve_time_s: float  # the correction's solve, whitening included
    weight_error: float = 0.0  # ||E||_F / ||W||_F over the members (the quantization alone)
    restore_gain: float = 0.0  # whitened error the solved correction removes (GlowQ-S score)
    candidate_factor_bytes: int = 0  # bytes of the solved factors, stored or not
    restored: bool = True  # False: GlowQ-S left this group uncorrected
    member_gains: tuple[float, ...] = ()  # whitened error each member's correction removes
    # an experts row: each expert's GlowQ-S score (the error its correction removes on its own
    # tokens times its routing frequency; their sum is restore_gain), and the experts whose
    # correction GlowQ-S kept (None: all of them)
    member_scores: tuple[float, ...] = ()
    corrected_experts: int | None = None
    quantize_time_s: float = 0.0  # the base quantizer (RTN or GPTQ) over the members
    whitening_time_s: float = 0.0  # the eigendecomposition of S, part of solve_time_s

    @property
    def relative_error(self) -> float:
        return self.error_after / self.error_before if self.error_before else 0.0


def _members(g: GroupReport) -> str:
    """The row's member count; an experts row whose correction GlowQ-S kept for some experts
    only says how many of them (5/8)."""
    n = len(g.members)
    return f"{g.corrected_experts}/{n}" if g.corrected_experts is not None and g.corrected_experts < n else str(n)


@dataclass
class QuantizationReport:
    """What ``quantize_`` did: per-group rows, skipped modules with reasons, totals."""

    config: GlowQConfig
    groups: list[GroupReport]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_breaks: list[str] = field(default_factory=list)
    n_batches: int = 0
    n_tokens: int = 0
    time_s: float = 0.0
    selection: dict | None = None  # selective="auto": the measured loss curve and the knee
    calibration: dict | None = None  # how S was collected: {"mode": "blocks" | "model", ...}
    embeddings: dict = field(default_factory=dict)  # quantized tables: name -> bits, bytes, tied head
    model_bytes: tuple[int, int] | None = None  # the whole model's bytes before and after, each storage once
    # quantized linear -> "cpu_gemv" / "cpu_int4" / "cpu_gemv8" / "cpu_int8" or "reference: <why>" (this machine)
    kernels: dict = field(default_factory=dict)

    def total(self, key: str) -> int:
        return sum(getattr(g, key) for g in self.groups)

    @property
    def quantized_bytes(self) -> int:
        return self.total("code_bytes") + self.total("scale_bytes") + self.total("factor_bytes")

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "groups": [asdict(g) for g in self.groups],
                "skipped": dict(self.skipped), "graph_breaks": list(self.graph_breaks),
                "n_batches": self.n_batches, "n_tokens": self.n_tokens, "time_s": self.time_s,
                "selection": self.selection, "calibration": self.calibration, "embeddings": self.embeddings,
                "model_bytes": None if self.model_bytes is None else list(self.model_bytes),
                "kernels": dict(self.kernels)}

    def table(self) -> str:
        rows = [[g.name, _members(g), str(g.in_features), str(sum(g.out_features)), str(g.rank),
                 f"{g.error_before:.4g}", f"{g.error_after:.4g}", f"{g.relative_error:.3f}",
                 f"{g.code_bytes + g.scale_bytes:,}", f"{g.factor_bytes:,}"] for g in self.groups]
        before, after = self.total("error_before"), self.total("error_after")
        rows.append(["total", str(sum(len(g.members) for g in self.groups)),
                     "", "", "", f"{before:.4g}", f"{after:.4g}", f"{after / before if before else 0:.3f}",
                     f"{self.total('code_bytes') + self.total('scale_bytes'):,}", f"{self.total('factor_bytes'):,}"])
        headers = ["group", "k", "d_in", "sum d_out", "rank", "err before", "err after", "after/before",
                   "W4 bytes", "factor bytes"]
        return format_table(headers, rows)

    def __str__(self) -> str:
        dense = self.total("dense_bytes")
        correction = ("no correction" if not CORRECTIONS[self.config.method].corrects or self.config.rank == 0
                      else f"method {self.config.method}, rank {self.config.rank}")
        lines = [f"glowq-fx: {sum(len(g.members) for g in self.groups)} linears in {len(self.groups)} groups, "
                 f"{correction}, {self.config.quantizer.upper()} "
                 f"W{self.config.bits} g{self.config.group_size}; {self.n_batches} batches, {self.n_tokens} tokens, "
                 f"{self.time_s:.1f} s",
                 f"linears: {dense:,} bytes dense -> {self.quantized_bytes:,} quantized "
                 f"({self.quantized_bytes / dense if dense else 0:.3f}x)"]
        if self.model_bytes is not None:
            before, after = self.model_bytes
            lines.append(f"whole model (embeddings and everything left in floating point included): {before:,} -> "
                         f"{after:,} bytes ({after / before if before else 0:.3f}x)")
        for name, e in self.embeddings.items():
            if e.get("kind") == "output head":
                lines.append(f"output head {name} {e['shape'][0]} x {e['shape'][1]}: INT8, one scale per row")
                continue
            shared = f", shared with the output head {e['tied_head']}" if e["tied_head"] else ""
            lines.append(f"embedding {name} {e['shape'][0]} x {e['shape'][1]}: INT{e['bits']} g{e['group_size']}"
                         f"{shared}")
        if self.kernels:
            counts = Counter(k for k in self.kernels.values() if not k.startswith("reference: "))
            reasons = sorted({k.split(": ", 1)[1] for k in self.kernels.values() if k.startswith("reference: ")})
            lines.append(f"on this CPU, of {len(self.kernels)} quantized linears: "
                         + ", ".join(f"{n} run {KERNEL_NAMES.get(k, k)}" for k, n in sorted(counts.items()))
                         + "".join(f"; reference path: {r}" for r in reasons))
        lines.append(self.table())
        c = self.calibration or {}
        if c.get("mode") == "blocks":
            lines.insert(1, f"calibrated block by block over {c['n_blocks']} blocks of {c['blocks']} on {c['device']}, "
                            f"next block fed the {c['block_inputs']} outputs, cached inputs on {c['activations']} "
                            f"({c['activation_bytes'] / 2**20:.1f} MB)")
        if c.get("windows_start_with_bos") is not None:
            lines.insert(1, "calibration windows " + ("start with the BOS token" if c["windows_start_with_bos"]
                                                      else "do not all start with the BOS token"))
        if self.config.selective is not None:
            kept = [g for g in self.groups if g.restored]
            lines.append(
                f"GlowQ-S ({self.config.selective!r}): corrections kept for {len(kept)} of {len(self.groups)} "
                f"groups, {self.total('factor_bytes'):,} of {self.total('candidate_factor_bytes'):,} factor bytes"
            )
            sel = self.selection or {}
            if "curve" in sel:
                curve = sel["curve"]
                lines.append(f"  knee of the calibration loss ({sel['curve_tokens']} tokens): "
                             f"{curve[0]['loss']:.4f} with none, {curve[-1]['loss']:.4f} with all corrections, "
                             f"kept the best {sel['kept']}")
            per = sel.get("per_expert")
            if per:
                loss = (f"; calibration loss {per['loss']:.4f} with them dropped, {per['loss_at_knee']:.4f} at the knee"
                        if "loss" in per else "")
                lines.append(f"  per expert: the factors of {per['dropped']} of {per['experts']} experts in the kept "
                             "corrections dropped (their usage-weighted gain per byte below the kept units' lowest; "
                             f"k reads corrected/experts), {per['bytes_saved']:,} bytes{loss}")
        if self.skipped:
            lines.append("not quantized: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        return "\n".join(lines)
