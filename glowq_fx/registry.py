"""Where the methods live: a name -> handler table per kind of method (torchao's
``register_quantize_module_handler`` in spirit).

Two tables: ``QUANTIZERS`` (the base 4-bit quantizers: a function ``(W, S, quantization) ->
QuantizedWeight`` of the config's ``QuantizationConfig`` part, ``glowq_fx.quant``) and
``CORRECTIONS`` (the low-rank corrections: a ``correction.methods.CorrectionMethod``). Each
handler registers itself in its own file, which its package imports, so the names are known once
``glowq_fx`` is imported. ``GlowQConfig`` checks its ``quantizer`` and ``method`` against these
tables, ``quantize_`` and the solvers look the handler up here: adding a method is one new file
that registers it (and its test). A name is never compared anywhere else.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

Handler = TypeVar("Handler")


class Registry(Generic[Handler]):
    """Handlers by name, in registration order."""

    def __init__(self, option: str, what: str):
        self.option, self.what = option, what  # the config field that names one, what a handler is
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler | None = None, *, replace: bool = False):
        """``register(name, handler)``, or ``@register(name)`` on the handler. A name taken by
        another handler is refused unless ``replace``."""
        def add(h: Handler) -> Handler:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.what} is registered under a non-empty string name, got {name!r}")
            if name in self._handlers and self._handlers[name] is not h and not replace:
                raise ValueError(f"{self.option} {name!r} is already registered ({self._handlers[name]!r}); "
                                 "pass replace=True to replace it")
            self._handlers[name] = h
            return h

        return add if handler is None else add(handler)

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __getitem__(self, name: str) -> Handler:
        try:
            return self._handlers[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.option} {name!r}: choose one of {list(self._handlers)}, or register "
                             f"a {self.what} under that name first") from None


QUANTIZERS: Registry[Callable] = Registry("quantizer", "base quantizer (glowq_fx.registry.QUANTIZERS)")
CORRECTIONS: Registry = Registry("method", "correction method (glowq_fx.registry.CORRECTIONS)")
