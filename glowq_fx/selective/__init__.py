"""GlowQ-S: which groups keep their correction. ``knee`` and ``policy`` serve ``quantize_``;
``corrections`` switches them on a live model; ``latency`` prices each unit (the offline study
itself is ``studies.selective``)."""
