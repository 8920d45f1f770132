"""A new user's path through the CLI: a GGUF as the model, and every mistake a clear one-line
error (or warning) that names the problem and the fix, before the model loads where it can."""
import pytest
import torch

from glowq_fx.cli.main import main
from tests_helpers import tiny_llama_config, tiny_qwen2, write_qwen2_gguf

TEXT = " ".join(f"the cat in the hat number {i} sat on the mat, then another one came in." for i in range(300))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOWQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def gguf_file(tmp_path):
    model = tiny_qwen2()
    path = tmp_path / "gguf" / "tiny-qwen2.gguf"
    path.parent.mkdir()
    write_qwen2_gguf(model, path, add_bos=True)
    return model, path


def _err(capsys) -> str:
    return capsys.readouterr().err


def _quick(text_file) -> list[str]:
    return ["--calib", str(text_file), "--calib-samples", "4", "--calib-len", "64", "--group-size", "32", "--rank",
            "8"]


def test_a_gguf_file_and_a_directory_holding_one_are_models(gguf_file, text_file, tmp_path, cache, capsys):
    from glowq_fx import load_quantized
    from glowq_fx.data.models import load_model

    model, path = gguf_file
    assert main(["quantize", str(path), "--out", str(tmp_path / "q"), *_quick(text_file)]) == 0
    out = capsys.readouterr().out
    assert "calibration windows start with the BOS token" in out  # the GGUF's tokenizer adds one
    loaded, tokenizer = load_model(str(path.parent))  # the directory: converted once, read from the cache
    assert len(list((cache / "models").iterdir())) == 1
    ids = torch.randint(0, 264, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, model(ids).logits)  # dequantized F32: the very model
    assert tokenizer("the cat")["input_ids"][0] == 263
    quantized = load_quantized(tmp_path / "q")
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    assert main(["eval", str(path), "--text", str(text_file), "--seq-len", "64", "--max-tokens", "256"]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    assert "BOS" in header and row.split()[-2] == "263"  # every window started with the GGUF's BOS
    assert main(["groups", str(path)]) == 0
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in capsys.readouterr().out


def test_a_gguf_transformers_cannot_read_names_its_architecture(tmp_path, cache, capsys):
    path = tmp_path / "odd.gguf"
    write_qwen2_gguf(tiny_qwen2(), path, architecture="rwkv7")
    assert main(["quantize", str(path), "--out", str(tmp_path / "q")]) == 2
    err = _err(capsys)
    assert "'rwkv7'" in err and "architecture transformers cannot read" in err
    truncated = tmp_path / "cut.gguf"
    write_qwen2_gguf(tiny_qwen2(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    assert main(["eval", str(truncated)]) == 2
    assert "truncated or not a GGUF" in _err(capsys)


def test_a_path_that_does_not_exist(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nothing"), "--out", str(tmp_path / "q")]) == 2
    err = _err(capsys)
    assert "no such file or directory" in err and "Repo id" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    assert "without config.json or a .gguf file" in _err(capsys)


def test_a_truncated_float_checkpoint_and_a_missing_tokenizer(tmp_path, capsys):
    import transformers as T

    from tests.cli.test_main import _tiny_model_dir

    T.LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "bare")
    assert main(["eval", str(tmp_path / "bare")]) == 2
    assert "needs its tokenizer files" in _err(capsys)
    _tiny_model_dir(tmp_path / "m", TEXT.split())
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert main(["eval", str(tmp_path / "m")]) == 2
    err = _err(capsys)
    assert "truncated or corrupted" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here(tmp_path, capsys, monkeypatch):
    import glowq_fx.data.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert main(["quantize", "smollm2", "--out", str(tmp_path / "q"), "--device", "cuda"]) == 2
    assert "--device 'cuda': this torch is built without CUDA; use cpu" in _err(capsys)
    assert main(["quantize", "smollm2", "--out", str(tmp_path / "q"), "--compute-device", "cuda:1"]) == 2
    assert "--compute-device 'cuda:1'" in _err(capsys)
    assert main(["eval", "smollm2", "--device", "potato"]) == 2
    assert "is not a device name" in _err(capsys)


def test_an_empty_text_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import glowq_fx.data.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["quantize", "smollm2", "--out", str(tmp_path / "q"), "--calib", str(tmp_path / "empty.txt")]) == 2
    assert "--calib" in (err := _err(capsys)) and "is empty" in err
    assert main(["eval", "smollm2", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "neither a built-in text" in _err(capsys)


def test_a_rank_no_correction_can_use_warns_that_it_exceeds_the_weights(tmp_path, text_file, capsys):
    import transformers as T

    from tests.cli.test_main import _tiny_model_dir

    directory = _tiny_model_dir(tmp_path / "m", TEXT.split())
    assert T.AutoConfig.from_pretrained(directory).hidden_size == 64
    args = ["quantize", str(directory), "--out", str(tmp_path / "q"), *_quick(text_file)]
    with pytest.warns(UserWarning, match=r"rank 100000 is at or above the full rank .* stores more values than the "
                                         r"weights it corrects; a rank below \d+ keeps"):
        assert main([*args[:-1], "100000"]) == 0
    capsys.readouterr()
    assert main([*args, "--method", "none"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "no correction" in header and "rank" not in header


def test_help_shows_the_defaults(capsys):
    for command, defaults in (("quantize", ["(default: news)", "(default: 32)", "(default: 512)", "(default: auto)"]),
                              ("eval", ["(default: wikipedia)", "(default: 2048)"]),
                              ("select", ["(default: wikipedia)", "(default: 8192)"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert all(d in out for d in defaults), (command, out)


def test_the_smollm2_gguf_quantizes_end_to_end_from_its_file(tmp_path, capsys):
    """The packaged SmolLM2 GGUF given as a file path: the generic GGUF path, not the built-in name."""
    from glowq_fx.data.models import smollm2_gguf
    from tests_helpers import or_skip

    path = or_skip(smollm2_gguf)
    assert main(["quantize", str(path), "--out", str(tmp_path / "q"), "--calib-samples", "1", "--calib-len", "32",
                 "--group-size", "64", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "210 linears in 120 groups" in out and "whole model" in out
    assert (tmp_path / "q" / "glowq.json").is_file() and (tmp_path / "q" / "tokenizer.json").is_file()
