"""The quantized experts of an MoE block: every expert's weights in 4 bits, one shared ``B``.

transformers (5.x) keeps an MoE block's experts in one module with fused 3-D parameters,
``gate_up_proj`` (E, 2I, H) (``up_proj`` when the experts have no gate) and ``down_proj``
(E, H, I) (stored (E, in, out) when ``is_transposed``), and a forward
``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``; the class is
marked by ``use_experts_implementation``, which sets ``has_gate``, ``has_bias``,
``is_transposed`` and ``has_post_expert_norm``. ``experts_protocol`` reads those marks (no
class names).

``QuantizedExperts`` replaces such a module in place with the same forward signature. Each 3-D
weight becomes a ``QuantizedExpertWeights`` child under the parameter's name: per-expert codes,
scales and zero points stacked (E, ...) in the layout of ``kernels.layout``, and per-expert
``A_e``. The first weight (it reads the block input) shares one ``B`` across the experts (and
any dense linear reading the same input, e.g. a shared expert): ``R = B x`` is computed once for
all tokens, before dispatch, and expert ``e``'s rows get ``deq(W_e) x_e + A_e R_e``. The second
weight reads each expert's own intermediate, so each expert has its own ``B_e`` there. The
forward sorts the (token, slot) pairs by expert and runs each weight as one op on the sorted rows
(``glowq::w4a16_experts``: a grouped Triton kernel on CUDA), so it has no data-dependent loop and
compiles into one graph. A module without those marks whose weights were traced in calibration
keeps its own forward instead (``capture.experts``), its weights read through ``QuantizedWeightsView``.

The quantized module takes the experts module's class (a dynamic subclass, as
``QuantizedEmbedding`` does), so the class's own gating (``_apply_gate``: concatenated or
interleaved gate/up, clamped activations), activation and post-expert norm keep working.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn

from glowq_fx import ops
from glowq_fx.capture.experts import ExpertsProtocol, ExpertWeightsView, TracedExperts, TracedWeight
from glowq_fx.kernels.layout import PackedW4, dequantize_packed, group_size_of, zero_points
from glowq_fx.modules.linear import SharedProjection


class QuantizedExpertWeights(nn.Module):
    """One 3-D expert weight, quantized: ``y_e = deq(W_e) x + A_e R + bias_e`` for expert ``e``.

    Buffers:
        qweight: int32 (E, K_pad / 8, N); scales, zeros: (E, n_groups, N) in the model dtype (zeros
            as uint8 16 * zero where they fit: ``kernels.layout``).
        bias: (E, N) or None.
        A: (E, N, r) in the factor dtype, or None.
        B: (E, r, K): each expert's own right factor, or None when the experts share the group's
            ``projection`` (a reference, registered once on the common ancestor as for linears).
        factor_slots: int32 (E,) or None. Where GlowQ-S kept the correction of some experts only,
            ``A`` (and ``B``) hold those experts' factors, (E_kept, ...), and ``factor_slots[e]`` is
            expert ``e``'s row of them (-1: it runs uncorrected); None: every expert has its row.
    """

    def __init__(self, packed: list[PackedW4], bias: Tensor | None = None):
        super().__init__()
        if not packed:
            raise ValueError("an experts weight needs at least one expert")
        first = packed[0]
        if any((p.qweight.shape, p.scales.shape, p.in_features) != (first.qweight.shape, first.scales.shape,
                                                                    first.in_features) for p in packed):
            raise ValueError("every expert of one weight must have the same shape and group size")
        zeros = [p.zeros for p in packed]
        if len({z.dtype for z in zeros}) > 1:  # some stored in 8 bits, some not: all as floats (stack would promote)
            zeros = [zero_points(z).to(first.scales.dtype) for z in zeros]
        self._setup(torch.stack([p.qweight for p in packed]), torch.stack([p.scales for p in packed]),
                    torch.stack(zeros), first.in_features, bias)

    @classmethod
    def stacked(cls, qweight: Tensor, scales: Tensor, zeros: Tensor, in_features: int,
                bias: Tensor | None = None) -> "QuantizedExpertWeights":
        """From tensors already stacked (E, ...) in the packed layout (a loader's empty tensors)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._setup(qweight, scales, zeros, in_features, bias)
        return new

    def _setup(self, qweight: Tensor, scales: Tensor, zeros: Tensor, in_features: int, bias: Tensor | None) -> None:
        E, N = qweight.shape[0], qweight.shape[-1]
        if qweight.dim() != 3 or scales.shape != zeros.shape or scales.shape[0] != E or scales.shape[-1] != N:
            raise ValueError(f"stacked experts need qweight (E, K_pad/8, N), scales and zeros (E, G, N); got "
                             f"{tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
        self.num_experts, self.in_features, self.out_features = E, in_features, N
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        if bias is not None and tuple(bias.shape) != (E, N):
            raise ValueError(f"bias must be ({E}, {N}), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().to(scales.dtype).clone())
        self.register_buffer("A", None)
        self.register_buffer("B", None)
        self.register_buffer("factor_slots", None)
        object.__setattr__(self, "projection", None)

    @property
    def group_size(self) -> int:
        return group_size_of(self.qweight[0], self.scales[0])

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[-1]

    @property
    def corrected_experts(self) -> Tensor | None:
        """bool (E,): the experts with a correction (None without one)."""
        if self.A is None:
            return None
        if self.factor_slots is None:
            return torch.ones(self.num_experts, dtype=torch.bool, device=self.A.device)
        return self.factor_slots >= 0

    def set_correction(self, A: Tensor | None, *, projection: SharedProjection | None = None,
                       B: Tensor | None = None, experts: Tensor | None = None) -> None:
        """Attach ``A`` (E, N, r) with either the group's shared ``projection`` or the experts' own
        ``B`` (E, r, K); ``(None)`` removes the correction. ``experts`` (bool (E,)) corrects those
        experts only: ``A`` and ``B`` then hold their factors, in expert order (E_kept, ...)."""
        if A is None:
            if projection is not None or B is not None or experts is not None:
                raise ValueError("a projection, B or experts without A")
            self.A, self.B, self.factor_slots = None, None, None
            object.__setattr__(self, "projection", None)
            return
        if (projection is None) == (B is None):
            raise ValueError("give A either the shared projection or each expert's own B, not both or neither")
        E, N, K = self.num_experts, self.out_features, self.in_features
        slots = None
        if experts is not None:
            if experts.dtype != torch.bool or tuple(experts.shape) != (E,):
                raise ValueError(f"experts must be a bool mask of the {E} experts, got {experts.dtype} "
                                 f"{tuple(experts.shape)}")
            kept = int(experts.sum())
            if kept == 0:
                raise ValueError("experts corrects no expert: remove the correction with set_correction(None)")
            if kept < E:  # each kept expert's row (its rank among the kept ones), -1 for the others
                slots = torch.where(experts, experts.cumsum(0) - 1, -1).to(device=A.device, dtype=torch.int32)
            E = kept
        r = projection.rank if projection is not None else B.shape[1]
        if tuple(A.shape) != (E, N, r) or not A.is_floating_point():
            raise ValueError(f"A must be floating point ({E}, {N}, {r}), got {A.dtype} {tuple(A.shape)}")
        if projection is not None and projection.in_features != K:
            raise ValueError(f"the projection reads {projection.in_features} features, the experts {K}")
        if B is not None and (tuple(B.shape) != (E, r, K) or not B.is_floating_point()):
            raise ValueError(f"B must be floating point ({E}, {r}, {K}), got {B.dtype} {tuple(B.shape)}")
        self.A = A.contiguous()
        self.B = None if B is None else B.contiguous()
        self.factor_slots = slots
        object.__setattr__(self, "projection", projection)

    def keep_experts(self, experts: Tensor) -> None:
        """Keep the correction of ``experts`` (bool (E,), a subset of those corrected now) only,
        dropping the other experts' rows of ``A`` (and ``B``): GlowQ-S per expert."""
        held = self.corrected_experts
        if held is None:
            raise ValueError("keep_experts needs a corrected weight; this one has no correction")
        experts = experts.to(device=held.device, dtype=torch.bool)
        if tuple(experts.shape) != tuple(held.shape) or bool((experts & ~held).any()):
            raise ValueError(f"keep_experts takes a bool mask of the {self.num_experts} experts within those corrected "
                             f"now ({int(held.sum())}), got {tuple(experts.shape)}")
        rows = experts[held]  # which of the held rows stay
        if not bool(experts.any()):
            self.set_correction(None)
            return
        self.set_correction(self.A[rows], projection=self.projection, B=None if self.B is None else self.B[rows],
                            experts=experts)

    def _slot(self, e: int) -> int:
        """Expert ``e``'s row of ``A`` / ``B`` (-1: uncorrected)."""
        if self.A is None:
            return -1
        return e if self.factor_slots is None else int(self.factor_slots[e])

    def project(self, x: Tensor) -> Tensor | None:
        """``R = B x`` for all tokens when the experts share ``B`` (else None: each expert's own)."""
        return None if self.projection is None else self.projection(x)

    def expert(self, e: int, x: Tensor, R: Tensor | None = None) -> Tensor:
        """Expert ``e`` on its rows ``x`` (n, K); ``R`` the rows of the shared projection."""
        slot = self._slot(e)
        A = None if slot < 0 else self.A[slot]
        if A is None:
            R = None
        elif R is None:
            R = ops.shared_projection(x, self.B[slot])
        bias = None if self.bias is None else self.bias[e]
        return ops.w4a16_linear(x, self.qweight[e], self.scales[e], self.zeros[e], bias, A, R)

    def experts(self, x: Tensor, offsets: Tensor, R: Tensor | None = None) -> Tensor:
        """Every expert on rows sorted by expert (``offsets``: each expert's end row); ``R`` the
        rows of the shared projection (each expert's own ``B`` is applied here)."""
        if self.A is not None and R is None:
            R = ops.experts_projection(x, offsets, self.B, self.factor_slots)
        return ops.w4a16_experts(x, offsets, self.qweight, self.scales, self.zeros, self.bias, self.A, R,
                                 self.factor_slots)

    def dequantized_weight(self, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """``W_q`` of expert ``e`` (out, in), without the correction."""
        q, s, z = self.qweight[e], self.scales[e], self.zeros[e]
        return dequantize_packed(q, s, z, group_size_of(q, s), self.in_features, dtype or s.dtype)

    def extra_repr(self) -> str:
        corrected = "" if self.factor_slots is None else f", corrected_experts={int((self.factor_slots >= 0).sum())}"
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, rank={self.rank}, shared_B={self.projection is not None}{corrected}")


class QuantizedExperts(nn.Module):
    """An experts module whose 3-D weights are ``QuantizedExpertWeights`` (module docstring);
    built by ``quantize_experts`` or ``empty_quantized_experts``, never directly."""

    glowq_quantized = True  # capture.run.check_model: not quantized twice

    glowq_protocol: ExpertsProtocol

    def __init__(self, *args, **kwargs):
        raise TypeError("build QuantizedExperts with glowq_fx.modules.experts.quantized_experts(module, weights)")

    def quantized_weights(self, name: str) -> QuantizedExpertWeights:
        """The quantized 3-D weight ``name`` (a traced module's code sees it through a view instead)."""
        return self._modules[name]

    def forward(self, *args, **kwargs) -> Tensor:
        if isinstance(self.glowq_protocol, TracedExperts):
            return super().forward(*args, **kwargs)  # the module's own code, its weights seen through views
        return self._routed_forward(*args, **kwargs)

    def _routed_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        p = self.glowq_protocol
        first, second = getattr(self, p.first), getattr(self, p.second)
        T, k = top_k_index.shape
        # (token, slot) pairs sorted by expert; transformers' sentinel for a token no local expert
        # serves (index >= E) sorts last, past every expert's rows, and comes out zero. E is the
        # experts held here: all of them, or this rank's under expert parallelism
        E = first.num_experts
        flat = top_k_index.reshape(-1).clamp(0, E)
        order = torch.argsort(flat, stable=True)
        token = torch.div(order, k, rounding_mode="floor")
        counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device)
        offsets = counts.scatter_add_(0, flat, torch.ones_like(flat))[:E].cumsum(0)
        R = first.project(hidden_states)  # once for every token, before dispatch
        h = first.experts(hidden_states[token], offsets, None if R is None else R[token])
        h = self._apply_gate(h) if p.has_gate else self.act_fn(h)
        y = second.experts(h, offsets)
        if p.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(y).index_copy_(0, order, y)
        return unsorted.view(T, k, -1).sum(dim=1).to(hidden_states.dtype)


def layout_record(layout: ExpertsProtocol | TracedExperts) -> dict:
    """``layout`` as JSON (a checkpoint's description)."""
    kind = "traced" if isinstance(layout, TracedExperts) else "transformers"
    return {"kind": kind, **dataclasses.asdict(layout)}


def layout_from_record(record: dict) -> ExpertsProtocol | TracedExperts:
    """The inverse of ``layout_record``."""
    fields = {k: v for k, v in record.items() if k != "kind"}
    if record.get("kind") == "traced":
        return TracedExperts(fields["num_experts"], tuple(TracedWeight(**t) for t in fields["traced"]))
    return ExpertsProtocol(**fields)


@functools.cache
def _quantized_class(cls: type) -> type:
    return type(f"Quantized{cls.__name__}", (QuantizedExperts, cls), {"__module__": __name__})


def quantized_experts(module: nn.Module, weights: dict[str, QuantizedExpertWeights],
                      protocol: ExpertsProtocol | TracedExperts) -> QuantizedExperts:
    """``module`` (an experts module, left unchanged) with its 3-D weights replaced by ``weights``:
    a new module of a subclass of ``module``'s class sharing its other parameters and children.
    A traced module's code reads each weight through a ``QuantizedWeightsView`` under the
    weight's name (``capture.experts``)."""
    if set(weights) != set(protocol.weights):
        raise ValueError(f"quantized weights for {sorted(weights)}, the experts have {sorted(protocol.weights)}")
    cls = _quantized_class(type(module))
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    replaced = {*weights, *(f"{w}_bias" for w in weights)}  # the biases live on in the quantized weights
    new._parameters = {k: v for k, v in module._parameters.items() if k not in replaced}
    new._buffers = dict(module._buffers)
    new._modules = {**module._modules, **weights}
    new.glowq_protocol = protocol
    if isinstance(protocol, TracedExperts):
        for traced in protocol.traced:  # found before _modules by attribute lookup: the module's code sees the view
            new.__dict__[traced.name] = QuantizedWeightsView(weights[traced.name], traced,
                                                             weights[traced.name].scales.dtype)
    return new


class QuantizedWeightsView(ExpertWeightsView):
    """A ``QuantizedExpertWeights`` read by the module's own code: products with an expert's slice
    run the 4-bit op with the correction, anything else gets the corrected dense weight."""

    def __init__(self, weights, traced: TracedWeight, dtype: torch.dtype):
        E, N, K = weights.num_experts, weights.out_features, weights.in_features
        super().__init__((E, N, K) if traced.stored_out_in else (E, K, N), dtype, weights.qweight.device)
        self.weights, self.traced = weights, traced

    def apply(self, e: int, x: Tensor, stored_out_in: bool) -> Tensor:
        if stored_out_in != self.traced.stored_out_in:  # used the other way round than calibrated
            W = self.dense(e)
            return x @ W.T if stored_out_in else x @ W
        rows = x.reshape(-1, x.shape[-1])
        y = self.weights.expert(e, rows, self.weights.project(rows))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def dense(self, e: int) -> Tensor:
        w = self.weights
        W = w.dequantized_weight(e, self.dtype)
        slot = w._slot(e)
        if slot >= 0:
            B = w.projection.B if w.projection is not None else w.B[slot]
            W = W + (w.A[slot].to(torch.float32) @ B.to(torch.float32)).to(self.dtype)
        return W if self.traced.stored_out_in else W.T
