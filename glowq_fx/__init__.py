"""glowq-fx: GlowQ group-shared low-rank correction for 4-bit LLMs, as a PyTorch library.

``quantize_(model, calibration, GlowQConfig())`` quantizes a model in place;
``torch.compile(model, backend=glowq_backend)`` (or ``backend="glowq"``) runs it with one shared
projection per group and the fused kernels; ``find_groups`` shows the input-sharing groups;
``save_quantized`` / ``load_quantized`` write and read a quantized model.

The package follows the stages a model goes through, each a subpackage that imports only the
ones before it: ``capture`` (graph, groups) -> ``calibration`` (one ``S`` per group) -> ``quant``
(4-bit codes) and ``correction`` (low-rank solvers) -> ``modules`` (what a quantized model runs)
-> ``ops`` / ``kernels`` -> ``backend``; ``selective`` (GlowQ-S), ``evaluation``, ``data``,
``checkpoint`` and ``cli`` on top. The graph passes (``passes``) sit below all of them.
"""
from glowq_fx._version import __version__
from glowq_fx.backend import glowq_backend
from glowq_fx.calibration.calibrate import Calibration, calibrate
from glowq_fx.capture.groups import GroupDiscovery, find_groups
from glowq_fx.checkpoint import load_quantized, save_quantized
from glowq_fx.checkpoint.transformers import register as _register_with_transformers
from glowq_fx.config import (
    CalibrationConfig,
    CorrectionConfig,
    ExpertsConfig,
    GlowQConfig,
    OnLoadDataConfig,
    QuantizationConfig,
    TargetsConfig,
)
from glowq_fx.errors import GlowQWarning
from glowq_fx.modules.kernels import use_cpu_kernels
from glowq_fx.quantize import quantize_
from glowq_fx.quantize.on_load import GlowQOnLoadQuantizer as _OnLoad
from glowq_fx.quantize.on_load import GlowQQuantizer
from glowq_fx.report import QuantizationReport

_register_with_transformers(_OnLoad)  # from_pretrained reads (and quantizes to) glowq once the package is imported

__all__ = [
    "Calibration",
    "CalibrationConfig",
    "CorrectionConfig",
    "ExpertsConfig",
    "GlowQConfig",
    "GlowQQuantizer",
    "GlowQWarning",
    "GroupDiscovery",
    "OnLoadDataConfig",
    "QuantizationConfig",
    "QuantizationReport",
    "TargetsConfig",
    "__version__",
    "calibrate",
    "find_groups",
    "glowq_backend",
    "load_quantized",
    "quantize_",
    "save_quantized",
    "use_cpu_kernels",
]
