"""The ``glowq`` command (``main``) and ``glowq demo`` (``demo``)."""
