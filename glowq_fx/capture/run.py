"""The forward pass the capture and the calibration run, and the checks on what they are given.

A calibration batch is a mapping of model keyword arguments (``{"input_ids": (B, T) int64,
"attention_mask": (B, T)}``), a tuple of positional arguments, or one tensor; ``run_batch``
calls the model on it. ``check_model`` and ``check_calibration`` refuse, with the fix, what
cannot be quantized, before any work is done.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from glowq_fx.capture.linears import linear_weight

Run = Callable[[nn.Module, object], object]
GLOWQ_QUANTIZED = "glowq_quantized"  # the class attribute (True) of every module glowq-fx swaps in


def run_batch(model: nn.Module, batch: object) -> object:
    """One forward pass: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list,
    ``model(batch)`` otherwise. Mappings get ``use_cache=False`` when the model takes it: a
    KV cache is wasted memory during calibration."""
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "use_cache" not in kwargs and "use_cache" in _forward_parameters(model):
            kwargs["use_cache"] = False
        return model(**kwargs)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_sparing_logits(model: nn.Module, batch: object) -> object:
    """``run_batch``, asking a transformers causal LM for the last position's logits only
    (``logits_to_keep=1``) when its forward takes that argument: for passes that never read the
    logits (with a 262k vocabulary, 8 x 512 tokens of float32 logits are 4.3 GB)."""
    if isinstance(batch, Mapping) and "logits_to_keep" not in batch and "logits_to_keep" in _forward_parameters(model):
        batch = {**batch, "logits_to_keep": 1}
    return run_batch(model, batch)


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` for a model that cannot be quantized: already quantized (by glowq-fx
    or another library), or with no linear layers."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    # glowq-fx's modules say what they are (``GLOWQ_QUANTIZED``): the capture stage sits below them
    done = [(n, type(m).__name__) for n, m in model.named_modules() if getattr(m, GLOWQ_QUANTIZED, False) is True]
    if done:
        raise ValueError(f"the model is already quantized by glowq-fx ({len(done)} quantized modules, e.g. "
                         f"{done[0][0]}, a {done[0][1]}); call quantize_ on the original floating-point model")
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is not None or getattr(model, "hf_quantizer", None) is not None:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
        raise ValueError(f"the model is already quantized (quantization_config: {method}); load it in "
                         "floating point (e.g. torch_dtype=torch.bfloat16, no quantization_config) first")
    linears = 0
    for name, m in model.named_modules():
        W = linear_weight(m)
        if W is None:
            continue
        if not W.is_floating_point():
            raise ValueError(f"{name} has a {W.dtype} weight ({type(m).__name__}): the model is already "
                             "quantized; quantize the floating-point model instead")
        linears += 1
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layers: nothing to quantize")


def _tensors(batch: object) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [("input", batch)]
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, Tensor)]
    if isinstance(batch, (tuple, list)):
        return [(f"argument {i}", v) for i, v in enumerate(batch) if isinstance(v, Tensor)]
    return []


def check_calibration(model: nn.Module, calibration: Iterable[object]) -> list[object]:
    """The calibration batches as a list, after checking device, dtype, shape and token range.

    A batch is a mapping of model keyword arguments (``{"input_ids": (B, T) int64,
    "attention_mask": (B, T)}``), a tuple of positional arguments, or one tensor.
    """
    try:
        batches = list(calibration)
    except TypeError:
        raise ValueError(f"calibration must be an iterable of batches, got {type(calibration).__name__}") from None
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch, e.g. [{'input_ids': ids}]")
    device, dtype = model_device(model), model_dtype(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for i, batch in enumerate(batches):
        tensors = _tensors(batch)
        if not tensors:
            raise ValueError(f"calibration batch {i} holds no tensor ({type(batch).__name__}); pass a mapping "
                             "like {'input_ids': ids}, a tuple of tensors or a tensor")
        for key, t in tensors:
            if t.device != device:
                raise ValueError(f"calibration batch {i}: {key} is on {t.device} but the model is on {device}; "
                                 f"move the batch with .to('{device}')")
            if t.numel() == 0:
                raise ValueError(f"calibration batch {i}: {key} is empty (shape {tuple(t.shape)})")
            if t.is_floating_point() and t.dtype != dtype and key != "attention_mask":
                raise ValueError(f"calibration batch {i}: {key} is {t.dtype} but the model computes in {dtype}; "
                                 f"cast it with .to({dtype})")
        named = dict(tensors)
        ids = named.get("input_ids", named.get("input") if vocab is not None else None)
        if ids is None:
            continue
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"calibration batch {i}: input_ids must be integer token ids, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"calibration batch {i}: input_ids must be (batch, sequence), got shape "
                             f"{tuple(ids.shape)}; add a batch dimension with ids.unsqueeze(0)")
        mask = named.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"calibration batch {i}: attention_mask shape {tuple(mask.shape)} differs from "
                             f"input_ids shape {tuple(ids.shape)}")
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"calibration batch {i}: token ids span [{int(ids.min())}, {int(ids.max())}] but "
                             f"the vocabulary has {vocab} entries; tokenize with this model's tokenizer")
    return batches
