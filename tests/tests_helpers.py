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
