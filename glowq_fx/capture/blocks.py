"""The repeated blocks of a model (its decoder layers), found without per-architecture names.

A block list is an ``nn.ModuleList`` (or ``nn.Sequential``) of at least two children of one class
that hold linears; of those, the one whose children hold the most linears is the model's blocks
(a Llama's ``model.layers``, GPT-2's ``transformer.h``, Falcon's ``transformer.h``). transformers'
``_no_split_modules``, where a model declares it, names the classes that must not be split across
devices, which are its blocks: a candidate of such a class is preferred, and a choice outside it
is said in a warning. A model without such a list has no blocks (``find_blocks`` returns None) and
is calibrated whole.

Groups belong to one block each: a group whose members sit in different blocks (or some outside
every block) is split into one group per block (and one of the members outside), each still
sharing one ``B`` within its part (``assign_groups``; ``quantize_`` says so in a warning).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glowq_fx.capture.linears import linear_weight
from glowq_fx.errors import warn
from passes.groups import InputGroup


@dataclass(frozen=True)
class Blocks:
    """The model's repeated blocks.

    Attributes:
        container: qualified name of the module list (``model.layers``).
        names: qualified names of the blocks, in execution order (``model.layers.0``, ...).
    """

    container: str
    names: tuple[str, ...]

    def index_of(self, module_name: str) -> int | None:
        """The block holding the module ``module_name``, or None (outside every block)."""
        for i, name in enumerate(self.names):
            if module_name == name or module_name.startswith(name + "."):
                return i
        return None


def _linears_under(module: nn.Module) -> int:
    return sum(linear_weight(m) is not None for m in module.modules())


def find_blocks(model: nn.Module) -> Blocks | None:
    """The module list whose children (two or more, of one class, each holding linears) hold the
    most linears; None when the model has no such list."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module.named_children())
        if len({type(child) for _, child in children}) != 1:
            continue
        counts = [_linears_under(child) for _, child in children]
        if min(counts) == 0:
            continue
        prefix = f"{name}." if name else ""
        candidates.append((sum(counts), type(children[0][1]).__name__,
                           Blocks(name, tuple(f"{prefix}{child}" for child, _ in children))))
    if not candidates:
        return None
    candidates.sort(key=lambda c: -c[0])
    declared = set(getattr(model, "_no_split_modules", None) or ())
    if declared:
        for _, cls, blocks in candidates:
            if cls in declared:
                return blocks
        warn(f"the blocks found ({candidates[0][2].container}, {candidates[0][1]}) are none of the classes "
             f"{type(model).__name__} declares unsplittable ({sorted(declared)}); calibrating block by block over "
             "them all the same (GlowQConfig(calibration='model') calibrates the whole model at once)")
    return candidates[0][2]


def assign_groups(groups: list[InputGroup], blocks: Blocks
                  ) -> tuple[list[list[InputGroup]], list[InputGroup], list[str]]:
    """(the groups of each block, the groups outside every block, the names of the groups that
    straddled blocks and were split by block)."""
    per_block: list[list[InputGroup]] = [[] for _ in blocks.names]
    outside: list[InputGroup] = []
    split = []
    for g in groups:
        parts: dict[int | None, list[str]] = {}
        for m in g.members:
            parts.setdefault(blocks.index_of(m), []).append(m)
        if len(parts) > 1:
            split.append(g.name)
        for index, members in parts.items():
            part = g if len(parts) == 1 else g.subset(members)
            (outside if index is None else per_block[index]).append(part)
    return per_block, outside, split
