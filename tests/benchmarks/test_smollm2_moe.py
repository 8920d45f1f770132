"""benchmarks/smollm2_moe: a dense Llama split into experts computes the dense model exactly when
every expert is active; the sparse variant routes each token to its top-k by a fitted router."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests_helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def test_every_expert_active_computes_the_dense_model():
    moe = _load("smollm2_moe")
    dense = tiny_llama(seed=3)
    model = moe.dense_to_moe(dense, 8)
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 8
    with torch.no_grad():
        a, b = dense(input_ids=IDS).logits, model(input_ids=IDS).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * a.abs().max().item() + 1e-6)


def test_the_sparse_router_sends_each_token_to_the_experts_that_contribute_most():
    moe = _load("smollm2_moe")
    dense = tiny_llama(seed=3)
    routers = moe.fit_routers(dense, [IDS], 8)
    model = moe.dense_to_moe(dense, 8, 2, routers)
    picked = []
    model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, args: picked.append(args[1]))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()
    index = picked[0]
    assert index.shape == (IDS.numel(), 2) and (index[:, 0] != index[:, 1]).all()
    # the router is the least-squares fit of the experts' centred log output norms: it ranks them
    # better than chance on the tokens it was fit on
    captured = []
    dense.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        dense(input_ids=IDS)
        x = captured[0]
        norms = moe.expert_outputs(dense.model.layers[0].mlp, x, 8).norm(dim=-1).T  # (T, E)
    best = norms.argmax(dim=-1)
    hit = (index == best[:, None]).any(dim=-1).float().mean()
    assert hit > 2 / 8 + 0.1
    with pytest.raises(ValueError, match="needs its routers"):
        moe.dense_to_moe(dense, 8, 2)
    with pytest.raises(ValueError, match="do not split into 5 equal experts"):
        moe.dense_to_moe(dense, 5)


def test_equal_bytes_rank_matches_the_independent_bytes():
    bench = _load("bench_moe")
    for E, N, H, r in [(8, 384, 576, 32), (128, 1536, 2048, 64), (8, 28672, 4096, 16)]:
        shared = bench.equal_bytes_rank(r, E, N, H)
        assert abs(shared * (E * N + H) - r * E * (N + H)) <= (E * N + H) / 2  # the nearest whole rank
    for a in bench.correction_arithmetic(64):
        assert a["shared_values"] < a["independent_values"]
        assert a["saving"] == pytest.approx((a["experts"] - 1) * a["hidden"] /
                                            (a["experts"] * (a["gate_up_out"] + a["hidden"])))


def test_neuron_grouping_is_balanced_and_keeps_the_dense_function():
    moe = _load("smollm2_moe")
    dense = tiny_llama(seed=3)
    inputs = moe.mlp_inputs(dense, [IDS])
    perms = moe.group_neurons(dense, inputs, 8)
    for perm in perms:  # a permutation of the 128 neurons
        assert sorted(perm.tolist()) == list(range(128))
    X = torch.nn.functional.normalize(torch.randn(64, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    assign = moe.balanced_kmeans(X, 4)
    assert torch.bincount(assign, minlength=4).tolist() == [16] * 4
    grouped = moe.permuted(dense, perms)
    with torch.no_grad():
        torch.testing.assert_close(grouped(input_ids=IDS).logits, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not split into 3 equal clusters"):
        moe.balanced_kmeans(X, 3)
