"""Which kernel each quantized linear of a model runs on this machine.

``use_cpu_kernels`` is called where a quantized model comes into being on a device (the end of
``quantize_``, both checkpoint loaders) and may be called again by the user (``enable=False``
goes back to the reference path everywhere).
"""
from __future__ import annotations

import logging

from torch import nn

from glowq_fx.modules.int8_linear import Int8Linear
from glowq_fx.modules.linear import QuantizedLinear

log = logging.getLogger("glowq_fx")

def use_cpu_kernels(model: nn.Module, enable: bool = True, kernel: str = "auto") -> dict[str, str]:
    """Give every quantized linear on the CPU a 4-bit kernel (an int8 head: an int8 kernel) where it
    can take it: ``kernel`` "auto" (our GEMVs where they build, else PyTorch's int4 / int8
    kernels), "glowq" (ours, or an error saying why not) or "aten" (PyTorch's).

    Returns module name -> ``"cpu_gemv"``, ``"cpu_int4"``, ``"cpu_gemv8"``, ``"cpu_int8"`` or
    ``"reference: <why>"`` for every quantized linear on the CPU; the linears left on the reference
    path (dequantize + GEMM at every call) are said in one warning per reason, with how many they are.
    """
    kernels: dict[str, str] = {}
    left: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (QuantizedLinear, Int8Linear)) or module.qweight.device.type != "cpu":
            continue
        int8 = isinstance(module, Int8Linear)
        why = module.use_cpu_int8_kernel(enable, kernel) if int8 else module.use_cpu_int4_kernel(enable, kernel)
        kernels[name] = module.kernel_name if why is None else f"reference: {why}"
        if why is not None and enable:
            left.setdefault(why, []).append(name)
    for why, names in left.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        log.warning("glowq: %d quantized linear(s) run the reference path (dequantize + matmul at every call) on "
                    "this CPU: %s (%s)", len(names), why, shown)
    return kernels
