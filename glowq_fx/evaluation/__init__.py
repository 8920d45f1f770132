"""Evaluation of one model: perplexity (``perplexity``) and decoding speed (``speed``)."""
