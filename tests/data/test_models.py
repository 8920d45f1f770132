"""data.models: SmolLM2 from its package (skipped with the reason when it cannot be obtained)."""
import torch

from tests_helpers import or_skip


def test_smollm2_from_its_package():
    from glowq_fx.data.batches import tokenize
    from glowq_fx.data.models import load_model
    from glowq_fx.evaluation.perplexity import perplexity

    model, tokenizer = or_skip(load_model)
    cfg = model.config
    assert (type(model).__name__, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == ("LlamaForCausalLM", 30, 576, 9, 3)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    assert not hasattr(cfg, "quantization_config")  # a plain float checkpoint, quantizable
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ppl = perplexity(model, tokenize(tokenizer, text), 128, progress=False).perplexity
    assert ppl < 20  # a repeated sentence is easy for a trained model; random weights give ~vocab (49152)
    W = model.model.layers[0].self_attn.q_proj.weight
    # Q4_1 GGUF: each row's blocks of 32 hold at most 16 distinct values
    assert max(torch.unique(W[0, i:i + 32]).numel() for i in range(0, 576, 32)) <= 16
