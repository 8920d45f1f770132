"""GlowQConfig: every knob of GlowQ quantization, in six validated parts, versioned.

The config is saved next to a quantized checkpoint (``to_dict`` / ``from_dict`` round
trip through JSON) and validated at construction, so a bad value fails where it was
written rather than deep inside calibration.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from glowq_fx.registry import CORRECTIONS, QUANTIZERS

CONFIG_VERSION = 1

BITS = (4,)
GROUP_SIZES = (32, 64, 128, 256, -1)  # -1: one group per output channel (per-channel)
SVD_MODES = ("randomized", "exact")
CALIBRATIONS = ("auto", "blocks", "model")
BLOCK_INPUTS = ("float", "quantized")
ACTIVATION_PLACES = ("auto", "device", "cpu", "disk")
FACTOR_DTYPES = ("auto", "model", "float32", "bfloat16", "float16")
EMBEDDING_BITS = (None, 4, 8)
OUTPUT_HEAD_BITS = (None, 8)  # int8, one scale per output row (modules.int8_linear)
EXPERT_WEIGHTINGS = ("none", "usage")
EXPERT_SELECTIONS = ("per-expert", "whole")


@dataclass
class QuantizationConfig:
    """How weights become 4-bit codes (``glowq_fx.quant``).

    bits: code width; 4 (W4A16) is the only width the packed layout and kernels support.
    group_size: input columns sharing one scale and zero: 32, 64, 128, 256, or -1 for
        per-channel. ``in_features`` that are not a multiple are padded (see ``quant.rtn``).
    symmetric: symmetric codes (zero point fixed at 8) instead of asymmetric min/max.
    quantizer: a registered base quantizer (``glowq_fx.registry.QUANTIZERS``): ``"rtn"`` (round to
        nearest), ``"clip"`` (round to nearest on each group's clipped grid, the clipping chosen by
        the ``diag(S)``-weighted error: ``quant.clip``), ``"fitted"`` (round to nearest on each
        group's least-squares grid with a fractional zero point, ``diag(S)``-weighted:
        ``quant.fitted``), ``"gptq"`` (driven by the group's ``S``) or ``"fitted-gptq"`` (GPTQ on
        fitted grids: ``quant.fitted_gptq``).
    gptq_damp: GPTQ damping as a fraction of the mean diagonal of ``S``.
    gptq_block_size: GPTQ lazy-update block (rounded up to a multiple of group_size).
    gptq_act_order: process columns by decreasing ``diag(S)``; group parameters are then fixed up
        front from the unquantized weight ("static groups") so the codes keep the plain contiguous
        group layout.
    gptq_shrink: ``a`` in ``H <- (1 - a) H + a diag(H)``: GPTQ's cross-column terms scaled down
        by ``1 - a`` before damping. The cross-correlations of the inputs are the part of ``S``
        most particular to the calibration text; ``1`` leaves only ``diag(S)``, so GPTQ feeds no
        error forward and becomes its base grid's round to nearest (``"fitted-gptq"`` is then
        ``"fitted"``).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    quantizer: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False
    gptq_shrink: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("bits", self.bits, BITS, "glowq-fx stores INT4 codes")
        _check_choice("group_size", self.group_size, GROUP_SIZES, "-1 means per-channel")
        QUANTIZERS[self.quantizer]  # registered names only (glowq_fx.registry)
        if not 0.0 <= self.gptq_damp < 1.0:
            raise ValueError(f"gptq_damp must lie in [0, 1), got {self.gptq_damp!r}")
        if not 0.0 <= self.gptq_shrink <= 1.0:
            raise ValueError(f"gptq_shrink must lie in [0, 1], got {self.gptq_shrink!r}")
        if self.gptq_block_size < 1:
            raise ValueError(f"gptq_block_size must be positive, got {self.gptq_block_size!r}")


@dataclass
class CorrectionConfig:
    """The low-rank correction (``glowq_fx.correction``).

    method: a registered correction (``glowq_fx.registry.CORRECTIONS``): ``"glowq"`` (one shared
        ``B`` per input-sharing group, whitened by ``S``), ``"qera"`` (independent per linear,
        whitened: QERA-exact), ``"lqer"`` (independent, diagonal activation scaling: L2QER),
        ``"svd"`` (independent, plain SVD of ``E``: ZeroQuant-V2 LoRC) or ``"none"``.
    rank: rank ``r`` of the correction (of the shared ``B`` for GlowQ, of each member for the
        independent methods).
    shrinkage: ``a`` in ``S <- (1 - a) S + a tr(S)/d I``.
    svd: ``"randomized"`` (randomized SVD of the stacked whitened error, sketched member by member:
        ``correction.decompose``) or ``"exact"``.
    oversample, power_iters: randomized-SVD sketch width ``r + oversample`` and the number of
        re-orthonormalized power iterations. ``oversample=None`` means ``r // 2 + 10`` (see
        ``correction.decompose.solve``); the paper's setting is ``oversample=10``.
    seed: seed of the randomized-SVD sketch (a local generator; global RNG untouched).
    stats_dtype: ``"float32"`` or ``"float64"`` accumulation of ``S``.
    factor_dtype: the dtype ``A`` and ``B`` are stored in. ``"auto"``: bfloat16 when the model is
        float32 (16-bit factors halve the correction's bytes with no measurable perplexity change
        on SmolLM2, docs/results.md), else the model's dtype; ``"model"``: the model's dtype; or a
        dtype name. Narrower factors are widened where they are used.
    selective: GlowQ-S. ``None`` restores every group's correction; otherwise groups are ranked by
        the whitened error their correction removes per byte of factors, and ``"auto"`` keeps the
        best ``k``, ``k`` at the knee (Kneedle) of the calibration loss against the kept factor
        bytes (``selective.corrections.loss_curve_knee``), a float in (0, 1] that fraction of the
        groups, an int a budget of factor bytes (model dtype). The others keep their 4-bit
        weights without correction.
    alternations: rounds of alternating quantization and correction (LoftQ's alternation,
        ``quantize.api``): the base quantizer runs again on ``W - A B`` (the weight less its
        correction) and the correction is solved again on the new error; a round is kept only
        where it lowers the group's whitened error. It lets GPTQ spend its rounding on what the
        correction does not capture. Dense groups only (experts refuse it).
    """

    method: str = "glowq"
    rank: int = 64
    shrinkage: float = 0.05
    svd: str = "randomized"
    oversample: int | None = None
    power_iters: int = 2
    seed: int = 0
    stats_dtype: str = "float32"
    factor_dtype: str = "auto"
    selective: str | float | int | None = None
    alternations: int = 0

    def __post_init__(self) -> None:
        CORRECTIONS[self.method]  # registered names only (glowq_fx.registry)
        if not isinstance(self.alternations, int) or isinstance(self.alternations, bool) or self.alternations < 0:
            raise ValueError(f"alternations must be a non-negative int, got {self.alternations!r}")
        if self.alternations and (not CORRECTIONS[self.method].corrects or self.rank == 0):
            raise ValueError("alternations re-quantize the weight less its correction; method='none' or rank=0 has "
                             "none: set alternations=0")
        _check_choice("svd", self.svd, SVD_MODES)
        _check_choice("stats_dtype", self.stats_dtype, ("float32", "float64"))
        _check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {self.rank!r}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in [0, 1], got {self.shrinkage!r}")
        if self.oversample is not None and self.oversample < 0:
            raise ValueError(f"oversample must be >= 0 or None, got {self.oversample!r}")
        if self.power_iters < 0:
            raise ValueError(f"power_iters must be >= 0, got {self.power_iters!r}")
        sel = self.selective
        if sel is not None:
            ok = (sel == "auto" or (isinstance(sel, float) and 0 < sel <= 1)
                  or (isinstance(sel, int) and not isinstance(sel, bool) and sel >= 0))
            if not ok:
                raise ValueError(f"selective must be None, 'auto', a fraction in (0, 1] or a byte budget "
                                 f"(int >= 0), got {sel!r}")
            if not CORRECTIONS[self.method].corrects or self.rank == 0:
                raise ValueError("selective chooses which corrections to keep; method='none' or rank=0 has none")


@dataclass
class TargetsConfig:
    """Which modules are quantized (``passes.grouping.GroupFilter``).

    include: regular expressions (``re.search`` on the qualified module name); when non-empty only
        matching modules are quantized.
    exclude: regular expressions; matching modules stay in full precision.
    quantize_output_head: quantize the output projection (``get_output_embeddings()``, else a
        module named ``lm_head``) with its own correction (a group of one). Off by default, as in
        GPTQ/AWQ tools. A head tied to the input embedding is quantized only together with it
        (``embedding_bits=4``): one 4-bit table serves both.
    output_head_bits: ``8`` (the default, as llama.cpp's Q4 files keep their head in 6-8 bits)
        stores the head, when ``quantize_output_head`` leaves it out of the 4-bit groups, as int8
        with one scale per output row (``modules.int8_linear``): on a large vocabulary the float
        head is most of the bytes a decode step reads. A tied input embedding then reads the same
        codes (``embedding_bits`` None or 8). ``None`` keeps the head in floating point.
    embedding_bits: ``None`` (default) keeps the input embedding table in floating point; 4 or 8
        stores it group-wise (``group_size`` along the embedding dimension, RTN, asymmetric) and
        dequantizes the rows looked up. With a tied output head the table is the head's
        quantized weight (``quantize_output_head=True`` and 4 bits needed).
    min_out_features: linears with fewer outputs stay in full precision: MoE routers (N = number
        of experts) and scalar gates steer the whole block and cost almost no memory; the
        default 32 keeps the common ones out. Raise it for models with more experts.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_output_head: bool = False
    output_head_bits: int | None = 8
    embedding_bits: int | None = None
    min_out_features: int = 32

    def __post_init__(self) -> None:
        _check_choice("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
        _check_choice("output_head_bits", self.output_head_bits, OUTPUT_HEAD_BITS)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                raise ValueError(f"{name} must be a list of patterns, got the string {patterns!r}; "
                                 f"write {name}=[{patterns!r}]")
            patterns = tuple(patterns)  # JSON gives lists
            for p in patterns:
                try:
                    re.compile(p)
                except (re.error, TypeError) as exc:
                    raise ValueError(f"{name} pattern {p!r} is not a regular expression: {exc}") from None
            setattr(self, name, patterns)
        if not isinstance(self.min_out_features, int) or self.min_out_features < 1:
            raise ValueError(f"min_out_features must be a positive int, got {self.min_out_features!r}")


@dataclass
class ExpertsConfig:
    """MoE experts (``glowq_fx.quantize.experts``; transformers' fused experts modules). The
    correction follows ``CorrectionConfig.method``: ``"glowq"`` shares one ``B`` across the
    experts' first projection (gate/up: they all read the block input), the independent methods
    solve each expert alone; each expert's second projection (down) reads its own intermediate and
    gets its own factors.

    experts: quantize the experts (every expert in 4 bits); False leaves them in floating point.
    expert_weighting: ``"usage"`` scales each expert's error by the square root of its routing
        frequency before the shared ``B`` is solved (and its ``A_e`` back after); ``"none"``:
        every expert alike.
    expert_refit: with the shared ``B`` fixed, refit each expert's ``A_e`` in closed form against
        the second moment of the tokens routed to it.
    expert_own_input_rank: the rank of each expert's correction on a weight that reads the
        expert's own input (down); None: ``rank``.
    expert_selection: how GlowQ-S (``selective``) treats an experts correction it keeps:
        ``"whole"`` keeps every expert's factors; ``"per-expert"`` also drops the factors of each
        expert whose usage-weighted gain per byte (its routing frequency times the error its
        ``A_e`` removes on its own tokens) is below the last kept unit's, storing only the other
        experts' ``A_e``. Not the default: the routing frequencies are the calibration text's, and
        on SmolLM2 split top-6 of 8 dropping 4 of 416 experts' factors (2% of the gate/up bytes)
        lowered the calibration loss but cost 0.39% perplexity on other text.
    """

    experts: bool = True
    expert_weighting: str = "none"
    expert_refit: bool = False
    expert_own_input_rank: int | None = None
    expert_selection: str = "whole"

    def __post_init__(self) -> None:
        _check_choice("expert_weighting", self.expert_weighting, EXPERT_WEIGHTINGS)
        _check_choice("expert_selection", self.expert_selection, EXPERT_SELECTIONS)
        own = self.expert_own_input_rank
        if own is not None and (not isinstance(own, int) or isinstance(own, bool) or own < 0):
            raise ValueError(f"expert_own_input_rank must be None or a non-negative int, got {own!r}")
        if not isinstance(self.experts, bool) or not isinstance(self.expert_refit, bool):
            raise ValueError(f"experts and expert_refit are booleans, got {self.experts!r}, {self.expert_refit!r}")


@dataclass
class CalibrationConfig:
    """How the calibration pass runs (``glowq_fx.calibration``).

    calibration: ``"blocks"`` runs the model one repeated block (decoder layer) at a time: the
        inputs of the first block are cached for every batch, then each block collects its groups'
        ``S``, is quantized, and produces the next block's inputs, so only one block's ``S`` (and,
        with weights elsewhere, one block's weights) is on the compute device at a time.
        ``"model"`` runs whole-model forward passes and holds every group's ``S`` at once.
        ``"auto"``: blocks when the model has repeated blocks (``capture.blocks.find_blocks``),
        else the whole model.
    block_inputs: what feeds block ``i + 1`` with ``calibration="blocks"``: ``"float"`` the outputs
        of the unquantized block ``i`` (the float model's statistics, exactly as the whole-model
        pass), ``"quantized"`` the outputs of the quantized and corrected block ``i`` (GPTQ's "true
        sequential" at block level).
    activations: where the cached block inputs live: ``"device"``, ``"cpu"``, ``"disk"``
        (``offload_dir``, else a temporary directory, removed after), or ``"auto"``: the first
        that holds them in half of its measured free memory.
    offload_dir: the directory for ``activations="disk"`` (and the fallback of ``"auto"``).
    first_position_weight: how many times the first position of each calibration window counts in
        every ``S`` (1: like any other). The first token of a sequence is an attention sink: its
        input to k/v lies where other tokens rarely go, so it carries ``1/seq_len`` of ``S`` while
        every later query reads its key and value; GPTQ (and the whitened correction) then move
        error there. A weight of ~32 made GPTQ beat RTN on SmolLM2
        (``benchmarks/results/gptq_sink.md``); choose it on calibration data (held-out windows),
        as ``benchmarks/bench_peers.py`` does. Needs group inputs shaped (batch, positions,
        features); MoE experts' own statistics are not weighted.
    """

    calibration: str = "auto"
    block_inputs: str = "float"
    activations: str = "auto"
    offload_dir: str | None = None
    first_position_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("calibration", self.calibration, CALIBRATIONS)
        _check_choice("block_inputs", self.block_inputs, BLOCK_INPUTS)
        _check_choice("activations", self.activations, ACTIVATION_PLACES)
        w = self.first_position_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"first_position_weight must be a positive number (1: the first position counts like "
                             f"any other), got {w!r}")


@dataclass
class OnLoadDataConfig:
    """Calibration data when the config quantizes on load (``from_pretrained(float_dir,
    quantization_config=GlowQConfig(dataset="news", tokenizer=...))``, like transformers' GPTQ
    integration; ``quantize_`` takes its batches directly and ignores these).

    dataset: a built-in text (``"news"``, ``"wikipedia"``), a text file, or a list of texts.
    tokenizer: a tokenizer or the name/path ``AutoTokenizer`` reads (default: the model's own
        directory).
    n_samples, seq_len: calibration windows and tokens per window.
    """

    dataset: str | list[str] | None = None
    tokenizer: Any = None
    n_samples: int = 32
    seq_len: int = 512

    def __post_init__(self) -> None:
        texts = self.dataset
        if texts is not None and not isinstance(texts, str) and not (
                isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts)):
            raise ValueError(f"dataset must be a text name, a file path or a non-empty list of texts, got {texts!r}")
        if not isinstance(self.n_samples, int) or self.n_samples < 1 or not isinstance(self.seq_len, int) \
                or self.seq_len < 2:
            raise ValueError(f"n_samples must be >= 1 and seq_len >= 2, got {self.n_samples!r}, {self.seq_len!r}")


PARTS = {"quantization": QuantizationConfig, "correction": CorrectionConfig, "targets": TargetsConfig,
         "moe": ExpertsConfig, "calibration_run": CalibrationConfig, "on_load": OnLoadDataConfig}
# flat keyword -> the part that holds it: the flat names are the checkpoint metadata's keys
FLAT_FIELDS = {f.name: part for part, cls in PARTS.items() for f in dataclasses.fields(cls)}


@dataclass(init=False)
class GlowQConfig:
    """How to quantize and correct a model: six parts, each a small validated dataclass
    (``QuantizationConfig``, ``CorrectionConfig``, ``TargetsConfig``, ``ExpertsConfig``,
    ``CalibrationConfig``, ``OnLoadDataConfig``; their docstrings describe every option).

    Built from parts, from flat keywords, or both (a flat keyword overrides its part's value)::

        GlowQConfig(rank=32, quantizer="gptq")
        GlowQConfig(correction=CorrectionConfig(rank=32), quantization=QuantizationConfig(quantizer="gptq"))

    Every option also reads and writes as a flat attribute (``config.rank``), and ``to_dict`` /
    ``from_dict`` use the flat names, so checkpoint metadata keeps one format (``version``)."""

    quantization: QuantizationConfig
    correction: CorrectionConfig
    targets: TargetsConfig
    moe: ExpertsConfig
    calibration_run: CalibrationConfig
    on_load: OnLoadDataConfig
    version: int = CONFIG_VERSION
    quant_method: ClassVar[str] = "glowq"  # transformers' registry key (not a field)

    def __init__(self, *, quantization: QuantizationConfig | None = None, correction: CorrectionConfig | None = None,
                 targets: TargetsConfig | None = None, moe: ExpertsConfig | None = None,
                 calibration_run: CalibrationConfig | None = None, on_load: OnLoadDataConfig | None = None,
                 version: int = CONFIG_VERSION, **options: Any) -> None:
        unknown = sorted(set(options) - set(FLAT_FIELDS))
        if unknown:
            raise ValueError(f"unknown GlowQConfig options {unknown}; known: {sorted(FLAT_FIELDS)} and the parts "
                             f"{sorted(PARTS)}")
        given = dict(quantization=quantization, correction=correction, targets=targets, moe=moe,
                     calibration_run=calibration_run, on_load=on_load)
        for name, cls in PARTS.items():
            part = given[name]
            if part is not None and not isinstance(part, cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(part).__name__}")
            own = {k: v for k, v in options.items() if FLAT_FIELDS[k] == name}
            setattr(self, name, dataclasses.replace(part, **own) if part is not None else cls(**own))
        if version > CONFIG_VERSION:
            raise ValueError(f"config version {version} is newer than this glowq-fx understands ({CONFIG_VERSION}); "
                             f"upgrade glowq-fx to load it")
        self.version = version

    def to_dict(self) -> dict[str, Any]:
        """The flat options (the checkpoint's ``quantization_config``)."""
        out = {name: getattr(self, name) for name in FLAT_FIELDS}
        out["version"] = self.version
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        if out["tokenizer"] is not None and not isinstance(out["tokenizer"], str):  # an object: its name
            out["tokenizer"] = getattr(out["tokenizer"], "name_or_path", type(out["tokenizer"]).__name__)
        if isinstance(out["dataset"], tuple):
            out["dataset"] = list(out["dataset"])
        return out

    def to_json_string(self, use_diff: bool = True) -> str:  # transformers logs a quantization_config this way
        import json

        return json.dumps({"quant_method": self.quant_method, **self.to_dict()}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GlowQConfig":
        """From ``to_dict``'s flat options (every version so far), with ``quant_method`` as
        transformers writes it; a part may also come as a nested dict."""
        data = {k: v for k, v in data.items() if k != "quant_method"}
        unknown = sorted(set(data) - set(FLAT_FIELDS) - set(PARTS) - {"version"})
        if unknown:
            raise ValueError(f"unknown GlowQConfig fields {unknown}; known fields: {sorted(FLAT_FIELDS)}")
        for name, part_cls in PARTS.items():
            if isinstance(data.get(name), dict):
                data[name] = part_cls(**data[name])
        return cls(**data)


class _FlatOption:
    """``config.<option>``: reads and writes its part's field (a write rebuilds the part, so it is
    validated); on the class, the field's default, as a plain dataclass field reads."""

    def __init__(self, name: str, part: str):
        self.name, self.part = name, part
        field = next(f for f in dataclasses.fields(PARTS[part]) if f.name == name)
        self.default = field.default
        self.__doc__ = f"``{part}.{name}``"

    def __get__(self, obj, owner=None):
        return self.default if obj is None else getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.part, dataclasses.replace(getattr(obj, self.part), **{self.name: value}))


for _name, _part in FLAT_FIELDS.items():
    setattr(GlowQConfig, _name, _FlatOption(_name, _part))


def _check_choice(name: str, value: Any, choices: tuple, why: str = "") -> None:
    if value not in choices:
        hint = f" ({why})" if why else ""
        raise ValueError(f"unsupported {name}={value!r}: choose one of {list(choices)}{hint}")


def as_config(config: GlowQConfig | None) -> GlowQConfig:
    """``config``, or the default ``GlowQConfig()`` for None; a ``ValueError`` for anything else."""
    config = config if config is not None else GlowQConfig()
    if not isinstance(config, GlowQConfig):
        raise ValueError(f"config must be a GlowQConfig, got {type(config).__name__}")
    return config
