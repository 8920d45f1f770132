"""Data sources: models and texts from packages, the checksummed cache, text to calibration batches."""
