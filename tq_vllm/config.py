"""Presets and every derived byte size of the tq-vllm KV cache.

This module is the single owner of layout arithmetic: a :class:`Preset` describes
how keys and values are quantized, and :meth:`Preset.layout` derives the exact byte
map of one packed cache slot (one token of one KV head) for a given head size.
Nothing else in the package computes offsets or sizes.

Families at each budget ``b`` (bits per coordinate of codes) in {4, 3.5, 3, 2.5}:

``tq{b}-mse``  keys and values TurboQuant_mse at ``b`` bits.
``tq{b}-qjl``  keys TurboQuant_prod as in the paper: ``b-1`` bit MSE codes plus a
               1-bit QJL sketch of the residual and its norm; values TurboQuant_mse.
``tq{b}``      the recommended preset at that budget: MSE codes with norm correction,
               more bits for keys than values (``RECOMMENDED_BITS``, averaging ``b``),
               keys rounded with feedback (``TensorCodec.feedback``), plus the
               calibrated transforms of ``RECOMMENDED_TRANSFORM``.

``tq{b}-trellis``  ``tq{b}`` with bitshift-trellis codes (:data:`TRELLIS_STATE_BITS`):
               the same bytes, decoded with the stream bits before each code
               (``tq_vllm.trellis``), keys searched against the calibration queries
               (feedback in the search); CPU kernels, Triton kernels (tested on an
               H100, where they are slow) and the PyTorch reference.

Above them, ``tq4.5`` (:data:`QJL_RECOMMENDED`): ``tq4`` with the key residual's QJL
sketch on top (orthonormal rows, the term scaled by its optimal factor) — 5 bits of key
codes where the kernels' codebooks stop at 4.

Fractional budgets split the channels into two halves (an outlier half at
``ceil`` bits and the rest at ``floor`` bits), each an independent TurboQuant
instance with its own rotation and norm, as in the paper's 2.5/3.5-bit setups.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SUPPORTED_HEAD_DIMS = (64, 128, 256)
"""Head sizes the randomized Hadamard rotation handles (powers of two; each half
of a split preset must be a power of two too)."""

NORM_BYTES = 2
"""Norms are stored as little-endian IEEE fp16."""

SLOT_ALIGN = 2
"""Slots are padded to a multiple of this so every slot's fp16 norms stay aligned."""

KERNEL_MAX_CODE_BITS = 4
"""Widest codes the fast kernels decode (16-entry codebooks held in vector registers);
5-bit codes are an A/B of the PyTorch reference (docs/quality.md, seventh round)."""

PRESET_PREFIX = "tq"
BUDGETS = ("4", "3.5", "3", "2.5")


class UnsupportedHeadDim(ValueError):
    """The codec cannot handle this head size."""


def check_head_dim(head_dim: int) -> int:
    """Return ``head_dim`` or raise a clear error naming the supported sizes."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedHeadDim(
            f"tq-vllm supports head_dim in {SUPPORTED_HEAD_DIMS} (randomized Hadamard "
            f"rotation needs a power of two); got head_dim={head_dim}. Use "
            "--kv-cache-dtype auto or fp8 for this model."
        )
    return head_dim


class TensorCodec(BaseModel):
    """How one of K or V is quantized, independent of head size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits_hi: int = Field(ge=1, le=5, description="MSE code bits of the outlier half "
                                                 "(5: PyTorch reference only, KERNEL_MAX_CODE_BITS)")
    bits_lo: int = Field(ge=1, le=5, description="MSE code bits of the other channels")
    split: bool = Field(description="two channel groups (d/2 each) with own rotation+norm")
    qjl: bool = Field(default=False, description="1-bit QJL sketch of the residual")
    qjl_rows: int = Field(default=1, ge=1, le=8,
                          description="QJL sketch rows per sketched coordinate (m = rows · n)")
    qjl_group: Literal["all", "outlier"] = Field(
        default="all", description="sketch the whole residual, or the outlier half's only")
    qjl_shrink: bool = Field(
        default=False, description="scale the QJL term by its logit-MSE-optimal factor "
                                   "(rotation.qjl_shrink_factor): biased, less noisy")
    norm_correction: bool = Field(
        default=False, description="store norm/|reconstruction| so decoded norms are exact"
    )
    trellis: int = Field(
        default=0, ge=0, le=10,
        description="bitshift-trellis state bits S (tq_vllm.trellis): each code decodes "
                    "with the S stream bits before it; 0 = scalar Lloyd–Max codes")
    feedback: bool = Field(
        default=False,
        description="query-aware rounding: scalar codes rounded one coordinate at a time, "
                    "each one's error fed into the rest through the calibration queries' "
                    "second moment (LDLQ), trellis codes searched with each survivor's "
                    "errors fed the same way, so the expected logit error, not ‖x − x̂‖, is "
                    "minimised; keys only, needs calibration queries (plain codes without)")

    @model_validator(mode="after")
    def _check(self) -> "TensorCodec":
        if not self.split and self.bits_hi != self.bits_lo:
            raise ValueError("an unsplit codec has one bit width: bits_hi must equal bits_lo")
        if self.split and self.bits_hi < self.bits_lo:
            raise ValueError("the outlier half must not get fewer bits than the rest")
        if not self.qjl and (self.qjl_rows != 1 or self.qjl_group != "all" or self.qjl_shrink):
            raise ValueError("qjl_rows, qjl_group and qjl_shrink describe a QJL sketch: set qjl=True")
        if self.trellis and self.trellis < self.bits_hi:
            raise ValueError(f"a trellis needs at least as many state bits as code bits: "
                             f"set trellis ≥ {self.bits_hi} (or 0 for scalar codes)")
        if self.qjl_group == "outlier" and not self.split:
            raise ValueError("qjl_group='outlier' sketches the outlier half: it needs split=True")
        return self

    @property
    def sketched_fraction(self) -> float:
        """Share of the head's coordinates the QJL sketch covers (0 without QJL)."""
        if not self.qjl:
            return 0.0
        return 0.5 if self.qjl_group == "outlier" else 1.0

    def sketch_dims(self, head_dim: int) -> tuple[int, int]:
        """(rows ``m``, sketched coordinates ``n``) of the QJL sketch; (0, 0) without QJL.
        The sketched coordinates are the first ``n`` of the rotated vector (group 0)."""
        n = int(head_dim * self.sketched_fraction)
        return self.qjl_rows * n, n

    @property
    def code_bits_per_coord(self) -> float:
        """Bits per coordinate of codes (MSE codes plus QJL signs), norms excluded."""
        mse = (self.bits_hi + self.bits_lo) / 2 if self.split else self.bits_hi
        return mse + self.qjl_rows * self.sketched_fraction

    @property
    def num_groups(self) -> int:
        return 2 if self.split else 1

    @property
    def num_norms(self) -> int:
        """fp16 norms per vector: one per group, plus the QJL residual norm."""
        return self.num_groups + (1 if self.qjl else 0)

    def group_dims(self, head_dim: int) -> tuple[int, ...]:
        return (head_dim // 2, head_dim // 2) if self.split else (head_dim,)

    def group_bits(self) -> tuple[int, ...]:
        return (self.bits_hi, self.bits_lo) if self.split else (self.bits_hi,)


class KVTransform(BaseModel):
    """Calibrated, attention-exact pre-transforms of K/V (see :mod:`tq_vllm.calibration`).

    They need per-layer statistics of the model's keys, values and queries, which the
    vLLM backend computes once per model and caches (``tq_vllm.tools.calibrate``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_mean: bool = Field(default=False, description="subtract the calibration key mean")
    key_scale: Literal["rms", "balanced"] | None = Field(
        default=None, description="per-channel key smoothing, queries scaled inversely")
    value_mean: bool = Field(default=False, description="subtract the value mean, add it back")
    value_scale: bool = Field(default=False, description="per-channel value smoothing")
    calibrated_split: bool = Field(
        default=False, description="outlier half of split codecs chosen by calibration RMS")
    key_offset_choice: bool = Field(
        default=False, description="per token, store the key with or without its mean, "
                                   "whichever decodes closer (flag: the first norm's sign bit)")
    key_offset_rule: Literal["residual", "norm"] = Field(
        default="residual", description="how the offset choice decides: the encoding of "
        "smaller residual (each key encoded twice: every preset), or the vector of smaller "
        "norm before encoding (once: for trellis keys 1.7x faster stores, at a cost in "
        "retrieval; docs/quality.md, thirteenth round)")

    @model_validator(mode="after")
    def _check(self) -> "KVTransform":
        if self.key_offset_choice and not self.key_mean:
            raise ValueError("key_offset_choice needs key_mean: the offset it may keep is the "
                             "key mean")
        if self.key_offset_rule != "residual" and not self.key_offset_choice:
            raise ValueError("key_offset_rule='norm' needs key_offset_choice")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.key_mean or self.key_scale is not None or self.value_mean \
            or self.value_scale or self.calibrated_split


class Segment(BaseModel):
    """A byte range inside a slot."""

    model_config = ConfigDict(frozen=True)

    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class TensorLayout(BaseModel):
    """Byte map of one of K or V inside a slot, for one head size."""

    model_config = ConfigDict(frozen=True)

    head_dim: int
    group_dims: tuple[int, ...]
    group_bits: tuple[int, ...]
    norms: Segment  # fp16: group norms in group order, then the QJL residual norm
    codes: tuple[Segment, ...]  # one LSB-first bitstream per group
    signs: Segment | None  # QJL sign bits, LSB-first, bit set = +1

    @property
    def nbytes(self) -> int:
        return self.norms.nbytes + sum(s.nbytes for s in self.codes) + (
            self.signs.nbytes if self.signs else 0
        )

    @property
    def bits_per_coord(self) -> float:
        """True storage bits per coordinate including norms."""
        return 8 * self.nbytes / self.head_dim


class SlotLayout(BaseModel):
    """Byte map of one packed slot (one token of one KV head)."""

    model_config = ConfigDict(frozen=True)

    head_dim: int
    key: TensorLayout
    value: TensorLayout
    slot_bytes: int
    padding: int

    @property
    def bf16_bytes(self) -> int:
        return 2 * 2 * self.head_dim

    @property
    def compression_vs_bf16(self) -> float:
        return self.bf16_bytes / self.slot_bytes


class Preset(BaseModel):
    """A named KV-cache format: key codec, value codec and the random constructions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: Literal["mse", "qjl", "recommended", "trellis"]
    budget: str
    key: TensorCodec
    value: TensorCodec
    codebook: Literal["beta", "gaussian"] = "beta"
    sketch: Literal["gaussian", "orthogonal"] = "gaussian"
    transform: KVTransform = KVTransform()
    seed: int = 0x7A11

    @model_validator(mode="after")
    def _check(self) -> "Preset":
        if self.name.startswith("turboquant"):
            raise ValueError("names starting with 'turboquant' belong to vLLM's own presets")
        if not self.name.startswith(PRESET_PREFIX):
            raise ValueError(f"preset names start with {PRESET_PREFIX!r}")
        if self.value.qjl:
            raise ValueError("QJL estimates inner products; it is for keys only")
        if self.value.feedback:
            raise ValueError("feedback rounding weighs errors by the queries' second moment; "
                             "it is for keys only (set value.feedback=False)")
        return self

    def layout(self, head_dim: int) -> SlotLayout:
        """Byte map of one slot for ``head_dim``; see :mod:`tq_vllm.layout` for the table."""
        return _layout(self, check_head_dim(head_dim))

    def bits_per_coord(self, head_dim: int) -> tuple[float, float]:
        """True (key, value) storage bits per coordinate including norms."""
        lay = self.layout(head_dim)
        return lay.key.bits_per_coord, lay.value.bits_per_coord


def _tensor_layout(codec: TensorCodec, head_dim: int, offset: int) -> tuple[TensorLayout, int]:
    """Lay K or V out from ``offset``: norms first (aligned), codes, signs."""
    dims, bits = codec.group_dims(head_dim), codec.group_bits()
    norms = Segment(offset=offset, nbytes=NORM_BYTES * codec.num_norms)
    pos = norms.end
    codes = []
    for d, b in zip(dims, bits):
        nbytes = d * b // 8  # d is a multiple of 8, so every segment is whole bytes
        codes.append(Segment(offset=pos, nbytes=nbytes))
        pos += nbytes
    signs = None
    if codec.qjl:
        signs = Segment(offset=pos, nbytes=codec.sketch_dims(head_dim)[0] // 8)
        pos = signs.end
    lay = TensorLayout(
        head_dim=head_dim, group_dims=dims, group_bits=bits, norms=norms,
        codes=tuple(codes), signs=signs,
    )
    return lay, pos


@lru_cache(maxsize=256)
def _layout(preset: Preset, head_dim: int) -> SlotLayout:
    key, pos = _tensor_layout(preset.key, head_dim, 0)
    value, pos = _tensor_layout(preset.value, head_dim, pos)
    slot = math.ceil(pos / SLOT_ALIGN) * SLOT_ALIGN
    return SlotLayout(head_dim=head_dim, key=key, value=value, slot_bytes=slot, padding=slot - pos)


def mse_codec(budget: str, **kw) -> TensorCodec:
    """TurboQuant_mse at ``budget`` bits per coordinate ("3.5" → halves at 4 and 3 bits)."""
    b = float(budget)
    hi, lo = math.ceil(b), math.floor(b)
    return TensorCodec(bits_hi=hi, bits_lo=lo, split=hi != lo, **kw)


def _qjl_key(budget: str) -> TensorCodec:
    b = float(budget) - 1
    hi, lo = math.ceil(b), math.floor(b)
    return TensorCodec(bits_hi=hi, bits_lo=lo, split=hi != lo, qjl=True)


RECOMMENDED_TRANSFORM = KVTransform(key_mean=True, key_scale="balanced", calibrated_split=True,
                                    key_offset_choice=True)
"""What the plain ``tq{b}`` presets add to TurboQuant_mse codes (with norm correction),
each kept by a strict-mode perplexity A/B (``eval/ppl_strict.py``, docs/quality.md):
key mean removal, key channel smoothing balanced against the queries (``s² ∝ rms_k /
rms_q``: the scale that minimises a rotation quantizer's logit error; it replaced
``s = rms_k^½`` after a per-layer sweep showed SmolLM2's layer 10 losing as much at 4 bits
as at 3.5 — KL to exact −15 to −30% on both models), the outlier half chosen by
calibration, and the per-token key offset choice (keys far from the mean — the attention
sink — keep it). The paper's QJL keys lose to MSE-only codes at equal bits (π/2 variance
factor, see tests/test_codec.py), so the ``tq{b}`` presets carry no QJL bits; ``tq4.5``
adds a corrected sketch past the 4-bit codebooks (:data:`QJL_RECOMMENDED`)."""


RECOMMENDED_BITS: dict[str, tuple[str, str]] = {
    "4": ("4", "4"), "3.5": ("4", "3"), "3": ("3.5", "2.5"), "2.5": ("3", "2")}
"""(key, value) MSE code bits of ``tq{b}``, averaging ``b``: keys carry most of the
attention error (SmolLM2 tq4, strict: +1.7% from keys alone, +0.3% from values), so
below 4 bits the values give up the bits first (k4v3 +4.2% beat both halves split 4/3,
+4.8%, and is 4 bytes smaller)."""


QJL_RECOMMENDED = Preset(
    name="tq4.5", family="recommended", budget="4.5", sketch="orthogonal",
    key=mse_codec("4", norm_correction=True, qjl=True, qjl_shrink=True),
    value=mse_codec("4", norm_correction=True), transform=RECOMMENDED_TRANSFORM)
"""``tq4`` plus a 1-bit QJL sketch of each key's residual (4.88 bits per coordinate at
head_dim 64, 3.28× smaller than bf16): where QJL earns its bits. Below 4 bits a QJL bit
always loses to an MSE bit (docs/quality.md, sixth round: the unbiased term's variance is
π/2 · n/m times the error it corrects); past the 4-bit codebooks the kernels carry it is
the one more bit the keys can get: KL to exact −40% against ``tq4`` on both bundled
models. Orthonormal rows and the shrink factor ``rotation.qjl_shrink_factor`` (≈ 2/π) make
the sketch a 1-bit quantizer of the rotated residual; the paper's Gaussian, unbiased term
would add more noise than it removes. Its keys round to the nearest code: feedback
rounding shapes the residual the sketch then quantizes (SmolLM2, strict, KL 0.0103 nearest
vs 0.0110 with feedback)."""


FEEDBACK_DAMPING = 0.5
"""Feedback rounding weighs key errors by ``H + δ·mean(diag H)·I``, ``H`` the calibration
queries' second moment: the damping ``δ`` keeps the weight from trusting directions the
calibration text's queries happened not to use — a retrieval query may use them.
SmolLM2, strict, 6 essays, KL to exact of ``tq4`` / ``tq3.5`` / ``tq3`` / ``tq2.5``:
nearest rounding 0.0181 / 0.0345 / 0.0576 / 0.1548; δ = 0.2 0.0145 / 0.0303 / 0.0539 /
0.1344; δ = 0.5 0.0145 / 0.0309 / 0.0542 / 0.1353; δ = 1 0.0152 / 0.0313 / 0.0533 /
0.1367 (``tq4`` alone: δ = 0.001 → 0.0161, 0.01 → 0.0155). Pass key in 1024 tokens, 20
prompts (exact 19): ``tq4`` 18 → 19 / 20 / 20, ``tq3.5`` 18 → 17 / 19 / 19 at δ = 0.2 /
0.5 / 1 (docs/quality.md, eleventh round)."""


TRELLIS_STATE_BITS = 6
"""State bits of the ``tq{b}-trellis`` codes: 64 states, 1.2–2.1 dB less distortion than
the Lloyd–Max codes of the same bits (``tq_vllm.trellis``); decode tables of
``2**(6 + 4)`` floats (4 KiB) per channel group, which stay in L1 beside a tile."""


def with_trellis(preset: Preset, state_bits: int, **update) -> Preset:
    """``preset`` with its K and V codes as bitshift-trellis codes of ``state_bits`` state
    bits (0: scalar codes), both codecs validated (keys that round with feedback search
    their trellis against the same query weight); ``update`` sets other fields (``name``)."""
    codecs = {part: TensorCodec.model_validate({**getattr(preset, part).model_dump(),
                                                "trellis": state_bits})
              for part in ("key", "value")}
    return preset.model_copy(update={**codecs, **update})


def _build_presets() -> dict[str, Preset]:
    out: dict[str, Preset] = {}
    for b in BUDGETS:
        mse = Preset(name=f"tq{b}-mse", family="mse", budget=b,
                     key=mse_codec(b), value=mse_codec(b))
        qjl = Preset(name=f"tq{b}-qjl", family="qjl", budget=b,
                     key=_qjl_key(b), value=mse_codec(b))
        kb, vb = RECOMMENDED_BITS[b]
        rec = Preset(name=f"tq{b}", family="recommended", budget=b,
                     key=mse_codec(kb, norm_correction=True, feedback=True),
                     value=mse_codec(vb, norm_correction=True), transform=RECOMMENDED_TRANSFORM)
        out[mse.name], out[qjl.name], out[rec.name] = mse, qjl, rec
    for b in BUDGETS:
        rec = out[f"tq{b}"]
        out[f"tq{b}-trellis"] = with_trellis(rec, TRELLIS_STATE_BITS, name=f"tq{b}-trellis",
                                             family="trellis")
    out[QJL_RECOMMENDED.name] = QJL_RECOMMENDED
    return out


PRESETS: dict[str, Preset] = _build_presets()
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def is_tq_dtype(name: object) -> bool:
    return isinstance(name, str) and name in PRESETS


def get_preset(name: str) -> Preset:
    """Look up a preset by its ``--kv-cache-dtype`` name, with a clear error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown tq-vllm KV cache preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}"
        ) from None


def backend_enum_name(preset: str) -> str:
    """``tq3.5-qjl`` → ``TQ_VLLM_TQ3_5_QJL``: the AttentionBackendEnum name of its backend."""
    return "TQ_VLLM_" + preset.upper().replace(".", "_").replace("-", "_")


def backend_class_path(preset: str) -> str:
    """Importable path of the preset's backend class in :mod:`tq_vllm.backend`."""
    return "tq_vllm.backend." + backend_enum_name(preset).title().replace("_", "") + "Backend"


def preset_table(head_dim: int) -> list[dict[str, object]]:
    """One row per preset: bits per coordinate (codes and true), slot bytes, ratio."""
    rows = []
    for p in PRESETS.values():
        lay = p.layout(head_dim)
        rows.append({
            "preset": p.name,
            "family": p.family,
            "key_code_bits": p.key.code_bits_per_coord,
            "value_code_bits": p.value.code_bits_per_coord,
            "key_bits": lay.key.bits_per_coord,
            "value_bits": lay.value.bits_per_coord,
            "slot_bytes": lay.slot_bytes,
            "vs_bf16": lay.compression_vs_bf16,
        })
    return rows


__all__ = [
    "PRESETS", "PRESET_NAMES", "Preset", "SlotLayout", "TensorCodec", "TensorLayout",
    "SUPPORTED_HEAD_DIMS", "UnsupportedHeadDim", "check_head_dim", "get_preset",
    "is_tq_dtype", "preset_table",
]
