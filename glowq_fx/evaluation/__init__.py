"""Evaluation: perplexity (``perplexity``) and many methods from one calibration (``accuracy``)."""
