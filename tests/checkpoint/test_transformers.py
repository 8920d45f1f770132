"""checkpoint.transformers: a glowq checkpoint is a transformers checkpoint. from_pretrained loads
what save_quantized wrote, bit for bit as load_quantized; save_pretrained of a quantized model
writes what both loaders read; bad checkpoints are refused with the problem named."""
import json
import shutil

import pytest
import torch
import transformers as T

import glowq_fx
from glowq_fx import GlowQConfig, load_quantized, quantize_, save_quantized
from glowq_fx.checkpoint.shards import CheckpointError
from glowq_fx.modules import QuantizedLinear
from tests_helpers import tiny_llama_config, token_batches


def _quantized(tied=False, **config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, rank=8, **config), progress=False)
    return model, report


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    vocab = a.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


# the untied quantized head's bf16 factor "lm_head.A" is the file's first floating tensor: config.json's dtype
# keeps transformers' dtype="auto" from taking it for the model's
@pytest.mark.parametrize("config", [{}, {"quantize_output_head": True, "embedding_bits": 4}, {"method": "qera"},
                                    {"quantize_output_head": True}])
def test_from_pretrained_loads_what_save_quantized_wrote(tmp_path, config):
    tied = "embedding_bits" in config
    model, report = _quantized(tied=tied, **config)
    save_quantized(model, tmp_path, report=report, max_shard_size="60KB")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["quantization_config"]["quant_method"] == "glowq" and written["dtype"] == "float32"
    ours = load_quantized(tmp_path)
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(theirs.model.layers[1].mlp.down_proj, QuantizedLinear)
    _same(ours, theirs)
    _same(ours, model)
    if tied:
        assert theirs.lm_head.qweight is theirs.model.embed_tokens.qweight


def test_save_pretrained_writes_what_both_loaders_read(tmp_path):
    model, _ = _quantized()
    model.save_pretrained(tmp_path / "a", max_shard_size="60KB")  # transformers' own sharded writer
    assert not (tmp_path / "a" / "glowq.json").exists()
    _same(load_quantized(tmp_path / "a"), model)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    _same(loaded, model)
    loaded.save_pretrained(tmp_path / "b")  # and again, from the loaded model
    _same(load_quantized(tmp_path / "b"), model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_honoured_by_both_loaders(tmp_path, dtype):
    model, report = _quantized(quantize_output_head=True)  # float32, factors in bfloat16
    save_quantized(model, tmp_path, report=report)
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    ours = load_quantized(tmp_path, dtype=dtype)
    _same(ours, theirs)
    stored = load_quantized(tmp_path).state_dict()
    for key, t in theirs.state_dict().items():
        # what the checkpoint holds in its model dtype is cast, the codes and the narrower factors are as stored
        expected = stored[key].to(dtype) if stored[key].dtype == torch.float32 else stored[key]
        assert t.dtype == expected.dtype and torch.equal(t, expected), key
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, cast = model(input_ids=ids).logits, theirs(input_ids=ids).logits.float()
    assert cast.dtype == torch.float32 and (cast - reference).abs().max() < 0.05 * reference.abs().max()


def test_the_loaded_model_compiles_with_the_glowq_backend(tmp_path):
    model, report = _quantized()
    save_quantized(model, tmp_path, report=report)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(loaded, backend=glowq_fx.glowq_backend)
    # 1e-4: the CPU GEMV rounds its activations to int16 (one step ~3e-5 of a block's largest), and
    # Inductor's fused norms can move an activation across a rounding boundary
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_checkpoints_are_refused_by_from_pretrained(tmp_path):
    model, report = _quantized()
    save_quantized(model, tmp_path / "ok", report=report, max_shard_size="60KB")

    def copy(name):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        return tmp_path / name

    newer = copy("newer")
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer than this glowq-fx reads"):
        T.AutoModelForCausalLM.from_pretrained(newer)

    edited = copy("edited")
    cfg = json.loads((edited / "config.json").read_text())
    cfg["quantization_config"]["linears"]["model.layers.0.mlp.down_proj"]["rank"] = 3
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="disagrees with its glowq.json on linears"):
        T.AutoModelForCausalLM.from_pretrained(edited)

    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ok", device_map="cpu")  # a device map is honoured
    assert loaded.model.layers[0].mlp.up_proj.qweight.device.type == "cpu"

    missing = copy("missing")
    next(missing.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises((CheckpointError, OSError), match="missing|model-00002"):
        T.AutoModelForCausalLM.from_pretrained(missing)


def test_registration_is_idempotent_and_refuses_a_foreign_glowq():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from glowq_fx.checkpoint.transformers import register
    from glowq_fx.quantize.on_load import GlowQOnLoadQuantizer

    register(GlowQOnLoadQuantizer)  # what import glowq_fx did: again, a no-op
    assert AUTO_QUANTIZER_MAPPING["glowq"] is GlowQOnLoadQuantizer
    saved = AUTO_QUANTIZER_MAPPING["glowq"]
    AUTO_QUANTIZER_MAPPING["glowq"] = type("Other", (), {})
    try:
        with pytest.raises(RuntimeError, match="already has a quantization method 'glowq'"):
            register(GlowQOnLoadQuantizer)
    finally:
        AUTO_QUANTIZER_MAPPING["glowq"] = saved


def test_the_cli_reads_a_checkpoint_saved_either_way(tmp_path, capsys):
    from glowq_fx.cli.main import main
    from tests.cli.test_main import _tiny_model_dir

    words = [f"w{i}" for i in range(60)]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i % 60] for i in range(2000)))
    _tiny_model_dir(tmp_path / "float", words)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "float")
    quantize_(model, token_batches(vocab=61), GlowQConfig(group_size=32, rank=8), progress=False)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["eval", str(tmp_path / "hf"), "--text", str(text), "--seq-len", "64", "--max-tokens", "300"]) == 0
    assert "quantized checkpoint" in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "hf"), "--tokens", "8", "--repeats", "1"]) == 0
    assert "glowq_backend" in capsys.readouterr().out


def _float_dir(tmp_path):
    from tests.cli.test_main import _tiny_model_dir

    words = [f"w{i}" for i in range(60)]
    text = " ".join(words[(i * 7) % 60] for i in range(3000))
    return _tiny_model_dir(tmp_path / "float", words), text


def test_from_pretrained_with_a_glowq_config_quantizes_on_load(tmp_path):
    from glowq_fx.quantize.on_load import calibration_data

    directory, text = _float_dir(tmp_path)
    config = GlowQConfig(group_size=32, rank=8, dataset=[text], n_samples=4, seq_len=64)
    model = T.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    assert model.glowq_report.n_batches == 1 and model.glowq_report.n_tokens == 4 * 64
    # the same as quantize_ on the same windows
    reference = T.AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = T.AutoTokenizer.from_pretrained(directory)
    quantize_(reference, calibration_data(config, tokenizer), config, progress=False)
    _same(model, reference)
    model.save_pretrained(tmp_path / "q")  # and it saves as a glowq checkpoint
    _same(T.AutoModelForCausalLM.from_pretrained(tmp_path / "q"), reference)
    with pytest.raises(ValueError, match="needs calibration data"):
        T.AutoModelForCausalLM.from_pretrained(directory, quantization_config=GlowQConfig(group_size=32))


def test_optimum_quantizer_interface(tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    from glowq_fx import GlowQQuantizer

    directory, text = _float_dir(tmp_path)
    (tmp_path / "calib.txt").write_text(text)
    quantizer = GlowQQuantizer.from_pretrained(str(directory), config=GlowQConfig(
        group_size=32, rank=8, dataset=str(tmp_path / "calib.txt"), n_samples=4, seq_len=64))
    assert isinstance(quantizer, OptimumQuantizer)
    report = quantizer.quantize(tmp_path / "q")
    assert report.n_tokens == 4 * 64
    loaded = load_quantized(tmp_path / "q")
    _same(loaded, quantizer.model)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="drop file_prefix"):
        quantizer.quantize(tmp_path / "r", file_prefix="x")


def test_generate_and_pipeline_run_the_loaded_model(tmp_path):
    directory, text = _float_dir(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(directory, quantization_config=GlowQConfig(
        group_size=32, rank=8, dataset=[text], n_samples=2, seq_len=32))
    tokenizer = T.AutoTokenizer.from_pretrained(directory)
    model.save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)  # fresh random weights may pick EOS early
    out = loaded.generate(ids, **greedy)
    assert torch.equal(out, model.generate(ids, **greedy)) and out.shape[1] == ids.shape[1] + 5
    generated = T.pipeline("text-generation", model=loaded, tokenizer=tokenizer)("w1 w2", max_new_tokens=3,
                                                                                   do_sample=False)
    assert generated[0]["generated_text"].startswith("w1 w2")


def test_without_glowq_imported_transformers_names_the_method(tmp_path):
    """transformers only warns about a method it does not know; the warning names 'glowq' (the
    README says: import glowq_fx first). Run in a fresh interpreter, where nothing imported it."""
    import subprocess
    import sys

    model, report = _quantized()
    save_quantized(model, tmp_path, report=report)
    code = ("import transformers, warnings; transformers.logging.set_verbosity_warning(); "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "glowq" in done.stderr + done.stdout
