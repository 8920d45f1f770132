"""The correction methods, one file each, registered in ``glowq_fx.registry.CORRECTIONS``.

A method is what ``correction.decompose.solve`` needs to know about it: how ``S`` whitens the
errors before the truncated SVD (or that there is no correction at all), whether the members of a
group share one ``B`` (their stacked error) or each gets its own, and which method serves a
weight alone where nothing can be shared (an expert's own intermediate). Importing this package
registers the built-in methods.
"""
from glowq_fx.correction.method import CorrectionMethod

# the built-in methods, each registering itself, in the order the CLI and the errors list them
# isort: off
from glowq_fx.correction.methods import glowq, qera, lqer, svd, none  # noqa: F401
# isort: on

__all__ = ["CorrectionMethod"]
