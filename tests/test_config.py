import json

import pytest

from glowq_fx.config import CONFIG_VERSION, GlowQConfig


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
