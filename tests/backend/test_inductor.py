"""Loud checks of the private torch APIs glowq_backend wraps (glowq_fx/_inductor.py,
glowq_fx/_dynamo.placeholder_fqn): if torch changes them, these fail first."""
import torch

from glowq_fx.backend._inductor import compile_with_inductor, mode_options, run_and_get_generated_code
from passes._dynamo import placeholder_fqn


def test_mode_options_mean_what_torch_compile_means():
    assert mode_options("reduce-overhead")["triton.cudagraphs"] is True
    assert mode_options(None) == {} and mode_options("default") == {}


def test_compile_with_inductor_compiles_a_dynamo_graph():
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return compile_with_inductor(gm, example_inputs, {})

    f = torch.compile(lambda x: torch.relu(x) * 2, backend=backend)
    x = torch.randn(5)
    assert torch.equal(f(x), torch.relu(x) * 2) and seen


def test_placeholder_fqn_names_parameters_and_buffers():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 3)])
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return self.layers[0](x) * self.scale

    names = []

    def backend(gm, example_inputs):
        names.extend(placeholder_fqn(n) for n in gm.graph.nodes if n.op == "placeholder")
        return gm

    torch.compile(M(), backend=backend)(torch.randn(2, 3))
    assert {"layers.0.weight", "layers.0.bias", "scale"} <= set(names) and None in names  # x is a user input


def test_run_and_get_generated_code_returns_the_result_and_inductor_source():
    f = torch.compile(lambda x: torch.relu(x) * 3)
    x = torch.randn(6)
    out, codes = run_and_get_generated_code(f, x)
    assert torch.equal(out, torch.relu(x) * 3)
    assert codes and all(isinstance(c, str) for c in codes) and any("def call(" in c for c in codes)
