"""Stage 4: the low-rank correction solvers (``decompose``: whitening, randomized SVD by member
products, shared and independent solves)."""
