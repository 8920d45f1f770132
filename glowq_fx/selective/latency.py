"""What a correction unit costs in time: a per-unit latency model calibrated by measured kernel times.

GlowQ-S trades accuracy against cost. Bytes are exact and free; time is what a deployment pays,
and it is not proportional to bytes: at decode (one token) a unit's correction costs one thin
``R = x B^T`` launch plus the ``A_i R`` epilogue work of its members, a fixed part that bytes do not
see. So the model here is measured, not assumed: every distinct unit shape (input width, member
widths, rank, dtype, device) is timed once, on the model's own device, with the ops the compiled
model runs (on CUDA ``glowq::w4a16_group_projected``: ``R`` made by the group's op, in its launch
where that is faster, and the members' ``A_i R`` epilogues; on the CPU ``glowq::shared_projection``
and the epilogues' ops), against the same group launch without correction; the difference is the
unit's correction latency (on the CPU, below, the correction's own ops). Units of one shape
share it. A Llama has four shapes (q/k/v, o,
gate/up, down), so calibration is four pairs of timings whatever the depth.

On CUDA the timings are CUDA-graph replays of the Triton kernels (``kernels.timing.graph_time_ms``), and
the correction's cost is the difference of the two launches (its work is fused into the launch).
On the CPU the pure-torch path adds the correction as separate ops after the dequantized matmul
(``ops.reference_linear``: ``R = x B^T``, then ``+ R A_i^T`` per member), so those ops are timed
on their own: a difference of two wall-clock timings of milliseconds is too noisy for a
correction of tens of microseconds (two study runs disagreed 8x on one shape). CPU figures are
what an eager CPU model pays, a different trade-off from the GPU's: say which device a figure
comes from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from glowq_fx import ops
from glowq_fx.kernels.timing import time_ms
from glowq_fx.modules.linear import QuantizedLinear


@dataclass(frozen=True)
class UnitShape:
    """What a unit's correction latency depends on."""

    in_features: int
    out_features: tuple[int, ...]
    rank: int
    group_size: int
    dtype: str
    device: str

    def label(self) -> str:
        outs = "+".join(str(n) for n in self.out_features)
        return f"{self.in_features}->{outs} r{self.rank} g{self.group_size} {self.dtype} {self.device}"


@dataclass
class LatencyModel:
    """Measured correction latency per unit shape, at ``tokens`` rows (1 = one decode step)."""

    tokens: int
    device: str
    correction_ms: dict[UnitShape, float] = field(default_factory=dict)  # what the correction adds, >= 0
    uncorrected_ms: dict[UnitShape, float] = field(default_factory=dict)  # the group launch alone

    def unit_ms(self, shape: UnitShape) -> float:
        if shape not in self.correction_ms:
            raise ValueError(f"no timing for unit shape {shape.label()}; measure_latency() on this model covers it")
        return self.correction_ms[shape]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "device": self.device,
                "shapes": [{"shape": s.label(), "correction_ms": self.correction_ms[s],
                            "uncorrected_ms": self.uncorrected_ms[s]} for s in self.correction_ms]}


def unit_shape(members: list[QuantizedLinear]) -> UnitShape:
    """The shape of a unit whose members share one projection."""
    first = members[0]
    if not all(isinstance(m, QuantizedLinear) for m in members):
        raise ValueError("the latency model times units of linears; this unit holds MoE experts weights "
                         f"({type(next(m for m in members if not isinstance(m, QuantizedLinear))).__name__}), whose "
                         "launches it does not model: rank MoE models by removed error per byte (selective='auto' "
                         "or a fraction)")
    if first.projection is None:
        raise ValueError("a unit's members must carry their correction (A and projection) to be timed")
    return UnitShape(first.in_features, tuple(m.out_features for m in members), first.projection.rank,
                     first.group_size, str(first.scales.dtype).removeprefix("torch."), str(first.scales.device))


def _time_pair(members: list[QuantizedLinear], tokens: int, reps: int, trials: int,
               generator: torch.Generator) -> tuple[float, float]:
    """(uncorrected launch, correction) milliseconds of the unit: medians over ``trials``
    interleaved trials, so drifting clocks and caches hit both alike."""
    first = members[0]
    device = first.scales.device
    x = torch.randn(tokens, first.in_features, generator=generator, dtype=torch.float32).to(device,
                                                                                            first.scales.dtype)
    args = ([m.qweight for m in members], [m.scales for m in members], [m.zeros for m in members],
            [m.bias for m in members])
    B = first.projection.B
    As = [m.A for m in members]
    none = [None] * len(members)

    def plain():
        return ops.w4a16_group(x, *args, none, None)

    if device.type == "cuda":  # the correction is fused into the launch: time the launch with it
        def second():  # as glowq_backend emits it on CUDA: the op makes R, in its launch where faster
            return ops.w4a16_group_projected(x, *args, As, B)
    else:  # the CPU path adds the correction as separate ops (module docstring): time those alone
        y = [torch.zeros(tokens, m.out_features, dtype=x.dtype, device=device) for m in members]

        def second():
            R = ops.shared_projection(x, B)
            return [out + F.linear(R, ops.widen_factor(A, R)) for out, A in zip(y, As)]  # reference_linear's

    times = {plain: [], second: []}
    with torch.inference_mode():
        for _ in range(trials):
            for fn in times:
                times[fn].append(time_ms(fn, reps, device))
    plain_ms, second_ms = (sorted(t)[len(t) // 2] for t in times.values())
    # CUDA: the correction is the difference, which noise can push below 0; CPU: timed alone
    return plain_ms, (max(second_ms - plain_ms, 0.0) if device.type == "cuda" else second_ms)


def measure_latency(units: dict[str, list[QuantizedLinear]], *, tokens: int = 1, reps: int = 20, trials: int = 5,
                    seed: int = 0) -> tuple[LatencyModel, dict[str, UnitShape]]:
    """Time each distinct unit shape once; return the model and each unit's shape.

    Args:
        units: unit name -> its members (``QuantizedLinear``s sharing one projection, correction on).
        tokens: rows of the timed input (1: decode at batch 1; the paper's throughput setting).
        reps, trials: launches per timing and interleaved timings per shape (the median is kept).
    """
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    if not units:
        raise ValueError("no units to time")
    shapes = {name: unit_shape(members) for name, members in units.items()}
    devices = {s.device for s in shapes.values()}
    if len(devices) > 1:
        raise ValueError(f"units live on several devices {sorted(devices)}; time a model on one device")
    model = LatencyModel(tokens, devices.pop())
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if shape in model.correction_ms:
            continue
        model.uncorrected_ms[shape], model.correction_ms[shape] = _time_pair(units[name], tokens, reps, trials,
                                                                            generator)
    return model, shapes
