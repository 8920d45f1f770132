"""Checkpoint I/O: a quantized model on disk (``quantized``: ``save_quantized`` / ``load_quantized``)
in safetensors shards with checksums (``shards``)."""
from glowq_fx.checkpoint.quantized import META_FILE, is_checkpoint, load_quantized, read_metadata, save_quantized
from glowq_fx.checkpoint.shards import CheckpointError

__all__ = ["CheckpointError", "META_FILE", "is_checkpoint", "load_quantized", "read_metadata", "save_quantized"]
