"""GlowQ-S: which groups keep their correction. ``knee`` and ``policy`` serve ``quantize_``;
``corrections`` switches them on a live model; ``study`` and ``latency`` are the offline study."""
