"""Which of several equivalent kernel paths a shape runs: the fastest of those that agree.

A launcher offers candidates (callables that run one path and return its outputs) and a
fallback, the path verified on real hardware. ``FastestPaths.choose`` runs the fallback, then
each candidate on the same inputs, keeps those whose outputs agree with it (``agreeing``),
times them as CUDA-graph replays (as a served model runs them) and remembers the winner per
shape key. A candidate that disagrees or raises is left out with a ``GlowQWarning``: an untested
kernel can neither silently give a wrong result nor break a call on new hardware. Under the
Triton interpreter, or during someone else's graph capture, nothing is timed: the fallback runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from glowq_fx.errors import warn

Candidate = Callable[[], Tensor | Sequence[Tensor]]

AGREE_ULPS = 8  # of the output dtype's eps, times |ref| + rms(ref): see agreeing


class FastestPaths:
    """The remembered choice per shape key ``(what, device, dtype, shape...)``. One instance
    (``FASTEST``) serves the launchers; ``clear()`` forgets every choice (tests, a new GPU clock)."""

    def __init__(self) -> None:
        self._chosen: dict[tuple, str] = {}

    def clear(self) -> None:
        self._chosen.clear()

    def __contains__(self, key: tuple) -> bool:
        return key in self._chosen

    def chosen(self) -> dict[tuple, str]:
        """Every decided key and the path it runs (a copy)."""
        return dict(self._chosen)

    def choose(self, key: tuple, candidates: dict[str, Candidate], fallback: str) -> str:
        """The name of the candidate that ran fastest on this shape, among those agreeing with
        ``fallback`` on this very call (each candidate autotunes in its warm-up calls)."""
        from glowq_fx.kernels.timing import graph_time_ms
        from glowq_fx.kernels.w4a16 import interpreting

        if interpreting():
            return fallback
        if key not in self._chosen:
            if torch.cuda.is_current_stream_capturing():
                return fallback  # decided on a later, uncaptured call
            times = {}
            for name in agreeing(key, candidates, fallback):
                try:
                    times[name] = graph_time_ms(candidates[name], 20)
                except Exception as exc:  # noqa: BLE001 - e.g. a launch that cannot be graph-captured
                    if name == fallback:
                        raise
                    _leave_out(name, key, fallback, f"failed while being timed ({type(exc).__name__}: {exc})")
            self._chosen[key] = min(times, key=times.get)
        return self._chosen[key]


FASTEST = FastestPaths()


def agreeing(key: tuple, candidates: dict[str, Candidate], fallback: str) -> list[str]:
    """``fallback`` and the candidates whose outputs match its outputs on the same inputs, each
    output element within ``AGREE_ULPS`` units of its dtype's precision of ``|ref| + rms(ref)``.
    The paths differ only in float32 summation order and so agree far closer than that, while a
    dropped K slice or a racing reduction misses by a large fraction of the output. A candidate
    that disagrees, or raises (a kernel that does not compile for this GPU), is left out with a
    ``GlowQWarning``. Errors of the fallback itself propagate."""
    outputs = _as_outputs(candidates[fallback]())
    reference = [t.clone() for t in outputs]
    kept = [fallback]
    for name, fn in candidates.items():
        if name == fallback:
            continue
        for t in outputs:  # the candidates write into the same buffers: one that writes nothing must not pass
            t.fill_(float("nan"))
        try:
            worst = max(excess(out, ref) for out, ref in zip(_as_outputs(fn()), reference))
        except Exception as exc:  # noqa: BLE001 - Triton's compile and resource errors share no base class
            _leave_out(name, key, fallback, f"raised {type(exc).__name__}: {exc}")
            continue
        if worst <= 1:
            kept.append(name)
        else:
            _leave_out(name, key, fallback, f"disagrees with the '{fallback}' path (its worst element is off by "
                                            f"{worst:.3g}x the tolerance)")
    return kept  # the buffers hold the last candidate's outputs: callers run the chosen path after this


def _leave_out(name: str, key: tuple, fallback: str, why: str) -> None:
    warn(f"glowq: the '{name}' path for {key} {why}; it is not used, '{fallback}' is. Please report this with "
         "the GPU name and the torch and triton versions.", stacklevel=4)


def _as_outputs(outputs: Tensor | Sequence[Tensor]) -> Sequence[Tensor]:
    return [outputs] if isinstance(outputs, Tensor) else outputs


def excess(out: Tensor, ref: Tensor) -> float:
    """Largest ``|out - ref| / tolerance`` over the elements (<= 1: they agree); NaN where
    ``ref`` is finite counts as infinitely far."""
    ref32, out32 = ref.float(), out.float()
    finite = torch.isfinite(ref32)
    scale = ref32[finite].pow(2).mean().sqrt() if finite.any() else ref32.new_zeros(())
    tol = AGREE_ULPS * torch.finfo(ref.dtype).eps * (ref32.abs() + scale) + torch.finfo(torch.float32).tiny
    diff = ((out32 - ref32).abs() / tol).nan_to_num(nan=float("inf"))
    same = (out32 == ref32) | (out32.isnan() & ref32.isnan())  # equal infinities and NaNs agree too
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return float(diff.max()) if diff.numel() else 0.0
