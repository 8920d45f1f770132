"""Shared builders for tests (not fixtures: plain functions any test file can import)."""
import importlib.util
from pathlib import Path

import torch
import transformers as T

ROOT = Path(__file__).resolve().parents[1]


def weighted_group_error(W, qw, d):
    """``sum_k d_k E_k^2`` per (row, group) of ``W``'s quantization error under ``qw``."""
    from glowq_fx.quant import group_geometry, quantization_error

    E = quantization_error(W, qw)
    g, n = group_geometry(W.shape[1], qw.group_size if qw.group_size != W.shape[1] else -1)
    E = torch.nn.functional.pad(E, (0, g * n - W.shape[1])).view(W.shape[0], n, g)
    d = torch.nn.functional.pad(d, (0, g * n - W.shape[1])).view(1, n, g)
    return (E.square() * d).sum(-1)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a fresh module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama_config(**overrides) -> T.LlamaConfig:
    """Llama with hidden 64, two layers, 4 heads / 2 kv heads, vocab 128."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    kw.update(overrides)
    return T.LlamaConfig(**kw)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """``tiny_llama_config()`` with seeded random weights, in eval mode (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T.LlamaForCausalLM(tiny_llama_config()).eval()


def token_batches(n: int = 3, seed: int = 0, t: int = 24, vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    """``n`` calibration batches of 2 x ``t`` random token ids below ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, t), generator=g)} for _ in range(n)]


def random_llama(seed: int = 0) -> torch.nn.Module:
    """A 4-layer Llama (hidden 256) with random weights; ``intermediate_size`` 688 exercises group padding."""
    config = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = T.LlamaForCausalLM(config)
    return model.eval()


def packed_member(N, K, group_size, dtype, rank, bias, gen, device, float_zeros=False):
    """One kernel member on ``device``: (qweight, scales, zeros, bias or None, A or None) of a random
    (N, K) weight RTN-quantized in groups of ``group_size``; ``A`` scaled by 1/sqrt(rank). The zero
    points as stored (uint8 16 * zero), or with ``float_zeros`` in ``dtype`` (a GGUF file's form)."""
    from glowq_fx.kernels.layout import pack, zero_points
    from glowq_fx.quant.rtn import quantize_rtn

    W = torch.randn(N, K, generator=gen, dtype=torch.float64)
    packed = pack(quantize_rtn(W.to(dtype).float(), group_size))
    zeros = zero_points(packed.zeros).to(dtype) if float_zeros else packed.zeros
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    A = (torch.randn(N, rank, generator=gen) / rank**0.5).to(dtype) if rank else None
    return tuple(None if t is None else t.to(device) for t in (packed.qweight, packed.scales.to(dtype), zeros, b, A))


def quantized_copy(setup, **config):
    """(a deep copy of ``setup[0]`` quantized from the ``Calibration`` ``setup[1]`` with
    ``GlowQConfig(group_size=32, rank=8, **config)``, its report)."""
    import copy

    from glowq_fx import GlowQConfig, quantize_

    subject = copy.deepcopy(setup[0])
    report = quantize_(subject, setup[1], GlowQConfig(**{"group_size": 32, "rank": 8, **config}), progress=False)
    return subject, report


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def llama_batch(n=2, t=12, vocab=512, seed=0):
    """A batch for ``random_llama``: seeded ids and an all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (n, t), generator=g),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
    }


def or_skip(load):
    """``load()``, or skip the test naming the packaged resource that could not be obtained."""
    import pytest

    from glowq_fx.data.cache import MissingResourceError

    try:
        return load()
    except MissingResourceError as exc:
        pytest.skip(f"packaged resource unavailable: {exc}")



def write_qwen2_gguf(model, path, *, add_bos: bool = False, architecture: str = "qwen2") -> None:
    """Write a ``Qwen2ForCausalLM`` as a float32 GGUF with the ``gguf`` package, as llama.cpp's
    converter lays it out (tensor names, metadata keys), with a byte-level BPE tokenizer of
    ``config.vocab_size`` tokens: 256 byte symbols, a few merges, ``<|endoftext|>`` last (BOS/EOS)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-qwen2")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    merges = ["Ġ t", "Ġ a", "h e", "i n", "Ġt he", "o n", "e r"][: c.vocab_size - 257]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    if len(tokens) != c.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, the model {c.vocab_size}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(add_bos)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, gg in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w.add_tensor(names[key], t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_qwen2(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer Qwen2 (hidden 64) with 264 tokens (``write_qwen2_gguf``'s tokenizer), tied embeddings."""
    kw = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    kw.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T.Qwen2ForCausalLM(T.Qwen2Config(**kw)).eval()


def every_config(module, kernels: dict) -> list:
    """pytest params ``(name, index)`` for each configuration of each autotuned kernel of a kernel
    module; ``kernels``: name -> (module attribute of the raw kernel, of its configurations, ...)."""
    import pytest

    return [pytest.param(name, i, id=f"{name}-{i}-" + "-".join(f"{k}{v}" for k, v in config.kwargs.items()))
            for name, (_, configs, *_) in kernels.items() for i, config in enumerate(getattr(module, configs))]


def only_config(monkeypatch, module, attr: str, raw: str, configs: str, index: int, key: list) -> None:
    """Make ``module.attr`` the raw kernel autotuned over configuration ``index`` alone (the GPU's
    autotuner picks by speed, the interpreter the first: this runs each one)."""
    import triton

    monkeypatch.setattr(module, attr, triton.autotune(configs=[getattr(module, configs)[index]], key=key)(
        getattr(module, raw)))


MOE_BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE_CONFIGS = {  # tiny MoE configs, by model type
    "mixtral": lambda: T.MixtralConfig(**MOE_BASE, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**MOE_BASE, intermediate_size=128, moe_intermediate_size=48,
                                          shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                          decoder_sparse_step=1),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**MOE_BASE, intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                                          num_experts_per_tok=2, decoder_sparse_step=1, head_dim=16),
    "olmoe": lambda: T.OlmoeConfig(**MOE_BASE, intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": lambda: T.DeepseekV3Config(**{**MOE_BASE, "num_key_value_heads": 4}, intermediate_size=128,
                                              moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                                              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                                              q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                              v_head_dim=16, n_group=2, topk_group=1),
}
