"""Public codec API outside vLLM: encode, decode, score, shadow mode, memory report.

The recommended presets (``tq4``, ``tq3.5``, …) need calibration statistics
(:mod:`tq_vllm.calibration`): pass ``calibration=KVStats`` or let the first
``append`` calibrate on the vectors it receives.

Example (executed by ``tests/test_api.py``)::

    import torch
    from tq_vllm.api import KVCompressor

    kv = KVCompressor("tq3.5", head_dim=128, num_kv_heads=2, keep_exact_shadow=True)
    keys, values = torch.randn(100, 2, 128), torch.randn(100, 2, 128)
    kv.append(keys, values)                       # calibrates, packs 116-byte slots
    q = torch.randn(1, 4, 128)                    # 4 query heads share 2 KV heads
    scores = kv.scores(q)                         # [1, 4, 100] from the codes
    out = kv.attend(q)                            # [1, 4, 128] softmax(q·k/√d)·v
    report = kv.shadow_report(q)                  # score error against the exact copies
    print(kv.memory_report())                     # packed vs shadow vs fp16 bytes
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from tq_vllm.calibration import KVStats, LayerTransform, calibrated_codec
from tq_vllm.codec import LayerCodec
from tq_vllm.config import SlotLayout, get_preset
from tq_vllm.layout import pack_slots, unpack_slots


@dataclass(frozen=True)
class MemoryReport:
    """Honest byte accounting of a compressed KV store.

    ``resident_bytes`` is what the store actually holds (packed slots plus any exact
    shadows); never quote ``packed_bytes`` as the saving while shadows are kept.
    """

    tokens: int
    kv_heads: int
    head_dim: int
    code_bytes: int  # K and V centroid indices
    sign_bytes: int  # QJL sign bits
    norm_bytes: int  # fp16 norms (metadata)
    padding_bytes: int  # slot alignment
    packed_bytes: int  # all of the above: the paged cache's bytes
    shadow_bytes: int  # exact float32 K/V copies kept by shadow mode
    resident_bytes: int
    fp16_baseline_bytes: int  # same tokens as an fp16/bf16 K+V cache
    fp32_baseline_bytes: int

    @property
    def compression_vs_fp16(self) -> float:
        return self.fp16_baseline_bytes / self.resident_bytes if self.resident_bytes else math.inf

    def as_dict(self) -> dict:
        return asdict(self) | {"compression_vs_fp16": self.compression_vs_fp16}


def memory_report(layout: SlotLayout, tokens: int, kv_heads: int, shadow_bytes: int = 0) -> MemoryReport:
    """Byte accounting for ``tokens`` × ``kv_heads`` slots of ``layout``."""
    n = tokens * kv_heads
    parts = (layout.key, layout.value)
    code = sum(s.nbytes for t in parts for s in t.codes)
    sign = sum(t.signs.nbytes for t in parts if t.signs)
    norm = sum(t.norms.nbytes for t in parts)
    packed = n * layout.slot_bytes
    return MemoryReport(
        tokens=tokens, kv_heads=kv_heads, head_dim=layout.head_dim,
        code_bytes=n * code, sign_bytes=n * sign, norm_bytes=n * norm,
        padding_bytes=n * layout.padding, packed_bytes=packed, shadow_bytes=shadow_bytes,
        resident_bytes=packed + shadow_bytes, fp16_baseline_bytes=n * 2 * layout.head_dim * 2,
        fp32_baseline_bytes=n * 2 * layout.head_dim * 4,
    )


class KVCompressor:
    """An append-only compressed K/V store for one attention layer.

    keys/values are ``[N, H, d]``; queries ``[L, Hq, d]`` with ``Hq`` a multiple of ``H``.
    With ``keep_exact_shadow`` the exact vectors are kept beside the codes for
    side-by-side comparison (and counted in the memory report).
    """

    def __init__(self, preset: str, head_dim: int, num_kv_heads: int = 1, layer: int = 0,
                 keep_exact_shadow: bool = False, calibration: KVStats | None = None):
        self.preset = get_preset(preset)
        self.layout = self.preset.layout(head_dim)
        self.layer = layer
        self.num_kv_heads = num_kv_heads
        self.transform = LayerTransform()
        self.codec = LayerCodec.create(self.preset, head_dim, num_kv_heads, layer)
        self._calibrated = not self.preset.transform.needs_calibration
        self.keep_exact_shadow = keep_exact_shadow
        self.slots = torch.empty(0, num_kv_heads, self.layout.slot_bytes, dtype=torch.uint8)
        self._shadow_k: list[torch.Tensor] = []
        self._shadow_v: list[torch.Tensor] = []
        if calibration is not None:
            self.calibrate(calibration)

    def __len__(self) -> int:
        return self.slots.shape[0]

    def calibrate(self, stats: KVStats) -> None:
        """Set the preset's calibrated transforms (and outlier halves) from ``stats``.

        Presets that need calibration (the recommended ``tq{b}``) calibrate on the
        first :meth:`append` or :meth:`encode` unless this was called first; the
        vLLM backend uses the model's cached calibration instead. That first-use
        calibration sees no queries, so ``tq{b}`` keys then round to the nearest code (and
        ``tq{b}-trellis`` keys take the plain search); pass ``KVStats.from_samples(keys,
        values, queries)`` here for feedback rounding."""
        if len(self):
            raise RuntimeError("calibrate before the first append: stored codes depend on it")
        self.codec, self.transform = calibrated_codec(self.preset, stats, self.layout.head_dim,
                                                      self.layer)
        self._calibrated = True

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Pack ``[N, H, d]`` keys and values into uint8 slots ``[N, H, slot_bytes]``."""
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
        if not self._calibrated:
            self.calibrate(KVStats.from_samples(keys, values))
        tf = self.transform
        return pack_slots(self.layout, self.codec.key.encode(tf.keys(keys.float())),
                          self.codec.value.encode(tf.values(values.float())))

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (keys, values) ``[N, H, d]`` float32 from slots."""
        k, v = unpack_slots(self.layout, slots)
        tf = self.transform
        return tf.unkeys(self.codec.key.decode(k)), tf.unvalues(self.codec.value.decode(v))

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Compress and append ``[N, H, d]`` tokens."""
        self.slots = torch.cat([self.slots, self.encode(keys, values)])
        if self.keep_exact_shadow:
            self._shadow_k.append(keys.detach().float().clone())
            self._shadow_v.append(values.detach().float().clone())

    def _head_of(self, queries: torch.Tensor) -> torch.Tensor:
        if queries.dim() != 3 or queries.shape[1] % self.num_kv_heads:
            raise ValueError(f"queries must be [L, Hq, d] with Hq a multiple of "
                             f"{self.num_kv_heads}, got {tuple(queries.shape)}")
        return torch.arange(queries.shape[1]) // (queries.shape[1] // self.num_kv_heads)

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Estimated ``⟨q, k⟩`` ``[L, Hq, N]`` computed from the codes (plus the exact
        ``⟨q, μ_k⟩`` that key mean removal took out)."""
        head_of = self._head_of(queries)
        k, _ = unpack_slots(self.layout, self.slots)
        q = queries.float()
        est = self.codec.key.scores(self.codec.key.rotate(self.transform.queries(q), head_of),
                                    k, head_of)
        return est + self.transform.key_offset(q)[..., None]

    def exact_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Exact ``⟨q, k⟩`` ``[L, Hq, N]`` from the shadow copies."""
        if not self.keep_exact_shadow:
            raise RuntimeError("exact scores need keep_exact_shadow=True")
        k = torch.cat(self._shadow_k)[:, self._head_of(queries)]
        return torch.einsum("lhd,nhd->lhn", queries.float(), k)

    def attend(self, queries: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Non-causal attention of ``[L, Hq, d]`` queries over all stored tokens."""
        scale = 1 / math.sqrt(self.layout.head_dim) if scale is None else scale
        head_of = self._head_of(queries)
        p = torch.softmax(self.scores(queries) * scale, -1)
        _, v = unpack_slots(self.layout, self.slots)
        v_rot = self.codec.value.decode_rotated(v)[:, head_of]
        out = self.codec.value.unrotate(torch.einsum("lhn,nhd->lhd", p, v_rot), head_of)
        self.transform.restore_output(out)
        return out

    def shadow_report(self, queries: torch.Tensor) -> dict[str, float]:
        """Per-token score error of the codes against the exact shadow keys."""
        est, ref = self.scores(queries), self.exact_scores(queries)
        err = est - ref
        scale = 1 / math.sqrt(self.layout.head_dim)
        p_ref = torch.softmax(ref * scale, -1)
        kl = (p_ref * (torch.log_softmax(ref * scale, -1) - torch.log_softmax(est * scale, -1))).sum(-1)
        return {"score_rmse": err.pow(2).mean().sqrt().item(), "score_bias": err.mean().item(),
                "score_max_abs_error": err.abs().max().item(), "softmax_kl": kl.mean().item()}

    def memory_report(self) -> MemoryReport:
        shadow = sum(t.numel() * t.element_size() for t in self._shadow_k + self._shadow_v)
        return memory_report(self.layout, len(self), self.num_kv_heads, shadow)
