"""The glowq checkpoint format, shared by its two loaders (``load_quantized`` and transformers'
``from_pretrained`` through ``checkpoint.transformers``): the description of a quantized model
(``describe``, ``glowq.json``, the ``quantization_config`` of ``config.json``), every check
between a checkpoint and a model (``read_checked``, ``_plan``) and the empty quantized modules
a loader fills (``install_quantized``). ``checkpoint.quantized`` writes and reads it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from glowq_fx.capture.experts import TracedExperts, experts_protocol
from glowq_fx.capture.linears import linear_weight
from glowq_fx.checkpoint.shards import CheckpointError, check_shards, read_headers
from glowq_fx.config import GlowQConfig
from glowq_fx.kernels.layout import PackedW4, packed_shapes
from glowq_fx.modules.embedding import QuantizedEmbedding, empty_quantized_embedding
from glowq_fx.modules.experts import (
    QuantizedExperts,
    QuantizedExpertWeights,
    layout_from_record,
    layout_record,
    quantized_experts,
)
from glowq_fx.modules.install import register_projection, replace_module
from glowq_fx.modules.int8_linear import Int8Linear
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection

FORMAT = "glowq-fx"
FORMAT_VERSION = 2  # 2: sharded tensors (tensors.shards); 1: one model.safetensors (tensors.file)
META_FILE = "glowq.json"
def _projection_key(model: nn.Module, projection: SharedProjection) -> str:
    for name, m in model.named_modules():
        if m is projection:
            return f"{name}.B"
    raise CheckpointError(f"the projection of {list(projection.members)} is not registered in the model; "
                          "was the model quantized with glowq_fx.quantize_?")


def under_module(key: str, prefix: str | None) -> bool:
    return prefix is None or key == prefix or key.startswith(prefix + ".")


def describe(model: nn.Module, prefix: str | None = None) -> dict:
    """The quantized modules of ``model`` under the module ``prefix`` (None: all): each quantized
    linear (shape, group size, rank, bias, the projection it reads), each projection (members,
    state-dict key), each quantized embedding table (bits, shape, the head sharing it) and each
    quantized experts module (its protocol, and per 3-D weight what a linear records), and each
    int8 linear (the output head, ``output_head_bits``)."""
    linears, projections, embeddings, experts, int8_linears = {}, {}, {}, {}, {}

    def projection_key(projection: SharedProjection | None) -> str | None:
        if projection is None:
            return None
        key = _projection_key(model, projection)
        projections.setdefault(key, {"key": key, "members": list(projection.members), "rank": projection.rank,
                                     "in_features": projection.in_features})
        return key

    for name, m in model.named_modules():
        if not under_module(name, prefix):
            continue
        if isinstance(m, QuantizedLinear):
            linears[name] = {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
                             "rank": m.rank, "bias": m.bias is not None, "projection": projection_key(m.projection)}
        elif isinstance(m, QuantizedExperts):
            if getattr(m, "glowq_expert_parallel", None):
                raise CheckpointError(f"{name} holds 1/{m.glowq_expert_parallel} of its experts (expert parallelism): "
                                      "a checkpoint needs all of them; save the model loaded in one process (or "
                                      "without ep_size)")
            weights = {}
            for w in m.glowq_protocol.weights:
                q = m.quantized_weights(w)
                weights[w] = {"in_features": q.in_features, "out_features": q.out_features,
                              "group_size": q.group_size, "rank": q.rank, "bias": q.bias is not None,
                              "projection": projection_key(q.projection)}
                if q.factor_slots is not None:  # GlowQ-S kept some experts' factors: A (and B) hold theirs
                    weights[w]["corrected_experts"] = q.A.shape[0]
            experts[name] = {"protocol": layout_record(m.glowq_protocol), "weights": weights}
        elif isinstance(m, Int8Linear):
            int8_linears[name] = {"in_features": m.in_features, "out_features": m.out_features,
                                  "bias": m.bias is not None}
        elif isinstance(m, QuantizedEmbedding):
            heads = [n for n, h in model.named_modules()
                     if isinstance(h, (QuantizedLinear, Int8Linear)) and h.qweight is m.qweight]
            embeddings[name] = {"bits": m.bits, "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                                "tied_head": heads[0] if heads else None}
    return {"linears": linears, "projections": list(projections.values()), "embeddings": embeddings,
            "experts": experts, "int8_linears": int8_linears}


def hf_quantization_config(model: nn.Module, config: GlowQConfig | None) -> dict:
    """The ``quantization_config`` entry of a glowq checkpoint's ``config.json``: the method, the
    format version, the ``GlowQConfig`` and the model's quantized modules (``describe``) with the
    state-dict keys that alias another (tied tables), so the checkpoint describes itself even when
    transformers' ``save_pretrained`` wrote it (without ``glowq.json``)."""
    return {"quant_method": "glowq", "format_version": FORMAT_VERSION,
            "config": None if config is None else config.to_dict(), **describe(model),
            "aliases": alias_keys(model.state_dict())}


def alias_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each key whose tensor is the same view of the same storage as an earlier key's (tied
    tables), mapped to that earlier key: stored once, loaded under both."""
    kept, aliases = {}, {}
    for key, t in state.items():
        t = t.to_local() if hasattr(t, "to_local") else t  # a tensor-parallel shard: its storage is local
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in kept:
            aliases[key] = kept[ident]
        else:
            kept[ident] = key
    return aliases


def read_metadata(directory: str | Path) -> dict:
    """``glowq.json`` of a checkpoint, after checking it is one this version can read."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a glowq-fx checkpoint: {META_FILE} is missing "
                              "(write one with glowq_fx.save_quantized or `glowq quantize --out`)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupted: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a glowq-fx checkpoint description (no format {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta['format_version']}, newer than this glowq-fx "
                              f"reads ({FORMAT_VERSION}); upgrade glowq-fx")
    for field in ("linears", "projections", "aliases", "tensors"):
        if field not in meta:
            raise CheckpointError(f"{path} is incomplete: field {field!r} is missing")
    tensors = meta["tensors"]
    if not isinstance(tensors, dict) or not (isinstance(tensors.get("shards"), list) and tensors["shards"]
                                             or {"file", "bytes", "sha256"} <= set(tensors)):
        raise CheckpointError(f"{path} is incomplete: it lists no tensor files")
    return meta


def file_dtype(header: dict[str, tuple[tuple[int, ...], torch.dtype]], meta: dict) -> torch.dtype:
    """The dtype of the model's floating tensors: that of the first quantized linear's scales
    (or experts weight's)."""
    if meta["linears"]:
        return header[f"{next(iter(meta['linears']))}.scales"][1]
    name, rec = next(iter(meta["experts"].items()))
    return header[f"{name}.{next(iter(rec['weights']))}.scales"][1]


def in_dtype(header: dict[str, tuple[tuple[int, ...], torch.dtype]], meta: dict,
             dtype: torch.dtype | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``header`` as a model loaded in ``dtype`` holds it: every tensor stored in the checkpoint's
    model dtype (weights, scales, zero points, biases, factors kept in the model dtype) in
    ``dtype``; the codes, and factors stored narrower (``GlowQConfig.factor_dtype``), as stored.
    Loading casts the scales to ``dtype`` like any other weight: asked for bfloat16, a float32
    checkpoint gives the model a user would get by quantizing in bfloat16 up to the scales' rounding."""
    if dtype is None:
        return header
    if not dtype.is_floating_point:
        raise CheckpointError(f"a model loads in a floating-point dtype, not {dtype}")
    stored = file_dtype(header, meta)
    return {k: (shape, dtype if d == stored else d) for k, (shape, d) in header.items()}


def _check_packed(name: str, rec: dict, header: dict, experts: int | None = None) -> None:
    """The packed tensors' shapes and dtypes agree with each other and the record (layout.py);
    with ``experts``, each is that many experts' stacked."""
    keys = [f"{name}.{s}" for s in ("qweight", "scales", "zeros")]
    absent = [k for k in keys if k not in header]
    if absent:
        raise CheckpointError(f"the checkpoint does not match its description: missing tensors {absent}")
    (qshape, qdtype), (sshape, sdtype), (zshape, zdtype) = (header[k] for k in keys)
    if experts is not None:
        if not (len(qshape) == len(sshape) == len(zshape) == 3 and qshape[0] == sshape[0] == zshape[0] == experts):
            raise CheckpointError(f"{name}: {tuple(qshape)}, {tuple(sshape)}, {tuple(zshape)} are not {experts} "
                                  "experts' packed weights (the checkpoint is corrupted)")
        qshape, sshape, zshape = qshape[1:], sshape[1:], zshape[1:]
    N, K, g = rec["out_features"], rec["in_features"], rec["group_size"]
    try:
        q_expected, s_expected = packed_shapes(K, N, g)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc} (the record is corrupted)") from None
    whole_groups = (s_expected[0] * g // 8, N)  # written before a partial last group was stored as such
    if qdtype != torch.int32 or tuple(qshape) not in (q_expected, whole_groups):
        raise CheckpointError(f"{name}.qweight is {qdtype} {tuple(qshape)}, expected int32 {q_expected} for "
                              f"in_features {K} in groups of {g}")
    for key, shape, dtype in ((keys[1], sshape, sdtype), (keys[2], zshape, zdtype)):
        zero_points = key == keys[2] and dtype == torch.uint8  # 16 * zero (kernels.layout)
        if tuple(shape) != s_expected or not (dtype.is_floating_point or zero_points):
            raise CheckpointError(f"{key} is {dtype} {tuple(shape)}, expected a float {s_expected}"
                                  f"{' (or uint8 zero points)' if key == keys[2] else ''}")


def _check_embedding(name: str, rec: dict, modules: dict, header: dict, linears: dict, int8_linears: dict) -> None:
    """A quantized table's record agrees with the model and its tensors (``modules.embedding``)."""
    module = modules.get(name)
    if not isinstance(module, nn.Embedding):
        raise CheckpointError(f"the checkpoint quantized the embedding {name}, which this model "
                              f"{'does not have' if module is None else f'has as a {type(module).__name__}'}")
    V, D, bits = rec["num_embeddings"], rec["embedding_dim"], rec["bits"]
    if (module.num_embeddings, module.embedding_dim) != (V, D):
        raise CheckpointError(f"{name}: the model's table is {module.num_embeddings} x {module.embedding_dim}, the "
                              f"checkpoint's {V} x {D}; other model size")
    head = rec.get("tied_head")
    if head is not None and head in int8_linears:  # the per-row int8 layout, the head's own tensors
        rec_head = int8_linears[head]
        if (rec_head["out_features"], rec_head["in_features"]) != (V, D) or bits != 8:
            raise CheckpointError(f"{name}: its table is recorded as shared with the int8 output head {head}, which "
                                  f"is not an 8-bit {V} x {D} table there (the description is corrupted)")
        return
    keys = [f"{name}.{s}" for s in ("qweight", "scales", "zeros")]
    absent = [k for k in keys if k not in header]
    if absent:
        raise CheckpointError(f"the checkpoint does not match its description: missing tensors {absent}")
    (qshape, qdtype), (sshape, _), (zshape, _) = (header[k] for k in keys)
    rows = qshape[0] * (8 if bits == 4 else 1)  # K_pad
    code_dtype = torch.int32 if bits == 4 else torch.uint8
    if (bits not in (4, 8) or qdtype != code_dtype or qshape[1] != V or rows < D or tuple(sshape) != tuple(zshape)
            or sshape[1] != V or rows % sshape[0]):
        raise CheckpointError(f"{name}: codes {qdtype} {tuple(qshape)} and scales {tuple(sshape)} are not a {bits}-bit "
                              f"{V} x {D} table (the checkpoint is corrupted)")
    if head is not None and (head not in linears or (linears[head]["out_features"], linears[head]["in_features"])
                             != (V, D) or bits != 4):
        raise CheckpointError(f"{name}: its table is recorded as shared with the output head {head}, which the "
                              f"checkpoint does not hold as a 4-bit {V} x {D} quantized linear (the description is "
                              "corrupted)")


def _plan_experts(name: str, rec: dict, module: nn.Module | None, header: dict, expected: dict) -> set[str]:
    """Check an experts module against its record, adding its tensors to ``expected``; the keys of
    the float tensors it replaces."""
    recorded = layout_from_record(rec["protocol"])
    if module is None:
        raise CheckpointError(f"the checkpoint quantized the experts {name}, which this model does not have: it was "
                              "written for another architecture")
    if isinstance(recorded, TracedExperts):
        found = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
        if set(found) != set(recorded.weights) or any(s[0] != recorded.num_experts for s in found.values()):
            raise CheckpointError(f"{name}: the model's 3-D weights {found} are not the checkpoint's "
                                  f"({recorded.num_experts} experts of {list(recorded.weights)}); other model size or "
                                  "architecture")
        out_in = {t.name: t.stored_out_in for t in recorded.traced}
    else:
        found = experts_protocol(module)
        if found != recorded:
            raise CheckpointError(f"{name}: the model's experts ({found}) are not the checkpoint's ({recorded}); "
                                  "other model size or architecture")
        out_in = dict.fromkeys(recorded.weights, not recorded.is_transposed)
    E, replaced = recorded.num_experts, set()
    for w, wrec in rec["weights"].items():
        N, K, r = wrec["out_features"], wrec["in_features"], wrec["rank"]
        stored = getattr(module, w)[0]
        shape = tuple(stored.shape if out_in[w] else stored.T.shape)
        if shape != (N, K):
            raise CheckpointError(f"{name}.{w}: the model's experts are (out, in) {shape}, the checkpoint's ({N}, {K})")
        key = f"{name}.{w}"
        _check_packed(key, wrec, header, experts=E)
        replaced.update((key, f"{key}_bias"))
        expected.update({f"{key}.{suffix}": None for suffix in ("qweight", "scales", "zeros")})
        if wrec["bias"]:
            expected[f"{key}.bias"] = (E, N)
        if r:
            kept = wrec.get("corrected_experts")
            if kept is not None and not (isinstance(kept, int) and 0 < kept < E):
                raise CheckpointError(f"{key}: corrected_experts={kept!r} is not a number of its {E} experts between 1 "
                                      f"and {E - 1} (the description is corrupted)")
            held = E if kept is None else kept
            expected[f"{key}.A"] = (held, N, r)
            if wrec["projection"] is None:
                expected[f"{key}.B"] = (held, r, K)
            if kept is not None:
                expected[f"{key}.factor_slots"] = (E,)
    return replaced


def _plan_int8(name: str, rec: dict, module: nn.Module | None, header: dict, expected: dict) -> None:
    """Check an int8 linear's record against the model's linear, adding its tensors to ``expected``."""
    W = None if module is None else linear_weight(module)
    if W is None:
        raise CheckpointError(f"the checkpoint holds an int8 linear at {name}, which this model "
                              f"{'does not have' if module is None else f'has as a {type(module).__name__}'}")
    N, K = rec["out_features"], rec["in_features"]
    if tuple(W.shape) != (N, K):
        raise CheckpointError(f"{name}: the model's linear is {tuple(W.shape)} (out, in), the checkpoint's int8 "
                              f"({N}, {K}); other model size")
    if rec["bias"] != (getattr(module, "bias", None) is not None):
        raise CheckpointError(f"{name}: bias {'missing in the model' if rec['bias'] else 'unexpected'}")
    codes, scales = header.get(f"{name}.qweight"), header.get(f"{name}.scales")
    if codes is not None and codes[1] != torch.int8 or scales is not None and not scales[1].is_floating_point:
        raise CheckpointError(f"{name}: codes {codes and codes[1]} and scales {scales and scales[1]} are not an int8 "
                              "linear's (int8 codes, float scales; the checkpoint is corrupted)")
    expected.update({f"{name}.qweight": (N, K), f"{name}.scales": (N,)})
    if rec["bias"]:
        expected[f"{name}.bias"] = (N,)


def _plan(model: nn.Module, meta: dict, header: dict) -> None:
    """Every check between the checkpoint and ``model``, before anything changes."""
    modules = dict(model.named_modules())
    state = model.state_dict()
    expected: dict[str, tuple[int, ...] | None] = {}  # state key -> shape (None: checked by _check_packed)
    replaced = set()  # the float linears' own tensors, which the quantized ones replace
    for name, rec in meta["linears"].items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"the checkpoint quantized {name}, which this model does not have: it was "
                                  "written for another architecture")
        W = linear_weight(module)
        if W is None:
            raise CheckpointError(f"{name} is a {type(module).__name__} in this model, the checkpoint holds a "
                                  "quantized linear there")
        N, K, r = rec["out_features"], rec["in_features"], rec["rank"]
        if tuple(W.shape) != (N, K):
            raise CheckpointError(f"{name}: the model's linear is {tuple(W.shape)} (out, in), the checkpoint's "
                                  f"({N}, {K}); other model size")
        if rec["bias"] != (getattr(module, "bias", None) is not None):
            raise CheckpointError(f"{name}: bias {'missing in the model' if rec['bias'] else 'unexpected'}")
        _check_packed(name, rec, header)
        replaced.update((f"{name}.weight", f"{name}.bias"))
        expected.update({f"{name}.{suffix}": None for suffix in ("qweight", "scales", "zeros")})
        if rec["bias"]:
            expected[f"{name}.bias"] = (N,)
        if r:
            expected[f"{name}.A"] = (N, r)
    for name, rec in meta.get("experts", {}).items():
        replaced.update(_plan_experts(name, rec, modules.get(name), header, expected))
    for p in meta["projections"]:
        expected[p["key"]] = (p["rank"], p["in_features"])
    int8_linears = meta.get("int8_linears", {})
    for name, rec in int8_linears.items():
        _plan_int8(name, rec, modules.get(name), header, expected)
        replaced.update((f"{name}.weight", f"{name}.bias"))
    for name, rec in meta.get("embeddings", {}).items():
        _check_embedding(name, rec, modules, header, meta["linears"], int8_linears)
        replaced.add(f"{name}.weight")
        if rec.get("tied_head") in int8_linears:
            expected.update({f"{name}.qweight": (rec["num_embeddings"], rec["embedding_dim"]),
                             f"{name}.scales": (rec["num_embeddings"],)})
        else:
            expected.update({f"{name}.{suffix}": None for suffix in ("qweight", "scales", "zeros")})
    expected.update({key: tuple(t.shape) for key, t in state.items() if key not in replaced})
    present = set(header) | set(meta["aliases"])
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not match this model: "
            + (f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
        )
    for alias, target in meta["aliases"].items():
        if target not in header:
            raise CheckpointError(f"alias {alias} -> {target}, but the file has no {target}")
    for key, shape in expected.items():
        source = meta["aliases"].get(key, key)
        file_shape, file_dtype = header[source]
        if shape is not None and tuple(file_shape) != shape:
            raise CheckpointError(f"{key}: the checkpoint holds shape {tuple(file_shape)}, the model needs {shape}")
        if key in state and state[key].is_floating_point() and state[key].dtype != file_dtype:
            raise CheckpointError(f"{key}: the checkpoint holds {file_dtype}, the model has {state[key].dtype}; "
                                  f"build the model in {file_dtype} (loading would round)")


def _shards(meta: dict) -> list[dict]:
    """The shard records of any format version (version 1: one file)."""
    tensors = meta["tensors"]
    if "shards" in tensors:
        return tensors["shards"]
    return [{"file": tensors["file"], "bytes": tensors["bytes"], "sha256": tensors["sha256"]}]


def _empty_tensor(header: dict, device: str | torch.device, key: str) -> torch.Tensor:
    """An uninitialised tensor of ``key``'s recorded shape and dtype on ``device`` (a loader fills it)."""
    shape, dtype = header[key]
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_quantized(name: str, rec: dict, header: dict, projection: SharedProjection | None,
                     device) -> QuantizedLinear:
    """A ``QuantizedLinear`` of the recorded shapes and dtypes, its tensors still to be read."""
    empty = functools.partial(_empty_tensor, header, device)
    packed = PackedW4(empty(f"{name}.qweight"), empty(f"{name}.scales"), empty(f"{name}.zeros"), rec["group_size"],
                      rec["in_features"])
    return QuantizedLinear(packed, empty(f"{name}.bias") if rec["bias"] else None,
                           empty(f"{name}.A") if rec["projection"] else None, projection)


def _empty_experts(module: nn.Module, name: str, rec: dict, header: dict, projections: dict,
                   device: str | torch.device) -> QuantizedExperts:
    """A ``QuantizedExperts`` of the recorded shapes and dtypes over ``module``, its tensors still to be read."""
    empty = functools.partial(_empty_tensor, header, device)
    weights = {}
    for w, wrec in rec["weights"].items():
        key = f"{name}.{w}"
        q = QuantizedExpertWeights.stacked(empty(f"{key}.qweight"), empty(f"{key}.scales"), empty(f"{key}.zeros"),
                                           wrec["in_features"], empty(f"{key}.bias") if wrec["bias"] else None)
        if wrec["rank"]:
            kept = wrec.get("corrected_experts")
            # the first `kept` experts stand in until the loader reads the recorded factor_slots
            experts = None if kept is None else torch.arange(q.num_experts, device="cpu") < kept
            if wrec["projection"] is not None:
                q.set_correction(empty(f"{key}.A"), projection=projections[wrec["projection"]], experts=experts)
            else:
                q.set_correction(empty(f"{key}.A"), B=empty(f"{key}.B"), experts=experts)
            if kept is not None:
                q.factor_slots = empty(f"{key}.factor_slots")
        weights[w] = q
    return quantized_experts(module, weights, layout_from_record(rec["protocol"]))


def read_checked(directory: str | Path) -> tuple[dict, list[dict], dict]:
    """``(glowq.json, its shard records, every tensor's (shape, dtype) by key)`` of a checkpoint,
    after checking every shard's size and checksum (``CheckpointError`` naming what is wrong)."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file() and _config_description(directory) is not None:
        meta, shards = _meta_from_config(directory)  # written by save_pretrained: no checksums to check
    else:
        meta = read_metadata(directory)
        shards = _shards(meta)
        check_shards(directory, shards, META_FILE)
    header = read_headers(directory, shards)
    # a tensor stored once under one key (tied tables) is described under each of its keys
    header.update({alias: header[target] for alias, target in meta["aliases"].items() if target in header})
    try:
        file_dtype(header, meta)
    except (KeyError, StopIteration):
        raise CheckpointError(
            f"the shards in {directory} do not hold the quantized linears that {META_FILE} lists"
        ) from None
    return meta, shards, header


def _config_description(directory: Path) -> dict | None:
    """The glowq ``quantization_config`` of ``directory/config.json`` when it holds one."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("quant_method") == "glowq" and "linears" in entry else None


def _meta_from_config(directory: Path) -> tuple[dict, list[dict]]:
    """A checkpoint description from ``config.json`` alone, and its shards from the index (or the
    one ``model.safetensors``): what transformers' ``save_pretrained`` writes."""
    entry = _config_description(directory)
    if entry.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory}/config.json has glowq format version {entry['format_version']}, newer "
                              f"than this glowq-fx reads ({FORMAT_VERSION}); upgrade glowq-fx")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"{directory / missing[0]} is missing: {len(files)} shard(s) are listed in the index, "
                              "nothing was loaded")
    meta = {
        "format": FORMAT,
        "format_version": entry.get("format_version", FORMAT_VERSION),
        "config": entry.get("config"),
        "linears": entry["linears"],
        "projections": entry.get("projections", []),
        "embeddings": entry.get("embeddings", {}),
        "experts": entry.get("experts", {}),
        "int8_linears": entry.get("int8_linears", {}),
        "aliases": entry.get("aliases", {}),
        "model_class": (json.loads((directory / "config.json").read_text()).get("architectures") or ["?"])[0],
        "tensors": {"shards": [{"file": f} for f in files]},
    }
    return meta, meta["tensors"]["shards"]


def install_quantized(model: nn.Module, meta: dict, header: dict, device: str | torch.device) -> None:
    """Check ``model`` against the checkpoint (``_plan``), then swap in its quantized modules with
    empty tensors of the recorded shapes and dtypes on ``device`` (the loader fills them)."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise CheckpointError("pass the unquantized model to load into; this one already has QuantizedLinear modules")
    _plan(model, meta, header)
    # Everything is checked: from here on the model changes.
    projections = {}
    for p in meta["projections"]:
        shape, dtype = header[p["key"]]
        projection = SharedProjection(torch.empty(shape, dtype=dtype, device=device), tuple(p["members"]))
        register_projection(model, projection)
        projections[p["key"]] = projection
    for name, rec in meta["linears"].items():
        projection = projections.get(rec["projection"]) if rec["projection"] else None
        replace_module(model, name, _empty_quantized(name, rec, header, projection, device))
    for name, rec in meta.get("experts", {}).items():
        replace_module(model, name, _empty_experts(model.get_submodule(name), name, rec, header, projections, device))
    for name, rec in meta.get("int8_linears", {}).items():
        empty = functools.partial(_empty_tensor, header, device)
        replace_module(model, name, Int8Linear(empty(f"{name}.qweight"), empty(f"{name}.scales"),
                                               empty(f"{name}.bias") if rec["bias"] else None))
    for name, rec in meta.get("embeddings", {}).items():
        table = empty_quantized_embedding(model.get_submodule(name), rec["bits"],
                                          {k: header[f"{name}.{k}"] for k in ("qweight", "scales", "zeros")
                                           if f"{name}.{k}" in header}, device)
        replace_module(model, name, table)
    tie_tables(model, meta)


def check_factor_slots(model: nn.Module) -> None:
    """After loading: every experts weight's ``factor_slots`` number its rows of ``A`` in expert
    order (-1 for the others), or ``CheckpointError``: a kernel would read past ``A`` otherwise."""
    for name, m in model.named_modules():
        slots = getattr(m, "factor_slots", None)
        if slots is None or not isinstance(m, QuantizedExpertWeights):
            continue
        kept = slots >= 0
        n = int(kept.sum())
        expected = torch.arange(n, dtype=slots.dtype, device=slots.device)
        if (m.A is None or n != m.A.shape[0] or not torch.equal(slots[kept], expected)
                or bool((slots[~kept] != -1).any())):
            raise CheckpointError(f"{name}.factor_slots {slots.tolist()} do not number the "
                                  f"{None if m.A is None else m.A.shape[0]} experts' factors of A in order (-1 for "
                                  "the experts without one): the checkpoint is corrupted")


def tie_tables(model: nn.Module, meta: dict) -> None:
    """A quantized table shared with the output head is one set of tensors, as when quantized."""
    for name, rec in meta.get("embeddings", {}).items():
        if rec["tied_head"] is not None:
            table, head = model.get_submodule(name), model.get_submodule(rec["tied_head"])
            if isinstance(head, Int8Linear):
                head.qweight, head.scales = table.qweight, table.scales
            else:
                head.qweight, head.scales, head.zeros = table.qweight, table.scales, table.zeros


def is_checkpoint(path: str | Path) -> bool:
    """A glowq checkpoint: written by ``save_quantized`` (``glowq.json``) or by transformers'
    ``save_pretrained`` of a quantized model (``config.json`` describes it)."""
    return (Path(path) / META_FILE).is_file() or _config_description(Path(path)) is not None
