"""Shared builders for tests (not fixtures: plain functions any test file can import)."""
import transformers as T


def tiny_llama_config(**overrides) -> T.LlamaConfig:
    """Llama with hidden 64, two layers, 4 heads / 2 kv heads, vocab 128."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    kw.update(overrides)
    return T.LlamaConfig(**kw)
