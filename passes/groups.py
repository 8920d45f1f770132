"""The types the graph passes and the library share: an input-sharing group, its name, and the
filter that says which linears may join one. Plain data, no torch: both ``passes`` and
``glowq_fx`` import them without either importing the other's internals.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InputGroup:
    """Linears reading one input, in graph (or first-call) order.

    Attributes:
        name: ``prefix.{a,b,c}`` from the members' qualified names.
        members: qualified module names.
        in_features: the shared input width.
        out_features: each member's output width.
    """

    name: str
    members: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]

    def subset(self, members: Iterable[str]) -> "InputGroup":
        """The group restricted to ``members`` (kept in their given order)."""
        members = tuple(members)
        outs = dict(zip(self.members, self.out_features))
        return InputGroup(group_name(members), members, self.in_features, tuple(outs[m] for m in members))


def group_name(members: Iterable[str]) -> str:
    members = list(members)
    if len(members) == 1:
        return members[0]
    prefix = os.path.commonprefix(members)
    prefix = prefix[: prefix.rfind(".") + 1]
    return f"{prefix}{{{','.join(m[len(prefix):] for m in members)}}}"


@dataclass(frozen=True)
class GroupFilter:
    """Which linears may join a group.

    Attributes:
        skip: module names never grouped, each with its reason (e.g. the output head).
        include: regular expressions; when non-empty a module must match one (``re.search``).
        exclude: regular expressions; a matching module is skipped.
        min_out_features: members with fewer outputs are skipped. MoE routers (N = number of
            experts) and scalar gates (Qwen2-MoE's ``shared_expert_gate``, N = 1) are tiny
            and sensitive: they stay in full precision.
        tied_to_embedding: linears whose weight is an embedding's table and may still be
            grouped (the caller quantizes the one table for both); any other tied linear is
            skipped, since quantizing it would change the embedding.
    """

    skip: Mapping[str, str] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_out_features: int = 1
    tied_to_embedding: frozenset[str] = frozenset()

    def reason(self, module: str, out_features: int) -> str | None:
        if module in self.skip:
            return self.skip[module]
        if self.include and not any(re.search(p, module) for p in self.include):
            return f"matches none of the include patterns {list(self.include)}"
        for p in self.exclude:
            if re.search(p, module):
                return f"matches the exclude pattern {p!r}"
        if out_features < self.min_out_features:
            return (f"out_features {out_features} < min_out_features {self.min_out_features} "
                    "(a router or gate: kept in full precision)")
        return None
