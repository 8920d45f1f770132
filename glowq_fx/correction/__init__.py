"""The low-rank correction solvers (``decompose``: whitening, randomized SVD by member products,
shared and independent solves; ``experts``: one B across experts) and the registered methods
(``methods``)."""
from glowq_fx.correction import methods  # noqa: F401  (registers the built-in methods)
