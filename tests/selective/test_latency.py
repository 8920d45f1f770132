"""selective.latency: the per-unit correction latency model, with a fake clock."""
import pytest

from glowq_fx.selective.corrections import Corrections
from tests_helpers import quantized_copy


def test_cpu_latency_is_the_median_time_of_the_correction_ops(glowq_s_model, monkeypatch):
    from glowq_fx.selective import latency as latency_mod

    model, _ = quantized_copy(glowq_s_model)
    corrections = Corrections(model)
    calls = []

    def fake_time_ms(fn, reps, device):
        calls.append(fn())
        i = len(calls) - 1  # interleaved: plain launch, correction alone, plain, correction, ...
        return {0: 1.0, 1: 0.5, 2: 1.2, 3: 9.0, 4: 1.1, 5: 0.4}[i % 6]

    monkeypatch.setattr(latency_mod, "time_ms", fake_time_ms)
    name = corrections.names[0]
    members = corrections.modules(name)
    lat, shapes = latency_mod.measure_latency({name: members}, tokens=3, trials=3)
    assert lat.uncorrected_ms[shapes[name]] == 1.1 and lat.correction_ms[shapes[name]] == 0.5  # medians
    plain, correction = calls[0], calls[1]
    assert [t.shape for t in plain] == [t.shape for t in correction] == [(3, m.out_features) for m in members]
    with pytest.raises(ValueError, match="tokens must be positive"):
        latency_mod.measure_latency({name: members}, tokens=0)
    with pytest.raises(ValueError, match="no units"):
        latency_mod.measure_latency({})
    with pytest.raises(ValueError, match="no timing for unit shape"):
        lat.unit_ms(latency_mod.UnitShape(1, (2,), 3, 32, "float32", "cpu"))
