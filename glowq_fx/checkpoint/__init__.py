"""Checkpoint I/O: a quantized model on disk (``quantized``: ``save_quantized`` / ``load_quantized``)
in safetensors shards with checksums (``shards``), described and checked by ``format``, and read
by transformers' ``from_pretrained`` too (``transformers``)."""
from glowq_fx.checkpoint.format import META_FILE, is_checkpoint, read_metadata
from glowq_fx.checkpoint.quantized import load_quantized, save_quantized
from glowq_fx.checkpoint.shards import CheckpointError

__all__ = ["CheckpointError", "META_FILE", "is_checkpoint", "load_quantized", "read_metadata", "save_quantized"]
