"""TurboQuant quantizers (PyTorch reference): TurboQuant_mse and TurboQuant_prod.

For one of K or V of one attention layer, :class:`TensorQuantizer` holds the
seeded rotation (per KV head, with that head's outlier-channel permutation), the
per-coordinate codebooks and, for TurboQuant_prod keys, the QJL sketch.

Encoding ``x`` (``[N, H, d]``):

1. ``y = R_h x`` where ``R_h = blockdiag(R_hi, R_lo) · P_h``: ``P_h`` moves the head's
   outlier channels first, each group gets its own randomized Hadamard rotation.
2. Per group ``g``: norm ``n_g = ‖y_g‖``; codes ``idx = nearest centroid of y_g / n_g``
   (Lloyd–Max codebook for dimension ``d_g``); the stored norm is ``n_g`` (or
   ``n_g / ‖c[idx]‖`` with norm correction) rounded to fp16. With ``TensorCodec.trellis``
   the codes are instead the Viterbi path of a bitshift trellis (:mod:`tq_vllm.trellis`:
   same bits, each code decoded with the stream bits before it; the PyTorch reference,
   the CPU and the Triton kernels). With ``TensorCodec.feedback`` (keys of ``tq{b}``) and
   a query weight set (:meth:`TensorQuantizer.set_query_weight`), scalar codes are
   chosen one rotated coordinate at a time, ``i = 0 … d−1``: the code nearest to
   ``w_i / n_g`` (``w`` starts as ``y``), then every later coordinate takes the error in
   (float32, product then difference) ``w_j −= (w_i − n_g c_i) · F_ij`` — LDLQ: with
   ``F`` from the Cholesky factor of the damped query weight's inverse this minimises the
   expected logit error ``E⟨q, y − ŷ⟩²`` greedily rather than ``‖y − ŷ‖``. Trellis codes
   with feedback (``tq{b}-trellis`` keys) are searched against the same weight instead:
   each Viterbi survivor carries its own fed errors (:func:`tq_vllm.trellis.encode_fed`).
   Decoding is unchanged.
3. TurboQuant_prod only: residual ``r = y − ŷ`` in the rotated domain (``ŷ`` built
   from the stored fp16 norms), ``signs = sign(S r)``, ``γ = ‖r‖`` in fp16. Variants
   (``TensorCodec.qjl_rows / qjl_group / qjl_shrink``, issue 7's A/B): ``m = rows · n``
   sketch rows; only the outlier group's residual sketched (``n = d/2``, ``γ = ‖r_0‖``);
   the QJL term scaled by its logit-MSE-optimal factor. The fast kernels run the first
   two only at their defaults (:meth:`TensorQuantizer.kernel_sketch`).

Key offset choice (keys of presets with ``key_offset_choice``, after the calibrated
transform took the mean ``o`` = μ/s off every key): each key is encoded twice, as ``y``
and as ``y + R_h o`` (the key with its mean left in), and the encoding whose residual
``‖r‖`` (as in step 3, float32) is strictly smaller is kept; with
``key_offset_rule='norm'`` (a switch, not a preset's default) the vector is chosen before
encoding, ``y + R_h o`` where ``‖y + R_h o‖ < ‖y‖`` (float32 norms, :func:`_norm`), and
encoded once. The choice is stored in the
sign bit of the first group norm (norms are never negative, so the bit is free);
decoding takes ``R_h o`` off flagged keys again, and the estimator of a flagged key is
``⟨q̃, ŷ⟩ − ⟨q̃, R_h o⟩``. Keys far from the mean — the attention sink, whose logit
error moves every other token's weight — then keep their own small residual.

Norms and ``S r`` are accumulated in float64 (then rounded once), which pins the
stored bits independently of summation order: kernels reproduce them exactly.

The inner-product estimator for a query ``q`` (``q̃ = R_h q``) is
``⟨q̃, ŷ⟩ + c · γ · ⟨S q̃, signs⟩`` with ``c`` from :func:`rotation.qjl_constant`;
it is unbiased over the sketch. :meth:`TensorQuantizer.decode_rotated` returns the
vector ``ŷ + c γ Sᵀ signs`` whose inner products equal that estimator exactly, so
"attention on the dequantized cache" and "scores from codes" agree.

Bad numbers (policy): a vector with any NaN/Inf coordinate is stored as zeros
(norm 0) and counted in ``stats["nonfinite_vectors"]``; a norm above the fp16
range is saturated to 65504 and counted in ``stats["saturated_norms"]``. Neither
touches any other vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tq_vllm import codebook, trellis
from tq_vllm.config import (FEEDBACK_DAMPING, KERNEL_MAX_CODE_BITS, Preset, TensorCodec,
                             TensorLayout, check_head_dim)
from tq_vllm.rotation import (derive_seed, group_rotation, qjl_constant, qjl_shrink_factor,
                               qjl_sketch)

FP16_MAX = 65504.0
_TINY = 1e-30


def _norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dim, accumulated in float64 and rounded once to
    float32, so every implementation (kernels included) gets the same bits."""
    return v.double().norm(dim=-1).float()


@dataclass
class Encoded:
    """Unpacked codes of ``[N, H, d]`` vectors (before byte packing).

    codes: uint8 ``[N, H, d]`` centroid indices in rotated-domain order.
    norms: float16 ``[N, H, num_norms]``: group norms, then the QJL residual norm; the
    first one's sign bit is the key offset flag (see the module docstring).
    signs: bool ``[N, H, d]`` QJL sign bits (True = +1), or None.
    """

    codes: torch.Tensor
    norms: torch.Tensor
    signs: torch.Tensor | None = None


def identity_permutation(num_heads: int, head_dim: int) -> torch.Tensor:
    """Channel order ``[H, d]`` that keeps channels in place (first half = outlier group)."""
    return torch.arange(head_dim).repeat(num_heads, 1)


def outlier_permutation(sample: torch.Tensor) -> torch.Tensor:
    """Per-head channel order putting the half with the largest RMS first.

    sample: ``[N, H, d]`` calibration vectors (e.g. the first prefill's keys).
    Returns long ``[H, d]``; each half keeps ascending channel order.
    """
    if sample.dim() != 3:
        raise ValueError(f"calibration sample must be [N, H, d], got {tuple(sample.shape)}")
    s = sample.float()
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return permutation_from_rms(s.pow(2).mean(0))


def permutation_from_rms(rms: torch.Tensor) -> torch.Tensor:
    """Channel order ``[H, d]`` with the half of largest ``rms`` ``[H, d]`` first (any
    monotone statistic works), each half in ascending channel order."""
    d = rms.shape[-1]
    top = torch.topk(rms, d // 2, dim=-1, sorted=False).indices
    is_hi = torch.zeros_like(rms, dtype=torch.bool).scatter_(-1, top, True)
    # stable sort: hi channels first, each half ascending
    key = (~is_hi).to(torch.int64) * d + torch.arange(d)[None, :]
    return torch.argsort(key, dim=-1)


@dataclass
class TensorQuantizer:
    """Quantizer state for K or V of one layer (all tensors float32, CPU or device)."""

    codec: TensorCodec
    layout: TensorLayout
    rot: torch.Tensor  # [H, d, d]: y = rot[h] @ x
    lut: torch.Tensor  # [d, 2**max_bits] centroid table per rotated coordinate
    bounds: list[torch.Tensor]  # per group decision boundaries
    group_id: torch.Tensor  # long [d]: group of each rotated coordinate
    sketch: torch.Tensor | None  # [m, d] QJL rows (zero outside the sketched group), or None
    qjl_scale: float
    tables: list[torch.Tensor] | None = None  # per group trellis decode table, or None
    offset: torch.Tensor | None = None  # [H, d] key offset o (offset choice), or None
    offset_rot: torch.Tensor | None = None  # [H, d] R_h o
    offset_by_norm: bool = False  # the offset choice's rule: smaller norm (else residual)
    feedback: torch.Tensor | None = None  # [H, d, d] strictly upper F (feedback rounding), or None
    feedback_weight: torch.Tensor | None = None  # [H, d] 1/u_i² (mean 1 per head): trellis feedback
    rot64: torch.Tensor | None = None  # [H, d, d] rot's float32 entries in float64 (rotate)
    stats: dict[str, int] = field(default_factory=lambda: {"nonfinite_vectors": 0,
                                                           "saturated_norms": 0})

    @classmethod
    def create(cls, codec: TensorCodec, layout: TensorLayout, num_heads: int, seed: int,
               tag: str, codebook_kind: str = "beta", sketch_kind: str = "gaussian",
               perm: torch.Tensor | None = None) -> "TensorQuantizer":
        d = check_head_dim(layout.head_dim)
        perm = identity_permutation(num_heads, d) if perm is None else perm.to(torch.long)
        if perm.shape != (num_heads, d):
            raise ValueError(f"channel permutation must be [{num_heads}, {d}], got {tuple(perm.shape)}")
        if not torch.equal(perm.sort(-1).values, torch.arange(d).expand(num_heads, d)):
            raise ValueError("channel permutation rows must be permutations of range(head_dim)")
        block = group_rotation(layout.group_dims, seed, f"{tag}/rot")  # [d, d] float64
        rot = torch.zeros(num_heads, d, d, dtype=torch.float64)
        for h in range(num_heads):
            rot[h][:, perm[h]] = block  # R_h = B · P_h
        width = 1 << max(layout.group_bits)
        lut = torch.zeros(d, width)
        group_id = torch.empty(d, dtype=torch.long)
        bounds, start = [], 0
        for g, (dg, bg) in enumerate(zip(layout.group_dims, layout.group_bits)):
            lut[start:start + dg, : 1 << bg] = codebook.centroids(bg, dg, codebook_kind)
            bounds.append(codebook.boundaries(bg, dg, codebook_kind))
            group_id[start:start + dg] = g
            start += dg
        sketch, scale = None, 0.0
        if codec.qjl:
            m, n = codec.sketch_dims(d)
            rows = codec.qjl_rows
            sketch = torch.zeros(m, d)
            sketch[:, :n] = qjl_sketch(n, derive_seed(seed, tag, "qjl"), sketch_kind, rows).float()
            scale = qjl_constant(n, sketch_kind, rows)
            if codec.qjl_shrink:
                scale *= qjl_shrink_factor(n, sketch_kind, rows)
        tables = None
        if codec.trellis:
            tables = [trellis.table(bg, codec.trellis, dg)
                      for dg, bg in zip(layout.group_dims, layout.group_bits)]
        rot = rot.float()
        return cls(codec=codec, layout=layout, rot=rot, lut=lut, bounds=bounds,
                   group_id=group_id, sketch=sketch, qjl_scale=scale, tables=tables,
                   rot64=rot.double())

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    def _check_kernel_bits(self) -> None:
        if max(self.layout.group_bits) > KERNEL_MAX_CODE_BITS:
            raise ValueError(f"the fast kernels decode codes of at most {KERNEL_MAX_CODE_BITS} "
                             f"bits; {max(self.layout.group_bits)}-bit codes run in the PyTorch "
                             f"reference only")

    def group_codebooks(self) -> torch.Tensor:
        """Centroids ``[G, W]`` of each channel group: the row ``lut`` repeats for every
        coordinate of the group, which is what the fast kernels read. Raises if ``lut``
        differs between coordinates of a group (the kernels would read it wrong), and for
        trellis codes (:meth:`trellis_tables` is what the kernels read for those)."""
        if self.tables is not None:
            raise ValueError(f"trellis codes (trellis={self.codec.trellis}) have no scalar "
                             f"codebooks: read trellis_tables()")
        self._check_kernel_bits()
        starts = torch.tensor([0, *self.layout.group_dims[:-1]]).cumsum(0).to(self.lut.device)
        books = self.lut[starts]
        if not torch.equal(books[self.group_id], self.lut):
            raise ValueError("the fast kernels read one codebook per channel group, but this "
                             "quantizer's centroid table differs between coordinates of a group")
        return books

    def trellis_tables(self) -> torch.Tensor:
        """Trellis decode tables ``[G, 2**(S + max bits)]`` float32 (group ``g``'s table in
        its first ``2**(S + bits_g)`` entries, zeros after), what the kernels read.
        Raises for scalar codes and for codes wider than the kernels take."""
        if self.tables is None:
            raise ValueError("this quantizer has scalar codes: read group_codebooks()")
        self._check_kernel_bits()
        return trellis.padded_tables(self.tables)

    def kernel_sketch(self) -> torch.Tensor | None:
        """The ``[d, d]`` QJL sketch the fast kernels read (one row per coordinate, whole
        residual), or None without QJL. Raises for the reference-only sketch variants
        (``qjl_rows > 1``, ``qjl_group='outlier'``): the kernels read d sign bits."""
        if self.sketch is None:
            return None
        d = self.head_dim
        if self.sketch.shape != (d, d) or self.codec.qjl_group != "all":
            raise ValueError(
                f"the fast kernels read a [{d}, {d}] QJL sketch of the whole residual; this "
                f"codec sketches {tuple(self.sketch.shape)} (qjl_rows={self.codec.qjl_rows}, "
                f"qjl_group={self.codec.qjl_group!r}), which only the PyTorch reference runs")
        return self.sketch

    def to(self, device: torch.device | str) -> "TensorQuantizer":
        """Move the tables to ``device`` (in place); returns self."""
        self.rot, self.rot64, self.lut, self.group_id = (
            t.to(device) for t in (self.rot, self.rot64, self.lut, self.group_id))
        self.bounds = [b.to(device) for b in self.bounds]
        if self.sketch is not None:
            self.sketch = self.sketch.to(device)
        if self.offset is not None:
            self.offset, self.offset_rot = self.offset.to(device), self.offset_rot.to(device)
        if self.feedback is not None:
            self.feedback = self.feedback.to(device)
            self.feedback_weight = self.feedback_weight.to(device)
        if self.tables is not None:
            self.tables = [t.to(device) for t in self.tables]
        return self

    def set_offset(self, offset: torch.Tensor, by_norm: bool = False) -> "TensorQuantizer":
        """Turn on the offset choice with offset ``o`` ``[H, d]`` (stored domain), deciding
        by the smaller residual or (``by_norm``) the smaller norm; returns self."""
        h, d = self.rot.shape[0], self.head_dim
        if offset.shape != (h, d) or not offset.is_floating_point():
            raise ValueError(f"key offset must be a float [{h}, {d}] tensor, got "
                             f"{offset.dtype} {tuple(offset.shape)}")
        if not bool(torch.isfinite(offset).all()):
            raise ValueError("key offset has non-finite entries: recalibrate the model")
        self.offset = offset.float().to(self.rot.device).contiguous()
        self.offset_rot = self.rotate(self.offset[None])[0].contiguous()
        self.offset_by_norm = by_norm
        return self

    def offset_by_norm_choice(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The offset choice by norm for rotated keys ``y`` ``[N, H, d]``: (the vectors to
        encode, ``y + R_h o`` where ``‖y + R_h o‖ < ‖y‖`` else ``y``, float32 contiguous;
        the flags, bool ``[N, H]``). Every store path calls this one function."""
        alt = y + self.offset_rot
        flag = _norm(alt) < _norm(y)
        return torch.where(flag[..., None], alt, y).contiguous(), flag

    def set_query_weight(self, weight: torch.Tensor) -> "TensorQuantizer":
        """Turn on feedback rounding (``TensorCodec.feedback``) for queries of second moment
        ``weight`` ``[H, d, d]`` (stored domain, summed over each KV head's query heads);
        returns self. ``F_h`` is the strictly upper part of ``U / diag(U)``, ``U`` the upper
        Cholesky factor of ``(R_h W_h R_hᵀ + δ·mean(diag)·I)⁻¹`` (:data:`FEEDBACK_DAMPING`),
        computed in float64 and rounded once to float32; ``feedback_weight`` ``[H, d]`` is
        ``1 / diag(U)²`` scaled to mean 1 per head (what a trellis search weighs each
        coordinate's fed error by: :func:`tq_vllm.trellis.encode_fed`)."""
        h, d = self.rot.shape[0], self.head_dim
        if not self.codec.feedback:
            raise ValueError("this codec rounds to the nearest code: set feedback=True in its "
                             "TensorCodec to give it a query weight")
        if weight.shape != (h, d, d) or not weight.is_floating_point():
            raise ValueError(f"query weight must be a float [{h}, {d}, {d}] tensor, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        w = weight.double().cpu()
        if not bool(torch.isfinite(w).all()) or not torch.allclose(w, w.mT, rtol=1e-5, atol=1e-8):
            raise ValueError("query weight must be finite and symmetric (a second moment of "
                             "queries): recalibrate the model")
        rot = self.rot64.cpu()
        hr = rot @ w @ rot.mT
        scale = hr.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        hr = hr + FEEDBACK_DAMPING * scale[:, None, None] * torch.eye(d, dtype=torch.float64)
        u = torch.linalg.cholesky(torch.linalg.inv(hr), upper=True)
        diag = u.diagonal(dim1=-2, dim2=-1)
        f = (u / diag[..., None]).triu(1)
        wt = 1.0 / diag ** 2
        self.feedback = f.float().to(self.rot.device).contiguous()
        self.feedback_weight = (wt / wt.mean(-1, keepdim=True)).float().to(self.rot.device).contiguous()
        return self

    def rotate(self, x: torch.Tensor, head_of: torch.Tensor | None = None) -> torch.Tensor:
        """``y = R_h x`` float32 for ``x`` ``[N, Hx, d]``; ``head_of[i]`` maps column i to its
        KV head. Accumulated in float64 (``R_h``'s float32 entries, exactly promoted) and
        rounded once: a float32 GEMM changes its blocking with ``N`` (1–3 tokens gave other
        last bits than 4 or more), so a token's codes would depend on the batch it is
        stored with; float64 sums differ by ~1e-16 relative, which survives the rounding
        only where a sum lies that close to a float32 rounding point."""
        rot = self.rot64 if head_of is None else self.rot64[head_of]
        return torch.einsum("nhd,hed->nhe", x.double(), rot).float()

    def rotate_finite(self, x: torch.Tensor) -> torch.Tensor:
        """``R_h x`` float32 ``[N, H, d]`` for ``x`` ``[N, H, d]`` (any float dtype) under the
        non-finite policy: a vector with a NaN/Inf coordinate is rotated as zeros and
        counted. A non-finite coordinate makes its whole rotated row non-finite (NaN or Inf
        times any rotation entry, zero included, is not finite), so one sum over the result
        says whether there is any."""
        x = x.float()
        y = self.rotate(x)
        if not math.isfinite(float(y.sum())):  # rare: find and zero the bad vectors
            finite = torch.isfinite(x).all(-1)
            if not bool(finite.all()):
                self.stats["nonfinite_vectors"] += int((~finite).sum())
                y = self.rotate(torch.where(finite[..., None], x, torch.zeros_like(x)))
        return y

    def unrotate(self, y: torch.Tensor, head_of: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`rotate`: ``x = R_hᵀ y``."""
        rot = self.rot if head_of is None else self.rot[head_of]
        return torch.einsum("nhe,hed->nhd", y, rot)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.rot.shape[0] or x.shape[2] != self.head_dim:
            raise ValueError(
                f"expected [N, {self.rot.shape[0]}, {self.head_dim}] vectors, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {x.dtype}")

    def unit_values(self, codes: torch.Tensor) -> torch.Tensor:
        """Centroid values ``[N, H, d]`` (unit-norm scale) for codes ``[N, H, d]``."""
        if self.tables is not None:
            return torch.cat([self._trellis_values(codes[..., a:a + dg], g)
                              for g, (a, dg) in enumerate(self.group_spans())], -1)
        lut = self.lut.expand(*codes.shape[:-1], *self.lut.shape)
        return torch.gather(lut, -1, codes.long().unsqueeze(-1)).squeeze(-1)

    def group_spans(self) -> list[tuple[int, int]]:
        """(first coordinate, size) of each channel group."""
        dims = self.layout.group_dims
        return [(sum(dims[:g]), dg) for g, dg in enumerate(dims)]

    def group_unit(self, y: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm float32 ``[N, H]``, unit-scale coordinates float32 ``[N, H, d_g]``) of
        channel group ``g`` of rotated vectors ``y`` ``[N, H, d]``: what its codes quantize."""
        a, dg = self.group_spans()[g]
        yg = y[..., a:a + dg]
        n = _norm(yg)
        return n, yg / n.clamp_min(_TINY)[..., None]

    def trellis_codes(self, y: torch.Tensor, search=None, fed_search=None) -> torch.Tensor:
        """Trellis codes uint8 ``[N, H, d]`` of rotated vectors ``y`` ``[N, H, d]``: each
        channel group's Viterbi path on its unit coordinates (:meth:`group_unit`), found by
        ``search(u [R, d_g], table, bits, state_bits)`` — :func:`trellis.encode` unless a
        kernel passes its own (bit-identical) search. With a query weight set (feedback)
        the groups are searched together against it by ``fed_search``, which has
        :func:`trellis.encode_fed`'s signature and codes (the default)."""
        if self.tables is None:
            raise ValueError("this quantizer has scalar codes: no trellis search")
        if self.feedback is not None:
            norms = [self.group_unit(y, g)[0] for g in range(len(self.tables))]
            return self._trellis_fed_codes(y, norms, fed_search)
        search = search or trellis.encode
        codes = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
        for g, (start, dg) in enumerate(self.group_spans()):
            u = self.group_unit(y, g)[1].reshape(-1, dg)
            found = search(u, self.tables[g], self.layout.group_bits[g], self.codec.trellis)
            codes[..., start:start + dg] = found.view(*y.shape[:-1], dg)
        return codes

    def feedback_codes(self, y: torch.Tensor,
                       norms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8, unit-scale values float32), both ``[N, H, d]``, of rotated vectors
        ``y`` ``[N, H, d]`` by feedback rounding (module docstring), or for trellis codes by
        the search against the query weight; ``norms[g]`` ``[N, H]`` is group ``g``'s norm
        ``n_g`` (:meth:`group_unit`), clamped as it divides there."""
        if self.feedback is None:
            raise ValueError("no query weight set: call set_query_weight first")
        if self.tables is not None:
            codes = self._trellis_fed_codes(y, norms)
            return codes, self.unit_values(codes)
        scale = torch.empty_like(y)
        for (a, dg), n in zip(self.group_spans(), norms):
            scale[..., a:a + dg] = n.clamp_min(_TINY)[..., None]
        w = y.clone()
        codes = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
        vals = torch.empty_like(y)
        gid = self.group_id.tolist()
        for i in range(y.shape[-1]):
            idx = torch.bucketize((w[..., i] / scale[..., i]).contiguous(), self.bounds[gid[i]])
            c = self.lut[i][idx]
            codes[..., i], vals[..., i] = idx.to(torch.uint8), c
            err = w[..., i] - c * scale[..., i]
            w[..., i + 1:] -= err[..., None] * self.feedback[:, i, i + 1:]
        return codes, vals

    def _trellis_fed_codes(self, y: torch.Tensor, norms: list[torch.Tensor],
                           fed_search=None) -> torch.Tensor:
        """Trellis codes uint8 ``[N, H, d]`` of ``y`` ``[N, H, d]`` searched against the
        query weight (:func:`trellis.encode_fed`, or ``fed_search`` with its signature);
        ``norms[g]`` ``[N, H]`` as in :meth:`feedback_codes`."""
        n, h, d = y.shape
        head = torch.arange(h, device=y.device).repeat(n)
        nrm = torch.stack(norms, -1).clamp_min(_TINY).reshape(n * h, -1).contiguous()
        codes = (fed_search or trellis.encode_fed)(
            y.reshape(n * h, d).contiguous(), nrm, head, self.feedback, self.feedback_weight,
            self.tables, list(self.layout.group_bits), self.codec.trellis)
        return codes.view(n, h, d)

    def _trellis_values(self, codes: torch.Tensor, g: int) -> torch.Tensor:
        return trellis.decode(codes, self.tables[g], self.layout.group_bits[g], self.codec.trellis)

    def _group_codes(self, unit: torch.Tensor, g: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8, unit-scale values float32) of group ``g``'s normalized coordinates
        ``unit`` ``[N, H, d_g]``: nearest centroid, or the trellis's Viterbi path."""
        if self.tables is None:
            idx = torch.bucketize(unit.contiguous(), self.bounds[g])
            return idx.to(torch.uint8), self.lut[start, :][idx]
        flat = unit.reshape(-1, unit.shape[-1]).float()
        codes = trellis.encode(flat, self.tables[g], self.layout.group_bits[g],
                               self.codec.trellis).reshape(unit.shape)
        return codes, self._trellis_values(codes, g)

    def group_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-coordinate stored norms ``[N, H, d]`` from fp16 norms ``[N, H, num_norms]``
        (the offset flag, a sign bit, dropped)."""
        return norms.float().abs()[..., self.group_id]

    def query_offsets(self, q: torch.Tensor) -> torch.Tensor | None:
        """``⟨q, o_h⟩`` float32 contiguous ``[N, Hq]`` for queries ``q`` ``[N, Hq, d]`` (GQA:
        heads grouped by KV head), what a flagged key's logit loses; None without offset."""
        if self.offset is None:
            return None
        o = self.offset.repeat_interleave(q.shape[1] // self.offset.shape[0], 0)
        return (q.float() * o).sum(-1).contiguous()

    @staticmethod
    def offset_flags(norms: torch.Tensor) -> torch.Tensor:
        """Key offset flags, bool ``[N, H]``, from fp16 norms ``[N, H, num_norms]``."""
        return norms[..., 0].view(torch.int16) < 0

    def encode(self, x: torch.Tensor) -> Encoded:
        """Quantize ``x`` ``[N, H, d]`` (any float dtype) to unpacked codes."""
        self._check(x)
        y = self.rotate_finite(x)
        flag = None
        if self.offset_rot is not None and self.offset_by_norm:
            y, flag = self.offset_by_norm_choice(y)
        codes, norms, signs, resid = self._encode_rotated(y)
        if self.offset_rot is not None and not self.offset_by_norm:
            alt = self._encode_rotated(y + self.offset_rot)
            flag = alt[3] < resid
            pick = (lambda a, b: None if a is None else
                    torch.where(flag.reshape(*flag.shape, *[1] * (a.dim() - 2)), b, a))
            codes, norms, signs = (pick(a, b) for a, b in zip((codes, norms, signs), alt))
        norms16 = self._to_fp16(norms)
        if flag is not None:
            bits = norms16.view(torch.int16)
            bits[..., 0] |= flag.to(torch.int16) * -32768  # the first norm's sign bit
        return Encoded(codes=codes, norms=norms16, signs=signs)

    def _encode_rotated(self, y: torch.Tensor):
        """(codes, float32 norms ``[N, H, num_norms]``, signs or None, residual norm
        ``‖y − ŷ‖`` float32 ``[N, H]`` or None) of rotated vectors ``y`` ``[N, H, d]``; the
        residual is computed for QJL keys and for the offset choice."""
        codes = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
        spans = self.group_spans()
        units = [self.group_unit(y, g) for g in range(len(spans))]
        fed = (self.feedback_codes(y, [n for n, _ in units]) if self.feedback is not None
               else None)
        norms = []
        for g, (start, dg) in enumerate(spans):
            n, unit = units[g]
            if fed is None:
                idx, vals = self._group_codes(unit, g, start)
            else:
                idx, vals = (t[..., start:start + dg] for t in fed)
            codes[..., start:start + dg] = idx
            if self.codec.norm_correction:
                c_norm = _norm(vals)
                n = torch.where(c_norm > 0, n / c_norm.clamp_min(_TINY), n)
            norms.append(n)
        signs = resid = None
        if self.codec.qjl or (self.offset_rot is not None and not self.offset_by_norm):
            partial = torch.stack(norms, -1).clamp(max=FP16_MAX).to(torch.float16)  # counted later
            r = y - self.group_norms(partial) * self.unit_values(codes)
            resid = _norm(r)
        if self.codec.qjl:
            n = self.codec.sketch_dims(self.head_dim)[1]
            r_s = r[..., :n]  # the sketched group (all of r unless qjl_group='outlier')
            signs = (r_s.double() @ self.sketch[:, :n].double().T) >= 0
            norms.append(resid if n == self.head_dim else _norm(r_s))
        return codes, torch.stack(norms, -1), signs, resid

    def _to_fp16(self, n: torch.Tensor) -> torch.Tensor:
        over = n > FP16_MAX
        self.stats["saturated_norms"] += int(over.sum())
        return n.clamp(max=FP16_MAX).to(torch.float16)

    def decode_rotated(self, enc: Encoded) -> torch.Tensor:
        """Rotated-domain vectors ``[N, H, d]`` float32 whose inner products with ``R_h q``
        equal the estimator (MSE part, plus the QJL term for TurboQuant_prod)."""
        y_hat = self._mse_rotated(enc)
        if self.codec.qjl:
            pm = enc.signs.float() * 2 - 1
            gamma = enc.norms[..., -1:].float()
            y_hat = y_hat + self.qjl_scale * gamma * (pm @ self.sketch)
        return y_hat

    def _mse_rotated(self, enc: Encoded) -> torch.Tensor:
        """Rotated-domain MSE reconstruction ``[N, H, d]``, offset taken off flagged keys."""
        y_hat = self.group_norms(enc.norms) * self.unit_values(enc.codes)
        if self.offset_rot is not None:
            y_hat = y_hat - self.offset_flags(enc.norms)[..., None].float() * self.offset_rot
        return y_hat

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Dequantized vectors ``[N, H, d]`` float32 in the original domain."""
        return self.unrotate(self.decode_rotated(enc))

    def decode_mse(self, enc: Encoded) -> torch.Tensor:
        """Original-domain MSE reconstruction only (QJL term dropped), ``[N, H, d]``."""
        return self.unrotate(self._mse_rotated(enc))

    def scores(self, q_rot: torch.Tensor, enc: Encoded, head_of: torch.Tensor) -> torch.Tensor:
        """Inner-product estimates from codes, without decoding keys to the original domain.

        q_rot: ``[L, Hq, d]`` queries already rotated by their KV head's ``R_h``.
        enc: codes of ``T`` tokens, ``[T, H, d]``; head_of: long ``[Hq]`` → KV head.
        Returns ``[L, Hq, T]`` float32: MSE part in the rotated domain plus the QJL bias.
        """
        unit = self.unit_values(enc.codes)[:, head_of]  # [T, Hq, d]
        norms = self.group_norms(enc.norms)[:, head_of]
        s = torch.einsum("lhd,thd->lht", q_rot, unit * norms)
        if self.codec.qjl:
            q_sk = q_rot @ self.sketch.T  # [L, Hq, d]: each query sketched once
            pm = enc.signs[:, head_of].float() * 2 - 1
            gamma = enc.norms[:, head_of, -1].float()  # [T, Hq]
            s = s + self.qjl_scale * gamma.T[None] * torch.einsum("lhd,thd->lht", q_sk, pm)
        if self.offset_rot is not None:
            q_off = (q_rot * self.offset_rot[head_of]).sum(-1)  # [L, Hq]: ⟨R q, R o⟩
            flag = self.offset_flags(enc.norms)[:, head_of].float()  # [T, Hq]
            s = s - q_off[..., None] * flag.T[None]
        return s


@dataclass
class LayerCodec:
    """Key and value quantizers of one attention layer."""

    preset: Preset
    key: TensorQuantizer
    value: TensorQuantizer

    @classmethod
    def create(cls, preset: Preset, head_dim: int, num_kv_heads: int, layer: int = 0,
               key_perm: torch.Tensor | None = None, value_perm: torch.Tensor | None = None,
               key_offset: torch.Tensor | None = None,
               key_query_weight: torch.Tensor | None = None) -> "LayerCodec":
        """Build the seeded codec of ``layer``; same inputs give bit-identical tables.

        key_offset: ``[H, d]`` stored-domain key mean for presets with the key offset
        choice (:meth:`tq_vllm.calibration.LayerTransform.stored_key_mean`); without it
        such a preset stores every key as given (no flags).
        key_query_weight: ``[H, d, d]`` stored-domain query second moment for presets whose
        keys round with feedback (:meth:`TensorQuantizer.set_query_weight`); without it
        they round to the nearest code."""
        if key_offset is not None and not preset.transform.key_offset_choice:
            raise ValueError(f"preset {preset.name} has no key offset choice; pass no key_offset")
        if key_query_weight is not None and not preset.key.feedback:
            raise ValueError(f"preset {preset.name} rounds keys to the nearest code; pass no "
                             f"key_query_weight")
        lay = preset.layout(head_dim)
        seed = derive_seed(preset.seed, "layer", layer)
        common = dict(num_heads=num_kv_heads, seed=seed, codebook_kind=preset.codebook,
                      sketch_kind=preset.sketch)
        key = TensorQuantizer.create(preset.key, lay.key, tag="k", perm=key_perm, **common)
        if key_offset is not None:
            key.set_offset(key_offset, by_norm=preset.transform.key_offset_rule == "norm")
        if key_query_weight is not None:
            key.set_query_weight(key_query_weight)
        return cls(preset=preset, key=key,
                   value=TensorQuantizer.create(preset.value, lay.value, tag="v", perm=value_perm,
                                                **common))

    def to(self, device: torch.device | str) -> "LayerCodec":
        self.key.to(device)
        self.value.to(device)
        return self
