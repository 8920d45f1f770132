"""The glowq command: `groups` on model types and local directories."""
import re

import pytest

from glowq_fx.checkpoint import read_metadata
from glowq_fx.cli.main import main
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
    "qwen3_moe": "model.layers.0.mlp.experts.gate_up_proj          128 experts  2048    128 x 1536",
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
    assert "neither a local model directory, a GGUF file nor a transformers model type" in capsys.readouterr().err


def _tiny_model_dir(path, text_words):
    """A local transformers directory: a tiny Llama and a word-level tokenizer over ``text_words``."""
    import tokenizers
    import transformers as T

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(text_words)))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    T.LlamaForCausalLM(tiny_llama_config(vocab_size=len(vocab))).save_pretrained(path)
    return path


def _tiny_model_and_text(tmp_path):
    """A tiny local model directory and a text file of fresh random words from its vocabulary."""
    import random

    rng = random.Random()
    words = [f"w{i}" for i in range(60)]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return _tiny_model_dir(tmp_path / "model", words), text


def test_quantize_eval_bench_on_a_local_model(tmp_path, capsys):
    model_dir, text = _tiny_model_and_text(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--group-size", "32", "--rank", "8",
                 "--calib", str(text), "--calib-samples", "4", "--calib-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "method glowq, rank 8" in printed and f"saved to {out}" in printed
    assert (out / "glowq.json").is_file() and (out / "tokenizer.json").is_file()
    assert list(read_metadata(out)["int8_linears"]) == ["lm_head"]  # the default int8 head

    for target in (str(model_dir), str(out)):
        assert main(["eval", target, "--text", str(text), "--seq-len", "128", "--max-tokens", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith(str(tmp_path))]
    assert [r[1] for r in rows] == ["float32", "quantized"]
    # perplexity, and predicted tokens: 1000 in 8 windows, each predicting all but its first
    assert all(float(r[4]) > 1 and r[6] == "992" and r[7] == "8" for r in rows)

    assert main(["bench", str(out), "--tokens", "16", "--repeats", "2"]) == 0
    assert "torch.compile(backend=glowq_backend)" in capsys.readouterr().out
    assert main(["bench", str(model_dir)]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err


def test_quantize_block_by_block_into_shards(tmp_path, capsys):
    model_dir, text = _tiny_model_and_text(tmp_path)
    out, scratch = tmp_path / "q", tmp_path / "scratch"
    assert main(["quantize", str(model_dir), "--out", str(out), "--group-size", "32", "--rank", "8",
                 "--calib", str(text), "--calib-samples", "4", "--calib-len", "64", "--calibration", "blocks",
                 "--block-inputs", "quantized",
                 "--activations", "disk", "--offload-dir", str(scratch), "--max-shard-size", "20KB",
                 "--output-head-bits", "none"]) == 0
    printed = capsys.readouterr().out
    assert read_metadata(out)["int8_linears"] == {}  # the head left in floating point
    assert "calibrated block by block over 2 blocks of model.layers on cpu, next block fed the quantized outputs, " \
           "cached inputs on disk" in printed
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert scratch.is_dir() and not any(scratch.iterdir())
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "128", "--max-tokens", "500"]) == 0
    assert "quantized" in capsys.readouterr().out


def test_quantize_from_disk_loads_one_block_at_a_time(tmp_path, capsys):
    model_dir, text = _tiny_model_and_text(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--group-size", "32", "--rank", "8",
                 "--calib", str(text), "--calib-samples", "4", "--calib-len", "64", "--from-disk"]) == 0
    assert "calibrated block by block" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "128", "--max-tokens", "500"]) == 0
    assert main(["quantize", str(text), "--out", str(out), "--from-disk"]) == 2
    assert "is a file but not a model" in capsys.readouterr().err  # a text file given as the model


def test_eval_of_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing-here"), "--text", __file__]) == 2
    assert "nothing-here: no such file or directory" in capsys.readouterr().err


def test_select_writes_table_json_and_plot(tmp_path, capsys):
    import json

    model_dir, text = _tiny_model_and_text(tmp_path)
    out = tmp_path / "sel" / "selective"
    assert main(["select", str(model_dir), "--score", "gain", "--score", "measured", "--rank", "8",
                 "--group-size", "32", "--step", "3", "--compare-rank", "4", "--text", str(text),
                 "--eval-tokens", "600", "--seq-len", "128",
                 "--calib", str(text),
                 "--calib-samples", "4", "--calib-len", "64", "--measure-len", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "elbow of the gain sweep" in printed and "selective='auto'" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert [st["score"] for st in data["studies"]] == ["gain", "measured"]
    units = data["studies"][0]["units"]
    assert [p["k"] for p in data["studies"][0]["points"]] == sorted(set(range(0, units, 3)) | {units})
    lower = data["lower_ranks"]["4"]
    assert lower["k"] == units and lower["factor_bytes"] * 2 == data["studies"][0]["points"][-1]["factor_bytes"]
    assert "every group at rank 4" in printed
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert out.with_suffix(".md").read_text().count("\n| ") >= 3
    assert main(["select", str(model_dir), "--rank", "8", "--group-size", "32", "--compare-rank", "0", "--text",
                 str(text), "--calib", str(text), "--calib-samples", "2", "--calib-len", "32", "--out", str(out)]) == 2
    assert "ranks must be positive ints, got [0]" in capsys.readouterr().err
