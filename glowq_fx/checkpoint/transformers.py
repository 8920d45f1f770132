"""A glowq-fx checkpoint read by ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir)``.

``save_quantized`` writes ``"quantization_config": {"quant_method": "glowq", ...}`` into the
checkpoint's ``config.json``. transformers looks the method up in its registry, which
``import glowq_fx`` fills (``register``): ``GlowQHfConfig`` for the config, ``GlowQHfQuantizer``
for loading. Before the weights load, on the model transformers built on the meta device, the
quantizer makes every check ``load_quantized`` makes (``glowq.json``, each shard's size and
SHA-256, the model against the recorded shapes, exactly the tensors needed) and swaps in the
quantized modules, empty; transformers then reads the shards into them by name, each tensor in
its stored dtype (factors may be narrower than the model) or, with ``dtype=``, cast as
``format.in_dtype`` says. Without ``import glowq_fx``
transformers only warns that it does not know ``glowq`` and loads the float architecture with
its linears uninitialised: import the package first.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from glowq_fx.checkpoint.format import (
    FORMAT_VERSION,
    META_FILE,
    check_factor_slots,
    hf_quantization_config,
    in_dtype,
    install_quantized,
    read_checked,
    tie_tables,
)
from glowq_fx.checkpoint.shards import CheckpointError
from glowq_fx.checkpoint.tensor_parallel import (
    expert_parallel_size,
    localize_split_experts,
    shard_quantized,
    split_quantized_experts,
    tensor_parallel_size,
)
from glowq_fx.modules.kernels import use_cpu_kernels

QUANT_METHOD = "glowq"


class GlowQHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a glowq-fx checkpoint's ``config.json``: the method, the
    checkpoint format version and the ``GlowQConfig`` it was quantized with (``glowq.json``
    holds the full description)."""

    FIELDS = ("linears", "projections", "embeddings", "experts", "aliases", "int8_linears")

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        config: dict | None = None,
        quant_method: str = QUANT_METHOD,
        linears: dict | None = None,
        projections: list | None = None,
        embeddings: dict | None = None,
        aliases: dict | None = None,
        experts: dict | None = None,
        int8_linears: dict | None = None,
        **kwargs: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"GlowQHfConfig describes quant_method {QUANT_METHOD!r}, not {quant_method!r}")
        if kwargs:
            raise ValueError(f"unknown fields {sorted(kwargs)} in the glowq quantization_config")
        if format_version > FORMAT_VERSION:
            raise ValueError(f"the checkpoint has glowq format version {format_version}, newer than this glowq-fx "
                             f"reads ({FORMAT_VERSION}); upgrade glowq-fx")
        self.quant_method, self.format_version, self.config = QUANT_METHOD, format_version, config
        self.linears, self.projections = dict(linears or {}), list(projections or [])
        self.embeddings, self.aliases = dict(embeddings or {}), dict(aliases or {})
        self.experts, self.int8_linears = dict(experts or {}), dict(int8_linears or {})

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "config": self.config,
                **{k: getattr(self, k) for k in self.FIELDS}}

    def refresh(self, model) -> None:
        """Describe ``model`` as it is now (``save_pretrained`` writes this into config.json)."""
        entry = hf_quantization_config(model, None)
        for k in self.FIELDS:
            setattr(self, k, entry[k])


class GlowQHfQuantizer(HfQuantizer):
    """Loads a glowq-fx checkpoint inside ``from_pretrained`` (module docstring)."""

    requires_calibration = False  # loads a quantized checkpoint; glowq_fx.quantize.on_load quantizes on load

    def __init__(self, quantization_config: GlowQHfConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._meta: dict | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise CheckpointError("from_pretrained gave the glowq quantizer no checkpoint files; load the directory "
                                  "with glowq_fx.load_quantized")
        directory = Path(checkpoint_files[0]).parent
        meta, _, header = read_checked(directory)
        described = self.quantization_config.to_dict()
        disagree = [k for k in ("config", *GlowQHfConfig.FIELDS) if described.get(k) and meta.get(k) is not None
                    and described[k] != meta[k]]
        if disagree:
            raise CheckpointError(f"{directory}/config.json's quantization_config disagrees with its {META_FILE} on "
                                  f"{', '.join(disagree)} (one of them was edited or replaced); write the checkpoint "
                                  "again with save_quantized or save_pretrained")
        built = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)  # dtype= honoured
        install_quantized(model, meta, in_dtype(header, meta, built), "meta")
        _untie_quantized(model, meta)
        if (world_size := tensor_parallel_size(model)) > 1:
            shard_quantized(model, model.tp_plan, world_size)
        if (ep_size := expert_parallel_size(model)) > 1:
            split_quantized_experts(model, model.ep_plan, ep_size)
        self._meta = meta
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        tie_tables(model, self._meta or {})
        localize_split_experts(model)
        check_factor_slots(model)
        use_cpu_kernels(model)  # the CPU kernel's layout is made here, for this machine
        return model.eval()

    def get_state_dict_and_metadata(self, model):
        described = getattr(model.config, "quantization_config", None)
        if isinstance(described, GlowQHfConfig):
            described.refresh(model)  # save_pretrained writes config.json after this
        return None, {}

    def get_new_dtype(self, converter, param, dtype: torch.dtype | None) -> torch.dtype | None:
        return dtype  # the empty module's dtype: each tensor as stored

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _untie_quantized(model, meta: dict) -> None:
    """transformers ties parameters by name (``lm_head.weight`` to the embedding's); a quantized
    module has no such parameter (a tied table is one set of buffers, ``tie_tables``), and the
    keys stored once under another name (``aliases``) are expected missing."""
    quantized = {f"{name}.weight" for name in (*meta["linears"], *meta.get("embeddings", {}),
                                               *meta.get("int8_linears", {}))}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    model.all_tied_weights_keys = {t: s for t, s in tied.items() if t not in quantized and s not in quantized}
    aliases = [re.escape(key) + "$" for key in meta.get("aliases", {})]
    if aliases:
        model._keys_to_ignore_on_load_missing = [*(type(model)._keys_to_ignore_on_load_missing or []), *aliases]


def attach(model, config: dict | None = None) -> None:
    """Mark a transformers model quantized by glowq-fx as transformers marks the ones it loads
    (``hf_quantizer``, ``config.quantization_config``), so that ``save_pretrained`` writes a glowq
    checkpoint that both loaders read; other models are left alone."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    qconfig = GlowQHfConfig(config=config)
    qconfig.refresh(model)
    _untie_quantized(model, qconfig.to_dict())
    model.hf_quantizer = GlowQHfQuantizer(qconfig, pre_quantized=True)
    model.config.quantization_config = qconfig
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register(quantizer: type = GlowQHfQuantizer) -> None:
    """Make ``quant_method: "glowq"`` known to transformers (idempotent: a second import is a no-op;
    a different class already registered under the name is an error)."""
    for mapping, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, GlowQHfConfig), (AUTO_QUANTIZER_MAPPING, quantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is None:
            mapping[QUANT_METHOD] = cls
        elif present.__qualname__ != cls.__qualname__ or present.__module__ != cls.__module__:
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r} ({present!r}); "
                               "glowq-fx cannot register its own")
