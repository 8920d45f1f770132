"""quantize_ on every architecture of the grouping issue, with random weights from tiny configs.

For each: the groups expected from how the architecture computes (written out by hand below,
not read from any output of the library), then two exact checks of the whole pipeline:
at full rank without shrinkage the correction reconstructs every quantized weight, so the
logits equal the unquantized model's; at rank 0 they equal plain RTN's.
"""
import copy

import pytest
import torch
import transformers as T
from torch import nn

from glowq_fx import GlowQConfig, find_groups, quantize_
from glowq_fx.modules import QuantizedLinear, linear_weight
from glowq_fx.modules.linear import is_conv1d
from glowq_fx.quant import quantize_rtn

V, H, LAYERS = 128, 64, 2
SMALL = dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4)
LLAMA_LIKE = dict(SMALL, intermediate_size=128, num_key_value_heads=2)


def _attn_mlp(prefix, attn="self_attn", mlp="mlp", o="o_proj"):
    """The Llama family: q/k/v share the attention norm, gate/up the MLP norm."""
    return [f"{prefix}.{attn}.{{q_proj,k_proj,v_proj}}", f"{prefix}.{attn}.{o}",
            f"{prefix}.{mlp}.{{gate_proj,up_proj}}", f"{prefix}.{mlp}.down_proj"]


class NovelBlock(nn.Module):
    """Three projections read one normalized tensor (one through a reshape), a fourth reads it
    after a dtype cast; the outputs are mixed back into the residual stream."""

    def __init__(self, d: int, dtype_d: torch.dtype = torch.float32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.p1, self.p2, self.p3 = nn.Linear(d, 48), nn.Linear(d, 40, bias=False), nn.Linear(d, 56)
        self.p4 = nn.Linear(d, 36).to(dtype_d)
        self.out = nn.Linear(48 + 40 + 56 + 36, d)

    def forward(self, x):
        h = self.norm(x)
        b, t, d = h.shape
        parts = [self.p1(h), self.p2(h.reshape(b * t, d)).view(b, t, -1), self.p3(h),
                 self.p4(h.to(self.p4.weight.dtype)).to(x.dtype)]
        return x + self.out(torch.relu(torch.cat(parts, dim=-1)))


class NovelLM(nn.Module):
    def __init__(self, dtype_d: torch.dtype = torch.float32):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(NovelBlock(H, dtype_d) for _ in range(LAYERS))
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


ARCHS = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_LIKE)),
              lambda i: _attn_mlp(f"model.layers.{i}")),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**LLAMA_LIKE)),
                lambda i: _attn_mlp(f"model.layers.{i}")),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA_LIKE)),
              lambda i: _attn_mlp(f"model.layers.{i}")),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**LLAMA_LIKE, head_dim=16)),
              lambda i: _attn_mlp(f"model.layers.{i}")),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**LLAMA_LIKE, head_dim=16)),
              lambda i: _attn_mlp(f"model.layers.{i}")),
    # fused projections: each reads its own norm alone
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**LLAMA_LIKE, pad_token_id=0)),
             lambda i: [f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.self_attn.o_proj",
                        f"model.layers.{i}.mlp.gate_up_proj", f"model.layers.{i}.mlp.down_proj"]),
    # Conv1D (weight stored in x out), fused c_attn: no sharing at all
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=4,
                                                    bos_token_id=0, eos_token_id=0)),
             lambda i: [f"transformer.h.{i}.attn.c_attn", f"transformer.h.{i}.attn.c_proj",
                        f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj"]),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS,
                                                 num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=H,
                                                 pad_token_id=1, bos_token_id=0, eos_token_id=0)),
            lambda i: [f"model.decoder.layers.{i}.self_attn.{{q_proj,k_proj,v_proj}}",
                       f"model.decoder.layers.{i}.self_attn.out_proj",
                       f"model.decoder.layers.{i}.fc1", f"model.decoder.layers.{i}.fc2"]),
    # parallel attention with one norm: the fused qkv and the MLP input read one tensor
    "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(**SMALL, parallel_attn=True,
                                                          new_decoder_architecture=False, multi_query=True,
                                                          bos_token_id=0, eos_token_id=0)),
               lambda i: [f"transformer.h.{i}.{{self_attention.query_key_value,mlp.dense_h_to_4h}}",
                          f"transformer.h.{i}.self_attention.dense", f"transformer.h.{i}.mlp.dense_4h_to_h"]),
    # parallel block: q, k, v and fc_in all read ln_1's output, a group of four
    "gptj": (lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=4, rotary_dim=8,
                                                    bos_token_id=0, eos_token_id=0)),
             lambda i: [f"transformer.h.{i}.{{attn.q_proj,attn.k_proj,attn.v_proj,mlp.fc_in}}",
                        f"transformer.h.{i}.attn.out_proj", f"transformer.h.{i}.mlp.fc_out"]),
    # parallel residual but two norms: nothing shared
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL, intermediate_size=128,
                                                               bos_token_id=0, eos_token_id=0)),
                 lambda i: [f"gpt_neox.layers.{i}.attention.query_key_value", f"gpt_neox.layers.{i}.attention.dense",
                            f"gpt_neox.layers.{i}.mlp.dense_h_to_4h", f"gpt_neox.layers.{i}.mlp.dense_4h_to_h"]),
    "novel": (NovelLM, lambda i: [f"blocks.{i}.{{p1,p2,p3,p4}}", f"blocks.{i}.out"]),
}


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
