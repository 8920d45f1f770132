"""A real-weight MoE model for the MoE benchmark, built from a dense Llama (SmolLM2-135M).

No MoE checkpoint can be installed here, so one is made: each MLP's ``I`` neurons are split into
``E`` experts of ``I / E`` consecutive neurons (expert ``e`` keeps rows ``e I/E .. (e+1) I/E`` of
``gate_proj`` and ``up_proj`` and those columns of ``down_proj``) in a transformers Mixtral model
(the same attention, norms, embeddings and head as the Llama). Two variants:

- ``top_k = E`` (every expert active): the router's weight is zero, so every token gives every
  expert the weight ``1/E`` after Mixtral's softmax and renormalisation, and ``down_proj`` is
  scaled by ``E``: the MoE model computes exactly the dense MLP (both scalings are powers of two
  for ``E = 8``; only the order of the final sum differs), same perplexity.
- ``top_k < E`` (sparse), derived from data on calibration tokens run through the dense model,
  MoEfication-style: each layer's neurons are first grouped by co-activation (balanced k-means,
  ``E`` clusters of ``I / E``, on the neurons' normalised |activation| profiles over the tokens,
  randomly projected to 128 dimensions) so that an expert holds neurons that fire together; the
  router is then the least-squares fit of ``x -> log ||y_e(x)||`` (the norm of expert ``e``'s
  output, centred over the experts), scaled by 0.01 so that the kept experts get nearly equal
  weights, and ``down_proj`` is scaled by ``top_k`` (the kept experts' weights sum to one): a
  token goes to the experts that contribute most to its dense MLP output, which they pass on
  about unscaled. SmolLM2's SiLU-gated neurons are not sparse, so 2 of 8 experts (a quarter of
  the neurons) cannot carry the MLP: that variant no longer models text (perplexity in the
  thousands); 6 of 8 still does (about 60 against the dense 24.5). Each one's own float
  perplexity is its reference.

The neuron grouping and the routers are cached under ``cache_dir()/moe-routers`` with a checksum
(``data.cache``), keyed by the dense weights' checksum, the split and the text.
"""
from __future__ import annotations

import hashlib
import io
import json

import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from glowq_fx.data.cache import cache_dir, read_checked, write_checked


def _experts_config(dense: nn.Module, n_experts: int, top_k: int) -> T.MixtralConfig:
    c = dense.config
    if c.intermediate_size % n_experts:
        raise ValueError(f"{c.intermediate_size} MLP neurons do not split into {n_experts} equal experts")
    return T.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size // n_experts,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None), num_local_experts=n_experts,
        num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0)


def expert_outputs(mlp: nn.Module, x: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each expert's share of the dense ``mlp``'s output on ``x`` (T, H): (E, T, H)."""
    h = F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)  # (T, I)
    width = h.shape[-1] // n_experts
    return torch.stack([F.linear(h[:, e * width:(e + 1) * width], mlp.down_proj.weight[:, e * width:(e + 1) * width])
                        for e in range(n_experts)])


def fit_routers(dense: nn.Module, batches: list[torch.Tensor], n_experts: int) -> list[torch.Tensor]:
    """Per layer, the (E, H) router fitted to the experts' output norms (module docstring)."""
    inputs = mlp_inputs(dense, batches)
    routers = []
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            x = inputs[i].double()
            scores = (
                expert_outputs(layer.mlp, x.float(), n_experts).double().norm(dim=-1).clamp_min(1e-12).log()
            )  # (E, T)
            scores = scores - scores.mean(dim=0, keepdim=True)
            routers.append(torch.linalg.lstsq(x, scores.T).solution.T.float())  # (E, H)
    return routers


def mlp_inputs(dense: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's MLP input rows on ``batches`` (T, H)."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(dense.model.layers))}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(dense.model.layers)
    ]
    try:
        with torch.no_grad():
            for ids in batches:
                dense(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(inputs[i]) for i in range(len(inputs))]


def balanced_kmeans(X: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """A cluster in ``0..k-1`` for each row of ``X`` (unit rows, n divisible by k), every cluster of
    n / k rows: spherical k-means whose assignment step fills the clusters greedily by similarity."""
    n = X.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    capacity = n // k
    centroids = X[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]].clone()
    assign = torch.zeros(n, dtype=torch.int64)
    for _ in range(iters):
        order = torch.argsort((X @ centroids.T).reshape(-1), descending=True).tolist()
        assign.fill_(-1)
        fill = [0] * k
        for flat in order:
            i, c = divmod(flat, k)
            if assign[i] < 0 and fill[c] < capacity:
                assign[i] = c
                fill[c] += 1
        centroids = torch.stack([F.normalize(X[assign == c].mean(0), dim=0) for c in range(k)])
    return assign


def group_neurons(dense: nn.Module, inputs: list[torch.Tensor], n_experts: int) -> list[torch.Tensor]:
    """Per layer, the neuron order that puts co-activated neurons in one expert (module docstring)."""
    perms = []
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            mlp = layer.mlp
            h = F.silu(F.linear(inputs[i], mlp.gate_proj.weight)) * F.linear(inputs[i], mlp.up_proj.weight)
            profiles = F.normalize(h.abs().T, dim=1)  # neurons x tokens
            sketch = torch.randn(profiles.shape[1], 128, generator=torch.Generator().manual_seed(i)) / 128**0.5
            assign = balanced_kmeans(F.normalize(profiles @ sketch, dim=1), n_experts, seed=i)
            perms.append(torch.cat([torch.nonzero(assign == c).flatten() for c in range(n_experts)]))
    return perms


def permuted(dense: nn.Module, perms: list[torch.Tensor]) -> nn.Module:
    """A copy of ``dense`` with each layer's MLP neurons reordered (the same function)."""
    import copy

    out = copy.deepcopy(dense)
    for layer, perm in zip(out.model.layers, perms):
        mlp = layer.mlp
        mlp.gate_proj.weight.data = mlp.gate_proj.weight.data[perm]
        mlp.up_proj.weight.data = mlp.up_proj.weight.data[perm]
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, perm]
    return out


def sparse_moe(dense: nn.Module, batches: list[torch.Tensor], n_experts: int, top_k: int, key: str) -> nn.Module:
    """The sparse variant (module docstring); its neuron grouping and routers read from / written to
    the cache under ``key``."""
    path = cache_dir() / "moe-routers" / f"{key}.pt"
    data = read_checked(path)
    if data is not None:
        perms, routers = torch.load(io.BytesIO(data), weights_only=True)
        grouped = permuted(dense, perms)
    else:
        perms = group_neurons(dense, mlp_inputs(dense, batches), n_experts)
        grouped = permuted(dense, perms)
        routers = [r * 0.01 for r in fit_routers(grouped, batches, n_experts)]
        buffer = io.BytesIO()
        torch.save((perms, routers), buffer)
        write_checked(path, buffer.getvalue())
    return dense_to_moe(grouped, n_experts, top_k, routers)


def dense_to_moe(dense: nn.Module, n_experts: int = 8, top_k: int | None = None,
                 routers: list[torch.Tensor] | None = None) -> nn.Module:
    """The Mixtral model of ``dense`` (a Llama) split into ``n_experts`` experts per MLP (module
    docstring); ``top_k`` defaults to every expert (the exact variant, router zero); a sparse
    ``top_k`` needs ``routers`` (one (E, H) per layer)."""
    top_k = n_experts if top_k is None else top_k
    if top_k < n_experts and routers is None:
        raise ValueError("a sparse MoE (top_k < n_experts) needs its routers (fit_routers)")
    config = _experts_config(dense, n_experts, top_k)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        moe = T.MixtralForCausalLM(config)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    width = config.intermediate_size
    for i, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp"
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        rows = [slice(e * width, (e + 1) * width) for e in range(n_experts)]
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([gate[r], up[r]]) for r in rows])
        state[f"{prefix}.experts.down_proj"] = torch.stack([down[:, r] * top_k for r in rows])
        state[f"{prefix}.gate.weight"] = (torch.zeros(n_experts, config.hidden_size, dtype=gate.dtype)
                                          if top_k == n_experts else routers[i].to(gate.dtype))
    missing = set(moe.state_dict()) - set(state)
    if missing - {"lm_head.weight"}:
        raise ValueError(f"the dense model does not give {sorted(missing)[:4]}")
    moe.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        moe.tie_weights()
    elif "lm_head.weight" in missing:
        raise ValueError("the dense model has no lm_head.weight and untied embeddings")
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=config)  # its buffers are not in the state dict
    left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"the MoE model has tensors the dense one does not give: {left[:4]}")
    return moe.eval()


def router_key(dense: nn.Module, n_experts: int, text_key: str) -> str:
    """A cache key for the routers of ``dense``: its weights, the split and the calibration text."""
    digest = hashlib.sha256()
    for k, v in sorted(dense.state_dict().items()):
        digest.update(k.encode())
        digest.update(json.dumps([list(v.shape), str(v.dtype)]).encode())
        digest.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{n_experts}:{text_key}".encode())
    return digest.hexdigest()[:16]
