"""out_of_core.quantize_checkpoint: a float checkpoint quantized from disk one block in memory at a
time equals quantize_ on the loaded model, bit for bit; bad inputs are named."""
import copy
import gc
import json
import weakref

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, load_quantized, quantize_
from glowq_fx.quantize.from_disk import quantize_checkpoint
from tests_helpers import tiny_llama_config, token_batches


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True, num_hidden_layers=3)).eval()
    path = tmp_path_factory.mktemp("float")
    model.save_pretrained(path, max_shard_size="60KB")  # several float shards
    return model, path


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("feed", ["float", "quantized"])
def test_from_disk_equals_quantize_on_the_loaded_model(float_dir, tmp_path, feed):
    model, path = float_dir
    batches = token_batches(2)
    config = GlowQConfig(group_size=32, rank=8, block_inputs=feed, quantize_output_head=False)
    report = quantize_checkpoint(path, tmp_path / "q", batches, config, progress=False, max_shard_size="50KB")
    assert report.calibration["read_from"] == str(path) and report.calibration["block_inputs"] == feed
    assert len(list((tmp_path / "q").glob("model-*-of-*.safetensors"))) > 1
    reference = copy.deepcopy(model)
    expected = quantize_(reference, batches, config, progress=False)
    assert [g.name for g in report.groups] == [g.name for g in expected.groups]
    loaded = load_quantized(tmp_path / "q")
    _assert_same(reference, loaded)
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight  # the default int8 head, still tied


def test_from_disk_quantizes_a_tied_table_once_like_quantize_(float_dir, tmp_path):
    model, path = float_dir
    batches = token_batches(2)
    config = GlowQConfig(group_size=32, rank=8, quantize_output_head=True, embedding_bits=4)
    report = quantize_checkpoint(path, tmp_path / "q", batches, config, progress=False)
    reference = copy.deepcopy(model)
    expected = quantize_(reference, batches, config, progress=False)
    assert report.model_bytes == expected.model_bytes and report.embeddings == expected.embeddings
    loaded = load_quantized(tmp_path / "q")
    _assert_same(reference, loaded)
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight


def test_one_block_in_memory_at_a_time(float_dir, tmp_path, monkeypatch):
    import glowq_fx.quantize.from_disk as ooc

    _, path = float_dir
    seen = []
    load, release = ooc.LazyCheckpoint.load, ooc.release

    def loaded_blocks(model):
        return [i for i, layer in enumerate(model.model.layers) if not next(layer.parameters()).is_meta]

    floats = []  # weak references to the float weights read so far: freed once their block is done

    def spy_load(self, device, prefixes=None, **kw):
        gc.collect()
        assert all(ref() is None for ref in floats[:-1] if floats), "a finished block's float weights are alive"
        count = load(self, device, prefixes, **kw)
        seen.append(("load", loaded_blocks(self.model)))
        floats.extend(weakref.ref(layer.self_attn.q_proj.weight) for i, layer in enumerate(self.model.model.layers)
                      if i in loaded_blocks(self.model) and not hasattr(layer.self_attn.q_proj, "qweight"))
        return count

    def spy_release(module):
        release(module)
        seen.append(("release", None))

    monkeypatch.setattr(ooc.LazyCheckpoint, "load", spy_load)
    monkeypatch.setattr(ooc, "release", spy_release)
    quantize_checkpoint(path, tmp_path / "q", token_batches(1), GlowQConfig(group_size=32, rank=4), progress=False)
    assert [s for s in seen if s[0] == "load"] == [("load", []), ("load", [0]), ("load", [1]), ("load", [2])]
    assert [s[0] for s in seen[2:]] == ["release", "load", "release", "load", "release"]


def test_bad_inputs_are_named(float_dir, tmp_path):
    model, path = float_dir
    batches = token_batches(1)
    with pytest.raises(ValueError, match="GlowQ-S cannot choose among all groups afterwards"):
        quantize_checkpoint(path, tmp_path / "q", batches, GlowQConfig(selective=0.5))
    with pytest.raises(ValueError, match="calibration='model' needs the whole model in memory"):
        quantize_checkpoint(path, tmp_path / "q", batches, GlowQConfig(calibration="model"))
    with pytest.raises(ValueError, match="config.json is missing"):
        quantize_checkpoint(tmp_path, tmp_path / "q", batches)
    bin_dir = tmp_path / "bin"
    model.save_pretrained(bin_dir)
    (bin_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")  # what older transformers wrote
    with pytest.raises(ValueError, match="only safetensors checkpoints are read from disk"):
        quantize_checkpoint(bin_dir, tmp_path / "q", batches)
    renamed = tmp_path / "renamed"
    model.save_pretrained(renamed)
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "model.safetensors"}}
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="its keys are not the model's parameter names"):
        quantize_checkpoint(renamed, tmp_path / "q", batches)


MOE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
MOE_CONFIGS = {  # per-expert keys on disk (what save_pretrained writes), 3-D experts in the model
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**MOE, intermediate_size=128, moe_intermediate_size=48,
                                          shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                          decoder_sparse_step=1),
    "mixtral": lambda: T.MixtralConfig(**MOE, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
}


def _moe_dir(tmp_path, name, max_shard_size="100KB"):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(MOE_CONFIGS[name]()).eval()
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model, path


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_an_moe_model_from_disk_equals_quantize_by_blocks(name, tmp_path):
    """Per-expert keys read block by block into the 3-D experts (transformers' own conversion), the
    experts' statistics collected with their block: the checkpoint equals quantize_ by blocks."""
    from safetensors import safe_open

    model, path = _moe_dir(tmp_path, name)
    keys = [k for f in path.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert any(".experts.3." in k for k in keys) and not any(k.endswith("experts.down_proj") for k in keys)
    batches = token_batches(2)
    config = GlowQConfig(group_size=32, rank=8, block_inputs="quantized")
    report = quantize_checkpoint(path, tmp_path / "q", batches, config, progress=False)
    reference = copy.deepcopy(model)
    expected = quantize_(reference, batches, GlowQConfig(group_size=32, rank=8, block_inputs="quantized",
                                                         calibration="blocks"), progress=False)
    assert [g.name for g in report.groups] == [g.name for g in expected.groups]
    assert any(".experts." in g.name for g in report.groups)
    assert report.skipped == expected.skipped
    _assert_same(reference, load_quantized(tmp_path / "q"))


def test_an_incomplete_or_mismatched_moe_checkpoint_is_named_before_anything_loads(tmp_path):
    """A lost expert key, or experts of unequal shapes: the tensor, the expert and the fix are
    named when the checkpoint is opened, before any block is read or anything written."""
    from safetensors.torch import load_file, save_file

    _, path = _moe_dir(tmp_path, "mixtral", max_shard_size="1GB")
    shard = path / "model.safetensors"
    state = load_file(str(shard))
    # Mixtral's original keys: block_sparse_moe.experts.{i}.w1 (gate), w3 (up), w2 (down)
    lost = {k: v for k, v in state.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    save_file(lost, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.gate_up_proj: the checkpoint's experts are "
                                         r"incomplete: model.layers.1.block_sparse_moe.experts.\{i\}.w3.weight is "
                                         r"missing for i in \[2\].*write it again"):
        quantize_checkpoint(path, tmp_path / "q", token_batches(1), GlowQConfig(group_size=32, rank=4),
                            progress=False)
    assert not (tmp_path / "q").exists()
    odd = dict(state)
    odd["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(64, 80)
    save_file(odd, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.down_proj: the checkpoint's experts have "
                                         r"unequal shapes .*experts.1.w2.weight \(64, 80\).*config"):
        quantize_checkpoint(path, tmp_path / "q2", token_batches(1), GlowQConfig(group_size=32, rank=4),
                            progress=False)
