"""The Inductor entry points glowq_backend uses, behind one small wrapper.

``compile_fx`` lives in a private module (``torch._inductor.compile_fx``),
``list_mode_options`` is Inductor's own table of what ``mode=`` means, and ``run_and_get_code``
(``torch._inductor.utils``) returns the Python Inductor generates; all have kept their
signatures across 2.11-2.13. ``tests/backend/test_inductor.py`` fails loudly if any changes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import fx


def mode_options(mode: str | None, dynamic: bool | None = None) -> dict[str, Any]:
    """Inductor config patches that ``torch.compile(mode=...)`` stands for
    (``"reduce-overhead"`` -> CUDA graphs, ...)."""
    from torch._inductor import list_mode_options

    if mode is not None and mode not in ("default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"):
        raise ValueError(f"unknown mode {mode!r}: use 'default', 'reduce-overhead', 'max-autotune' or "
                         "'max-autotune-no-cudagraphs'")
    return dict(list_mode_options(mode or "default", dynamic))  # None would list every mode


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[object],
                          config_patches: Mapping[str, Any] | None = None):
    """Hand a Dynamo graph to Inductor, as ``backend="inductor"`` would."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=dict(config_patches or {}))


def run_and_get_generated_code(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
    """``fn(*args)`` and the source of every module Inductor generated while running it (the
    wrapper code that calls kernels and ops, in order): what runs, after all of Inductor's passes."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn, *args)
