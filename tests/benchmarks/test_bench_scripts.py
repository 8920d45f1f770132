"""The GPU benchmark scripts' code paths, run small on the CPU (their numbers come from the GPU)."""
import pytest

from tests_helpers import ROOT
from tests_helpers import load_benchmark as _load


@pytest.mark.slow
def test_selective_decode_benchmark_runs_every_variant_on_a_tiny_model(capsys):
    bench = _load("bench_selective_decode")
    assert bench.main(["--tiny", "--layers", "1", "--new-tokens", "4", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    for variant in ("float32", "W4A16", "independent (QERA)", "GlowQ", "GlowQ-S (keep 0.5)",
                    "GlowQ rank 16 (every group)"):
        assert f"{variant}: " in printed


def test_selective_decode_benchmark_refuses_a_cpu_only_full_run(monkeypatch):
    bench = _load("bench_selective_decode")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA machine"):
        bench.main([])
    with pytest.raises(SystemExit, match="compare-rank must lie"):
        bench.main(["--compare-rank", "64"])


def test_first_token_weighting_counts_the_first_position_c_times():
    """c = 1 gives calibrate's S; S(c) = S(0) + c (S(1) - S(0)) for any c (the first position's
    share scales linearly), and S(0) differs from S(1) (the first position was really there)."""
    import torch

    from glowq_fx import GlowQConfig, calibrate
    from tests_helpers import random_llama

    probe = _load("probe_gptq_sink")
    model = random_llama().eval()
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    calibrated = calibrate(model, batches, GlowQConfig(rank=4), progress=False)
    S = {c: probe.first_token_weighted(model, calibrated, batches, c) for c in (0.0, 1.0, 7.0)}
    for g in calibrated.groups:
        s0, s1, s7 = (S[c][g.name].value() * S[c][g.name].n_tokens for c in (0.0, 1.0, 7.0))
        assert torch.allclose(S[1.0][g.name].value(), calibrated.statistics[g.name].value(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(s7, s0 + 7 * (s1 - s0), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(s0, s1)


def test_w4a16_benchmark_table_and_chosen_paths(tmp_path):
    """The GPU table's writer on the stored H100 results: every cell's ratio is recomputed from
    the JSON, and the ops' per-shape kernel choices are counted per kind and row count."""
    import json

    bench = _load("bench_w4a16")
    results = json.loads((ROOT / "benchmarks" / "results" / "w4a16_gpu.json").read_text())
    chosen = {("gemv", "cuda", "bf16", 4096, (4096,), 64, 128, True, False): "split",
                                          ("gemv", "cuda", "bf16", 14336, (4096,), 64, 128, True, False): "plain",
                                          ("small_m", "cuda", "bf16", 4, 4096, (4096,), 64, 128, True, False): "rows",
                                          ("small_m", "cuda", "bf16", 4, 4096, (14336, 14336), 0, 128, False, False):
                                              "rows"}
    results["chosen_paths"] = bench.chosen_paths(chosen)
    assert results["chosen_paths"] == {"gemv": {"split": 1, "plain": 1}, "small_m M=4": {"rows": 2}}
    bench.write(results, tmp_path)
    table = (tmp_path / "w4a16_gpu.md").read_text()
    assert "gemv: plain 1, split 1; small_m M=4: rows 2." in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    bf16_m1 = results["rows"]["bf16 cuBLAS"]["1"]["us_per_layer"]
    glowq_m1 = results["rows"]["GlowQ fused"]["1"]["us_per_layer"]
    assert f"{bf16_m1 / glowq_m1:.2f}x bf16" in rows["GlowQ fused"].split(" | ")[1]
    assert json.loads((tmp_path / "w4a16_gpu.json").read_text())["chosen_paths"] == results["chosen_paths"]


@pytest.mark.slow  # a benchmark script end to end, 35-60 s (make test-slow)
def test_blockwise_memory_benchmark_measures_both_modes_in_child_processes(tmp_path):
    bench = _load("bench_blockwise")
    assert bench.main(["--layers", "2", "--tiny", "--tokens", "32", "--batches", "2", "--repeats", "2", "--out",
                       str(tmp_path / "mem")]) == 0
    results = __import__("json").loads((tmp_path / "mem.json").read_text())
    modes = {r["mode"]: r for r in results["rows"]}
    assert modes["blocks"]["calibration"]["mode"] == "blocks" and modes["model"]["calibration"]["mode"] == "model"
    assert all(r["quantized"] == "QuantizedLinear" and r["added_mib"] > 0 for r in results["rows"])
    assert all(len(r["added_mib_runs"]) == 2 and r["added_mib"] in r["added_mib_runs"] for r in results["rows"])
    table = (tmp_path / "mem.md").read_text()
    assert "| 2 |" in table and "correction solve" in table



@pytest.mark.slow  # a benchmark script end to end, 35-60 s (make test-slow)
def test_calibration_logits_benchmark_compares_computed_and_spared_logits(tmp_path):
    bench = _load("bench_calibration_logits")
    assert (
        bench.main(["--tiny", "--layers", "2", "--samples", "8", "--tokens", "32", "--out", str(tmp_path / "l")]) == 0
    )
    results = __import__("json").loads((tmp_path / "l.json").read_text())
    assert {(r["calibration"], r["spare_logits"]) for r in results["rows"]} == {
        (c, s) for c in ("blocks", "model") for s in (False, True)}
    assert all(r["added_mib"] > 0 for r in results["rows"])
    assert "| model |" in (tmp_path / "l.md").read_text()


def test_gpu_quantize_benchmark_runs_block_by_block_with_weights_left_on_the_cpu(tmp_path, monkeypatch):
    bench = _load("bench_quantize_gpu")
    assert bench.main(["--tiny", "--samples", "2", "--seq-len", "32", "--rank", "4", "--out", str(tmp_path)]) == 0
    row = __import__("json").loads((tmp_path / "quantize_gpu.json").read_text())["row"]
    assert row["quantized"] == "QuantizedLinear" and row["weights_after_on"] == "cpu"
    assert row["layers"] == bench.SHAPES["tiny"]["num_hidden_layers"] and row["peak_gpu_bytes"] is None
    assert row["wall_s"] >= sum(row["per_block"][k] for k in ("forwards_s", "quantizer_s", "solve_s")) * row["layers"]
    assert "tiny (measured)" in (tmp_path / "quantize_gpu.md").read_text()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA machine"):
        bench.main([])


def test_block_sizes_of_the_8b_shape():
    bench = _load("bench_quantize_gpu")
    sizes = bench.block_sizes(bench.SHAPES["8b"])
    # Llama-3-8B: 218.1M parameters per decoder layer in bf16; S of q/k/v, o, gate/up (4096) and down (14336)
    assert sizes["weights"] == 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 436_207_616
    assert sizes["S"] == 4 * (3 * 4096**2 + 14336**2) and sizes["factor"] == 4 * 14336**2


def test_decompose_benchmark_sets_the_solver_s_sketch_beside_the_paper_s_qr_reduced_one():
    """Both sketch the same operator with the same seed: the same objective to rounding, and both
    within a few percent of exact SVD's (which no randomized variant beats)."""
    bench = _load("bench_decompose")
    res = bench.run("cpu", rank=8, repeats=1, shrinkage=0.05, scale=32)
    by = {(r["group"], r["variant"]): r for r in res["rows"]}
    for group in bench.GROUPS:
        ours = by[group, "randomized (ours)"]["objective_ratio"]
        paper = by[group, "QR-reduced (paper's algorithm, our sketch)"]["objective_ratio"]
        assert abs(ours - paper) < 1e-4 * ours, (group, ours, paper)
        assert 1 - 1e-6 <= ours < 1.1
    assert "| - | - |" in bench.to_markdown(res)


def test_base_shift_probe_counts_the_weights_the_codes_reproduce(tmp_path):
    """The dequantized codes reproduce every weight of a model that already lies on their grid and
    not the float model's; the collector refuses a log without results."""
    import copy

    import torch

    from glowq_fx import GlowQConfig, quantize_
    from tests_helpers import random_llama, token_batches

    probe = _load("probe_base_shift")
    model = random_llama().eval()
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n}
    quantized = copy.deepcopy(model)
    quantize_(quantized, token_batches(vocab=model.config.vocab_size), GlowQConfig(group_size=32, rank=2,
                                                                                  output_head_bits=None),
              progress=False)
    on_grid = {n: quantized.get_submodule(n).dequantized_weight(torch.float32) for n in floats}
    assert probe.exact_fraction(quantized, on_grid) == 1.0
    assert probe.exact_fraction(quantized, floats) < 0.05
    (tmp_path / "empty.jsonl").write_text("no results here\n")
    with pytest.raises(SystemExit, match="no result lines"):
        probe.collect([str(tmp_path / "empty.jsonl")])


def test_base_shift_collector_keeps_the_reading_notes_and_names_gptq_settings(tmp_path, monkeypatch):
    """Rendering again keeps the text under the table; each GPTQ line names its damping, order and
    shrink (lines written before those options: the defaults), RTN-based lines none."""
    import json

    probe = _load("probe_base_shift")
    monkeypatch.setattr(probe, "RESULTS", tmp_path / "base_shift")
    common = {"group_size": 64, "rank": 5, "quantize_s": 1.0, "calibration_error_before": 2.0,
              "calibration_error_after": 1.0, "exact_fraction": 0.0, "held_out_news_nll": 3.0,
              "wikipedia_ppl": 20.0, "machine": "test", "torch": "x", "date": "today"}
    lines = [{"quantizer": "fitted", **common}, {"quantizer": "fitted-gptq", **common},
             {"quantizer": "fitted-gptq", "gptq_damp": 0.1, "gptq_act_order": True, **common},
             {"quantizer": "fitted-gptq", "gptq_damp": 0.01, "gptq_shrink": 0.5, **common}]
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    probe.collect([str(log)])
    md = tmp_path / "base_shift.md"
    assert md.read_text().endswith("|\n")
    md.write_text(md.read_text() + "\nReading: a note.\n")
    probe.collect([str(log)])
    probe.collect([str(log)])
    text = md.read_text()
    assert text.count("Reading: a note.") == 1 and text.endswith("|\n\nReading: a note.\n")
    rows = [line for line in text.splitlines() if line.startswith("| fitted")]
    assert [r.split(" | ")[1] for r in rows] == ["", "damp 0.01, in order", "damp 0.1, act-order",
                                                "damp 0.01, in order, shrink 0.5"]
    assert json.loads((tmp_path / "base_shift.json").read_text()) == lines
