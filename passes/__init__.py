"""FX graph passes: grouping by shared input, rewrite, lowering (independent of how a model was quantized)."""
