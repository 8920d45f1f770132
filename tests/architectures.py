"""The architectures of the grouping tests: tiny configs of transformers models and a novel
block, each with the input-sharing groups expected from how it computes (written out by hand, not
read from any output of the library). Shared by the quantize, capture and calibration tests."""
import torch
import transformers as T
from torch import nn

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
