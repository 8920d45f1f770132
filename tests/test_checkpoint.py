"""save_quantized / load_quantized: bit-exact round trip, and every bad checkpoint refused whole."""
import json

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.checkpoint import META_FILE, CheckpointError, load_quantized, read_metadata, save_quantized
from glowq_fx.checkpoint.shards import SINGLE_FILE as TENSOR_FILE
from glowq_fx.modules.linear import QuantizedLinear
from tests_helpers import tiny_llama_config


def _llama(**overrides):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True, **overrides)).eval()


def _gpt2():
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return T.GPT2LMHeadModel(config).eval()


def _ids(vocab=128):
    return torch.randint(0, vocab, (2, 24))  # fresh tokens each run


def _quantized(build, method="glowq", **kw):
    model = build()
    report = quantize_(model, [{"input_ids": _ids()}],
                       GlowQConfig(group_size=32, rank=8, method=method, **kw), progress=False)
    return model, report


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("build,method", [(_llama, "glowq"), (_llama, "qera"), (_gpt2, "glowq")],
                         ids=["llama-glowq", "llama-qera", "gpt2-conv1d-bias"])
def test_round_trip_is_bit_exact(tmp_path, build, method):
    model, report = _quantized(build, method)
    save_quantized(model, tmp_path, report=report)
    loaded = load_quantized(tmp_path)  # rebuilt from config.json
    _assert_same(model, loaded)
    meta = read_metadata(tmp_path)
    assert GlowQConfig.from_dict(meta["config"]) == report.config and meta["report"]["groups"]
    # members of a group still read one shared projection object
    by_projection = {}
    for name, m in loaded.named_modules():
        if isinstance(m, QuantizedLinear) and m.projection is not None:
            by_projection.setdefault(id(m.projection), []).append(name)
    expected = sorted(sorted(p["members"]) for p in meta["projections"])
    assert sorted(sorted(v) for v in by_projection.values()) == expected
    if method == "glowq" and build is _llama:
        assert any(len(v) > 1 for v in by_projection.values())


@pytest.mark.parametrize("head_bits, tied", [(None, ["weight"]), (8, ["qweight", "scales"])],
                         ids=["float-head", "int8-head"])
def test_load_into_a_given_model_and_tied_embeddings_stay_tied(tmp_path, head_bits, tied):
    model, report = _quantized(_llama, output_head_bits=head_bits)
    save_quantized(model, tmp_path, report=report)
    assert read_metadata(tmp_path)["aliases"] == {f"lm_head.{t}": f"model.embed_tokens.{t}" for t in tied}
    target = _llama()
    with torch.no_grad():
        target.model.embed_tokens.weight.normal_()  # other values: all are replaced
    loaded = load_quantized(tmp_path, target)
    assert loaded is target
    for t in tied:
        assert getattr(loaded.lm_head, t) is getattr(loaded.model.embed_tokens, t)
    _assert_same(model, loaded)


def _saved(tmp_path):
    model, report = _quantized(_llama)
    save_quantized(model, tmp_path, report=report)
    return tmp_path


def _untouched(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("other,match", [
    (dict(num_hidden_layers=3), "does not match this model: missing tensors"),
    (dict(num_hidden_layers=1), "does not have"),
    (dict(intermediate_size=96), r"\(out, in\)"),
])
def test_other_architecture_is_refused_and_the_model_is_unchanged(tmp_path, other, match):
    _saved(tmp_path)
    target = _llama(**other)
    before = _untouched(target)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(tmp_path, target)
    assert not any(isinstance(m, QuantizedLinear) for m in target.modules())
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_dtype_is_refused(tmp_path):
    _saved(tmp_path)
    with pytest.raises(CheckpointError, match="build the model in torch.float32"):
        load_quantized(tmp_path, _llama().to(torch.bfloat16))


def test_truncated_file(tmp_path):
    path = _saved(tmp_path) / TENSOR_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(tmp_path)


def test_corrupted_byte(tmp_path):
    path = _saved(tmp_path) / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # a tensor byte: same size, other content
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_quantized(tmp_path)


def test_missing_files(tmp_path):
    _saved(tmp_path)
    (tmp_path / TENSOR_FILE).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_quantized(tmp_path)
    (tmp_path / META_FILE).unlink()  # config.json still describes it (save_pretrained's form): no tensors
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="not a glowq-fx checkpoint"):
        load_quantized(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_quantized(tmp_path / "nowhere")


def test_corrupted_description(tmp_path):
    meta_path = _saved(tmp_path) / META_FILE
    meta = meta_path.read_text()
    meta_path.write_text(meta[:-20])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(tmp_path)
    data = json.loads(meta)
    data["format_version"] = 99
    meta_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="newer"):
        load_quantized(tmp_path)
    del data["linears"]
    data["format_version"] = 1
    meta_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'linears' is missing"):
        load_quantized(tmp_path)


def test_description_disagreeing_with_tensors(tmp_path):
    meta_path = _saved(tmp_path) / META_FILE
    data = json.loads(meta_path.read_text())
    name = next(iter(data["linears"]))
    data["linears"][name]["group_size"] = 64  # the file's scales hold 32-column groups
    meta_path.write_text(json.dumps(data))
    target = _llama()
    with pytest.raises(CheckpointError, match="scales"):
        load_quantized(tmp_path, target)
    assert not any(isinstance(m, QuantizedLinear) for m in target.modules())


def test_no_config_json_needs_a_model(tmp_path):
    (_saved(tmp_path) / "config.json").unlink()
    with pytest.raises(CheckpointError, match="build the unquantized model yourself"):
        load_quantized(tmp_path)
    load_quantized(tmp_path, _llama())  # works with the model given


def test_refusals_when_saving_or_loading_the_wrong_model(tmp_path):
    with pytest.raises(CheckpointError, match="no QuantizedLinear"):
        save_quantized(_llama(), tmp_path)
    model, _ = _quantized(_llama)
    save_quantized(model, tmp_path)
    with pytest.raises(CheckpointError, match="already has QuantizedLinear"):
        load_quantized(tmp_path, model)


# --- shards -----------------------------------------------------------------------------------------


def _sharded(tmp_path, max_shard_size="40KB"):
    model, report = _quantized(_llama)
    save_quantized(model, tmp_path, report=report, max_shard_size=max_shard_size)
    return model, read_metadata(tmp_path)["tensors"]["shards"]


def test_sharded_round_trip_is_bit_exact_and_the_index_is_transformers(tmp_path):
    from safetensors import safe_open

    model, shards = _sharded(tmp_path)
    n = len(shards)
    assert n >= 3 and [s["file"] for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / TENSOR_FILE).exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    keys = {}
    for s in shards:
        with safe_open(str(tmp_path / s["file"]), framework="pt") as f:
            keys.update({k: s["file"] for k in f.keys()})
            data = sum(f.get_tensor(k).nbytes for k in f.keys())
            alone = len(f.keys()) == 1
        assert data <= 40_000 or alone  # each shard within the cap (a bigger tensor goes alone)
    assert index["weight_map"] == keys
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _dedupe_state(model).values())
    _assert_same(model, load_quantized(tmp_path))


def _dedupe_state(model):
    from glowq_fx.checkpoint.quantized import _dedupe

    return _dedupe(model.state_dict())[0]


@pytest.mark.parametrize("damage, match", [
    ("missing", r"model-00002-of-000\d\d.safetensors is missing: \d+ shard\(s\) are listed"),
    ("truncated", "truncated"),
    ("corrupted", "SHA-256"),
])
def test_a_damaged_shard_is_named_and_nothing_loads(tmp_path, damage, match):
    _sharded(tmp_path)
    path = tmp_path / read_metadata(tmp_path)["tensors"]["shards"][1]["file"]
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    target = _llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        load_quantized(tmp_path, target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_key_in_two_shards_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from glowq_fx.data.cache import sha256_file

    _sharded(tmp_path)
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    first, second = (tmp_path / s["file"] for s in meta["tensors"]["shards"][:2])
    tensors = load_file(str(second))
    tensors.update(dict(list(load_file(str(first)).items())[:1]))
    save_file(tensors, str(second))
    meta["tensors"]["shards"][1].update(bytes=second.stat().st_size, sha256=sha256_file(second))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is in both model-00001-of-.* and model-00002-of-"):
        load_quantized(tmp_path)


def test_saving_again_removes_the_shards_of_the_earlier_save(tmp_path):
    model, shards = _sharded(tmp_path, "30KB")
    save_quantized(model, tmp_path)  # one file now
    assert sorted(p.name for p in tmp_path.glob("model*")) == [TENSOR_FILE]
    assert len(read_metadata(tmp_path)["tensors"]["shards"]) == 1 < len(shards)
    _assert_same(model, load_quantized(tmp_path))


def test_format_version_1_still_loads(tmp_path):
    model, _ = _quantized(_llama)
    save_quantized(model, tmp_path)
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    (shard,) = meta["tensors"]["shards"]
    meta.update(format_version=1, tensors=shard)  # as version 1 wrote it: {"file", "bytes", "sha256"}
    meta_path.write_text(json.dumps(meta))
    _assert_same(model, load_quantized(tmp_path))
    meta["tensors"] = {}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists no tensor files"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20),
                                            ("1.5kb", 1500), (" 2 GiB ", 2 * 2**30)])
def test_shard_sizes_read_like_transformers(size, expected):
    from glowq_fx.checkpoint.shards import parse_size

    assert parse_size(size) == expected


@pytest.mark.parametrize("bad", ["5 gigs", "", 0, -1, "GB"])
def test_bad_shard_sizes_are_named(bad, tmp_path):
    model, _ = _quantized(_llama)
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(model, tmp_path, max_shard_size=bad)


def test_the_shard_writer_streams_tensors_that_safetensors_reads_back(tmp_path, gen):
    """Every dtype a checkpoint holds, mixed and across shards: safetensors' own reader gives each
    tensor back bit for bit, each starting at a multiple of its element size; the bytes are taken
    when a tensor is added (changing it afterwards changes nothing written), so the writer holds no
    tensor, and the index maps each key to its shard."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from glowq_fx.checkpoint.shards import INDEX_FILE, ShardWriter

    tensors = {
        "a.qweight": torch.randint(-2**31, 2**31 - 1, (7, 5), dtype=torch.int32, generator=gen),
        "a.scales": torch.randn(7, 3, generator=gen).to(torch.bfloat16),
        "a.zeros": torch.randint(0, 255, (7, 3), dtype=torch.uint8, generator=gen),
        "b.half": torch.randn(3, generator=gen).to(torch.float16),
        "b.double": torch.randn(2, 2, generator=gen).double(),
        "b.scalar": torch.tensor(1.5),
        "b.empty": torch.empty(0, 4),
        "b.flag": torch.tensor([True, False, True]),
        "c.view": torch.randn(6, 6, generator=gen)[1::2, :3],  # not contiguous
        "c.long": torch.arange(5),
    }
    expected = {k: v.clone() for k, v in tensors.items()}
    writer = ShardWriter(tmp_path, 120, metadata={"format": "test"})
    for key, t in tensors.items():
        writer.add({key: t})
        t.zero_() if t.dtype != torch.bool else t.logical_not_()  # too late: already on disk
    records = writer.close()
    assert len(records) > 1
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert set(index) == set(expected)
    for rec in records:
        loaded = load_file(str(tmp_path / rec["file"]))
        with open(tmp_path / rec["file"], "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        with safe_open(str(tmp_path / rec["file"]), framework="pt") as f:
            assert f.metadata() == {"format": "test"}
        for key, t in loaded.items():
            assert index[key] == rec["file"]
            assert t.dtype == expected[key].dtype and torch.equal(t, expected[key])
            assert header[key]["data_offsets"][0] % expected[key].element_size() == 0
