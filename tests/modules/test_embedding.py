"""modules.embedding and quantize_'s tables: 4/8-bit embeddings dequantized on lookup, a tied
output head sharing the one quantized table, whole-model bytes, factor dtype, checkpoints."""
import pytest
import torch
import transformers as T
from torch import nn

from glowq_fx import GlowQConfig, load_quantized, quantize_, save_quantized
from glowq_fx.modules import QuantizedLinear
from glowq_fx.modules.embedding import QuantizedEmbedding, quantize_embedding
from glowq_fx.quant.rtn import quantize_rtn
from glowq_fx.quantize.api import model_bytes
from tests_helpers import tiny_llama_config, token_batches


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("vocab,dim,group", [(100, 72, 32), (37, 64, -1), (50, 130, 64)])
def test_lookup_gives_the_quantizers_rows_exactly(gen, bits, vocab, dim, group):
    table = nn.Embedding(vocab, dim)
    with torch.no_grad():
        table.weight.copy_(torch.randn(vocab, dim, generator=gen))
    q = quantize_embedding(table, bits, group)
    assert isinstance(q, QuantizedEmbedding) and q.bits == bits
    ids = torch.randint(0, vocab, (3, 11), generator=gen)
    rows = quantize_rtn(table.weight.detach(), group, bits=bits).dequantize(torch.float32)
    assert torch.equal(q(ids), rows[ids])
    assert torch.equal(q.weight, rows)
    err = (q(ids) - table(ids)).abs().max()
    step = (table.weight.max() - table.weight.min()) / (2**bits - 1)
    assert 0 < err <= step  # rounded, within one step of the widest group


def test_a_subclass_keeps_its_own_forward(gen):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    table = Gemma3TextScaledWordEmbedding(40, 32, 0, embed_scale=5.0)
    q = quantize_embedding(table, 4, 32)
    assert isinstance(q, Gemma3TextScaledWordEmbedding) and isinstance(q, QuantizedEmbedding)
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    assert torch.equal(q(ids), q.rows(ids.reshape(-1)).reshape(2, 6, 32) * 5.0)


def test_an_embedding_with_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm"):
        quantize_embedding(nn.Embedding(10, 32, max_norm=1.0), 4, 32)


def _llama(tied: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_head_quantized_with_one_table_when_tied(tmp_path, tied):
    model = _llama(tied)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    float_logits = model(ids).logits
    before = model_bytes(model)
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, rank=8, quantize_output_head=True,
                                                          embedding_bits=4), progress=False)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantizedEmbedding) and isinstance(head, QuantizedLinear) and head.rank == 8
    assert (head.qweight is table.qweight) == tied  # tied: one quantized table serves both
    assert report.model_bytes == (before, model_bytes(model)) and report.model_bytes[1] < 0.4 * before
    entry = report.embeddings["model.embed_tokens"]
    assert entry["bits"] == 4 and entry["tied_head"] == ("lm_head" if tied else None)
    assert "whole model" in str(report) and ("shared with the output head" in str(report)) == tied
    logits = model(ids).logits
    assert (logits - float_logits).abs().max() < 0.5 * float_logits.abs().max()  # quantized, still the model
    save_quantized(model, tmp_path, report=report)
    loaded = load_quantized(tmp_path)
    assert torch.equal(loaded(ids).logits, logits)
    assert (loaded.lm_head.qweight is loaded.model.embed_tokens.qweight) == tied


def test_eight_bit_table_round_trips(tmp_path):
    model = _llama(False)
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, rank=8, embedding_bits=8), progress=False)
    assert model.model.embed_tokens.bits == 8 and model.model.embed_tokens.qweight.dtype == torch.uint8
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    save_quantized(model, tmp_path, report=report)
    assert torch.equal(load_quantized(tmp_path)(ids).logits, model(ids).logits)


def test_tied_tables_that_cannot_be_stored_are_refused_before_any_work():
    with pytest.raises(ValueError, match="quantize both"):
        quantize_(_llama(True), token_batches(), GlowQConfig(group_size=32, embedding_bits=4, output_head_bits=None),
                  progress=False)
    with pytest.raises(ValueError, match="output_head_bits=8 stores in int8: use embedding_bits=8 or None"):
        quantize_(_llama(True), token_batches(), GlowQConfig(group_size=32, embedding_bits=4), progress=False)
    with pytest.raises(ValueError, match="use embedding_bits=4"):
        quantize_(_llama(True), token_batches(), GlowQConfig(group_size=32, quantize_output_head=True,
                                                             embedding_bits=8), progress=False)
    model = _llama(True)  # the head alone: skipped, with the fix in the reason
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, quantize_output_head=True), progress=False)
    assert "embedding_bits=4" in report.skipped["lm_head"] and isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize("factor_dtype,expected", [("auto", torch.bfloat16), ("model", torch.float32),
                                                   ("float16", torch.float16)])
def test_factor_dtype_is_how_the_factors_are_stored(tmp_path, factor_dtype, expected):
    model = _llama(False)
    reference = _llama(False)
    quantize_(reference, token_batches(), GlowQConfig(group_size=32, rank=8, factor_dtype="model"), progress=False)
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, rank=8, factor_dtype=factor_dtype),
                       progress=False)
    q = model.model.layers[0].mlp.up_proj
    assert q.A.dtype == q.projection.B.dtype == expected and q.scales.dtype == torch.float32
    assert report.total("factor_bytes") * 4 == reference_bytes(reference) * expected.itemsize
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    out, ref = model(ids).logits, reference(ids).logits
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()  # narrower factors, the same model
    save_quantized(model, tmp_path, report=report)
    loaded = load_quantized(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.A.dtype == expected and torch.equal(loaded(ids).logits, out)


def reference_bytes(model) -> int:
    return sum(m.A.nbytes for m in model.modules() if isinstance(m, QuantizedLinear) and m.A is not None) + sum(
        p.B.nbytes for n, p in model.named_modules() if type(p).__name__ == "SharedProjection")
