"""Putting the runtime modules into a model: the one place that swaps a linear for its quantized
module and registers a group's projection, used by ``quantize_``, GlowQ-S and checkpoint loading.

A group's ``SharedProjection`` (its ``B``) is registered once, in a ``ModuleDict`` named
``glowq_projections`` on the members' closest common ancestor, under the members' names relative
to it (``{q_proj,k_proj,v_proj}`` with dots as underscores), so the state dict holds ``B`` once and
a checkpoint's keys say which group it serves.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor, nn

from glowq_fx.modules.experts import QuantizedExpertWeights
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
from passes.groups import group_name

PROJECTIONS = "glowq_projections"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def projection_slot(model: nn.Module, members: Sequence[str]) -> tuple[nn.Module, str]:
    """(the members' common ancestor, the key of their projection in its ``glowq_projections``)."""
    label = group_name(members)
    ancestor = ".".join(os.path.commonprefix([m.split(".")[:-1] for m in members]))
    key = label[len(ancestor) + 1:] if ancestor else label
    return model.get_submodule(ancestor), key.replace(".", "_")


def register_projection(model: nn.Module, projection: SharedProjection) -> None:
    """Register ``projection`` once, under ``glowq_projections`` of its members' common ancestor."""
    ancestor, key = projection_slot(model, projection.members)
    holder = getattr(ancestor, PROJECTIONS, None)
    if holder is None:
        holder = nn.ModuleDict()
        ancestor.add_module(PROJECTIONS, holder)
    holder[key] = projection


def remove_projection(model: nn.Module, members: Sequence[str]) -> None:
    """Undo ``register_projection`` for the projection of ``members``."""
    ancestor, key = projection_slot(model, members)
    holder = getattr(ancestor, PROJECTIONS)
    del holder[key]
    if len(holder) == 0:
        delattr(ancestor, PROJECTIONS)


def attach_correction(model: nn.Module, members: Sequence[str], B: Tensor,
                      As: Sequence[Tensor]) -> SharedProjection | None:
    """Give the ``members`` the correction ``A_i (B x)``: one projection of ``B`` registered for all
    of them, each member's ``A_i`` set. A member is a ``QuantizedLinear`` or an experts weight
    (``QuantizedExpertWeights``: its ``A_i`` stacked (E, N, r), one per expert). A lone experts
    weight whose ``B`` is 3-D (E, r, K) has each expert's own ``B``: no projection. Returns the
    projection (None for each expert's own)."""
    if B.dim() == 3:
        (name,), (A,) = members, As
        correctable(model, name).set_correction(A, B=B)
        return None
    projection = SharedProjection(B, tuple(members))
    register_projection(model, projection)
    for name, A in zip(members, As, strict=True):
        correctable(model, name).set_correction(A, projection=projection)
    return projection


def detach_correction(model: nn.Module, members: Sequence[str]) -> None:
    """Undo ``attach_correction``: the members lose their correction, the projection leaves the tree."""
    shared = False
    for name in members:
        module = correctable(model, name)
        shared = shared or module.projection is not None
        module.set_correction(None, projection=None)
    if shared:
        remove_projection(model, members)


def correctable(model: nn.Module, name: str) -> QuantizedLinear | QuantizedExpertWeights:
    """The quantized linear or experts weight ``name`` whose correction can be set."""
    parent, _, child = name.rpartition(".")
    # the registered child, not the attribute: a traced experts module shows its weight through a view
    module = (model.get_submodule(parent) if parent else model)._modules.get(child)
    if not isinstance(module, (QuantizedLinear, QuantizedExpertWeights)):
        raise ValueError(f"{name} is a {type(module).__name__}, not a QuantizedLinear or quantized experts weight: "
                         "quantize it first")
    return module
