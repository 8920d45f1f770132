"""``save_quantized(model, dir)`` / ``load_quantized(dir)``: a quantized model on disk, bit for bit.

A checkpoint directory holds:

- ``model.safetensors``, or shards ``model-0000i-of-0000N.safetensors`` and their
  ``model.safetensors.index.json`` (``shards``: transformers' layout, ``max_shard_size`` 5 GB by
  default): the whole state dict (packed codes, scales, zeros, ``A_i``, each group's ``B``, and
  every tensor left in floating point), one copy of tensors that share storage (tied
  embeddings); the aliases are listed in ``glowq.json``.
- ``glowq.json``: format version, the glowq-fx / torch / transformers versions, the
  ``GlowQConfig``, each quantized linear (shape, group size, rank, bias, the projection it reads),
  each projection (its members and state-dict key), the model class, each shard's size and
  SHA-256, and the quantization report when one is given.
- ``config.json`` (and the tokenizer's files when one is given) for transformers models, so
  ``load_quantized(dir)`` can rebuild the model alone; other models are rebuilt by the caller
  and passed as ``load_quantized(dir, model)``.

Loading checks everything before touching the model: every shard's size and checksum (missing,
truncated or corrupted shards), that every quantized linear exists in the model with the recorded
shape, that the shards hold exactly the tensors the quantized model needs with the right shapes
and dtypes. Any mismatch raises ``CheckpointError`` naming it, and the model is left as it was.
Then the quantized modules are installed empty and the shards are read one at a time into the
model. Format version 1 (one ``model.safetensors``, written before shards) still loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from glowq_fx._version import __version__
from glowq_fx.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    alias_keys,
    check_factor_slots,
    describe,
    file_dtype,
    hf_quantization_config,
    in_dtype,
    install_quantized,
    read_checked,
    under_module,
)
from glowq_fx.checkpoint.shards import CheckpointError, ShardWriter, iter_shards
from glowq_fx.config import GlowQConfig
from glowq_fx.data.lazy_model import empty_model, materialize
from glowq_fx.modules.kernels import use_cpu_kernels
from glowq_fx.modules.linear import QuantizedLinear

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default

def _versions() -> dict[str, str]:
    versions = {"glowq_fx": __version__, "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one key per shared storage (safetensors stores no aliases); return the aliases."""
    aliases = alias_keys(state)
    return {k: t.detach().contiguous() for k, t in state.items() if k not in aliases}, aliases


class CheckpointWriter:
    """A quantized checkpoint written part by part: ``add`` writes a finished part of a model (a
    quantized block, whose weights may then be released), ``close`` the rest of the model and the
    description. ``save_quantized`` is one ``add`` of everything.

    Args:
        directory: the checkpoint directory (created if needed).
        max_shard_size: bytes per safetensors shard at most (int, or ``"5GB"``, ``"500MiB"``).
    """

    def __init__(self, directory: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        self.directory = Path(directory)
        self._shards = ShardWriter(self.directory, max_shard_size, metadata={"format": FORMAT})
        self.records: dict[str, dict] = {}
        self._projections: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.embeddings: dict[str, dict] = {}
        self.experts: dict[str, dict] = {}
        self.int8_linears: dict[str, dict] = {}
        self._written: set[str] = set()
        self.dtype: torch.dtype | None = None  # the model's (its quantized linears' scales')

    def add(self, model: nn.Module, prefix: str | None = None) -> None:
        """The quantized modules' records and the tensors of ``model`` under the module ``prefix``
        (None: everything not written yet)."""
        found = describe(model, prefix)
        for name, rec in found["linears"].items():
            self.records.setdefault(name, rec)
            self.dtype = self.dtype or model.get_submodule(name).scales.dtype
        for rec in found["projections"]:
            self._projections.setdefault(rec["key"], rec)
        for name, rec in found["embeddings"].items():
            self.embeddings.setdefault(name, rec)
        for name, rec in found["int8_linears"].items():
            self.int8_linears.setdefault(name, rec)
        for name, rec in found["experts"].items():
            self.experts.setdefault(name, rec)
            first = model.get_submodule(name)
            self.dtype = self.dtype or first.quantized_weights(next(iter(rec["weights"]))).scales.dtype
        state = {k: v for k, v in model.state_dict().items() if under_module(k, prefix) and k not in self._written}
        tensors, aliases = _dedupe(state)
        self._shards.add(tensors)
        self.aliases.update(aliases)
        self._written.update(state)

    def close(self, model: nn.Module, *, config: GlowQConfig | None = None, report=None, tokenizer=None) -> Path:
        """Write what is left of ``model``, its config (and tokenizer), and ``glowq.json``."""
        self.add(model)
        if not self.records and not self.experts:
            raise CheckpointError("the model has no QuantizedLinear modules: quantize it with glowq_fx.quantize_ "
                                  "first (a floating-point model is saved with save_pretrained)")
        shards = self._shards.close()
        if config is None and report is not None:
            config = report.config
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "save_pretrained"):
            # transformers' from_pretrained finds the glowq loader by this entry (checkpoint.transformers)
            qconfig = hf_quantization_config(model, config)
            saved = getattr(model_config, "quantization_config", None), getattr(model_config, "dtype", None)
            model_config.quantization_config = qconfig
            # the model's dtype, as save_pretrained writes it: without it, from_pretrained's dtype="auto" takes the
            # first floating tensor of the file, which may be a factor stored narrower (GlowQConfig.factor_dtype)
            model_config.dtype = str(self.dtype).removeprefix("torch.")
            try:
                model_config.save_pretrained(self.directory)
            finally:
                if saved[0] is None:
                    del model_config.quantization_config
                else:
                    model_config.quantization_config = saved[0]
                model_config.dtype = saved[1]
        if tokenizer is not None:
            tokenizer.save_pretrained(self.directory)
        if config is None and report is not None:
            config = report.config
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": None if config is None else config.to_dict(),
            "linears": self.records, "projections": list(self._projections.values()), "aliases": self.aliases,
            "embeddings": self.embeddings, "experts": self.experts, "int8_linears": self.int8_linears,
            "tensors": {"shards": shards},
            "report": None if report is None else report.to_dict(),
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=1))
        return self.directory


def save_quantized(model: nn.Module, directory: str | Path, *, config: GlowQConfig | None = None,
                   report=None, tokenizer=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the quantized ``model`` (from ``quantize_``) to ``directory``; returns the directory.

    ``config`` defaults to ``report.config`` when a ``QuantizationReport`` is given;
    ``max_shard_size`` (bytes, or ``"5GB"``, ``"500MiB"``) caps each safetensors shard.
    """
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise CheckpointError("the model has no QuantizedLinear modules: quantize it with glowq_fx.quantize_ "
                              "first (a floating-point model is saved with save_pretrained)")
    return CheckpointWriter(directory, max_shard_size).close(model, config=config, report=report, tokenizer=tokenizer)


def _build_model(directory: Path, meta: dict, dtype: torch.dtype) -> nn.Module:
    """The unquantized architecture without its weights (on meta: the float linears the quantized
    ones replace never take memory)."""
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json to rebuild the model from (the model was not a "
                              "transformers model): build the unquantized model yourself and call "
                              "load_quantized(directory, model)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    try:
        return empty_model(config, dtype, meta["model_class"].rsplit(".", 1)[-1])
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild the model from {directory}/config.json: {exc}; build the unquantized "
                              "model yourself and call load_quantized(directory, model)") from None


def load_quantized(directory: str | Path, model: nn.Module | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The quantized model saved in ``directory``, in eval mode on ``device``.

    Args:
        directory: written by ``save_quantized`` or a quantized model's ``save_pretrained``.
        model: the unquantized architecture to load into (its weights are replaced; it must have
            the dtype it is loaded in). Default: rebuilt from ``config.json`` (transformers models).
        device: where the tensors go.
        dtype: the model's floating dtype; default the checkpoint's. Another one casts what the
            checkpoint stores in its model dtype, scales included (``format.in_dtype``).
    """
    directory = Path(directory)
    meta, shards, header = read_checked(directory)
    header = in_dtype(header, meta, dtype)
    if model is None:
        model = _build_model(directory, meta, file_dtype(header, meta))
    install_quantized(model, meta, header, device)
    materialize(model, device)  # what is left on meta (a rebuilt model's float tensors), empty
    model.to(device)
    for tensors in iter_shards(directory, shards, device):  # one shard's tensors at a time
        tensors.update({alias: tensors[target] for alias, target in meta["aliases"].items() if target in tensors})
        model.load_state_dict(tensors, strict=False)  # _plan checked that the shards cover the state exactly
    check_factor_slots(model)
    from glowq_fx.checkpoint.transformers import attach

    attach(model, meta.get("config"))
    use_cpu_kernels(model)  # the CPU kernel's layout is made here, for this machine
    return model.eval()
