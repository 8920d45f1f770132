"""``glowq_backend``: the torch.compile backend for models that ``quantize_`` prepared.

    model = torch.compile(model, backend=glowq_backend)                       # default
    model = torch.compile(model, backend=glowq_backend, mode="reduce-overhead")  # CUDA graphs
    model = torch.compile(model, backend=functools.partial(glowq_backend, debug=True))

It is also registered under the name ``"glowq"`` (the ``torch_dynamo_backends`` entry point), so
``torch.compile(model, backend="glowq")`` works once glowq-fx is installed.

It runs ``passes.rewrite`` on the graph Dynamo captured (one shared projection per group, each
group's members in one fused W4A16 + low-rank node; on CUDA a group node that alone reads its
projection takes ``B`` and makes ``R`` itself, in its launch where that is faster), checks the
graph, and hands it to Inductor. On CUDA Inductor calls the ``glowq::`` ops (Triton kernels) from
its generated code; on the CPU it gets them decomposed into aten ops (``cpu_lowering``: the int4
matmul, the projection and the epilogue), which it lowers and fuses itself.
A graph without quantized linears is compiled unchanged. The backend registers no tensors and
changes no global state: the model was quantized before compiling.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from glowq_fx import ops  # noqa: F401  (registers the glowq:: ops named below)
from glowq_fx.backend._inductor import compile_with_inductor, mode_options
from glowq_fx.backend.cpu_gemv_groups import merge_gemv_members
from glowq_fx.backend.cpu_lowering import lower_to_aten
from passes.rewrite import QuantizedOps, RewriteReport, fuse_shared_projections

# the glowq:: ops (registered by importing glowq_fx.ops) that the rewrite reads and writes
GLOWQ_OPS = QuantizedOps(linear=torch.ops.glowq.w4a16_linear.default,
                         projection=torch.ops.glowq.shared_projection.default,
                         group=torch.ops.glowq.w4a16_group.default,
                         projected_group=torch.ops.glowq.w4a16_group_projected.default,
                         unfused_linear=torch.ops.glowq.w4a16_linear_int4pack.default)

_OWN_OPTIONS = ("glowq.debug", "glowq.fuse", "glowq.one_launch", "glowq.lower")


def glowq_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                  options: dict[str, Any] | None = None, dynamic: bool | None = None, debug: bool = False,
                  fuse: bool = True, one_launch: bool | None = None, lower: bool = True, **kwargs: Any):
    """Compile a Dynamo graph with GlowQ's rewrite, then Inductor.

    Args:
        gm, example_inputs: what Dynamo hands a backend (tensors and SymInts).
        mode: ``torch.compile``'s ``mode`` (passed through to Inductor).
        options: Inductor config patches, plus ``"glowq.debug"`` / ``"glowq.fuse"`` /
            ``"glowq.one_launch"`` / ``"glowq.lower"`` (the arguments below, for use through
            ``torch.compile(options=...)``).
        dynamic: ``torch.compile``'s ``dynamic``, for the mode's options.
        debug: print the groups found and the rewritten graph.
        fuse: run the rewrite (``False`` compiles the graph as captured: for comparisons).
        one_launch: hand each group node its ``B`` instead of a projection's ``R``
            (``glowq::w4a16_group_projected``), so that the launch may make ``R`` itself where
            that is faster; default: when the graph runs on CUDA (elsewhere it changes nothing).
        lower: on the CPU, hand Inductor the ops decomposed into aten ops (``cpu_lowering``);
            ``False`` leaves them opaque calls there too, as on CUDA (for comparisons and tests).
    """
    if kwargs:
        raise TypeError(f"glowq_backend got unexpected arguments {sorted(kwargs)}: it takes mode=, options=, "
                        "dynamic=, debug=, fuse=, one_launch= and lower=")
    patches = dict(options or {})
    debug = bool(patches.pop("glowq.debug", debug))
    fuse = bool(patches.pop("glowq.fuse", fuse))
    one_launch = patches.pop("glowq.one_launch", one_launch)
    lower = bool(patches.pop("glowq.lower", lower))
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if one_launch is None:
        one_launch = on_cuda
    patches = {**mode_options(mode, dynamic), **patches}
    report = fuse_shared_projections(gm, example_inputs, ops=GLOWQ_OPS, absorb=bool(one_launch)) if fuse \
        else RewriteReport()  # lints the graph
    if debug:
        print(report)
        print(gm.code)
    gm.meta["glowq_rewrite"] = report  # for tests and tools that inspect the compiled graph
    # on the CPU Inductor lowers what the ops compute (int4 matmul, projection, epilogue);
    # on CUDA it calls them, and they launch the Triton kernels
    if lower and not on_cuda:
        merge_gemv_members(gm)
        lower_to_aten(gm)
    return compile_with_inductor(gm, example_inputs, patches)
