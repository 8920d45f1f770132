"""glowq-fx: GlowQ group-shared low-rank correction for 4-bit LLMs, as a PyTorch library.

``quantize_(model, calibration, GlowQConfig())`` quantizes a model in place; ``find_groups``
shows the input-sharing groups it would use.
"""
from glowq_fx.capture import GlowQWarning, GroupDiscovery, find_groups
from glowq_fx.config import GlowQConfig
from glowq_fx.quantize import Calibration, QuantizationReport, calibrate, quantize_

__version__ = "0.1.0"
__all__ = ["Calibration", "GlowQConfig", "GlowQWarning", "GroupDiscovery", "QuantizationReport", "__version__", "calibrate", "find_groups", "quantize_"]
