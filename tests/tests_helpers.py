"""Shared builders for tests (not fixtures: plain functions any test file can import)."""
import torch
import transformers as T


def tiny_llama_config(**overrides) -> T.LlamaConfig:
    """Llama with hidden 64, two layers, 4 heads / 2 kv heads, vocab 128."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    kw.update(overrides)
    return T.LlamaConfig(**kw)


def random_llama(seed: int = 0) -> torch.nn.Module:
    """A 4-layer Llama (hidden 256) with random weights; ``intermediate_size`` 688 exercises group padding."""
    config = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = T.LlamaForCausalLM(config)
    return model.eval()


def packed_member(N, K, group_size, dtype, rank, bias, gen, device):
    """One kernel member on ``device``: (qweight, scales, zeros, bias or None, A or None) of a random
    (N, K) weight RTN-quantized in groups of ``group_size``; ``A`` scaled by 1/sqrt(rank)."""
    from glowq_fx.kernels.layout import pack
    from glowq_fx.quant.rtn import quantize_rtn

    W = torch.randn(N, K, generator=gen, dtype=torch.float64)
    packed = pack(quantize_rtn(W.to(dtype).float(), group_size))
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    A = (torch.randn(N, rank, generator=gen) / rank**0.5).to(dtype) if rank else None
    return tuple(None if t is None else t.to(device) for t in (packed.qweight, packed.scales.to(dtype),
                                                                packed.zeros.to(dtype), b, A))
