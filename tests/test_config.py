import dataclasses
import json

import pytest

from glowq_fx.config import (
    CONFIG_VERSION,
    CalibrationConfig,
    CorrectionConfig,
    ExpertsConfig,
    GlowQConfig,
    OnLoadDataConfig,
    QuantizationConfig,
    TargetsConfig,
)


def test_json_round_trip():
    cfg = GlowQConfig(group_size=64, quantizer="gptq", method="qera", rank=32, shrinkage=0.1)
    assert GlowQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["version"] == CONFIG_VERSION


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bits": 3}, "bits=3"),
        ({"group_size": 100}, "group_size=100"),
        ({"quantizer": "awq"}, "unknown quantizer 'awq'"),
        ({"method": "lora"}, "unknown method 'lora'"),
        ({"svd": "lanczos"}, "svd='lanczos'"),
        ({"rank": -1}, "rank"),
        ({"shrinkage": 1.5}, "shrinkage"),
        ({"gptq_damp": 1.0}, "gptq_damp"),
        ({"power_iters": -1}, "power_iters"),
        ({"version": CONFIG_VERSION + 1}, "newer"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        GlowQConfig(**kwargs)


def test_unknown_field_in_dict_raises():
    with pytest.raises(ValueError, match="unknown GlowQConfig fields"):
        GlowQConfig.from_dict({"rank": 8, "rnak": 8})


# what the flat GlowQConfig of the previous release wrote into a checkpoint (version 1)
FLAT_V1 = {"bits": 4, "group_size": 64, "symmetric": False, "quantizer": "gptq", "gptq_damp": 0.01,
           "gptq_block_size": 128, "gptq_act_order": False, "method": "glowq", "rank": 16, "shrinkage": 0.05,
           "svd": "randomized", "oversample": None, "power_iters": 2, "seed": 0, "stats_dtype": "float32",
           "include": [], "exclude": ["lm_head"], "quantize_output_head": False, "output_head_bits": 8,
           "embedding_bits": 8, "factor_dtype": "auto", "min_out_features": 32, "experts": True,
           "expert_weighting": "none", "expert_refit": False, "expert_own_input_rank": None, "selective": None,
           "calibration": "blocks", "block_inputs": "float", "activations": "auto", "offload_dir": None,
           "dataset": "news", "tokenizer": None, "n_samples": 32, "seq_len": 512, "version": 1}


def test_old_flat_checkpoint_metadata_loads_into_the_parts_and_writes_back_the_same():
    cfg = GlowQConfig.from_dict({"quant_method": "glowq", **FLAT_V1})
    assert cfg.quantization == QuantizationConfig(group_size=64, quantizer="gptq")
    assert cfg.correction == CorrectionConfig(rank=16)
    assert cfg.targets == TargetsConfig(exclude=("lm_head",), embedding_bits=8)
    assert cfg.calibration_run == CalibrationConfig(calibration="blocks")
    assert cfg.on_load == OnLoadDataConfig(dataset="news") and cfg.moe == ExpertsConfig()
    # it writes back every key it read, the same; options added since then come with their defaults
    written = cfg.to_dict()
    assert {k: written[k] for k in FLAT_V1} == FLAT_V1
    assert {k: written[k] for k in set(written) - set(FLAT_V1)} == {"first_position_weight": 1.0, "alternations": 0,
                                                                   "expert_selection": "whole", "gptq_shrink": 0.0}


def test_parts_and_flat_keywords_build_the_same_config():
    flat = GlowQConfig(rank=32, quantizer="gptq", calibration="model", exclude=["x"], n_samples=4)
    parts = GlowQConfig(correction=CorrectionConfig(rank=32), quantization=QuantizationConfig(quantizer="gptq"),
                        calibration_run=CalibrationConfig(calibration="model"), targets=TargetsConfig(exclude=["x"]),
                        on_load=OnLoadDataConfig(n_samples=4))
    assert flat == parts and flat.to_dict() == parts.to_dict()
    # a flat keyword overrides its part's value; the part passed in is not changed
    given = CorrectionConfig(rank=32)
    assert GlowQConfig(correction=given, rank=8).rank == 8 and given.rank == 32
    assert GlowQConfig.from_dict({"correction": {"rank": 5}}).correction.rank == 5
    assert dataclasses.replace(flat, rank=4).correction == CorrectionConfig(rank=4)


def test_parts_validate_alone_and_flat_writes_are_validated():
    with pytest.raises(ValueError, match="rank"):
        CorrectionConfig(rank=-1)
    with pytest.raises(ValueError, match="calibration='layers'"):
        CalibrationConfig(calibration="layers")
    with pytest.raises(ValueError, match="correction must be a CorrectionConfig"):
        GlowQConfig(correction=QuantizationConfig())
    with pytest.raises(ValueError, match="unknown GlowQConfig options \\['rnak'\\]"):
        GlowQConfig(rnak=4)
    cfg = GlowQConfig()
    cfg.rank = 16
    assert cfg.correction.rank == 16
    with pytest.raises(ValueError, match="group_size=100"):
        cfg.group_size = 100
    assert cfg.group_size == 128  # a refused write leaves the part as it was


def test_a_flat_option_on_the_class_reads_its_default():
    assert GlowQConfig.min_out_features == TargetsConfig().min_out_features
    assert GlowQConfig.rank == CorrectionConfig().rank and GlowQConfig.quantizer == QuantizationConfig().quantizer
