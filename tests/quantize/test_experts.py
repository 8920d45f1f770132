"""quantize_experts: MoE experts quantized inside quantize_, on tiny random transformers MoE models
(Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE, DeepSeek-V3). At full rank without
shrinkage the logits are the float model's; at rank 0 they are those of the float model with every
quantized weight replaced by its RTN dequantization; the experts share one B."""
import copy
import warnings

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.capture.experts import expert_weight
from glowq_fx.errors import GlowQWarning
from glowq_fx.modules import QuantizedLinear
from glowq_fx.modules.experts import QuantizedExperts
from glowq_fx.quant import quantize_rtn
from tests_helpers import MOE_CONFIGS, token_batches

CONFIGS = MOE_CONFIGS
FULL = dict(group_size=32, rank=64, shrinkage=0.0, svd="exact", factor_dtype="model", output_head_bits=None)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _model(name, implementation=None):
    config = CONFIGS[name]()
    if implementation is not None:
        config._experts_implementation = implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(config).eval()


def _quantized(name, implementation=None, **config):
    # the head stays float unless asked: these tests compare with the float and RTN models (the
    # int8 head has its own tests, tests/modules/test_int8_head.py)
    config.setdefault("output_head_bits", None)
    model = _model(name, implementation)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlowQWarning)
        report = quantize_(model, token_batches(4), GlowQConfig(**config), progress=False)
    return float_model, model, report


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _experts(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_rank_gives_the_float_model(name):
    float_model, model, report = _quantized(name, **FULL)
    experts = _experts(model)
    assert experts and len(experts) == sum(1 for m in float_model.modules()
                                           if any(p.dim() == 3 for p in m.parameters(recurse=False)))
    assert {f"{n}.{w}" for n, m in experts.items() for w in m.glowq_protocol.weights} <= {g.name for g in report.groups}
    reference = _logits(float_model)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=2e-5 * reference.abs().max().item())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_rank_zero_gives_the_rtn_model(name):
    float_model, model, _ = _quantized(name, group_size=32, method="none")
    rtn = copy.deepcopy(float_model)
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            W = rtn.get_submodule(n).weight
            assert torch.equal(m.dequantized_weight(), quantize_rtn(W.detach(), 32).dequantize().to(W.dtype))
            W.data.copy_(m.dequantized_weight())
        elif isinstance(m, QuantizedExperts):
            p, target = m.glowq_protocol, rtn.get_submodule(n)
            for w in p.weights:
                for e in range(p.num_experts):
                    W = expert_weight(target, w, e, p.is_transposed)
                    deq = getattr(m, w).dequantized_weight(e)
                    assert torch.equal(deq, quantize_rtn(W.detach(), 32).dequantize().to(W.dtype))
                    W.data.copy_(deq)
    reference = _logits(rtn)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_the_experts_share_one_B_and_store_less_than_independent_corrections():
    _, shared, shared_report = _quantized("mixtral", group_size=32, rank=8)
    _, independent, independent_report = _quantized("mixtral", group_size=32, rank=8, method="qera")
    name = "model.layers.0.mlp.experts"
    s, i = shared.get_submodule(name).gate_up_proj, independent.get_submodule(name).gate_up_proj
    assert s.projection is not None and s.B is None and tuple(s.projection.B.shape) == (8, 64)
    assert i.projection is None and tuple(i.B.shape) == (4, 8, 64)  # one B per expert
    row = {g.name: g for g in shared_report.groups}[f"{name}.gate_up_proj"]
    other = {g.name: g for g in independent_report.groups}[f"{name}.gate_up_proj"]
    assert row.factor_bytes == s.A.nbytes + s.projection.B.nbytes < other.factor_bytes == i.A.nbytes + i.B.nbytes
    assert row.error_after < row.error_before and other.error_after < other.error_before


@pytest.mark.parametrize("options", [{"expert_weighting": "usage"}, {"expert_refit": True},
                                     {"quantizer": "gptq"}])
def test_options_keep_full_rank_exact(options):
    float_model, model, _ = _quantized("qwen3_moe", **FULL, **options)
    reference = _logits(float_model)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=2e-5 * reference.abs().max().item())


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_every_experts_implementation_calibrates_alike(implementation):
    _, eager, _ = _quantized("mixtral", "eager", group_size=32, rank=8)
    _, other, _ = _quantized("mixtral", implementation, group_size=32, rank=8)
    a, b = eager.state_dict(), other.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:  # the same S up to the float rounding of another experts kernel upstream
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-3, msg=k)
        else:
            assert (a[k] != b[k]).float().mean() < 0.01, k  # codes: a rounding flip at most here and there
    torch.testing.assert_close(_logits(other), _logits(eager), rtol=0, atol=1e-3)


def test_block_by_block_equals_whole_model_calibration():
    _, blocks, blocks_report = _quantized("mixtral", group_size=32, rank=8, calibration="blocks")
    _, whole, _ = _quantized("mixtral", group_size=32, rank=8, calibration="model")
    assert blocks_report.calibration["mode"] == "blocks"
    a, b = blocks.state_dict(), whole.state_dict()
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_experts_can_stay_in_floating_point():
    _, model, report = _quantized("mixtral", group_size=32, rank=8, experts=False)
    assert not _experts(model)
    assert "experts=False" in report.skipped["model.layers.0.mlp.experts"]


class NovelExperts(torch.nn.Module):
    """3-D weights and a loop of its own, without transformers' experts marks: ``w_in`` stored
    (E, out, in) and used as ``x @ w_in[e].T``, ``w_out`` stored (E, in, out) and used as ``h @ w_out[e]``."""

    def __init__(self, n=4, d=64, m=48):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(n, m, d) / 8)
        self.w_out = torch.nn.Parameter(torch.randn(n, m, d) / 8)

    def forward(self, x, index, weights):
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            token, slot = torch.where(index == e)
            h = torch.relu(x[token] @ self.w_in[e].T)
            out.index_add_(0, token, (h @ self.w_out[e]) * weights[token, slot, None])
        return out


class GatheringExperts(NovelExperts):
    """Gathers every token's expert weights and multiplies them in a batch: not a product with one
    expert's slice, so glowq-fx cannot trace it."""

    def forward(self, x, index, weights):
        w = self.w_in[index[:, 0]]  # (T, m, d)
        return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1) @ self.w_out[0] * weights[:, :1]


def _with(experts_cls):
    model = _model("mixtral")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for layer in model.model.layers:
            layer.mlp.experts = experts_cls()
    return model


def test_a_novel_experts_module_is_traced_and_quantized(tmp_path):
    from glowq_fx import load_quantized, save_quantized

    model = _with(NovelExperts)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlowQWarning)
        report = quantize_(model, token_batches(4), GlowQConfig(**FULL), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts) and type(experts).__name__ == "QuantizedNovelExperts"
    layout = {t.name: t for t in experts.glowq_protocol.traced}
    assert layout["w_in"].reads_input and layout["w_in"].stored_out_in
    assert not layout["w_out"].reads_input and not layout["w_out"].stored_out_in
    assert experts.quantized_weights("w_in").projection is not None  # one B across the experts
    assert experts.quantized_weights("w_out").B.shape[0] == 4  # each expert's own
    assert {"model.layers.0.mlp.experts.w_in", "model.layers.0.mlp.experts.w_out"} <= {g.name for g in report.groups}
    reference = _logits(float_model)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=2e-5 * reference.abs().max().item())
    save_quantized(model, tmp_path / "q", report=report)
    loaded = load_quantized(tmp_path / "q", _with(NovelExperts))
    state, reference_state = loaded.state_dict(), model.state_dict()
    assert sorted(state) == sorted(reference_state) and all(torch.equal(state[k], reference_state[k]) for k in state)
    assert torch.equal(_logits(loaded), _logits(model))


class SeparateGateUpExperts(NovelExperts):
    """SwiGLU experts with the gate and up weights apart (each (E, out, in), both reading the
    input) and a loop of their own: GlowQ gives both weights' experts one ``B``."""

    def __init__(self, n=4, d=64, m=48):
        super().__init__(n, d, m)
        self.w_gate = torch.nn.Parameter(torch.randn(n, m, d) / 8)

    def forward(self, x, index, weights):
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            token, slot = torch.where(index == e)
            h = torch.nn.functional.silu(x[token] @ self.w_gate[e].T) * (x[token] @ self.w_in[e].T)
            out.index_add_(0, token, (h @ self.w_out[e]) * weights[token, slot, None])
        return out


def test_every_weight_that_reads_the_input_shares_one_B(tmp_path):
    """Gate and up apart, both reading the block input: one projection for both weights' experts
    (stored once), solved jointly, so each weight's correction lowers its error; the down weight
    keeps each expert's own ``B``; the checkpoint round trip and the compiled model give the same
    logits. (The module's own loop graph-breaks at each product, so each product projects its
    expert's rows itself: one ``B`` stored, ``x B^T`` made per weight.)"""
    from glowq_fx import glowq_backend, load_quantized, save_quantized

    model = _with(SeparateGateUpExperts)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlowQWarning)
        report = quantize_(model, token_batches(4), GlowQConfig(group_size=32, rank=8, output_head_bits=None),
                           progress=False)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        gate, up, down = (experts.quantized_weights(w) for w in ("w_gate", "w_in", "w_out"))
        assert gate.projection is not None and gate.projection is up.projection
        assert set(gate.projection.members) == {f"{_name(model, experts)}.w_gate", f"{_name(model, experts)}.w_in"}
        assert down.projection is None and down.B.shape[0] == 4
    keys = [k for k in model.state_dict() if k.startswith("model.layers.0.mlp.experts.") and k.endswith(".B")]
    assert sorted(keys) == ["model.layers.0.mlp.experts.glowq_projections.{w_in,w_gate}.B",
                            "model.layers.0.mlp.experts.w_out.B"]
    rows = {g.name: g for g in report.groups}
    for w in ("w_gate", "w_in"):
        row = rows[f"model.layers.0.mlp.experts.{w}"]
        assert row.error_after < row.error_before
    eager = _logits(model)
    assert (eager - _logits(float_model)).abs().max() > 0  # quantized, not the float model
    save_quantized(model, tmp_path / "q", report=report)
    loaded = load_quantized(tmp_path / "q", _with(SeparateGateUpExperts))
    l_gate, l_up = (loaded.model.layers[0].mlp.experts.quantized_weights(w) for w in ("w_gate", "w_in"))
    assert l_gate.projection is l_up.projection
    assert torch.equal(_logits(loaded), eager)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=glowq_backend)(input_ids=IDS).logits, eager,
                                   rtol=1e-4, atol=1e-4)


def _name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_a_novel_experts_module_at_rank_zero_is_its_rtn_self():
    model = _with(NovelExperts)
    rtn = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlowQWarning)
        quantize_(model, token_batches(4), GlowQConfig(group_size=32, method="none", output_head_bits=None),
                  progress=False)
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            rtn.get_submodule(n).weight.data.copy_(m.dequantized_weight())
        elif isinstance(m, QuantizedExperts):
            for t in m.glowq_protocol.traced:
                param = getattr(rtn.get_submodule(n), t.name)
                for e in range(4):
                    deq = m.quantized_weights(t.name).dequantized_weight(e)
                    param.data[e] = deq if t.stored_out_in else deq.T
    reference = _logits(rtn)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_experts_it_cannot_trace_stay_in_floating_point_with_the_reason():
    model = _with(GatheringExperts)
    with pytest.warns(GlowQWarning, match=r"cannot run quantized: its code uses its 3-D weights otherwise than in "
                                          r"products with one expert's slice \(w_in: __getitem__"):
        report = quantize_(model, token_batches(2), GlowQConfig(group_size=32, rank=8), progress=False)
    assert "w_in: __getitem__" in report.skipped["model.layers.1.mlp.experts"]
    assert isinstance(model.model.layers[0].mlp.experts, GatheringExperts)


def test_R_is_computed_once_per_block_and_the_backend_compiles_it_into_one_graph():
    from glowq_fx import glowq_backend

    _, model, report = _quantized("mixtral", group_size=32, rank=8)
    calls = []
    for layer in model.model.layers:
        projection = layer.mlp.experts.glowq_projections["gate_up_proj"]
        projection.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    eager = _logits(model)
    assert calls == [(IDS.numel(), 64)] * len(model.model.layers)  # once, for every token, before dispatch
    graphs = []

    def recording(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return glowq_backend(gm, example_inputs, lower=False, **kwargs)  # the graph keeps the glowq ops

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=recording)(input_ids=IDS).logits, eager, rtol=1e-5,
                                   atol=1e-5)
    (gm,) = graphs  # the experts' sorted dispatch traces: no graph break
    ops = torch.ops.glowq
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    experts = [n for n in nodes if n.target is ops.w4a16_experts.default]
    assert len(experts) == 2 * len(model.model.layers)
    assert sum(n.target is ops.experts_projection.default for n in nodes) == len(model.model.layers)  # down: own B_e
    dense = [g for g in report.groups if "experts" not in g.name]
    assert sum(n.target is ops.shared_projection.default for n in nodes) == len(dense) + len(model.model.layers)

    def projected(node, depth=3):  # R[token]: the gathered rows of one shared projection
        return node is not None and (node.target is ops.shared_projection.default or depth > 0 and any(
            projected(a, depth - 1) for a in node.args if isinstance(a, torch.fx.Node)))

    first = experts[0::2]
    assert all(projected(n.args[7]) for n in first)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_checkpoints_round_trip_bit_exact_through_both_loaders(tmp_path, name):
    import json

    from glowq_fx import load_quantized, save_quantized
    from glowq_fx.checkpoint.shards import CheckpointError

    _, model, report = _quantized(name, group_size=32, rank=8)
    save_quantized(model, tmp_path / "q", report=report, max_shard_size="100KB")
    ours = load_quantized(tmp_path / "q")
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    theirs.save_pretrained(tmp_path / "resaved")
    again = load_quantized(tmp_path / "resaved")
    reference = model.state_dict()
    for loaded in (ours, theirs, again):
        assert _experts(loaded).keys() == _experts(model).keys()
        state = loaded.state_dict()
        assert sorted(state) == sorted(reference)
        assert all(torch.equal(state[k], reference[k]) and state[k].dtype == reference[k].dtype for k in reference)
        assert torch.equal(_logits(loaded), _logits(model))
    meta = json.loads((tmp_path / "q" / "glowq.json").read_text())
    meta["experts"]["model.layers.0.mlp.experts"]["protocol"]["num_experts"] = 8  # edited: another model
    (tmp_path / "q" / "glowq.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.experts: the model's experts .* are not the "
                                              "checkpoint's"):
        load_quantized(tmp_path / "q")


def test_the_experts_alone_can_be_quantized():
    float_model, model, report = _quantized("mixtral", **FULL, exclude=[r"self_attn"])
    assert {g.name.rsplit(".", 1)[-1] for g in report.groups} == {"gate_up_proj", "down_proj"}
    reference = _logits(float_model)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=2e-5 * reference.abs().max().item())
    with pytest.raises(ValueError, match="nothing of MixtralForCausalLM is left to quantize"):
        quantize_(_model("mixtral"), token_batches(2), GlowQConfig(exclude=[r"self_attn"], experts=False),
                  progress=False)


def test_a_shared_expert_shares_the_experts_B():
    float_model, model, report = _quantized("qwen2_moe", **FULL)
    mlp = model.model.layers[0].mlp
    projection = mlp.experts.quantized_weights("gate_up_proj").projection
    assert projection.members == (
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.shared_expert.gate_proj",
        "model.layers.0.mlp.shared_expert.up_proj",
    )
    assert mlp.shared_expert.gate_proj.projection is projection and mlp.shared_expert.up_proj.projection is projection
    row = {g.name: g for g in report.groups}["model.layers.0.mlp.shared_expert.{gate_proj,up_proj}"]
    assert row.restored and row.error_after < 1e-9 * row.error_before and row.factor_bytes > 0
    reference = _logits(float_model)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=2e-5 * reference.abs().max().item())
    _, low, low_report = _quantized("qwen2_moe", group_size=32, rank=8, calibration="blocks", block_inputs="quantized")
    row = {g.name: g for g in low_report.groups}["model.layers.0.mlp.shared_expert.{gate_proj,up_proj}"]
    assert row.restored and row.rank == 8 and 0 < row.error_after < row.error_before


def test_the_rank_on_each_experts_own_input_can_differ():
    _, model, report = _quantized("mixtral", group_size=32, rank=8, expert_own_input_rank=3)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.rank == 8 and experts.down_proj.rank == 3
    _, model, _ = _quantized("mixtral", group_size=32, rank=8, expert_own_input_rank=0)
    assert model.model.layers[0].mlp.experts.down_proj.A is None
    with pytest.raises(ValueError, match="expert_own_input_rank must be None or a non-negative int"):
        GlowQConfig(expert_own_input_rank=-1)


def test_a_convolution_is_not_taken_for_experts():
    from glowq_fx.quantize.experts import find_experts

    model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3), torch.nn.Linear(8, 8))
    assert find_experts(model, GlowQConfig()) == ({}, {})
