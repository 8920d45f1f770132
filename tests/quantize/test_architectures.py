"""quantize_ on every architecture of the grouping issue, with random weights from tiny configs.

For each: the groups expected from how the architecture computes (written out by hand in architectures.py,
not read from any output of the library), then two exact checks of the whole pipeline:
at full rank without shrinkage the correction reconstructs every quantized weight, so the
logits equal the unquantized model's; at rank 0 they equal plain RTN's.
"""
import copy

import pytest
import torch

from architectures import ARCHS, LAYERS, V
from glowq_fx import GlowQConfig, find_groups, quantize_
from glowq_fx.capture.linears import is_conv1d, linear_weight
from glowq_fx.modules import QuantizedLinear
from glowq_fx.quant import quantize_rtn


def _batches(n, seed, batch=2, t=32):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, V, (batch, t), generator=g)} for _ in range(n)]


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    build, expected = ARCHS[request.param]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().eval()
    calibration = _batches(8, seed=1)  # 512 tokens > every d_in: S has full rank
    found = find_groups(model, calibration[0])
    return request.param, model, expected, calibration, found


def test_groups_from_first_principles(arch):
    name, _, expected, _, found = arch
    want = [g for i in range(LAYERS) for g in expected(i)]
    assert [g.name for g in found.groups] == want
    assert found.pieces == 1 and not found.graph_breaks and not found.from_hooks


def _max_error(a, b):
    return float((a - b).abs().max())


def test_full_rank_reconstructs_the_model(arch):
    _, model, _, calibration, found = arch
    q = copy.deepcopy(model)
    config = GlowQConfig(group_size=32, rank=10**6, shrinkage=0.0, factor_dtype="model", output_head_bits=None)
    report = quantize_(q, calibration, config, groups=found.groups, progress=False)
    test = _batches(1, seed=7)[0]
    ref, out = _logits(model, test), _logits(q, test)
    rtn = copy.deepcopy(q)
    for m in rtn.modules():
        if isinstance(m, QuantizedLinear):
            m.A, m.projection = None, None
    rtn_error = _max_error(_logits(rtn, test), ref)
    assert _max_error(out, ref) < 1e-4 * max(1.0, float(ref.abs().max())), "full rank must give back W"
    assert _max_error(out, ref) < 1e-2 * rtn_error  # and the check could fail: RTN is far off
    quantized = {m for g in found.groups for m in g.members}
    assert quantized == {n for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert all(g.error_after < 1e-6 * g.error_before for g in report.groups)


def test_rank_zero_is_plain_rtn(arch):
    _, model, _, calibration, found = arch
    q = copy.deepcopy(model)
    quantize_(q, calibration, GlowQConfig(group_size=32, rank=0, output_head_bits=None), groups=found.groups,
              progress=False)
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for g in found.groups:
            for name in g.members:
                m = modules[name]
                W = linear_weight(m)
                Wq = quantize_rtn(W.detach(), 32).dequantize()
                m.weight.copy_(Wq.T if is_conv1d(m) else Wq)  # Conv1D stores (in, out)
    test = _batches(1, seed=9)[0]
    ref_logits = _logits(ref, test)
    assert _max_error(_logits(q, test), ref_logits) < 1e-5 * max(1.0, float(ref_logits.abs().max()))
    assert not any(isinstance(m, QuantizedLinear) and m.rank for m in q.modules())


def test_compiled_equals_eager_with_one_projection_per_group(arch):
    """glowq_backend on every architecture: same logits as the eager quantized model (float32
    CPU: the ops run the same reference arithmetic, Inductor may reorder sums: 1e-5 of the
    logits' scale), and exactly one shared projection per quantized group in the graph."""
    from glowq_fx.backend import glowq_backend
    from glowq_fx.backend.compile import GLOWQ_OPS

    _, model, _, calibration, found = arch
    q = copy.deepcopy(model)
    report = quantize_(q, calibration, GlowQConfig(group_size=32, rank=4, output_head_bits=None), groups=found.groups,
                       progress=False)
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return glowq_backend(gm, example_inputs, lower=False, **kwargs)  # the graph keeps the glowq ops

    test = _batches(1, seed=11)[0]
    ref = _logits(q, test)
    # transformers' forward wrappers are shared code objects: without a reset, Dynamo's
    # recompile limit is hit after a few architectures and it silently runs them eagerly
    torch.compiler.reset()
    out = _logits(torch.compile(q, backend=backend), test)
    assert graphs, "the backend was never called"
    assert _max_error(out, ref) <= 1e-5 * max(1.0, float(ref.abs().max()))
    projections = [n for gm in graphs for n in gm.graph.nodes if n.target is GLOWQ_OPS.projection]
    assert len(projections) == len(report.groups)
    assert len({n.args[1].name for n in projections}) == len(projections)
