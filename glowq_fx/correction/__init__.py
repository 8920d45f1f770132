"""Stage 4: the low-rank correction solvers (``decompose``: whitening, QR-reduced randomized SVD,
shared and independent solves)."""
