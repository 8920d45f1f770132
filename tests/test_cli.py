"""The glowq command: `groups` on model types and local directories."""
import re

import pytest

from glowq_fx.cli import main
from tests_helpers import tiny_llama_config

# one model type per architecture of the grouping issue, and a group line each must print
EXPECTED = {
    "llama": "model.layers.0.self_attn.{q_proj,k_proj,v_proj}  3   4096  4096/4096/4096",
    "mistral": "model.layers.0.mlp.{gate_proj,up_proj}           2   4096     14336/14336",
    "qwen2": "model.layers.0.self_attn.{q_proj,k_proj,v_proj}",
    "qwen3": "model.layers.0.mlp.{gate_proj,up_proj}",
    "gemma": "model.layers.0.self_attn.{q_proj,k_proj,v_proj}  3   3072",
    "phi3": "model.layers.0.mlp.gate_up_proj",
    "gpt2": "transformer.h.0.attn.c_attn  1   768   2304",
    "opt": "model.decoder.layers.0.self_attn.{q_proj,k_proj,v_proj}",
    "falcon": "transformer.h.0.{self_attention.query_key_value,mlp.dense_h_to_4h}  2   4544  4672/18176",
    "gptj": "transformer.h.0.{attn.q_proj,attn.k_proj,attn.v_proj,mlp.fc_in}  4   4096  4096/4096/4096/16384",
    "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_groups_of_each_architecture(model_type, capsys):
    assert main(["groups", model_type, "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert EXPECTED[model_type] in out
    assert "layers.1." not in out and ".h.1." not in out


def test_groups_of_a_local_directory(tmp_path, capsys):
    tiny_llama_config().save_pretrained(tmp_path)
    assert main(["groups", str(tmp_path), "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\.layers\.1\.mlp\.\{gate_proj,up_proj\}\s+2\s+64\s+128/128", out), out
    assert "not quantized: lm_head" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["groups", "not-a-model"]) == 2
    assert "neither a local model directory nor a transformers model type" in capsys.readouterr().err
