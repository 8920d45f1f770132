"""Quantizing through the ecosystem's entry points: transformers' ``from_pretrained`` and optimum.

``from_pretrained(float_dir, quantization_config=GlowQConfig(dataset="news", tokenizer=...))``
loads the float weights, then quantizes the model in place with ``quantize_`` on calibration
windows of the named data (like transformers' GPTQ integration); the model comes back quantized,
its report in ``model.glowq_report``, and ``save_pretrained`` writes a glowq checkpoint.
A checkpoint that is already quantized loads as ``checkpoint.transformers`` describes.

``GlowQQuantizer`` follows optimum's ``OptimumQuantizer`` interface:

    quantizer = GlowQQuantizer.from_pretrained("model-dir-or.gguf", config=GlowQConfig(dataset="news"))
    quantizer.quantize("out-dir")        # quantize_ + save_quantized (shards, glowq.json, tokenizer)
"""
from __future__ import annotations

from pathlib import Path

from optimum.quantization_base import OptimumQuantizer
from torch import nn

from glowq_fx.checkpoint.quantized import DEFAULT_MAX_SHARD_SIZE, save_quantized
from glowq_fx.checkpoint.tensor_parallel import tensor_parallel_size
from glowq_fx.checkpoint.transformers import GlowQHfQuantizer
from glowq_fx.config import GlowQConfig
from glowq_fx.data.batches import bos_token, calibration_batches, text_calibration_batches, tokenize
from glowq_fx.quantize.api import quantize_
from glowq_fx.report import QuantizationReport


def calibration_data(config: GlowQConfig, tokenizer, *, device="cpu", bos: str = "auto") -> list:
    """``quantize_`` batches from ``config.dataset`` (a text name, a file or a list of texts)."""
    if config.dataset is None:
        raise ValueError("quantizing needs calibration data: GlowQConfig(dataset='news' (or 'wikipedia', a text file, "
                         "a list of texts), tokenizer=...)")
    if isinstance(config.dataset, str):
        return text_calibration_batches(tokenizer, config.dataset, config.n_samples, config.seq_len, seed=config.seed,
                                        device=device, bos=bos)
    tokens = tokenize(tokenizer, "\n\n".join(config.dataset))
    return calibration_batches(tokens, config.n_samples, config.seq_len, seed=config.seed, device=device,
                               bos=bos_token(tokenizer, bos))


def _tokenizer(config: GlowQConfig, fallback: str | None):
    if config.tokenizer is not None and not isinstance(config.tokenizer, (str, Path)):
        return config.tokenizer
    name = config.tokenizer or fallback
    if not name:
        raise ValueError("quantizing on load needs a tokenizer for the calibration text: GlowQConfig(tokenizer=...)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class GlowQOnLoadQuantizer(GlowQHfQuantizer):
    """``checkpoint.transformers.GlowQHfQuantizer``, and quantizing a float model as it loads
    when ``quantization_config`` is a ``GlowQConfig`` (module docstring)."""

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized and not isinstance(quantization_config, GlowQConfig):
            raise ValueError(f"quantizing on load takes a GlowQConfig, got {type(quantization_config).__name__}")

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError("from_pretrained(..., quantization_config=GlowQConfig(...)) quantizes on load and needs "
                             "calibration data: GlowQConfig(dataset='news' (or a text file, a list of texts), "
                             "tokenizer=...)")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            return super()._process_model_before_weight_loading(model, checkpoint_files=checkpoint_files, **kwargs)
        if tensor_parallel_size(model) > 1:
            raise ValueError("quantizing on load works on one process: quantize and save first (from_pretrained(..., "
                             "quantization_config=GlowQConfig(...)) then save_pretrained, or `glowq quantize`), then "
                             "load the quantized checkpoint with tensor parallelism")
        return model  # the float weights load as they are

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            return super()._process_model_after_weight_loading(model, **kwargs)
        config: GlowQConfig = self.quantization_config
        tokenizer = _tokenizer(config, getattr(model, "name_or_path", None))
        device = next(model.parameters()).device
        batches = calibration_data(config, tokenizer, device=device)
        # quantize_ refuses a model marked quantized: the marks transformers set are its own again after
        del model.hf_quantizer
        model.config.quantization_config = None
        del model.config.quantization_config
        model.glowq_report = quantize_(model, batches, config, progress=False)
        return model.eval()


class GlowQQuantizer(OptimumQuantizer):
    """optimum's quantizer interface over ``quantize_`` and ``save_quantized``.

    Args:
        model: a floating-point model (a transformers causal LM for the default calibration).
        config: ``GlowQConfig``; its ``dataset`` names the calibration data unless ``quantize``
            is given batches.
        tokenizer: the model's tokenizer (saved with the checkpoint, used for the calibration text).
    """

    def __init__(self, model: nn.Module, config: GlowQConfig | None = None, tokenizer=None):
        self.model, self.config, self.tokenizer = model, config or GlowQConfig(dataset="news"), tokenizer
        self.report: QuantizationReport | None = None

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path | nn.Module, file_name: str | None = None, *,
                        config: GlowQConfig | None = None, tokenizer=None, **load_kwargs) -> "GlowQQuantizer":
        """From a model, or what ``data.models.load_model`` reads: a directory, a GGUF file (or
        ``file_name``, a GGUF inside the directory ``model_or_path``), ``"smollm2"``."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, config, tokenizer)
        from glowq_fx.data.models import load_model

        where = str(Path(model_or_path) / file_name) if file_name else str(model_or_path)
        model, loaded_tokenizer = load_model(where, **load_kwargs)
        return cls(model, config, tokenizer or loaded_tokenizer)

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, *, calibration=None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, **kwargs) -> QuantizationReport:
        """Quantize the model in place and write the checkpoint to ``save_dir``; the report."""
        if file_prefix is not None:
            raise ValueError("a glowq checkpoint uses transformers' file names (model-0000i-of-0000N.safetensors); "
                             "drop file_prefix")
        if kwargs:
            raise ValueError(f"unknown arguments {sorted(kwargs)}; GlowQConfig holds the quantization options")
        if calibration is None:
            if self.tokenizer is None:
                raise ValueError("give a tokenizer (GlowQQuantizer(model, config, tokenizer)) or calibration batches")
            calibration = calibration_data(self.config, self.tokenizer, device=next(self.model.parameters()).device)
        self.report = quantize_(self.model, calibration, self.config, progress=False)
        save_quantized(self.model, save_dir, report=self.report, tokenizer=self.tokenizer,
                       max_shard_size=max_shard_size)
        return self.report
