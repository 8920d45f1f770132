"""selective.corrections: switching corrections in place and restoring them."""
import pytest
import torch

from glowq_fx.selective.corrections import Corrections
from tests_helpers import logits, quantized_copy


def test_switching_everything_off_is_rtn_and_back_on_is_glowq(glowq_s_model):
    glowq, report = quantized_copy(glowq_s_model)
    rtn, _ = quantized_copy(glowq_s_model, method="none")
    ids = torch.randint(0, 128, (2, 16))
    full = logits(glowq, ids)
    corrections = Corrections(glowq)
    assert sorted(corrections.names) == sorted(g.name for g in report.groups)
    corrections.set([])
    assert torch.equal(logits(glowq, ids), logits(rtn, ids))
    corrections.set(corrections.names)
    assert torch.equal(logits(glowq, ids), full)
    with pytest.raises(ValueError, match="unknown correction units"):
        corrections.set(["model.layers.9.mlp.down_proj"])
    with pytest.raises(ValueError, match="no low-rank corrections"):
        Corrections(rtn)


def test_restored_brings_back_the_units_enabled_on_entry_even_after_an_error(glowq_s_model):
    model, _ = quantized_copy(glowq_s_model)
    corrections = Corrections(model)
    some = set(corrections.names[:2])
    corrections.set(some)
    with pytest.raises(RuntimeError, match="inside"):
        with corrections.restored():
            corrections.set([])
            assert corrections.enabled == set()
            raise RuntimeError("inside")
    assert corrections.enabled == some
    kept = {n for n in corrections.names if corrections.modules(n)[0].A is not None}
    assert kept == some  # the modules themselves, not only the bookkeeping
