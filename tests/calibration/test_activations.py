"""calibration.activations: cached entries come back equal from every place, shared tensors once."""
from collections import namedtuple

import pytest
import torch

from glowq_fx.calibration import activations
from glowq_fx.calibration.activations import ActivationStore, choose_place, nbytes

Pair = namedtuple("Pair", "cos sin")


def _entry(gen):
    mask = torch.randn(2, 1, 5, 5, generator=gen)
    marker = object()  # not a tensor, not picklable by weights_only: must survive the disk too
    return [((torch.randn(2, 5, 8, generator=gen),), {"mask": mask, "rope": Pair(torch.ones(3), torch.zeros(3)),
                                                      "flag": False, "n": 3, "none": None, "other": marker}),
            ((), {"mask": mask})], marker


@pytest.mark.parametrize("place", ["device", "cpu", "disk"])
def test_entries_come_back_equal_with_shared_tensors_shared(place, gen, tmp_path):
    entry, marker = _entry(gen)
    with ActivationStore(place, torch.device("cpu"), tmp_path) as store:
        store[0] = entry
        store[1] = entry[0][0][0]
        back = store[0]
        assert torch.equal(store[1], entry[0][0][0]) and len(store) == 2
    (args, kw), (_, kw1) = back
    assert torch.equal(args[0], entry[0][0][0]) and torch.equal(kw["mask"], entry[0][1]["mask"])
    assert kw["mask"] is kw1["mask"]  # one tensor, stored once
    assert isinstance(kw["rope"], Pair) and torch.equal(kw["rope"].cos, torch.ones(3))
    assert (kw["flag"], kw["n"], kw["none"], kw["other"]) == (False, 3, None, marker)
    assert list(tmp_path.iterdir()) == []  # close removed what the disk store wrote
    with pytest.raises(KeyError, match="no cached activations for batch 7"):
        store[7]


def test_nbytes_counts_each_tensor_once(gen):
    entry, _ = _entry(gen)
    assert nbytes(entry) == (2 * 5 * 8 + 2 * 25 + 3 + 3) * 4


def test_auto_takes_the_first_place_with_room(monkeypatch):
    free = {"cuda": 100, "cpu": 1000}
    monkeypatch.setattr(activations, "free_bytes", lambda device: free[torch.device(device).type])
    assert choose_place("auto", 40, torch.device("cuda")) == "device"
    assert choose_place("auto", 60, torch.device("cuda")) == "cpu"
    assert choose_place("auto", 600, torch.device("cuda")) == "disk"
    assert choose_place("auto", 400, torch.device("cpu")) == "device"
    assert choose_place("cpu", 10**15, torch.device("cuda")) == "cpu"
    with pytest.raises(ValueError, match="activations must be one of"):
        choose_place("gpu", 1, torch.device("cpu"))


def test_free_cpu_memory_is_measured():
    assert 0 < activations.free_bytes(torch.device("cpu")) < 2**50
