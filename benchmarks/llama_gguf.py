"""A transformers Llama model as a GGUF file, so that llama.cpp runs the very weights we quantize.

``bench_cpu_decode.py --model llama8b-layers`` has random weights and no tokenizer, so there is
no GGUF of it to download; this writes one: the model's tensors in float16 under llama.cpp's
names (q and k rows permuted for llama.cpp's rotary layout, as llama.cpp's own
``convert_hf_to_gguf.py`` does), with a placeholder SentencePiece vocabulary of the model's size
(the benchmark feeds llama.cpp token ids, so no text is ever tokenized), and then llama.cpp's
quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) makes the Q4_1 file from it
with its default choices per tensor. Needs the ``gguf`` package here and ``llama_cpp`` in the
python that quantizes (the benchmark environment's).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
params.nthread = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""

LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


def _rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' half-split rotary layout to llama.cpp's interleaved one."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: nn.Module):
    """(GGUF name, float tensor) for every weight of a transformers LlamaForCausalLM."""
    cfg = model.config
    yield "token_embd.weight", model.model.embed_tokens.weight
    yield "output_norm.weight", model.model.norm.weight
    if not cfg.tie_word_embeddings:
        yield "output.weight", model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        for path, name in LAYER_TENSORS.items():
            w = layer.get_submodule(path).weight
            if path == "self_attn.q_proj":
                w = _rotary_rows(w, cfg.num_attention_heads)
            elif path == "self_attn.k_proj":
                w = _rotary_rows(w, cfg.num_key_value_heads)
            yield f"blk.{i}.{name}.weight", w


def write_f16_gguf(model: nn.Module, path: Path) -> None:
    """The Llama ``model`` as a float16 GGUF (norms in float32, as llama.cpp's converter keeps them)."""
    import gguf

    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"write_f16_gguf writes Llama models, got model_type {cfg.model_type!r}")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("random Llama layers (glowq-fx benchmark)")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
                                    else cfg.rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n = cfg.vocab_size  # placeholder vocabulary: ids only are ever fed
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, n)])
    writer.add_token_scores([0.0] * n)
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * (n - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, w in _tensors(model):
        data = w.detach().float().numpy()
        writer.add_tensor(name, data if data.ndim == 1 else data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_q4_1_gguf(model: nn.Module, out: Path, llama_python: str, threads: int) -> Path:
    """``out``: the model quantized to Q4_1 by llama.cpp itself (via a float16 GGUF next to it)."""
    f16 = out.with_suffix(".f16.gguf")
    write_f16_gguf(model, f16)
    try:
        done = subprocess.run([llama_python, "-c", QUANTIZE, str(f16), str(out), str(threads)],
                              capture_output=True, text=True)
        if done.returncode or not out.is_file():
            raise RuntimeError(f"llama_model_quantize failed ({done.returncode}): "
                               f"{' | '.join(done.stderr.strip().splitlines()[-3:])}")
    finally:
        f16.unlink(missing_ok=True)
    return out
