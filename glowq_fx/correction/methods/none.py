"""No correction: the 4-bit weights alone."""
from glowq_fx.correction.method import CorrectionMethod
from glowq_fx.registry import CORRECTIONS

NONE = CORRECTIONS.register("none", CorrectionMethod("none", None, summary="no correction"))
