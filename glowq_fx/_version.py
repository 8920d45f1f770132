"""The version of glowq-fx (also in pyproject.toml), at the bottom of the package."""
__version__ = "0.1.0"
