"""What an MoE block's experts see during calibration, from a forward pre-hook on the experts module.

Per experts module (``modules.experts``: forward ``(hidden_states, top_k_index, top_k_weights)``):

- ``S``: the second moment of every token entering the block (the shared ``B``'s whitening, the
  paper's choice), (H, H);
- ``counts``: tokens routed to each expert (routing frequency, for the usage-weighted solve);
- ``first[e]``: ``S_e`` of the tokens routed to expert ``e`` (the refit, the per-expert baseline,
  GPTQ), (H, H) each;
- ``second[e]``: the second moment of expert ``e``'s intermediate (``act(gate) * up`` of its
  tokens, computed here from the float weights: the second weight's input), (I, I) each.

Memory per experts module: ``(E + 1) H^2 + E I^2`` values in the statistics dtype, for the block
being calibrated (block by block, one block's at a time). Mixtral-8x7B (E 8, H 4096, I 14336):
0.15 G + 1.64 G values, 7.2 GB in float32; Qwen3-30B-A3B (E 128, H 2048, I 768): 0.54 G + 0.08 G
values, 2.5 GB in float32.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowq_fx.calibration.moments import SecondMoment
from glowq_fx.capture.experts import ExpertsProtocol, ExpertWeightsView, TracedExperts, TracedWeight, expert_weight


def routed_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """``(hidden_states, top_k_index)`` of an experts forward call, positional or by keyword."""
    names = ("hidden_states", "top_k_index")
    got = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
    if any(t is None for t in got):
        raise ValueError(f"an experts module was called without {', '.join(n for n, t in zip(names, got) if t is None)}"
                         "; glowq-fx reads forward(hidden_states, top_k_index, top_k_weights)")
    return got[0], got[1]


def pooled(moments: list[SecondMoment], name: str) -> Tensor:
    """The second moment over every expert's rows, each weighted by its row count (it stands in
    for an expert that no calibration token reached)."""
    fed = [m for m in moments if m.n_tokens]
    if not fed:
        raise ValueError(f"{name}: no calibration token reached any expert")
    total = sum(m.n_tokens for m in fed)
    return sum(m.value() * (m.n_tokens / total) for m in fed)


def _flat_mask(name: str, mask: Tensor | None, x: Tensor) -> Tensor | None:
    if mask is not None and mask.numel() != x.shape[:-1].numel():
        raise ValueError(f"{name}: attention_mask has {mask.numel()} tokens but the experts see "
                         f"{x.shape[:-1].numel()}; the mask must cover the tokens the experts see")
    return mask


class ExpertsStatistics:
    """The statistics of one experts module (module docstring).

    Args:
        name: the experts module's qualified name (for messages).
        protocol: its ``ExpertsProtocol``.
        d_in, d_mid: the block's hidden size H and the experts' intermediate size I.
        dtype: accumulation dtype (``GlowQConfig.stats_dtype``).
    """

    def __init__(self, name: str, protocol: ExpertsProtocol, d_in: int, d_mid: int, dtype: torch.dtype):
        E = protocol.num_experts
        self.name, self.protocol = name, protocol
        self.S = SecondMoment(d_in, name, dtype)
        self.counts = torch.zeros(E, dtype=torch.int64)
        self.first = [SecondMoment(d_in, f"{name} expert {e}", dtype) for e in range(E)]
        self.second = [SecondMoment(d_mid, f"{name} expert {e} {protocol.second}", dtype) for e in range(E)]

    def feed(self, module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, mask: Tensor | None) -> None:
        """One experts call: ``hidden_states`` (T, H), ``top_k_index`` (T, k); ``mask`` (T,) or None
        keeps padding tokens out of every statistic."""
        x = hidden_states.detach().reshape(-1, hidden_states.shape[-1])
        index = top_k_index.reshape(x.shape[0], -1)
        if mask is not None:
            keep = mask.reshape(-1).to(device=x.device).bool()
            x, index = x[keep], index[keep]
        self.S.add_batch(x)
        p = self.protocol
        for e in torch.unique(index).tolist():
            if not 0 <= e < p.num_experts:
                continue
            rows = (index == e).any(dim=-1)
            x_e = x[rows]
            self.counts[e] += x_e.shape[0]
            self.first[e].add_batch(x_e)
            W = expert_weight(module, p.first, e, p.is_transposed)
            bias = getattr(module, f"{p.first}_bias")[e] if p.has_bias else None
            h = F.linear(x_e, W, bias)
            h = module._apply_gate(h) if p.has_gate else module.act_fn(h)
            self.second[e].add_batch(h)

    def before(self, module: nn.Module, args: tuple, kwargs: dict, mask: Tensor | None) -> None:
        """The forward pre-hook's work (``calibration.collect.feeding``)."""
        x, index = routed_inputs(args, kwargs)
        self.feed(module, x, index, _flat_mask(self.name, mask, x))

    def after(self, module: nn.Module) -> None:
        """The forward hook's work: nothing to undo here."""

    def expert_moment(self, moments: list[SecondMoment], e: int) -> Tensor | None:
        """``moments[e]``'s ``S``, or None when no calibration token reached expert ``e``."""
        return moments[e].value() if moments[e].n_tokens else None


    def nbytes(self) -> int:
        d, m = self.S.d_in, self.second[0].d_in
        return (d * d * (1 + len(self.first)) + m * m * len(self.second)) * self.S.dtype.itemsize


class _RecordingView(ExpertWeightsView):
    """A float 3-D weight read by the module's own code, each product recorded (``TracedStatistics``)."""

    def __init__(self, param: Tensor, name: str, stats: "TracedStatistics"):
        super().__init__(tuple(param.shape), param.dtype, param.device)
        self.param, self.name, self.stats = param, name, stats

    def dense(self, e: int) -> Tensor:
        return self.param[e]

    def apply(self, e: int, x: Tensor, stored_out_in: bool) -> Tensor:
        self.stats.record(self.name, e, x, stored_out_in)
        W = self.param[e]
        return F.linear(x, W if stored_out_in else W.T)

    def unrecognized(self, op: str) -> None:
        self.stats.unrecognized.add(f"{self.name}: {op}")


class TracedStatistics:
    """Statistics of an experts module known only by its 3-D weights (``capture.experts``):
    while it runs, its weights are views that record, per weight and expert, the rows each
    product reads. A weight whose rows are always rows of the module's input (its first tensor
    argument) reads the block input: ``S`` of that input (every token) is its group's, and the
    rows routed to each expert give ``S_e`` and the counts; any other weight gets each expert's
    ``S_e`` of what it read. Padding (the batch's mask) is kept out of ``S`` and of the
    input-reading weights' rows; the other weights' rows cannot be matched to tokens and keep it.

    Args:
        name: the module's qualified name; module: the module; dtype: the accumulation dtype.
    """

    def __init__(self, name: str, module: nn.Module, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
        self.num_experts = next(iter(self.params.values())).shape[0]
        self.S: SecondMoment | None = None
        self.moments: dict[str, list[SecondMoment]] = {}
        self.counts = {n: torch.zeros(self.num_experts, dtype=torch.int64) for n in self.params}
        self.orientation: dict[str, set[bool]] = {n: set() for n in self.params}
        self.reads_input = {n: True for n in self.params}
        self.unrecognized: set[str] = set()
        self._keys: Tensor | None = None  # the current input's row fingerprints
        self._kept: Tensor | None = None  # those of its unmasked rows
        self._probe: Tensor | None = None

    def _fingerprint(self, rows: Tensor) -> Tensor:
        """One int64 per row from its exact bits (a float dot product would round differently for
        the same row in matrices of other sizes)."""
        if self._probe is None or self._probe.shape[0] != rows.shape[-1]:
            g = torch.Generator().manual_seed(0)
            self._probe = torch.randint(1, 2**62, (rows.shape[-1],), dtype=torch.int64, generator=g)
        bits = rows.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()])
        return (bits.to(torch.int64) * self._probe.to(rows.device)).sum(dim=-1)  # wraps around: exact all the same

    def begin(self, x: Tensor, mask: Tensor | None) -> None:
        """A forward call is about to run on input ``x`` (..., H)."""
        rows = x.detach().reshape(-1, x.shape[-1])
        if self.S is None:
            self.S = SecondMoment(rows.shape[-1], self.name, self.dtype)
        keep = None if mask is None else mask.reshape(-1).to(device=rows.device).bool()
        self.S.add_batch(rows if keep is None else rows[keep])
        self._keys = self._fingerprint(rows)
        self._kept = self._keys if keep is None else self._keys[keep]

    def record(self, name: str, e: int, x: Tensor, stored_out_in: bool) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        self.orientation[name].add(stored_out_in)
        if name not in self.moments:
            self.moments[name] = [SecondMoment(rows.shape[-1], f"{self.name}.{name} expert {i}", self.dtype)
                                  for i in range(self.num_experts)]
        reads = self._keys is not None and rows.shape[-1] == self.S.d_in
        if reads:
            keys = self._fingerprint(rows)
            reads = bool(torch.isin(keys, self._keys).all())
            if reads:
                rows = rows[torch.isin(keys, self._kept)]
        self.reads_input[name] &= reads
        self.counts[name][e] += rows.shape[0]
        self.moments[name][e].add_batch(rows)

    def layout(self) -> TracedExperts | str:
        """The module's ``TracedExperts``, or why glowq-fx cannot run it quantized."""
        if self.unrecognized:
            return (f"its code uses its 3-D weights otherwise than in products with one expert's slice "
                    f"({', '.join(sorted(self.unrecognized))})")
        unused = [n for n in self.params if n not in self.moments]
        if unused:
            return f"its 3-D weights {unused} were never used in a product with one expert's slice"
        mixed = [n for n, o in self.orientation.items() if len(o) > 1]
        if mixed:
            return f"its code uses the 3-D weights {mixed} both as (out, in) and as (in, out)"
        return TracedExperts(self.num_experts, tuple(
            TracedWeight(n, self.reads_input[n], next(iter(self.orientation[n]))) for n in self.params))

    def before(self, module: nn.Module, args: tuple, kwargs: dict, mask: Tensor | None) -> None:
        """The forward pre-hook's work: the input's statistics, then recording views in place."""
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if x is None or not x.is_floating_point():
            raise ValueError(f"{self.name}: its forward's first tensor argument is not floating point activations")
        self.begin(x, _flat_mask(self.name, mask, x))
        self._tracing = self.tracing(module)
        self._tracing.__enter__()

    def after(self, module: nn.Module) -> None:
        """The forward hook's work (also after an exception): the weights back."""
        tracing, self._tracing = getattr(self, "_tracing", None), None
        if tracing is not None:
            tracing.__exit__(None, None, None)

    @contextlib.contextmanager
    def tracing(self, module: nn.Module):
        """Run the body with ``module``'s 3-D weights replaced by recording views."""
        for n, p in self.params.items():
            del module._parameters[n]
            module.__dict__[n] = _RecordingView(p, n, self)
        try:
            yield
        finally:
            for n, p in self.params.items():
                module.__dict__.pop(n, None)
                module._parameters[n] = p
            self._keys = self._kept = None

    def nbytes(self) -> int:
        return sum(m.d_in ** 2 * self.dtype.itemsize for ms in self.moments.values() for m in ms) + (
            0 if self.S is None else self.S.d_in ** 2 * self.dtype.itemsize)
