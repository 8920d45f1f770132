"""Studies above the verb: many methods from one calibration (``accuracy``), and the GlowQ-S
trade-off of a fully corrected model (``selective``)."""
