"""A glowq checkpoint under transformers' tensor parallelism (``from_pretrained(dir, tp_plan="auto")``
under ``torchrun``): the shard plan of the quantized modules.

GlowQ needs no communication of its own. A member that the model's plan splits by output
(``colwise``: q/k/v, gate/up) keeps its rows of ``W_q`` and of ``A_i``, and its group's ``B`` whole
(the input is replicated, so ``R = B x`` is too). A member split by input (``rowwise``: o, down)
keeps its columns of ``W_q`` and of ``B`` and all of ``A``: each rank computes
``deq(W_shard) x_shard + A (B_shard x_shard)``, a partial sum that the all-reduce the layer
already does completes.

transformers shards only parameters, by the stock styles' rules for an ``nn.Linear`` weight
(out, in): ``colwise`` cuts dim ``ndim - 2``, ``rowwise`` cuts dim -1 (and keeps a bias whole),
``replicate`` leaves it. The packed tensors are stored (in, out) (``kernels.layout``: ``qweight``
(K_pad / 8, N), ``scales`` and ``zeros`` (n_groups, N)), so each tensor is given the stock style
that cuts it where the linear is cut, and the modules that are split hold their tensors as
parameters (frozen) rather than buffers. In the forward, transformers hands the modules their
local shards (``_hf_quantized_needs_local_tp``) and adds a row-split member's bias once, after
the all-reduce.

An int8 output head (``modules.int8_linear``) is split like an ``nn.Linear``: its codes are stored
(out, in) and its scales follow the output rows.

Expert parallelism (``DistributedConfig(ep_size=..., enable_expert_parallel=True)``): where the
model's expert plan dispatches an experts module (``ep_dispatch_experts``), its quantized experts
are split by expert as transformers splits the float ones (``grouped_gemm``: dim 0 of every
stacked tensor, the codes, scales, zero points, biases, ``A_e`` and each expert's own ``B_e``);
the ``B`` the experts share with the block's other readers stays whole on every rank. Each rank
runs its experts on the batch, the other ranks' routes masked, and transformers' all-reduce sums
them (``AllReduceEP``), as for the float model. After loading, the split tensors are held as the
rank's local tensors, so the experts' forward needs no DTensor; such a model is not saved (each
rank holds part of the experts). Where GlowQ-S kept the factors of some experts only (``A`` and
``B`` hold their rows, ``factor_slots`` maps each expert to its row), the map is split by expert
and the factors are read whole, each rank then keeping its own experts' rows.

Quantized embedding tables (and a head tied to one), and quantized experts that the tensor plan
(not an expert plan) names, are kept whole on every rank, with a warning: a vocab-split lookup of
packed codes and an intermediate-split of the stacked experts are not written yet.
"""
from __future__ import annotations

from torch import nn

from glowq_fx.capture.experts import TracedExperts
from glowq_fx.checkpoint.shards import CheckpointError
from glowq_fx.errors import warn
from glowq_fx.kernels.layout import group_size_of
from glowq_fx.modules.embedding import QuantizedEmbedding
from glowq_fx.modules.experts import QuantizedExperts, QuantizedExpertWeights
from glowq_fx.modules.int8_linear import Int8Linear
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection

BY_OUTPUT = frozenset({"colwise", "colwise_rep", "colwise_gather_output"})
BY_INPUT = frozenset({"rowwise", "rowwise_split_input", "rowwise_rep"})

# The stock style that cuts each stored tensor where a linear split by output / by input is cut.
MEMBER_STYLES = {
    "output": {"qweight": "rowwise", "scales": "rowwise", "zeros": "rowwise", "bias": "colwise", "A": "colwise"},
    "input": {"qweight": "colwise", "scales": "colwise", "zeros": "colwise", "bias": "rowwise", "A": "replicate"},
}
# An int8 linear stores its codes (out, in) like an nn.Linear weight and one scale per output row:
# split by input, each rank's partial product carries the full scale (it multiplies whole rows).
INT8_STYLES = {
    "output": {"qweight": "colwise", "scales": "colwise", "bias": "colwise"},
    "input": {"qweight": "rowwise", "scales": "replicate", "bias": "rowwise"},
}
PROJECTION_STYLE = "local_params"  # the projection's forward sees its local B
B_STYLE = {"output": "replicate", "input": "rowwise"}


EXPERT_STYLE = "grouped_gemm"  # transformers' split of stacked experts by expert (dim 0)
EXPERTS_DISPATCH = "ep_dispatch_experts"
EXPERT_TENSORS = ("qweight", "scales", "zeros", "bias", "A", "B")


def tensor_parallel_size(model: nn.Module) -> int:
    """The tensor-parallel world size ``from_pretrained`` was asked for (1 without one)."""
    distributed = getattr(getattr(model, "config", None), "distributed_config", None)
    return int(getattr(distributed, "tp_size", None) or 1)


def expert_parallel_size(model: nn.Module) -> int:
    """The expert-parallel world size ``from_pretrained`` was asked for (1 without one)."""
    distributed = getattr(getattr(model, "config", None), "distributed_config", None)
    return int(getattr(distributed, "ep_size", None) or 1)


def split_quantized_experts(model: nn.Module, plan: dict[str, str], ep_size: int) -> None:
    """Extend ``plan`` (``model.ep_plan``) so that each quantized experts module it dispatches is
    split by expert over ``ep_size`` ranks (module docstring): the float weights' rules are
    replaced by one ``grouped_gemm`` rule per stacked tensor, put first so that the tensors are
    split before the dispatch reads the local expert count. Experts the plan does not dispatch
    stay whole (their weights' rules dropped)."""
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    if {EXPERT_STYLE, EXPERTS_DISPATCH} - set(ALL_PARALLEL_STYLES):
        raise CheckpointError(f"this transformers has no expert-parallel styles {EXPERT_STYLE!r} and "
                              f"{EXPERTS_DISPATCH!r}; quantized experts under expert parallelism need a transformers "
                              "that has them (5.25 has); upgrade transformers")
    rules: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedExperts):
            continue
        key = generic_name(name)
        for k in [k for k in plan if k.startswith(key + ".")]:
            del plan[k]  # the float weights' rules: the quantized tensors get their own below
        if plan.get(key) != EXPERTS_DISPATCH:
            continue
        layout = module.glowq_protocol
        if isinstance(layout, TracedExperts):
            raise CheckpointError(f"expert parallelism dispatches {name}, whose quantized experts run the module's own "
                                  "traced code, which cannot run a part of the experts; load it without ep_size")
        if layout.num_experts % ep_size:
            raise CheckpointError(f"expert parallelism over {ep_size} ranks splits the {layout.num_experts} experts "
                                  f"of {name}, which {ep_size} does not divide: use an ep_size that divides "
                                  f"{layout.num_experts}")
        for weight in layout.weights:
            child = module.quantized_weights(weight)
            # A (and B) holding the corrected experts' rows only are read whole, as buffers, with the
            # map; each rank keeps its experts' rows after loading (localize_split_experts)
            whole = ("A", "B") if child.factor_slots is not None else ()
            names = [t for t in EXPERT_TENSORS if getattr(child, t, None) is not None and t not in whole]
            _as_parameters(child, names)
            rules.update({f"{key}.{weight}.{t}": EXPERT_STYLE for t in names})
        module.num_experts = layout.num_experts // ep_size  # the dispatch reads the local count from here
        module.glowq_expert_parallel = ep_size
    if rules:
        ordered = {**rules, **plan}
        plan.clear()
        plan.update(ordered)


def localize_split_experts(model: nn.Module) -> None:
    """After loading: the split experts' tensors as this rank's local tensors (plain buffers), so
    their forward and kernels see ``E / ep_size`` experts and no DTensor."""
    for module in model.modules():
        if not getattr(module, "glowq_expert_parallel", None):
            continue
        for weight in module.glowq_protocol.weights:
            child = module.quantized_weights(weight)
            codes = child._parameters["qweight"]
            # this rank's place among the expert-parallel ranks: it holds experts [p E_local, (p+1) E_local)
            place = codes.device_mesh.get_local_rank() if hasattr(codes, "device_mesh") else 0
            for key in EXPERT_TENSORS:
                t = child._parameters.pop(key, None)
                if t is not None:
                    local = t.to_local() if hasattr(t, "to_local") else t
                    child.register_buffer(key, local.detach())
            child.num_experts = child.qweight.shape[0]
            if child.factor_slots is not None:
                _keep_local_factor_rows(child, place)


def _keep_local_factor_rows(child: QuantizedExpertWeights, place: int) -> None:
    """A split experts weight whose ``A`` (and ``B``) hold the corrected experts' rows, read whole
    with their map ``factor_slots`` over every expert: keep the rows of this rank's experts, the
    ``place``-th run of ``num_experts`` (now local)."""
    E = child.num_experts
    slots, held = child.factor_slots[place * E:(place + 1) * E], child.A.shape[0]
    if bool(((child.factor_slots < -1) | (child.factor_slots >= held)).any()):
        raise CheckpointError(f"factor_slots {child.factor_slots.tolist()} point past the {held} experts' factors "
                              "of A: the checkpoint is corrupted")
    kept = slots >= 0
    if not bool(kept.any()):  # none of this rank's experts is corrected
        child.set_correction(None)
        return
    rows = slots[kept].long()
    child.set_correction(child.A[rows], projection=child.projection, B=None if child.B is None else child.B[rows],
                         experts=kept)


def generic_name(name: str) -> str:
    """A module name as the plans write it: layer numbers as ``*`` (``layers.*.mlp``)."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(name)


def _side(name: str, style: str | None) -> str | None:
    if style is None or style == "replicate":
        return None
    if style in BY_OUTPUT:
        return "output"
    if style in BY_INPUT:
        return "input"
    raise CheckpointError(f"the tensor-parallel plan splits the quantized {name} with style {style!r}; glowq modules "
                          f"take {sorted(BY_OUTPUT)} (split by output) or {sorted(BY_INPUT)} (split by input): give "
                          f"{generic_name(name)} one of those in DistributedConfig(tp_plan=...)")


def _check_divides(name: str, module: QuantizedLinear | Int8Linear, side: str, world_size: int) -> None:
    if side == "output" and module.out_features % world_size:
        raise CheckpointError(
            f"tensor parallel over {world_size} ranks splits the {module.out_features} output rows of "
            f"{name}, which {world_size} does not divide: run on a number of ranks that divides "
            f"{module.out_features}"
        )
    if side == "input" and isinstance(module, Int8Linear) and module.in_features % world_size:
        raise CheckpointError(f"tensor parallel over {world_size} ranks splits the {module.in_features} input columns "
                              f"of {name}, which {world_size} does not divide: run on a number of ranks that divides "
                              f"{module.in_features}")
    if side == "input" and isinstance(module, QuantizedLinear):
        K, g = module.in_features, group_size_of(module.qweight, module.scales)
        if K % world_size or (K // world_size) % g:
            raise CheckpointError(
                f"tensor parallel over {world_size} ranks splits the {K} input columns of {name} in "
                f"scale groups of {g}: each rank needs whole groups ({K} / {world_size} a multiple of "
                f"{g}); run on a number of ranks that divides {K // g if K % g == 0 else K} groups, "
                "or quantize with a group_size that divides "
                f"{K // world_size if K % world_size == 0 else K}"
            )


def _as_parameters(module: nn.Module, names) -> None:
    """Hold ``names`` as frozen parameters: transformers' tensor parallelism shards only those."""
    for key in names:
        tensor = module._buffers.get(key)
        if tensor is not None:
            del module._buffers[key]
            module.register_parameter(key, nn.Parameter(tensor, requires_grad=False))


def shard_quantized(model: nn.Module, plan: dict[str, str], world_size: int) -> None:
    """Extend ``plan`` (``model.tp_plan``, rules by generic name) with the shard rules of the
    quantized modules, as the module docstring says; the modules that are split turn their
    buffers into frozen parameters. Every problem is a ``CheckpointError`` naming the module."""
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    missing = {PROJECTION_STYLE, "replicate", "colwise", "rowwise"} - set(ALL_PARALLEL_STYLES)
    if missing:
        raise CheckpointError(
            f"this transformers has no tensor-parallel styles {sorted(missing)}; glowq checkpoints "
            "under tensor parallelism need a transformers that has them (5.24 has); upgrade transformers"
        )
    whole: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding) and generic_name(name) in plan:
            whole.append(name)
            del plan[generic_name(name)]
        if isinstance(module, QuantizedExperts):  # the experts' own rules (and their all-reduce) do not apply
            key = generic_name(name)
            ruled = [k for k in plan if k == key or k.startswith(key + ".")]
            if ruled:
                whole.append(name)
                for k in ruled:
                    del plan[k]
    tied = {id(t) for n, m in model.named_modules() if isinstance(m, QuantizedEmbedding) for t in m.buffers()}
    sides: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (QuantizedLinear, Int8Linear)):
            continue
        styles = INT8_STYLES if isinstance(module, Int8Linear) else MEMBER_STYLES
        key = generic_name(name)
        if any(id(t) in tied for t in module.buffers()) and key in plan:
            whole.append(name)
            del plan[key]
        sides[name] = side = _side(name, plan.get(key))
        if side is None:
            continue
        _check_divides(name, module, side, world_size)
        module._hf_quantized_needs_local_tp = True  # transformers then runs the forward on local shards
        _as_parameters(module, styles[side])
        for tensor in styles[side]:
            if getattr(module, tensor, None) is not None:
                plan[f"{key}.{tensor}"] = styles[side][tensor]
    for name, module in model.named_modules():
        if isinstance(module, SharedProjection):
            member_sides = {sides.get(m) for m in module.members}
            if "input" in member_sides and len(member_sides) > 1:
                raise CheckpointError(f"the members {list(module.members)} share one projection (their input), but the "
                                      "tensor-parallel plan splits some by input and not others; give them one style "
                                      "in DistributedConfig(tp_plan=...)")
            if "input" in member_sides:
                _as_parameters(module, ["B"])
                plan[generic_name(name)] = PROJECTION_STYLE
                plan[f"{generic_name(name)}.B"] = B_STYLE["input"]
    if whole:
        warn(f"tensor parallelism keeps the quantized tables and experts {whole} whole on every rank (a split "
             "lookup of packed codes and split stacked experts are not available); the rest of the model is split "
             "as planned")
