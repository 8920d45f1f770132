"""Models built without their weights, and a transformers checkpoint read from disk part by part.

``empty_model`` builds a transformers model whose parameters are on the meta device (no memory;
accelerate's empty-weight initialisation, buffers real, so rotary tables and position ids are
computed as usual). ``materialize`` then gives meta parameters real storage: read from a
``LazyCheckpoint`` (the safetensors of a checkpoint directory, tensor by tensor), or empty, to be
filled by a loader. A parameter shared by several modules (tied embeddings) is set once, for all.
``release`` sends a module's tensors back to meta, freeing them.
"""
from __future__ import annotations

import json
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
        missing = [names[0] for names in ([n for _, _, n in h] for h in _owners(self.model).values())
                   if not any(n in self.files for n in names) and self._is_meta(names[0])]
        if missing:
            raise ValueError(f"{self.directory}'s safetensors hold no tensor for {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}: its keys are not the model's parameter names "
                             "(a checkpoint transformers converts on load); load the model with "
                             "from_pretrained(..., device_map='cpu') and quantize it with quantize_")
        with torch.no_grad():  # buffers are built real; the ones the checkpoint saved are read now (small)
            for name, buffer in self.model.named_buffers():
                if name in self.files:
                    buffer.copy_(self.read([name]))

    def _is_meta(self, name: str) -> bool:
        owner, _, attr = name.rpartition(".")
        module = self.model.get_submodule(owner)
        t = module._parameters.get(attr, module._buffers.get(attr))
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
            raise KeyError(f"the checkpoint holds none of {names}")
        # opened per read: a handle kept open keeps the whole shard mapped, and its pages count as
        # the process's memory
        with safe_open(str(self.directory / self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def load(self, device: torch.device | str, prefixes: Iterable[str] | None = None, *,
             exclude: Iterable[str] = ()) -> int:
        """Read the meta tensors under ``prefixes`` (None: all, less ``exclude``) onto ``device``."""
        return materialize(self.model, device, self.read, prefixes, exclude=exclude)
