"""Stage 2: one input second moment ``S`` per group (``calibrate.calibrate``)."""
