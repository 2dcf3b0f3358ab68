"""Triton decode/prefill attention vs the reference paged attention.

Runs the kernels on CPU tensors through the Triton interpreter, or compiled on a GPU
with ``TQ_TEST_DEVICE=cuda`` (tests/kernels/conftest.py). The reference
(``reference.tq_paged_attention``, equal to exact attention on the dequantized
cache) gets the very same queries (bf16 queries stay bf16 for both), so the only
differences are fp32 summation order in the kernel and, for bf16 outputs, the final
rounding to bf16.
"""

import os

if os.environ.get("TQ_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to test")

from tq_vllm.kernels import triton_ops  # noqa: E402
from test_reference import shrunk_qjl_preset  # noqa: E402  (tests/ on sys.path: conftest)
from tq_vllm.reference import (dequantize_sequence, exact_attention,  # noqa: E402
                               tq_paged_attention)

FP32_ATOL, FP32_RTOL = 2e-5, 1e-4
"""fp32 accumulation over d-term dot products and ≤ a few hundred softmax terms in a
different order than the reference: ~1e-6 observed, 2e-5 / 1e-4 as in test_reference."""

KV_HEADS = 2
SEQ_LENS = [37, 1, 50, 16]  # ragged: not a multiple of the block size, 1 token, exact blocks
Q_LENS = [5, 1, 50, 1]  # prefill batch: continuation chunk, decode, full prefill, decode

# Every axis value appears at least twice across the cases: presets of both families,
# head_dim 64/128, GQA 1/3/7, block size 16/32, query dtype float32/bfloat16.
CASES = [
    ("tq4", 64, 1, 16, torch.float32),
    ("tq3.5-qjl", 64, 3, 32, torch.bfloat16),
    ("tq2.5-mse", 128, 7, 16, torch.float32),
    ("tq3-qjl", 128, 1, 32, torch.bfloat16),
    ("tq3.5-qjl", 128, 7, 32, torch.float32),
    ("tq4", 128, 3, 16, torch.bfloat16),
    ("tq2.5-mse", 64, 3, 32, torch.bfloat16),
    ("tq3-qjl", 64, 7, 16, torch.float32),
    ("tq4.5", 64, 3, 16, torch.bfloat16),  # 4-bit keys + orthonormal shrunk QJL + offsets
    ("tq3-trellis", 64, 3, 16, torch.float32),  # trellis windows, two channel groups
    ("tq3.5-trellis", 64, 7, 32, torch.bfloat16),  # one group: a window across the halves
]
IDS = [f"{n}-d{d}-g{g}-bs{b}-{str(t)[6:]}" for n, d, g, b, t in CASES]


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``out`` (in the query dtype) vs fp32 ``ref``; a bf16 output may also be off by its
    own rounding, half a bf16 ulp (2^-8 relative). Returns the max abs error."""
    rtol = FP32_RTOL + (2.0 ** -8 if out.dtype == torch.bfloat16 else 0.0)
    torch.testing.assert_close(out.float(), ref, atol=FP32_ATOL, rtol=rtol)
    return float((out.float() - ref).abs().max())


def torch_attention_in(dtype, q, cache, table, seq_lens, qsl, codec, scale):
    """Torch's attention computed in ``dtype`` on the dequantized cache
    (:func:`exact_attention`): the rows ``qsl[i]..qsl[i+1]`` of ``q`` ``[T, Hq, d]`` are the
    last positions of sequence ``i`` → float32 ``[T, Hq, d]``."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i, s in enumerate(seq_lens):
        q0, q1 = int(qsl[i]), int(qsl[i + 1])
        if q1 > q0:
            k, v = dequantize_sequence(cache, table[i], s, codec)
            out[q0:q1] = exact_attention(q[q0:q1], k, v, scale, dtype=dtype).float()
    return out


def _tf32_on_gpu(q: torch.Tensor) -> bool:
    """Whether the kernels run plain TF32 dots for ``q`` compiled on a GPU (the interpreter
    computes every dot in fp32)."""
    return triton_ops.dot_precision(q) == "tf32" and q.device.type == "cuda"


def assert_within_torch_dtype_error(out: torch.Tensor, out32: torch.Tensor, ref: torch.Tensor,
                                    torch_same_dtype: torch.Tensor) -> None:
    """GPU, bf16 queries: the fp32 output's max error within torch's own bf16 attention
    error, the bf16 output's within twice it (both also round the output to bf16)."""
    bound = float((torch_same_dtype - ref).abs().max())
    assert float((out32 - ref).abs().max()) <= bound, (float((out32 - ref).abs().max()), bound)
    assert float((out.float() - ref).abs().max()) <= 2 * bound


def _decode(q, cache, table, seq_lens, codec):
    out = torch.empty_like(q)
    triton_ops.decode(q, cache, table, torch.tensor(seq_lens, dtype=torch.int32,
                                                    device=cache.device),
                      codec, q.shape[-1] ** -0.5, out)
    return out


def _decode_ref(q, cache, table, seq_lens, codec):
    return tq_paged_attention(q, cache, table, torch.tensor(seq_lens),
                              torch.arange(len(seq_lens) + 1), codec)


def _randn(*shape, dtype=torch.float32, device):
    """Standard normal drawn on the CPU (same bits on every device), moved to ``device``."""
    return torch.randn(*shape).to(dtype).to(device)


@pytest.mark.parametrize("name,dim,gqa,block_size,dtype", CASES, ids=IDS)
def test_decode_matches_reference(name, dim, gqa, block_size, dtype, build_cache, device):
    codec, cache, table, _, _ = build_cache(name, dim, KV_HEADS, block_size, SEQ_LENS)
    q = _randn(len(SEQ_LENS), KV_HEADS * gqa, dim, dtype=dtype, device=device)
    out = _decode(q, cache, table, SEQ_LENS, codec)
    assert out.dtype == dtype
    ref = _decode_ref(q, cache, table, SEQ_LENS, codec)
    out32 = torch.empty(q.shape, dtype=torch.float32, device=device)
    triton_ops.decode(q, cache, table, torch.tensor(SEQ_LENS, dtype=torch.int32, device=device),
                      codec, dim ** -0.5, out32)
    if _tf32_on_gpu(q):
        same = torch_attention_in(dtype, q, cache, table, SEQ_LENS, torch.arange(len(SEQ_LENS) + 1),
                                  codec, dim ** -0.5)
        assert_within_torch_dtype_error(out, out32, ref, same)
    else:  # fp32-accurate dots: an fp32 output shows the kernel's own error
        assert_close(out, ref)
        assert_close(out32, ref)


@pytest.mark.parametrize("name,dim,gqa,block_size,dtype", CASES, ids=IDS)
def test_prefill_matches_reference(name, dim, gqa, block_size, dtype, build_cache, device):
    codec, cache, table, _, _ = build_cache(name, dim, KV_HEADS, block_size, SEQ_LENS)
    t = sum(Q_LENS)
    q = _randn(t, KV_HEADS * gqa, dim, dtype=dtype, device=device)
    k, v = (_randn(t, KV_HEADS, dim, dtype=dtype, device=device) for _ in range(2))
    qsl = torch.tensor([0] + torch.tensor(Q_LENS).cumsum(0).tolist())
    out = torch.zeros_like(q)
    triton_ops.prefill(q, k, v, cache, table, torch.tensor(SEQ_LENS), qsl, 0, codec, dim ** -0.5,
                       out, False)
    ref = tq_paged_attention(q, cache, table, torch.tensor(SEQ_LENS), qsl, codec)
    if _tf32_on_gpu(q):
        out32 = torch.zeros(q.shape, dtype=torch.float32, device=device)
        triton_ops.prefill(q, k, v, cache, table, torch.tensor(SEQ_LENS), qsl, 0, codec,
                           dim ** -0.5, out32, False)
        same = torch_attention_in(dtype, q, cache, table, SEQ_LENS, qsl, codec, dim ** -0.5)
        assert_within_torch_dtype_error(out, out32, ref, same)
    else:
        assert_close(out, ref)


def test_decode_split_kv_and_empty_sequence(monkeypatch, build_cache, device):
    """Several splits per sequence (some empty) merged by log-sum-exp; seq_len 0 → zeros."""
    monkeypatch.setattr(triton_ops, "DECODE_SPLIT_TOKENS", 32)
    monkeypatch.setitem(triton_ops.DECODE_BLOCK_N, 64, 16)  # two tiles per split, 4 splits
    seq_lens = [100, 33, 7, 0]
    codec, cache, table, _, _ = build_cache("tq3.5-qjl", 64, KV_HEADS, 16, seq_lens)
    q = _randn(4, KV_HEADS * 2, 64, device=device)
    out = _decode(q, cache, table, seq_lens, codec)
    assert_close(out[:3], _decode_ref(q[:3], cache, table[:3], seq_lens[:3], codec))
    assert torch.all(out[3] == 0)


def test_decode_does_not_depend_on_the_batch(monkeypatch, build_cache, device):
    """A sequence decoded alone gives the same bits as beside a longer one, which makes
    the grid launch more splits (fixed split size, in-order merge of empty splits)."""
    monkeypatch.setattr(triton_ops, "DECODE_SPLIT_TOKENS", 32)
    monkeypatch.setitem(triton_ops.DECODE_BLOCK_N, 64, 16)
    seq_lens = [45, 150]
    codec, cache, table, _, _ = build_cache("tq3.5", 64, KV_HEADS, 16, seq_lens)
    q = _randn(2, KV_HEADS * 3, 64, device=device)
    both = _decode(q, cache, table, seq_lens, codec)
    alone = _decode(q[:1], cache, table[:1, :3], seq_lens[:1], codec)
    assert torch.equal(alone[0], both[0])
    assert triton_ops.num_splits(table.shape[1] * 16) > triton_ops.num_splits(3 * 16)


def test_head_dim_256_block_128_gqa_8(build_cache, device):
    seq_lens, q_lens = [130, 5], [3, 5]
    codec, cache, table, _, _ = build_cache("tq3-qjl", 256, 1, 128, seq_lens)
    q = _randn(2, 8, 256, device=device)
    assert_close(_decode(q, cache, table, seq_lens, codec),
                 _decode_ref(q, cache, table, seq_lens, codec))
    qp = _randn(sum(q_lens), 8, 256, device=device)
    qsl = torch.tensor([0, 3, 8])
    out = torch.zeros_like(qp)
    fresh = _randn(8, 1, 256, device=device)
    triton_ops.prefill(qp, fresh, fresh, cache, table,
                       torch.tensor(seq_lens), qsl, 0, codec, 256 ** -0.5, out, False)
    assert_close(out, tq_paged_attention(qp, cache, table, torch.tensor(seq_lens), qsl, codec))


def test_prefill_first_and_fresh_exact(build_cache, device):
    """Rows before ``first`` stay untouched; a chunk without context uses the fresh K/V."""
    seq_lens, q_lens = [20, 24, 40], [1, 24, 9]
    codec, cache, table, kv, _ = build_cache("tq4-qjl", 64, KV_HEADS, 16, seq_lens)
    t = sum(q_lens)
    q = _randn(t, KV_HEADS * 3, 64, device=device)
    k = torch.cat([kv[0][0][-1:], kv[1][0], kv[2][0][-9:]])
    v = torch.cat([kv[0][1][-1:], kv[1][1], kv[2][1][-9:]])
    qsl = torch.tensor([0, 1, 25, 34])
    out = torch.full_like(q, 7.0)
    triton_ops.prefill(q, k, v, cache, table, torch.tensor(seq_lens), qsl, 1, codec, 0.125,
                       out, True)
    assert torch.all(out[:1] == 7.0)
    assert_close(out[1:25], exact_attention(q[1:25], kv[1][0], kv[1][1], scale=0.125))
    ref = tq_paged_attention(q, cache, table, torch.tensor(seq_lens), qsl, codec, scale=0.125)
    assert_close(out[25:], ref[25:])
    # without fresh_exact the fresh chunk reads the compressed cache like any other
    triton_ops.prefill(q, k, v, cache, table, torch.tensor(seq_lens), qsl, 1, codec, 0.125,
                       out, False)
    assert_close(out[1:], ref[1:])


def test_decode_on_strided_cache_view(build_cache, device):
    """vLLM may hand a view: permuted (token, head) strides and padded slots."""
    name, dim, bs = "tq2.5-qjl", 64, 16
    seq_lens = [29, 40]
    codec, packed, table, _, _ = build_cache(name, dim, KV_HEADS, bs, seq_lens)
    slot = packed.shape[-1]
    base = torch.zeros(packed.shape[0], bs, KV_HEADS, slot + 4, dtype=torch.uint8, device=device)
    view = base.permute(0, 2, 1, 3)[..., 2:2 + slot]
    view.copy_(packed)
    q = _randn(2, KV_HEADS * 3, dim, device=device)
    assert_close(_decode(q, view, table, seq_lens, codec),
                 _decode_ref(q, packed, table, seq_lens, codec))


@pytest.mark.parametrize("name,dim", [("tq4", 64), ("tq3", 128), ("tq4-qjl", 64),
                                      ("tq2.5-trellis", 64), ("tq3.5-trellis", 64)])
def test_word_loads_equal_byte_loads(name, dim, build_cache, device):
    """Code runs, norms and offset flags read as aligned int32 words (every slot 4-byte
    aligned: ``A4``) decode what the byte loads decode (the same slots at an odd stride):
    straddling 3- and 4-bit runs, two channel groups, QJL sign runs and residual norms,
    trellis windows with the run before. Under the interpreter both run one arithmetic:
    the same bits. Compiled, the two variants are two kernels whose reductions the
    compiler may lay out differently (1–4e-7 apart on an H100, with or without FMA
    fusion), so there they are held to the kernels' fp32 tolerance; a misread word
    would be off by O(1)."""
    seq_lens, q_lens = [29, 40], [3, 1]
    codec, packed, table, _, _ = build_cache(name, dim, KV_HEADS, 16, seq_lens)
    slot = packed.shape[-1]

    def in_slots_of(width):
        base = torch.zeros(*packed.shape[:3], width, dtype=torch.uint8, device=device)
        view = base[..., :slot]
        view.copy_(packed)
        return view

    words, single = in_slots_of(-(-slot // 4) * 4), in_slots_of(slot + 1)
    assert triton_ops.word_aligned(words) and not triton_ops.word_aligned(single)
    def same(a, b):
        if device.type == "cpu":
            assert torch.equal(a, b)
        else:
            assert_close(a, b)

    q = _randn(2, KV_HEADS * 3, dim, device=device)
    same(_decode(q, words, table, seq_lens, codec), _decode(q, single, table, seq_lens, codec))
    qp = _randn(sum(q_lens), KV_HEADS * 3, dim, device=device)
    fresh = _randn(sum(q_lens), KV_HEADS, dim, device=device)
    outs = []
    for cache in (words, single):
        out = torch.zeros_like(qp)
        triton_ops.prefill(qp, fresh, fresh, cache, table, torch.tensor(seq_lens),
                           torch.tensor([0, 3, 4]), 0, codec, dim ** -0.5, out, False)
        outs.append(out)
    same(*outs)


def test_launchers_reject_bad_inputs(build_cache):
    """Validation runs before any launch: checked on CPU tensors on every test device."""
    codec, cache, table, _, _ = build_cache("tq4", 64, KV_HEADS, 16, [20],
                                            device=torch.device("cpu"))
    q = torch.randn(1, 4, 64)
    sl = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(ValueError, match="out"):
        triton_ops.decode(q, cache, table, sl, codec, 0.1, torch.empty(1, 4, 32))
    with pytest.raises(ValueError, match="block_table"):
        triton_ops.decode(q, cache, table.float(), sl, codec, 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.zeros(1, 4, dtype=torch.int32)
        triton_ops.decode(q, cache, wide[:, ::2], sl, codec, 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="multiple"):
        triton_ops.decode(torch.randn(1, 3, 64), cache, table, sl, codec, 0.1,
                          torch.empty(1, 3, 64))
    with pytest.raises(ValueError, match="head size"):
        triton_ops.decode(torch.randn(1, 4, 128), cache, table, sl, codec, 0.1,
                          torch.empty(1, 4, 128))
    with pytest.raises(ValueError, match="uint8"):
        triton_ops.decode(q, cache.to(torch.int16), table, sl, codec, 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="host"):
        triton_ops.prefill(q, torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache, table, sl,
                           torch.tensor([0, 1]).to("meta"), 0, codec, 0.1, torch.empty_like(q),
                           False)
    with pytest.raises(ValueError, match="query tokens but seq_len"):
        triton_ops.prefill(torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64),
                           cache, table, torch.tensor([2]), torch.tensor([0, 3]), 0, codec, 0.1,
                           torch.empty(3, 4, 64), False)


def test_kernels_refuse_a_centroid_table_that_varies_inside_a_group(build_cache):
    """The kernels read one codebook per channel group: a per-coordinate table that
    differs inside a group is refused before any launch (CPU tensors on every test
    device, as above), not silently read wrong."""
    codec, cache, table, _, _ = build_cache("tq3.5", 64, KV_HEADS, 16, [20],
                                            device=torch.device("cpu"))
    codec.value.lut[5] *= 1.5  # coordinate 5 of the value group gets its own centroids
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="one codebook per channel group"):
        triton_ops.decode(q, cache, table, torch.tensor([20], dtype=torch.int32), codec, 0.1,
                          torch.empty_like(q))


def test_decode_carries_the_qjl_shrink_factor(build_cache, device):
    """The QJL term scaled by its optimal factor (issue 7's A/B, orthonormal sketch): the
    launcher sketches the query with the codec's scale, so decode matches the reference."""
    codec, cache, table, _, _ = build_cache(shrunk_qjl_preset("orthogonal"), 64, KV_HEADS, 16,
                                            SEQ_LENS)
    q = _randn(len(SEQ_LENS), KV_HEADS * 3, 64, device=device)
    out = _decode(q, cache, table, SEQ_LENS, codec)
    assert_close(out, _decode_ref(q, cache, table, SEQ_LENS, codec))  # fp32 queries: fp32 dots
