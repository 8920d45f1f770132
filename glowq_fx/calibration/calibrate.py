"""``calibrate(model, batches, config)``: find the groups and collect one ``S`` per group.

The model is unchanged. Its ``Calibration`` can be passed to ``quantize_`` instead of the batches,
so that several methods or ranks share one calibration run (every method reads the same ``S`` of
the unquantized model's group inputs).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from glowq_fx._console import progress_bar
from glowq_fx.calibration.collect import collect_statistics
from glowq_fx.calibration.moments import GroupStatistics
from glowq_fx.capture.groups import check_one_dtype, find_groups
from glowq_fx.capture.linears import linear_weight
from glowq_fx.capture.run import Run, check_calibration, check_model, run_batch
from glowq_fx.config import GlowQConfig, as_config
from passes.groups import InputGroup

log = logging.getLogger(__name__)


def check_given_groups(model: nn.Module, groups: Sequence[InputGroup]) -> list[InputGroup]:
    """``groups`` after checking each member is a linear of ``model`` with the group's width, in one
    group only, and that each group has one dtype."""
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for g in groups:
        if not isinstance(g, InputGroup):
            raise ValueError(f"groups must be InputGroup objects (from find_groups), got {type(g).__name__}")
        for name in g.members:
            if name not in modules:
                raise ValueError(f"group {g.name}: the model has no module {name!r}")
            W = linear_weight(modules[name])
            if W is None:
                raise ValueError(f"group {g.name}: {name} is a {type(modules[name]).__name__}, not an nn.Linear "
                                 "or Conv1D")
            if W.shape[1] != g.in_features:
                raise ValueError(f"group {g.name}: {name} has in_features {W.shape[1]}, the group {g.in_features}")
            if name in seen:
                raise ValueError(f"{name} appears in two groups; a module belongs to one group")
            seen.add(name)
        check_one_dtype(g, modules)
    return list(groups)


@dataclass
class Calibration:
    """Groups and their ``S`` from one calibration run: ``calibrate(model, batches, config)``.

    ``quantize_`` accepts it in place of the batches, so one run serves several methods or ranks
    (every method reads the same ``S`` of the unquantized model's group inputs). It belongs to the
    weights it was collected on: ``quantize_`` checks each group's weight fingerprint and refuses
    a model whose weights differ (use ``copy.deepcopy`` of the calibrated model).
    """

    groups: list[InputGroup]
    statistics: GroupStatistics
    fingerprints: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_breaks: list[str] = field(default_factory=list)
    n_batches: int = 0
    n_tokens: int = 0
    time_s: float = 0.0
    batches: list = field(default_factory=list, repr=False)  # selective="auto" measures its loss curve on them

    def check_belongs_to(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` has the groups and the very weights this
        calibration was collected on."""
        check_model(model)
        modules = dict(model.named_modules())
        check_given_groups(model, self.groups)
        for g in self.groups:
            now, then = _fingerprint(modules, g), self.fingerprints[g.name]
            if not abs(now - then) <= 1e-9 * max(abs(then), 1.0):
                raise ValueError(f"group {g.name}: the model's weights differ from those this Calibration was "
                                 "collected on; calibrate this model (or quantize a copy of the calibrated one)")


def _fingerprint(modules: dict[str, nn.Module], g: InputGroup) -> float:
    """Sum of |W| over the group's members in float64: cheap, and differs for other weights."""
    total = 0.0
    for name in g.members:
        W = linear_weight(modules[name]) if name in modules else None
        if W is None:
            return float("nan")
        total += W.detach().double().abs().sum().item()
    return total


def discover_groups(model: nn.Module, batches: list, config: GlowQConfig, groups: Sequence[InputGroup] | None,
                    run: Run) -> tuple[list[InputGroup], dict[str, str], list[str]]:
    """(groups, skipped modules with reasons, graph breaks): found from the captured graph on the
    first batch, or ``groups`` as given, checked."""
    if groups is None:
        discovery = find_groups(model, batches[0], config, run=run)
        return discovery.groups, discovery.skipped, discovery.graph_breaks
    return check_given_groups(model, groups), {}, []


def calibrate(
    model: nn.Module,
    calibration: Iterable[object],
    config: GlowQConfig | None = None,
    *,
    groups: Sequence[InputGroup] | None = None,
    run: Run = run_batch,
    progress: bool = True,
) -> Calibration:
    """Find ``model``'s groups (unless given) and collect one ``S`` per group in whole-model
    forward passes (every group's ``S`` at once, to serve several methods); the model is unchanged.

    Arguments as for ``quantize_``.
    """
    t0 = time.perf_counter()
    config = as_config(config)
    check_model(model)
    batches = check_calibration(model, calibration)
    was_training = model.training
    model.eval()  # calibration statistics without dropout
    try:
        groups, skipped, breaks = discover_groups(model, batches, config, groups, run)
        stats = collect_statistics(model, groups, batches, run, dtype=config.stats_dtype,
                                   first_position_weight=config.first_position_weight,
                                   progress=progress_bar(progress, "calibration", len(batches)))
    finally:
        model.train(was_training)
    n_tokens = max((stats[g.name].n_tokens for g in groups), default=0)
    log.info("calibrated %d groups on %d batches; S matrices hold %.1f MB", len(groups), len(batches),
             stats.nbytes() / 2**20)
    modules = dict(model.named_modules())
    fingerprints = {g.name: _fingerprint(modules, g) for g in groups}
    return Calibration(list(groups), stats, fingerprints, skipped, breaks, len(batches), n_tokens,
                       time.perf_counter() - t0, list(batches))
