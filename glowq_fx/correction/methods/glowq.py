"""GlowQ: one ``B`` shared by the group's members, from the randomized SVD of their stacked error
whitened by the Cholesky factor of the shrunk ``S``; a weight alone is solved as QERA."""
from glowq_fx.correction.decompose import factor_whitening
from glowq_fx.correction.method import CorrectionMethod
from glowq_fx.registry import CORRECTIONS

GLOWQ = CORRECTIONS.register("glowq", CorrectionMethod(
    "glowq", factor_whitening, shared=True, alone="qera", summary="one B per group, whitened by S"))
