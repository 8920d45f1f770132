"""Block-by-block calibration: run a model one repeated block at a time over cached inputs.

Whole-model calibration holds every group's ``S`` at once (about 1 GB per Llama-3-8B layer in
float32). Here only the block being calibrated has its ``S`` and, when the model's weights live
elsewhere (CPU), its weights on the compute device:

1. Recording pass, once per batch: the model runs with every block replaced by a stub, so no
   block computes. Each stub records what the model hands its block (the stream of hidden
   states, and the rest: masks, position embeddings, flags), per block, since they may differ
   (sliding-window layers get other masks). The stubs return their input (shaped like a real
   block's output, learned from running block 0 once), and the last one ends the pass. The
   linears that run before the first block (outside every block) are calibrated here. Unless
   the caller gives the groups, those outside the blocks are found first, from the graph of the
   model run with the same stubs (``capture.groups.capture_groups``).
2. Per block ``i``: unless given, its groups are found from the graph of the block alone,
   captured on its first cached batch with its own arguments (``find_block_groups``: the whole
   model is never traced). The block moves to the compute device, runs on every batch's cached stream
   with its own recorded arguments while its groups' ``S`` accumulate (``block_statistics``);
   the caller quantizes it; ``advance`` makes the next block's stream from the outputs of the
   float block (``block_inputs="float"``, kept from step 2) or of the quantized block (rerun).
3. Tail pass (only when linears after the last block are quantized, e.g. the output head): the
   model runs with stubs again, the last one returning the final stream.

Each stub checks that it receives the very tensor the previous one returned: a model that
changes the hidden states between its blocks raises ``BlockwiseUnsupported`` (the caller then
calibrates the whole model), as does a quantized linear that runs between two blocks.
The block computes exactly as inside the model (same inputs, same arguments, same batch order),
so with ``block_inputs="float"`` every ``S`` equals the whole-model pass's bit for bit.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from glowq_fx._heap import release_cycles, trim_heap
from glowq_fx.calibration.activations import ActivationStore, choose_place, nbytes
from glowq_fx.calibration.collect import StopForward, batch_mask, feeding, output_module
from glowq_fx.calibration.moments import GroupStatistics
from glowq_fx.capture.blocks import Blocks
from glowq_fx.capture.groups import GroupDiscovery, capture_groups, warn_discovery
from glowq_fx.capture.run import Run, run_batch, run_sparing_logits
from glowq_fx.config import GlowQConfig
from passes.groups import InputGroup

# a block whose weights reach this size has its capture's cycles collected at once (a full collection
# costs 0.2-1 s, small next to quantizing such a block)
RELEASE_BLOCK_BYTES = 16 << 20


class BlockwiseUnsupported(Exception):
    """This model cannot be calibrated block by block; the message says why."""


class _Stop(Exception):
    """Ends a forward pass at a stub (nothing after it is needed)."""


def _stream_of(args: tuple, kwargs: dict) -> tuple[Tensor, int | str]:
    """The hidden-state stream a block receives, and where: its first positional argument or
    ``hidden_states=``."""
    if args and isinstance(args[0], Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], "hidden_states"
    raise BlockwiseUnsupported("a block receives its hidden states neither as its first positional argument nor as "
                               "hidden_states=")


def _output_stream(out: object) -> Tensor:
    """The hidden states in a block's output: the output itself, or its first element."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise BlockwiseUnsupported(f"a block returns {type(out).__name__}, neither a tensor nor a tuple starting with one")


def _with_stream(template: object, stream: Tensor) -> object:
    """A block output shaped like ``template`` carrying ``stream``."""
    if isinstance(template, Tensor):
        return stream
    return type(template)([stream, *template[1:]])


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _stubbed(modules: Sequence[nn.Module], forward_of: Callable[[int], Callable]) -> Iterator[None]:
    """Each module's forward replaced by ``forward_of(i)`` (hooks still run), restored after: an
    instance attribute ``forward`` of its own (accelerate's offload hook) is put back as it was."""
    saved = [m.__dict__.get("forward") for m in modules]
    for i, m in enumerate(modules):
        m.forward = forward_of(i)
    try:
        yield
    finally:
        for m, own in zip(modules, saved):
            if own is None:
                del m.forward
            else:
                m.forward = own


class BlockwiseCalibration:
    """Cached block inputs for ``batches``, and the block-by-block steps (module docstring).

    Args:
        model: the model (eval mode, no grad: the caller's job).
        blocks: its blocks (``capture.blocks.find_blocks``).
        batches: the calibration batches, as ``run`` takes them.
        run: ``run(model, batch)`` does one forward pass.
        device: where the blocks compute.
        outside: the groups outside every block (calibrated in the recording or the tail pass), or
            None: found from the graph of the model with its blocks stubbed, with ``find``'s filters;
            each block's groups then come from its own graph (``find_block_groups``).
        find: the ``GlowQConfig`` whose filters the found groups follow (with ``outside=None``).
        stats_dtype: accumulation dtype of ``S``.
        first_position_weight: ``GlowQConfig.first_position_weight``.
        block_inputs: ``"float"`` or ``"quantized"`` (``GlowQConfig.block_inputs``).
        activations, offload_dir: where the cached inputs live (``GlowQConfig.activations``).
    """

    def __init__(self, model: nn.Module, blocks: Blocks, batches: Sequence[object], run: Run, device: torch.device,
                 outside: Sequence[InputGroup] | None, *, stats_dtype: str = "float32",
                 first_position_weight: float = 1.0, block_inputs: str = "float",
                 activations: str = "auto", offload_dir: str | None = None, find: GlowQConfig | None = None):
        self.model, self.blocks, self.batches, self.run = model, blocks, list(batches), run
        self.device = torch.device(device)
        self.modules = [model.get_submodule(name) for name in blocks.names]
        # where each block goes back after its turn: where it was, or, for a block not loaded yet
        # (on meta: its owner reads it from disk when its turn comes), the compute device
        self.homes = [self.device if _device_of(m).type == "meta" else _device_of(m) for m in self.modules]
        self.stats_dtype, self.block_inputs = stats_dtype, block_inputs
        self.first_position_weight = first_position_weight
        self._activations, self._offload_dir = activations, offload_dir
        self.place: str | None = None
        self._stores: list[ActivationStore] = []
        self._outputs: ActivationStore | None = None
        if outside is None and find is None:
            raise ValueError("pass the groups outside the blocks (outside=) or the config to find them with (find=)")
        self._find = find
        self.skipped: dict[str, str] = {}  # what the found groups left out, why
        self.graph_breaks: list[str] = []
        self._warned: set = set()  # the warnings said (once for blocks that say the same)
        t0 = time.perf_counter()
        try:
            self.template, self.stream_key = self._learn_output()
            if outside is None:
                outside = self._find_outside()
            trim_heap()  # block 0's forward and the capture's temporaries, back before the cached inputs are made
            self.head_stats, self.tail_groups, self.head_groups = self._record(outside)
        except BaseException:
            self.close()  # the stores opened so far (temporary files on disk)
            raise
        # seconds: the recording pass; per block its forwards (S accumulation included), of which S,
        # and the rerun that makes the next inputs (0 with float inputs: they are kept)
        self.times: dict = {"record_s": time.perf_counter() - t0, "forward_s": [], "statistics_s": [],
                            "next_inputs_s": []}

    # -- step 1 ----------------------------------------------------------------------------------
    def _record(self, outside: Sequence[InputGroup]):
        modules = dict(self.model.named_modules())
        seen_after: dict[str, int] = {}  # outside group -> blocks run before it
        ran = [0]

        def note(name: str):
            def hook(_module, _args):  # returns None: a pre-hook's return value would replace the input
                seen_after.setdefault(name, ran[0])
            return hook

        outside_hooks = [modules[g.members[0]].register_forward_pre_hook(note(g.name)) for g in outside]
        head_stats = GroupStatistics(((g.name, g.in_features) for g in outside), dtype=self.stats_dtype,
                                     first_position_weight=self.first_position_weight)
        last = len(self.modules) - 1
        current: dict = {}

        def stub(i: int):
            def forward(*args, **kwargs):
                stream, _ = _stream_of(args, kwargs)
                if self.stream_key == 0:
                    rest = args[1:]
                else:
                    rest, kwargs = args, {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i == 0:
                    current["stream"] = stream
                elif stream is not current["stream"]:
                    raise BlockwiseUnsupported(
                        f"the model changes the hidden states between {self.blocks.names[i - 1]} "
                        f"and {self.blocks.names[i]}, so a block's input is not the previous "
                        "block's output"
                    )
                current["extras"].append((rest, kwargs))
                ran[0] = i + 1
                if i == last:
                    raise _Stop
                return _with_stream(self.template, stream)
            return forward

        try:
            with feeding(self.model, outside, head_stats) as set_mask, torch.no_grad(), _stubbed(self.modules, stub):
                for b, batch in enumerate(self.batches):
                    current.clear()
                    current["extras"] = []
                    ran[0] = 0
                    set_mask(batch_mask(batch))
                    try:
                        self.run(self.model, batch)
                    except _Stop:
                        pass
                    else:
                        raise BlockwiseUnsupported(f"the forward pass never reached {self.blocks.names[-1]}")
                    if not self._stores:
                        self._open_stores(current["stream"], current["extras"])
                    self._stores[0][b] = current["stream"]
                    self._stores[1][b] = current["extras"]
        finally:
            for h in outside_hooks:
                h.remove()
        between = [name for name, n in seen_after.items() if 0 < n <= last]
        if between:
            raise BlockwiseUnsupported(f"linears outside the blocks run between two blocks ({', '.join(between[:3])})")
        head = [g for g in outside if seen_after.get(g.name) == 0]
        tail = [g for g in outside if g.name not in seen_after]  # their S comes from the tail pass
        return head_stats, tail, head

    def _learn_output(self):
        """Run block 0 once on the first batch's inputs: the shape of a block's output."""
        captured = {}

        def catch(*args, **kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        with torch.no_grad(), _stubbed(self.modules[:1], lambda i: catch):
            try:
                self.run(self.model, self.batches[0])
            except _Stop:
                pass
            else:
                raise BlockwiseUnsupported(f"the forward pass never called {self.blocks.names[0]}")
        stream, key = _stream_of(captured["args"], captured["kwargs"])
        with torch.no_grad():
            out = self.modules[0](*captured["args"], **captured["kwargs"])
        _output_stream(out)
        if isinstance(out, (tuple, list)):
            out = type(out)([None, *out[1:]])  # keep the structure, not the activations
        return out, key

    # -- the groups, from the graphs ------------------------------------------------------------
    def _find_outside(self) -> list[InputGroup]:
        """The groups outside every block, from the graph of the model run with its blocks stubbed
        (no block computes). A stub returns a new tensor (its input times one), so that a linear
        before the blocks and one after them read different producers, as in the model."""
        def stub(i: int):
            def forward(*args, **kwargs):
                stream, _ = _stream_of(args, kwargs)
                return _with_stream(self.template, stream * 1)
            return forward

        run = run_sparing_logits if self.run is run_batch else self.run
        with _stubbed(self.modules, stub):
            discovery = capture_groups(self.model, self.batches[0], self._find, run, whole=False)
        self._keep(discovery, f"the forward pass of {type(self.model).__name__} outside its blocks", None)
        return discovery.groups

    def find_block_groups(self, i: int) -> list[InputGroup]:
        """Block ``i``'s groups, from its own graph: the block is captured on its first cached batch
        with its own recorded arguments, where it computes (it moves to the compute device). Its
        warnings are said unless an earlier block said the same."""
        module = self.modules[i].to(self.device)
        rest, kwargs = self._stores[1][0][i]
        key = self.stream_key

        def call(_model: nn.Module, inputs: tuple) -> object:
            stream, rest, kwargs = inputs
            return module(stream, *rest, **kwargs) if key == 0 else module(*rest, hidden_states=stream, **kwargs)

        discovery = capture_groups(self.model, (self._stores[0][0], rest, kwargs), self._find, call, whole=False)
        groups = discovery.groups
        name = self.blocks.names[i]
        strays = [m for g in discovery.groups for m in g.members if self.blocks.index_of(m) != i]
        if strays:
            raise ValueError(
                f"{name} runs linears that are not its own ({', '.join(strays[:3])}), so its groups cannot "
                "be quantized with it (the blocks before it are quantized already): reload the model and "
                "use GlowQConfig(calibration='model')"
            )
        self._keep(discovery, name, name + ".")
        del discovery
        # the capture's traces reach the block's weights through reference cycles: freed now, or a
        # model read from disk keeps every released block's float weights until a full collection
        # (measured: +40 MB per block of a Qwen3-MoE-shaped model, 0.7 to 1.0 GB over 8 blocks)
        if nbytes(list(module.parameters())) >= RELEASE_BLOCK_BYTES:
            release_cycles()
        else:
            trim_heap()  # the capture's temporaries, back before the block's forwards allocate
        return groups

    def _keep(self, discovery: GroupDiscovery, what: str, prefix: str | None) -> None:
        """Record what a discovery skipped and its graph breaks, and say its warnings unless a block
        said the same (names relative to the block: ``prefix``)."""
        self.skipped.update(discovery.skipped)
        self.graph_breaks += [b for b in discovery.graph_breaks if b not in self.graph_breaks]
        local = (lambda s: s.replace(prefix, "")) if prefix else (lambda s: s)
        said = (discovery.capture_error, tuple(discovery.graph_breaks), tuple(map(local, discovery.from_hooks)),
                tuple(sorted((local(k), local(v)) for k, v in discovery.skipped.items())))
        if said not in self._warned:
            self._warned.add(said)
            warn_discovery(discovery, what)

    def _open_stores(self, stream: Tensor, extras: list) -> None:
        n = len(self.batches)
        needed = n * (nbytes(stream) * (2 if self.block_inputs == "float" else 1) + nbytes(extras))
        self.place = choose_place(self._activations, needed, self.device)
        self.needed_bytes = needed
        self._stores = [ActivationStore(self.place, self.device, self._offload_dir) for _ in range(2)]
        if self.block_inputs == "float":
            self._outputs = ActivationStore(self.place, self.device, self._offload_dir)

    # -- step 2 ----------------------------------------------------------------------------------
    def _call(self, i: int, b: int) -> Tensor:
        """Block ``i`` on batch ``b``'s cached input; its output stream."""
        stream = self._stores[0][b]
        rest, kwargs = self._stores[1][b][i]
        if self.stream_key == 0:
            out = self.modules[i](stream, *rest, **kwargs)
        else:
            out = self.modules[i](*rest, hidden_states=stream, **kwargs)
        return _output_stream(out)

    def block_statistics(self, i: int, groups: Sequence[InputGroup], experts: dict | None = None) -> GroupStatistics:
        """Move block ``i`` to the compute device and run it on every batch, collecting the ``S``
        of ``groups`` (its groups) and the statistics of ``experts`` (its experts modules, by name);
        with float block inputs its outputs are kept for ``advance``."""
        t0 = time.perf_counter()
        self.modules[i].to(self.device)
        stats = GroupStatistics(((g.name, g.in_features) for g in groups), dtype=self.stats_dtype, experts=experts,
                                first_position_weight=self.first_position_weight)
        with feeding(self.model, groups, stats) as set_mask, torch.no_grad():
            for b, batch in enumerate(self.batches):
                set_mask(batch_mask(batch))
                out = self._call(i, b)
                if self._outputs is not None:
                    self._outputs[b] = out
        self.times["forward_s"].append(time.perf_counter() - t0)
        self.times["statistics_s"].append(stats.time_s)
        return stats

    def advance(self, i: int) -> None:
        """The next block's inputs: the kept float outputs, or block ``i`` run again (quantized
        now); then block ``i`` goes back where it lives."""
        t0 = time.perf_counter()
        with torch.no_grad():
            if self._outputs is not None:
                self._stores[0], self._outputs = self._outputs, self._stores[0]
            else:
                for b in range(len(self.batches)):
                    self._stores[0][b] = self._call(i, b)
        self.modules[i].to(self.homes[i])
        self.times["next_inputs_s"].append(time.perf_counter() - t0)

    # -- step 3 ----------------------------------------------------------------------------------
    def tail_statistics(self) -> GroupStatistics:
        """The ``S`` of the groups after the last block, from the final streams."""
        stats = GroupStatistics(((g.name, g.in_features) for g in self.tail_groups), dtype=self.stats_dtype,
                                first_position_weight=self.first_position_weight)
        if not self.tail_groups:
            return stats
        last, home = len(self.modules) - 1, self.homes[-1]
        batch_index = [0]

        def stub(i: int):
            def forward(*args, **kwargs):
                stream, _ = _stream_of(args, kwargs)
                if i == last:
                    stream = self._stores[0][batch_index[0]].to(home)
                return _with_stream(self.template, stream)
            return forward

        with feeding(self.model, self.tail_groups, stats, stop_at=output_module(self.model)) as set_mask, \
                torch.no_grad(), _stubbed(self.modules, stub):
            for b, batch in enumerate(self.batches):
                batch_index[0] = b
                set_mask(batch_mask(batch))
                try:
                    self.run(self.model, batch)
                except StopForward:  # the head's input is recorded; its logits are not needed
                    pass
        missing = [g.name for g in self.tail_groups if stats[g.name].n_batches != len(self.batches)]
        if missing:
            raise BlockwiseUnsupported(
                f"linears outside the blocks did not run on every batch ({', '.join(missing[:3])})"
            )
        return stats

    def close(self) -> None:
        for store in (*self._stores, *([self._outputs] if self._outputs is not None else [])):
            store.close()
        for module, home in zip(self.modules, self.homes):
            # a released block stays released, and one left partly read by a failed read stays as it is
            if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
                module.to(home)

    def __enter__(self) -> "BlockwiseCalibration":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
