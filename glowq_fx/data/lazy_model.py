"""Models built without their weights, and a transformers checkpoint read from disk part by part.

``empty_model`` builds a transformers model whose parameters are on the meta device (no memory;
accelerate's empty-weight initialisation, buffers real, so rotary tables and position ids are
computed as usual). ``materialize`` then gives meta parameters real storage: read from a
``LazyCheckpoint`` (the safetensors of a checkpoint directory, tensor by tensor), or empty, to be
filled by a loader. A parameter shared by several modules (tied embeddings) is set once, for all.
``release`` sends a module's tensors back to meta, freeing them.

A checkpoint whose keys transformers converts on load (an MoE's per-expert keys merged into one
3-D tensor per block, renamed keys) is read the same way: ``KeyConversions`` asks transformers'
own conversion mapping which checkpoint keys make each model tensor, and ``LazyCheckpoint.read``
reads those keys and applies the converter's operations to them alone, one block's experts at a
time.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn


def empty_model(config, dtype: torch.dtype, class_name: str | None = None) -> nn.Module:
    """A transformers model for ``config`` with its parameters on meta (eval mode): the causal LM
    class, else the base model; ``class_name`` must match when given."""
    import transformers
    from accelerate import init_empty_weights

    built = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with init_empty_weights(include_buffers=False):
                model = auto.from_config(config, dtype=dtype)
        except ValueError:
            continue
        if class_name is None or type(model).__name__ == class_name:
            if hasattr(model, "tie_weights"):
                model.tie_weights()  # on meta the tie is not made at build time: one tensor for both names
            return model.eval()
        built.append(type(model).__name__)
    want = f"a {class_name}" if class_name else "a model"
    raise ValueError(f"transformers' auto classes build {built or 'nothing'} from this config, not {want}")


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, attribute, qualified name) holding that parameter or buffer."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None:
                    owners.setdefault(id(t), []).append((module, attr, f"{mod_name}.{attr}" if mod_name else attr))
    return owners


def materialize(model: nn.Module, device: torch.device | str, read: Callable[[list[str]], Tensor] | None = None,
                prefixes: Iterable[str] | None = None, *, exclude: Iterable[str] = ()) -> int:
    """Give the meta tensors of ``model`` real storage on ``device``: ``read(names)`` (all the
    qualified names of one tensor) returns its value, or, without ``read``, they are left empty.
    Only tensors with a name under one of ``prefixes`` (None: all) and none under ``exclude``;
    returns how many tensors were set."""
    prefixes = None if prefixes is None else tuple(prefixes)
    exclude = tuple(exclude)
    under = lambda name, ps: any(name == p or name.startswith(p + ".") or p == "" for p in ps)  # noqa: E731
    count = 0
    for holders in _owners(model).values():
        module, attr, _ = holders[0]
        t = module._parameters.get(attr, module._buffers.get(attr))
        names = [name for _, _, name in holders]
        if not t.is_meta or (prefixes is not None and not any(under(n, prefixes) for n in names)):
            continue
        if exclude and any(under(n, exclude) for n in names):
            continue
        value = torch.empty_like(t, device=device) if read is None else read(names).to(device=device, dtype=t.dtype)
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"{names[0]}: the checkpoint holds shape {tuple(value.shape)}, the model {tuple(t.shape)}")
        new = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
        for owner, name, _ in holders:
            (owner._parameters if name in owner._parameters else owner._buffers)[name] = new
        count += 1
    return count


def release(module: nn.Module) -> None:
    """Free ``module``'s tensors: back to the meta device (the structure stays)."""
    module.to("meta")


class KeyConversions:
    """Which checkpoint keys make each model tensor, by transformers' conversion mapping for the
    model (``get_model_conversion_mapping``): renamed keys, and keys merged by a converter (an
    MoE's per-expert weights stacked into one 3-D tensor). Model tensors the checkpoint holds under
    their own name need none of this."""

    def __init__(self, model: nn.Module, keys: Iterable[str]):
        self.renamed: dict[str, str] = {}  # model name -> checkpoint key
        # model name -> (converter, checkpoint keys by source pattern)
        self.converted: dict[str, tuple[object, dict[str, list[str]]]] = {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # a transformers without conversion mappings loads checkpoints under their own names
            return
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        for key in keys:
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if pattern is None:
                if target != key and target in meta:
                    self.renamed[target] = key
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            for name in self._targets(target, converter, meta):
                self.converted.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(key)

    @staticmethod
    def _targets(first: str, converter, meta: dict) -> list[str]:
        """The model tensors a converter makes from a key renamed to ``first`` (its first target;
        a one-to-many converter, such as a fused qkv split, makes one per target pattern)."""
        patterns = converter.target_patterns
        names = [first.replace(patterns[0], t, 1) for t in patterns] if len(patterns) > 1 else [first]
        return [n for n in names if n in meta]

    def sources(self, name: str) -> list[str]:
        """The checkpoint keys model tensor ``name`` is made from ([] if none)."""
        if name in self.renamed:
            return [self.renamed[name]]
        if name in self.converted:
            return [k for keys in self.converted[name][1].values() for k in keys]
        return []

    def check(self, model_shape: Callable[[str], tuple[int, ...]],
              stored_shape: Callable[[str], tuple[int, ...]]) -> None:
        """Before anything is read: every converted model tensor has all of its experts' keys and
        they have one shape (``stored_shape(key)`` from the safetensors headers), else a
        ``ValueError`` naming the tensor, the keys and the fix."""
        for name, (converter, by_pattern) in self.converted.items():
            stacks = any(type(op).__name__ == "MergeModulelist" for op in converter.operations)
            for pattern, keys in by_pattern.items():
                ordered, index = _numbered(pattern, keys)
                if stacks and "*" in pattern:
                    expected = model_shape(name)[0]
                    missing = sorted(set(range(expected)) - set(index.values()))
                    if missing or len(ordered) != expected:
                        where = ordered[0].replace(f".{index[ordered[0]]}.", ".{i}.", 1)
                        raise ValueError(
                            f"{name}: the checkpoint's experts are incomplete: {where} is missing for i in "
                            f"{missing or 'none'} ({len(ordered)} keys for {expected} experts); the checkpoint has "
                            "lost shards or was written for another number of experts: write it again "
                            "(save_pretrained) or point at the complete directory")
                shapes = [stored_shape(k) for k in ordered]
                odd = [f"{k} {s}" for k, s in zip(ordered, shapes) if s != shapes[0]]
                if odd:
                    raise ValueError(f"{name}: the checkpoint's experts have unequal shapes ({ordered[0]} {shapes[0]}; "
                                     f"{', '.join(odd)}): one 3-D tensor cannot hold them; the checkpoint does not "
                                     "match this model's config")

    def convert(self, name: str, read: Callable[[str], Tensor]) -> Tensor:
        """Model tensor ``name`` made from its checkpoint keys (``check`` passed), each read with ``read``."""
        if name in self.renamed:
            return read(self.renamed[name])
        converter, by_pattern = self.converted[name]
        result = {pattern: [read(k) for k in _numbered(pattern, keys)[0]] for pattern, keys in by_pattern.items()}
        for op in converter.operations:
            result = op.convert(result, source_patterns=converter.source_patterns,
                                target_patterns=converter.target_patterns, full_layer_name=name)
        made = [t for target, t in result.items() if name.endswith(target)] or list(result.values())
        if len(made) != 1:
            raise ValueError(f"{name}: transformers' conversion of {sorted(by_pattern)} made {sorted(result)}, not "
                             "one tensor for it")
        return made[0]


def _numbered(pattern: str, keys: list[str]) -> tuple[list[str], dict[str, int]]:
    """``keys`` in the order of the number that stands for ``*`` in ``pattern`` (the expert), and
    each key's number (0 where the pattern has none)."""
    numbered = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    index = {}
    for key in keys:
        found = numbered.search(key)
        index[key] = int(found.group(1)) if found and found.groups() else 0
    return sorted(keys, key=index.get), index


class LazyCheckpoint:
    """The float weights of a transformers checkpoint directory (``config.json`` and safetensors,
    one file or shards with their index), read tensor by tensor into an empty model.

    Args:
        directory: the checkpoint directory.
        dtype: the model's dtype (default: the config's, else float32); tensors are cast on read.
    """

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None):
        import transformers

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise ValueError(f"{self.directory} is not a transformers checkpoint directory: config.json is missing")
        self.config = transformers.AutoConfig.from_pretrained(self.directory)
        self.files = self._key_files()
        self.dtype = dtype or getattr(self.config, "dtype", None) or torch.float32
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
        self.model = empty_model(self.config, self.dtype)
        self.conversions = KeyConversions(self.model, self.files)
        missing = [names[0] for names in ([n for _, _, n in h] for h in _owners(self.model).values())
                   if not any(n in self.files or self.conversions.sources(n) for n in names)
                   and self._is_meta(names[0])]
        if missing:
            raise ValueError(f"{self.directory}'s safetensors hold no tensor for {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}: its keys are not the model's parameter names "
                             "and transformers' conversion mapping for it makes none of them either; load it with "
                             "from_pretrained(..., device_map='cpu') and quantize it with quantize_")
        self.conversions.check(lambda n: tuple(self._meta_tensor(n).shape), self._stored_shape)
        with torch.no_grad():  # buffers are built real; the ones the checkpoint saved are read now (small)
            for name, buffer in self.model.named_buffers():
                if name in self.files:
                    buffer.copy_(self.read([name]))

    def _is_meta(self, name: str) -> bool:
        t = self._meta_tensor(name)
        return t is not None and t.is_meta

    def _key_files(self) -> dict[str, str]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.directory / "model.safetensors"
        if not single.is_file():
            raise ValueError(f"{self.directory} has no model.safetensors (nor an index of shards): only safetensors "
                             "checkpoints are read from disk; save the model with save_pretrained first")
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {key: single.name for key in f.keys()}

    def read(self, names: list[str]) -> Tensor:
        """The checkpoint's tensor for the first of ``names`` it holds."""
        from safetensors import safe_open

        key = next((n for n in names if n in self.files), None)
        if key is None:
            converted = next((n for n in names if self.conversions.sources(n)), None)
            if converted is None:
                raise KeyError(f"the checkpoint holds none of {names}")
            return self.conversions.convert(converted, lambda k: self.read([k]))
        # opened per read: a handle kept open keeps the whole shard mapped, and its pages count as
        # the process's memory
        with safe_open(str(self.directory / self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        """The shape of checkpoint tensor ``key``, from its shard's header (no data read)."""
        from safetensors import safe_open

        with safe_open(str(self.directory / self.files[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def _meta_tensor(self, name: str) -> Tensor:
        owner, _, attr = name.rpartition(".")
        module = self.model.get_submodule(owner)
        return module._parameters.get(attr, module._buffers.get(attr))

    def load(self, device: torch.device | str, prefixes: Iterable[str] | None = None, *,
             exclude: Iterable[str] = ()) -> int:
        """Read the meta tensors under ``prefixes`` (None: all, less ``exclude``) onto ``device``."""
        return materialize(self.model, device, self.read, prefixes, exclude=exclude)
