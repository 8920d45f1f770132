"""The int8 output head (``GlowQConfig(output_head_bits=8)``): its codes, kernel, tied table,
checkpoint round trip and the bad inputs."""
import copy

import pytest
import torch
import transformers as T
from torch import nn

from glowq_fx import GlowQConfig, load_quantized, quantize_, save_quantized, use_cpu_kernels
from glowq_fx.kernels import cpu_int8
from glowq_fx.modules.embedding import QuantizedEmbedding
from glowq_fx.modules.int8_linear import Int8Linear
from glowq_fx.quant.rtn import quantize_int8_rows
from tests_helpers import tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_int8_rows_codes_bound_the_error():
    W = torch.randn(40, 72, generator=torch.Generator().manual_seed(1))
    W[3] = 0
    q, s = quantize_int8_rows(W)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (40,)
    err = (q.float() * s.unsqueeze(1) - W).abs()
    assert (err <= s.unsqueeze(1) / 2 + 1e-7).all()  # half a step per element
    assert (q[3] == 0).all() and s[3] == 1  # a zero row is exact
    assert torch.allclose(q.float().abs().amax(1)[W.abs().amax(1) > 0], torch.tensor(127.))


@pytest.mark.parametrize("kernel", ["auto", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_dequantized_linear(dtype, kernel):
    if cpu_int8.unsupported_reason(kernel) is not None:
        pytest.skip(str(cpu_int8.unsupported_reason(kernel)))
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(96, 200, bias=True).to(dtype)
    head = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    ref = nn.functional.linear(x.float(), head.dequantize(torch.float32), head.bias.float())
    assert head.use_cpu_int8_kernel(kernel=kernel) is None
    y = head(x)
    assert y.dtype == dtype and y.shape == (3, 5, 200)
    # PyTorch's kernel rounds the activations to bfloat16, ours to int16 per 32 columns
    ours = head.kernel_name == "cpu_gemv8"
    assert (y.float() - ref).norm() / ref.norm() < (1e-4 if ours and dtype == torch.float32 else 1e-2)
    head.use_cpu_int8_kernel(False)
    assert (head(x).float() - ref).norm() / ref.norm() < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(cpu_int8.unsupported_reason() is not None, reason=str(cpu_int8.unsupported_reason()))
def test_compiled_int8_head_behind_a_computed_input_equals_eager():
    # the head reads a norm's output: Inductor's int8 lowering gets an unrealized input
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.RMSNorm(64), Int8Linear.from_linear(nn.Linear(64, 160))).eval()
    model[1].use_cpu_int8_kernel()
    x = torch.randn(2, 7, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="inductor")(x), model(x), rtol=1e-3, atol=1e-3)


def test_int8_kernel_scales_follow_loads_and_moves():
    head = Int8Linear.from_linear(nn.Linear(32, 48))
    if head.use_cpu_int8_kernel() is not None:
        pytest.skip(str(cpu_int8.unsupported_reason()))
    dtype = cpu_int8.kernel_scales(head.scales).dtype  # the chosen kernel's
    assert head.kernel_scales.dtype == dtype and "kernel_scales" not in head.state_dict()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["scales"] *= 2
    head.load_state_dict(state)
    torch.testing.assert_close(head.kernel_scales, state["scales"].to(dtype))
    head.to(torch.bfloat16)
    assert head.scales.dtype == torch.bfloat16 and head.kernel_scales is not None
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    ref = nn.functional.linear(x.float(), head.dequantize(torch.float32), head.bias.float())
    assert (head(x).float() - ref).norm() / ref.norm() < 1e-2


def test_int8_linear_rejects_bad_buffers():
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="scales"):
        Int8Linear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))


def tiny_llama(tie_word_embeddings):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tie_word_embeddings))


def _batches(model, n=4, T=16):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, model.config.vocab_size, (1, T), generator=g) for _ in range(n)]


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_stores_the_head_in_int8_and_round_trips(tmp_path, tied):
    model = tiny_llama(tie_word_embeddings=tied).eval()
    float_model = copy.deepcopy(model)
    report = quantize_(model, _batches(model), GlowQConfig(rank=4, group_size=32, output_head_bits=8))
    head, table = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int8Linear)
    assert report.embeddings["lm_head"]["bits"] == 8 and "output head lm_head" in str(report)
    if tied:  # the table follows the head: one set of codes
        assert isinstance(table, QuantizedEmbedding) and table.qweight is head.qweight
        ids = torch.tensor([0, 5, 7])
        assert torch.equal(table(ids), head.dequantize()[ids])
    else:
        assert type(table) is nn.Embedding
    W = float_model.lm_head.weight
    assert ((head.dequantize() - W).abs() <= head.scales.unsqueeze(1) / 2 + 1e-6).all()
    ids = _batches(model, 1)[0]
    with torch.no_grad():
        expect = model(ids).logits
        save_quantized(model, tmp_path / "q")
        loaded = load_quantized(tmp_path / "q", copy.deepcopy(float_model))
        got = loaded(ids).logits
    assert isinstance(loaded.lm_head, Int8Linear) and torch.equal(loaded.lm_head.qweight, head.qweight)
    if tied:
        assert loaded.model.embed_tokens.qweight is loaded.lm_head.qweight
    assert torch.equal(got, expect)
    kernels = ("cpu_gemv8", "cpu_int8", f"reference: {cpu_int8.unsupported_reason()}")
    assert use_cpu_kernels(loaded)["lm_head"] in kernels


def test_int8_head_bad_combinations():
    with pytest.raises(ValueError, match="output_head_bits"):
        GlowQConfig(output_head_bits=4)
    model = tiny_llama(tie_word_embeddings=True).eval()
    with pytest.raises(ValueError, match="embedding_bits=8 or None"):
        quantize_(model, _batches(model), GlowQConfig(rank=4, group_size=32, output_head_bits=8, embedding_bits=4))


def test_quantize_output_head_takes_the_head_into_the_groups():
    model = tiny_llama(tie_word_embeddings=False).eval()
    quantize_(model, _batches(model), GlowQConfig(rank=4, group_size=32, quantize_output_head=True))
    assert type(model.lm_head).__name__ == "QuantizedLinear"


def test_excluded_head_stays_float():
    model = tiny_llama(tie_word_embeddings=False).eval()
    quantize_(model, _batches(model), GlowQConfig(rank=4, group_size=32, output_head_bits=8, exclude=("lm_head",)))
    assert type(model.lm_head) is nn.Linear
