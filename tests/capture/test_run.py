"""capture.run: the checks on the model and the calibration batches, each bad input named."""
import pytest
import torch
from torch import nn

from glowq_fx import GlowQConfig, quantize_
from tests_helpers import tiny_llama, token_batches

V = 128


def test_no_linear_model():
    with pytest.raises(ValueError, match="has no nn.Linear or Conv1D layers"):
        quantize_(nn.Sequential(nn.ReLU()), [torch.ones(2, 3)], progress=False)


def test_already_quantized():
    model = tiny_llama()
    quantize_(model, token_batches(1), GlowQConfig(rank=4), progress=False)
    with pytest.raises(ValueError, match="already quantized by glowq-fx"):
        quantize_(model, token_batches(1), progress=False)
    other = tiny_llama()
    other.config.quantization_config = {"quant_method": "gptq"}
    with pytest.raises(ValueError, match=r"already quantized \(quantization_config: gptq\)"):
        quantize_(other, token_batches(1), progress=False)
    int8 = nn.Sequential(nn.Linear(4, 4))
    int8[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"0 has a torch.int8 weight"):
        quantize_(int8, [torch.ones(1, 4)], progress=False)


@pytest.mark.parametrize("bad, match", [
    ([], "calibration is empty"),
    (5, "must be an iterable of batches"),
    ([{"input_ids": torch.rand(2, 8)}], "input_ids must be integer token ids"),
    ([{"input_ids": torch.zeros(8, dtype=torch.long)}], r"must be \(batch, sequence\)"),
    ([{"input_ids": torch.zeros(2, 0, dtype=torch.long)}], "is empty"),
    ([{"input_ids": torch.full((1, 4), V)}], r"token ids span \[128, 128\] but the vocabulary has 128"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 5)}],
     "attention_mask shape"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long, device="meta")}], "is on meta but the model is on cpu"),
    ([{"inputs_embeds": torch.zeros(1, 4, 64, dtype=torch.float64)}], "is torch.float64 but the model computes"),
    (["text"], "holds no tensor"),
])


def test_bad_calibration(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_(tiny_llama(), bad, progress=False)
