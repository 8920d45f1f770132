"""The GlowQ-S tests' shared model: a 2-layer Llama calibrated once per module."""
import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, calibrate
from tests_helpers import tiny_llama_config


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=160, num_hidden_layers=2)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 32))} for _ in range(2)]
    cal = calibrate(model, batches, GlowQConfig(group_size=32), progress=False)
    return model, cal, batches
