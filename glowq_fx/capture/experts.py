"""How an experts module computes, read from the module: transformers' marks, or its own code traced.

transformers (5.x) keeps an MoE block's experts in one module with fused 3-D parameters,
``gate_up_proj`` (E, 2I, H) (``up_proj`` when the experts have no gate) and ``down_proj``
(E, H, I) (stored (E, in, out) when ``is_transposed``); the class is marked by
``use_experts_implementation``, which sets ``has_gate``, ``has_bias``, ``is_transposed`` and
``has_post_expert_norm``. ``experts_protocol`` reads those marks (no class names).

Experts modules known only by their 3-D weights keep their own forward, the weights seen through views.

A module that keeps ``E`` experts' weights in 3-D parameters and computes with them in code of its
own (a loop over the experts using the slices ``W[e]`` with ``F.linear`` or ``@``, as a novel
experts module might) cannot be given another forward. Instead, each 3-D parameter is replaced
by an ``ExpertWeightsView``: ``view[e]`` is an ``ExpertSlice``, and through Python's
``__torch_function__`` protocol ``F.linear(x, view[e])``, ``x @ view[e].T`` and the like reach
the view's ``apply``, which computes the product its own way:

- during calibration (``calibration.experts.TracedStatistics``) with the float weights,
  recording which rows each expert's weight reads;
- in the quantized module (``modules.experts.QuantizedWeightsView``) with the expert's 4-bit weight and its
  correction ``A_e (B x)`` (``B`` shared across the experts when they read the block input).

Any other use of a slice or of the whole weight (``torch.bmm`` on gathered experts, reductions,
...) gets the dense weight instead: in calibration that marks the module as one glowq-fx cannot
trace; in the quantized module it is the dequantized and corrected weight, so the module's own
code stays correct whatever it does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

_PRODUCTS = {"linear", "matmul", "__matmul__", "mm"}


@dataclass(frozen=True)
class TracedWeight:
    """How a traced experts module uses one 3-D weight."""

    name: str
    reads_input: bool  # every expert's rows are rows of the module's input (one B for all experts)
    stored_out_in: bool  # W[e] is (out, in) as stored; False: stored (in, out)


@dataclass(frozen=True)
class TracedExperts:
    """The layout of a traced experts module (the counterpart of ``ExpertsProtocol``)."""

    num_experts: int
    traced: tuple[TracedWeight, ...]

    @property
    def weights(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.traced)


class ExpertSlice:
    """Expert ``e`` of an ``ExpertWeightsView`` as the module's code sees it: ``W[e]``, maybe transposed."""

    def __init__(self, view: "ExpertWeightsView", e: int, transposed: bool = False):
        self.view, self.e, self.transposed = view, e, transposed

    @property
    def T(self) -> "ExpertSlice":
        return ExpertSlice(self.view, self.e, not self.transposed)

    mT = T

    def t(self) -> "ExpertSlice":
        return self.T

    def transpose(self, d0: int, d1: int) -> "ExpertSlice":
        if {d0 % 2, d1 % 2} != {0, 1}:
            raise ValueError(f"an expert's 2-D weight transposes dims 0 and 1, not {d0} and {d1}")
        return self.T

    @property
    def shape(self) -> torch.Size:
        rows, cols = self.view.shape[1:]
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    ndim = property(dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.view.dtype

    @property
    def device(self) -> torch.device:
        return self.view.device

    def dense(self) -> Tensor:
        W = self.view.dense(self.e)
        return W.T if self.transposed else W

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _PRODUCTS and len(args) >= 2 and isinstance(args[1], ExpertSlice) \
                and isinstance(args[0], Tensor):
            x, s = args[0], args[1]
            # linear(x, M) uses W = M; x @ M uses W = M^T; the stored slice is M or M^T
            stored_out_in = not s.transposed if name == "linear" else s.transposed
            y = s.view.apply(s.e, x, stored_out_in)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return y if bias is None else y + bias
        for a in (*args, *kwargs.values()):
            if isinstance(a, (ExpertSlice, ExpertWeightsView)):
                a.view_of().unrecognized(name)
                break
        dense = lambda a: a.dense() if isinstance(a, ExpertSlice) else a.dense_all() if isinstance(  # noqa: E731
            a, ExpertWeightsView) else a
        return func(*tree_map(dense, args), **tree_map(dense, kwargs))

    def view_of(self) -> "ExpertWeightsView":
        return self.view


class ExpertWeightsView:
    """A 3-D expert weight as the module's code reads it (module docstring). Subclasses give
    ``apply(e, x, stored_out_in)`` (``x`` times expert ``e``'s weight) and ``dense(e)``."""

    __torch_function__ = classmethod(ExpertSlice.__torch_function__.__func__)

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)

    def __getitem__(self, index):
        if isinstance(index, int) or (isinstance(index, Tensor) and index.dim() == 0 and not index.is_floating_point()):
            e = int(index)
            if not -self.shape[0] <= e < self.shape[0]:
                raise IndexError(f"expert {e} of {self.shape[0]}")
            return ExpertSlice(self, e % self.shape[0])
        self.unrecognized("__getitem__")
        return self.dense_all()[index]

    def __len__(self) -> int:
        return self.shape[0]

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 3

    ndim = property(dim)

    def view_of(self) -> "ExpertWeightsView":
        return self

    def dense_all(self) -> Tensor:
        return torch.stack([self.dense(e) for e in range(self.shape[0])])

    def apply(self, e: int, x: Tensor, stored_out_in: bool) -> Tensor:
        raise NotImplementedError

    def dense(self, e: int) -> Tensor:
        raise NotImplementedError

    def unrecognized(self, op: str) -> None:
        """A use other than a product with one expert's slice (the dense weight serves it)."""


@dataclass(frozen=True)
class ExpertsProtocol:
    """How an experts module computes (read from transformers' ``use_experts_implementation`` marks)."""

    first: str  # the 3-D weight that reads the block input: "gate_up_proj" or "up_proj"
    second: str  # the one that reads each expert's intermediate: "down_proj"
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    has_post_expert_norm: bool
    num_experts: int

    @property
    def weights(self) -> tuple[str, str]:
        return self.first, self.second


def experts_protocol(module: nn.Module) -> ExpertsProtocol | str:
    """The module's ``ExpertsProtocol``, or why it is not an experts module glowq-fx can run
    (a string naming what is missing)."""
    marks = ("has_gate", "has_bias", "is_transposed")
    if not all(isinstance(getattr(module, m, None), bool) for m in marks):
        return f"it lacks transformers' experts marks ({', '.join(marks)}: set by use_experts_implementation)"
    first = "gate_up_proj" if module.has_gate else "up_proj"
    weights = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    missing = [n for n in (first, "down_proj") if n not in weights]
    if missing:
        return f"it has no 3-D parameter {' or '.join(missing)} (its 3-D parameters: {sorted(weights) or 'none'})"
    E = weights[first].shape[0]
    if weights["down_proj"].shape[0] != E:
        return f"{first} holds {E} experts but down_proj {weights['down_proj'].shape[0]}"
    return ExpertsProtocol(first, "down_proj", module.has_gate, module.has_bias, module.is_transposed,
                           bool(getattr(module, "has_post_expert_norm", False)), E)


def expert_weight(module: nn.Module, name: str, e: int, transposed: bool) -> Tensor:
    """Expert ``e``'s (out, in) weight of the 3-D parameter ``name``."""
    W = getattr(module, name)[e]
    return W.T if transposed else W
