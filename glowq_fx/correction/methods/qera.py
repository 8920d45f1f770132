"""QERA-exact: each member its own ``A_i, B_i``, whitened by the group's shrunk ``S``."""
from glowq_fx.correction.decompose import factor_whitening
from glowq_fx.correction.method import CorrectionMethod
from glowq_fx.registry import CORRECTIONS

QERA = CORRECTIONS.register("qera", CorrectionMethod(
    "qera", factor_whitening, summary="each member alone, whitened by S"))
