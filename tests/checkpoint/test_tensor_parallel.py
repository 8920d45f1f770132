"""checkpoint.tensor_parallel: a glowq checkpoint loads under transformers' tensor parallelism.
Two CPU processes (gloo) load quantized Llama and Qwen2 checkpoints with ``tp_plan``; their
logits equal the single-process model's within float32 reordering of the all-reduce's sum,
each rank holds its half of the split tensors, ``save_pretrained`` under tensor parallelism
writes the same checkpoint, ``glowq_backend`` compiles it, and plans the quantized layout cannot follow are refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, load_quantized, quantize_, save_quantized
from tests_helpers import tiny_llama_config, tiny_qwen2, token_batches

WORLD = 2
EXPERT_PARALLEL = ("qwen2_moe_ep", "mixtral_ep", "mixtral_some_experts_ep", "odd_experts")  # loaded with ep_size=WORLD
WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(7)).tolist()


def _llama(**overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def _checkpoints(root: Path) -> dict[str, Path]:
    """name -> checkpoint directory, quantized in this process."""
    made = {}

    def save(name, model, **config):
        quantize_(model, token_batches(), GlowQConfig(**{"group_size": 32, "rank": 8, **config}), progress=False)
        save_quantized(model, root / name)
        made[name] = root / name

    # biases on the members split by input (o, down) and a quantized head split by output
    save("llama", _llama(attention_bias=True, mlp_bias=True), quantize_output_head=True)
    save("qwen2_tied", tiny_qwen2(vocab_size=128), embedding_bits=4, quantize_output_head=True)
    save("qwen2_int8_tied", tiny_qwen2(vocab_size=128))  # the default: an int8 head, the table reading its codes
    save("llama_qera", _llama(), method="qera", rank=4)
    save("groups_too_wide", _llama(), group_size=64)  # o_proj: 64 inputs, 32 per rank, groups of 64
    save("per_channel", _llama(), group_size=-1)
    save("odd_rows", _llama(intermediate_size=129))  # gate/up: 129 output rows
    with torch.random.fork_rng(devices=[]):  # MoE: the experts whole on every rank
        torch.manual_seed(0)
        moe = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
            shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2)).eval()
    save("qwen2_moe", moe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mixtral = T.MixtralForCausalLM(T.MixtralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()
    save("mixtral", mixtral)
    made["qwen2_moe_ep"], made["mixtral_ep"] = made["qwen2_moe"], made["mixtral"]  # under expert parallelism
    # GlowQ-S per expert kept some experts' factors: layer 0's gate_up one expert on each rank,
    # layer 1's down none on rank 0's half
    some = load_quantized(made["mixtral"])
    for layer, weight, keep in ((0, "gate_up_proj", [True, False, False, True]),
                                (1, "down_proj", [False, False, True, False])):
        some.model.layers[layer].mlp.experts.quantized_weights(weight).keep_experts(torch.tensor(keep))
    save_quantized(some, root / "mixtral_some_experts_ep")
    made["mixtral_some_experts_ep"] = root / "mixtral_some_experts_ep"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        odd = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
            shared_expert_intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            num_experts=3, num_experts_per_tok=2)).eval()
    save("odd_experts", odd)  # 3 experts on 2 ranks
    _llama().save_pretrained(root / "float")
    made["quantize_on_load"] = root / "float"
    return made


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each job's per-rank results from one 2-process run."""
    root = tmp_path_factory.mktemp("tp")
    made = _checkpoints(root)
    jobs = [{"dir": str(d), "out": str(root / f"{name}.out"), "ids": IDS,
             "how": "tp_plan" if name == "llama" else "expert_parallel" if name in EXPERT_PARALLEL
             else "distributed_config",
             **({"resave": str(root / "llama_resaved"), "compile": True} if name == "llama" else {}),
             **({"compile": True} if name in ("qwen2_moe", "mixtral", *EXPERT_PARALLEL) else {}),
             **({"save_refused": str(root / f"{name}_resaved")} if name == "qwen2_moe_ep" else {}),
             **({"quantize_on_load": True} if name == "quantize_on_load" else {})} for name, d in made.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                          str(WORKER), str(root / "jobs.json")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = {name: [torch.load(f"{root / name}.out.rank{r}.pt", weights_only=False) for r in range(WORLD)]
               for name in made}
    return made, results, root


def _single_process_logits(directory):
    from glowq_fx.modules.embedding import QuantizedEmbedding
    from glowq_fx.modules.int8_linear import Int8Linear

    model = load_quantized(directory)
    # a split int8 head runs dequantized on the ranks (the CPU kernel takes no shard): so does the
    # reference's, or the test would compare bfloat16 kernel roundings; a tied one stays whole
    tables = {id(t) for m in model.modules() if isinstance(m, QuantizedEmbedding) for t in m.buffers()}
    for m in model.modules():
        if isinstance(m, Int8Linear) and id(m.qweight) not in tables:
            m.use_cpu_int8_kernel(False)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "qwen2_int8_tied", "llama_qera", "qwen2_moe", "mixtral",
                                  "qwen2_moe_ep", "mixtral_ep", "mixtral_some_experts_ep"])
def test_tensor_parallel_logits_equal_the_single_process_model(ranks, name):
    made, results, _ = ranks
    reference = _single_process_logits(made[name])
    for r in results[name]:
        assert "error" not in r, r.get("error")
        # float32: the all-reduce sums the ranks' partial products in another order
        torch.testing.assert_close(r["logits"], reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_tensor_parallel_compiles_with_the_glowq_backend_and_generates(ranks):
    made, results, _ = ranks
    with torch.no_grad():
        greedy = load_quantized(made["llama"]).generate(input_ids=torch.tensor(IDS), max_new_tokens=6, do_sample=False)
    for r in results["llama"]:
        torch.testing.assert_close(r["compiled"], r["logits"], rtol=1e-5, atol=1e-5 * r["logits"].abs().max().item())
        assert torch.equal(r["generated"], greedy)


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral", "qwen2_moe_ep", "mixtral_ep", "mixtral_some_experts_ep"])
def test_quantized_moe_under_tensor_parallel_compiles_with_the_glowq_backend(ranks, name):
    made, results, _ = ranks
    with torch.no_grad():
        greedy = load_quantized(made[name]).generate(input_ids=torch.tensor(IDS), max_new_tokens=6, do_sample=False)
    for r in results[name]:
        torch.testing.assert_close(r["compiled"], r["logits"], rtol=1e-5, atol=1e-5 * r["logits"].abs().max().item())
        assert torch.equal(r["generated"], greedy)


def test_each_rank_holds_its_half_of_the_split_tensors(ranks):
    made, results, _ = ranks
    full = {k: tuple(v.shape) for k, v in [*load_quantized(made["llama"]).named_parameters(),
                                           *load_quantized(made["llama"]).named_buffers()]}
    local = results["llama"][0]["local_shapes"]
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    halves = {  # tensor -> the dimension split (None: whole on every rank)
        f"{attn}.q_proj.qweight": 1, f"{attn}.q_proj.scales": 1, f"{attn}.q_proj.A": 0, f"{attn}.q_proj.bias": 0,
        f"{mlp}.up_proj.qweight": 1, f"{mlp}.up_proj.A": 0,
        f"{attn}.glowq_projections.{{q_proj,k_proj,v_proj}}.B": None,  # read by members split by output
        f"{attn}.o_proj.qweight": 0, f"{attn}.o_proj.zeros": 0, f"{attn}.o_proj.A": None, f"{attn}.o_proj.bias": None,
        f"{attn}.glowq_projections.o_proj.B": 1, f"{mlp}.down_proj.qweight": 0,
        f"{mlp}.glowq_projections.down_proj.B": 1, "lm_head.qweight": 1,
    }
    for key, dim in halves.items():
        expected = list(full[key])
        if dim is not None:
            expected[dim] //= WORLD
        assert local[key] == tuple(expected), key


def test_save_pretrained_under_tensor_parallel_writes_the_same_checkpoint(ranks):
    made, _, root = ranks
    a, b = load_quantized(made["llama"]).state_dict(), T.AutoModelForCausalLM.from_pretrained(root / "llama_resaved")
    b = b.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_quantized_experts_stay_whole_with_a_warning(ranks):
    _, results, _ = ranks
    r = results["qwen2_moe"][0]
    assert r["local_shapes"]["model.layers.0.mlp.experts.gate_up_proj.qweight"][0] == 4  # every expert here
    # Qwen2-MoE's plan has no rule for the shared expert: it stays whole, as in the float model
    assert r["local_shapes"]["model.layers.0.mlp.shared_expert.gate_proj.qweight"][1] == 96
    # the warning is owed only where this transformers' plan has rules for the experts (5.24 has, 5.25 has none)
    ruled = any(".mlp.experts" in key for key in T.Qwen2MoeConfig().base_model_tp_plan)
    warned = any("keeps the quantized tables and experts" in w and "model.layers.0.mlp.experts" in w
                 for w in r["warnings"])
    assert warned == ruled, (ruled, r["warnings"])


@pytest.mark.parametrize("name", ["qwen2_moe_ep", "mixtral_ep"])
def test_expert_parallelism_gives_each_rank_its_experts_and_the_shared_B_whole(ranks, name):
    """Under DistributedConfig(ep_size=2): every stacked tensor of the quantized experts (codes,
    scales, zero points, A_e, each expert's own B_e) holds half of the experts on each rank, the
    rank's own half (rank r: experts [rE/2, (r+1)E/2)), and the B the experts share stays whole."""
    made, results, _ = ranks
    full = load_quantized(made[name])
    experts = full.model.layers[0].mlp.experts
    E = experts.glowq_protocol.num_experts
    stacked = {f"model.layers.0.mlp.experts.{w}.{t}": getattr(experts.quantized_weights(w), t)
               for w in experts.glowq_protocol.weights for t in ("qweight", "scales", "zeros", "A", "B")
               if getattr(experts.quantized_weights(w), t) is not None}
    assert any(k.endswith(".B") for k in stacked)  # the second weight's own B_e is split too
    shared = {k: v for k, v in full.named_buffers()  # on the block (Qwen2-MoE: with the shared expert) or the experts
              if k.startswith("model.layers.0.mlp.") and "glowq_projections" in k and "experts" in k}
    assert shared
    for r in results[name]:
        assert "error" not in r, r.get("error")
        for key, t in stacked.items():
            assert r["local_shapes"][key] == (E // WORLD, *t.shape[1:]), key
        for key, t in shared.items():
            assert r["local_shapes"][key] == tuple(t.shape), key


def test_expert_parallelism_keeps_each_ranks_rows_of_some_experts_factors(ranks):
    """Factors kept for some experts only (``factor_slots``): each rank holds the rows of its own
    corrected experts, and none where its half has none (layer 1's down on rank 0)."""
    _, results, _ = ranks
    held = {0: {"model.layers.0.mlp.experts.gate_up_proj.A": 1, "model.layers.1.mlp.experts.down_proj.A": None},
            1: {"model.layers.0.mlp.experts.gate_up_proj.A": 1, "model.layers.1.mlp.experts.down_proj.A": 1}}
    for r in results["mixtral_some_experts_ep"]:
        assert "error" not in r, r.get("error")
        for key, rows in held[r["rank"]].items():
            shape = r["local_shapes"].get(key)
            assert (shape is None) == (rows is None) and (shape is None or shape[0] == rows), (r["rank"], key, shape)


def test_a_model_with_split_experts_is_not_saved(ranks):
    _, results, _ = ranks
    for r in results["qwen2_moe_ep"]:
        assert r["save_error"] and "holds 1/2 of its experts (expert parallelism)" in r["save_error"], r["save_error"]


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_int8_tied"])
def test_quantized_tied_tables_stay_whole_with_a_warning(ranks, name):
    made, results, _ = ranks
    r = results[name][0]
    full = load_quantized(made[name])
    assert r["local_shapes"]["model.embed_tokens.qweight"] == tuple(full.model.embed_tokens.qweight.shape)
    assert any("keeps the quantized tables and experts" in w and "model.embed_tokens" in w for w in r["warnings"])


def test_an_untied_int8_head_is_split_by_its_output_rows(ranks):
    made, results, _ = ranks
    head = load_quantized(made["llama_qera"]).lm_head  # the default int8 head, not tied here
    for r in results["llama_qera"]:
        assert r["local_shapes"]["lm_head.qweight"] == (head.out_features // WORLD, head.in_features)
        assert r["local_shapes"]["lm_head.scales"] == (head.out_features // WORLD,)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "groups_too_wide",
            r"CheckpointError: .*o_proj in scale groups of 64: each rank needs whole groups "
            r"\(64 / 2 a multiple of 64\)",
        ),
        ("per_channel", r"CheckpointError: .*o_proj in scale groups of 64"),
        (
            "odd_rows",
            r"CheckpointError: .*splits the 129 output rows of model.layers.0.mlp.gate_proj, which 2 does not",
        ),
        ("quantize_on_load", r"ValueError: quantizing on load works on one process: quantize and save first"),
        ("odd_experts", r"CheckpointError: expert parallelism over 2 ranks splits the 3 experts of "
                        r"model.layers.0.mlp.experts, which 2 does not divide"),
    ],
)
def test_what_tensor_parallel_cannot_do_is_refused(ranks, name, message):
    import re

    _, results, _ = ranks
    for r in results[name]:
        assert "error" in r and re.search(message, r["error"]), r
