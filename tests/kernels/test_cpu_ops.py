"""CPU kernels (native AVX-512 / AVX2 and Numba) against the PyTorch reference.

Attention is compared with :func:`tq_vllm.reference.tq_paged_attention`, which
itself equals exact attention on the dequantized cache (tests/test_reference.py),
so these tolerances measure kernel error only: float32 accumulation in another
order (~1e-6), never quantization error.
"""

import sys
from pathlib import Path

import pytest
import torch

from tq_vllm import rotation
from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS, mse_codec
from tq_vllm.kernels import cpu_native, cpu_ops, triton_ops
from tq_vllm.reference import tq_paged_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_reference import (build_cache, fed_search_case, key_offset, query_weight,  # noqa: E402
                            shrunk_qjl_preset, trellis_preset)

ATOL = 2e-5  # float32 reduction-order noise on O(1) outputs, ~20× observed max


def _require_native():
    """Skips where the native kernel cannot be built here; fails where it should have been."""
    if cpu_native.load() is None:
        if cpu_native.best_isa() is not None and cpu_native.find_compiler() is not None:
            pytest.fail("the native kernel did not build although this CPU and compiler support "
                        "it: see the compiler error logged by tq_vllm.kernels.cpu_native")
        pytest.skip("no AVX-512 or AVX2 CPU, or no C++ compiler here: native kernel unavailable")


@pytest.fixture(params=["native", "numba"])
def impl(request, monkeypatch):
    """The float32 bodies of the native kernel (its AMX bodies for bf16 models are
    tests/kernels/test_cpu_amx.py's), or the Numba kernel."""
    cpu_native.load.cache_clear()
    if request.param == "numba":
        monkeypatch.setenv(cpu_native.DISABLE_ENV, "1")
    else:
        _require_native()
        cpu_native.set_amx(0)
    yield request.param
    if request.param == "native":
        cpu_native.set_amx(cpu_native.amx_default())
    cpu_native.load.cache_clear()


def _reference(q, cache, table, seq_lens, q_lens, codec, dtype):
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    return tq_paged_attention(q.to(dtype).float(), cache, table, torch.tensor(seq_lens), qsl, codec, 0.3), qsl


@pytest.mark.parametrize("name", ["tq4", "tq3.5-qjl", "tq3", "tq2.5-mse", "tq4-qjl", "tq4.5",
                                  "tq3-trellis"])
@pytest.mark.parametrize("dim,gqa,block_size", [(64, 3, 16), (64, 1, 32), (128, 7, 16),
                                                  (128, 8, 128), (256, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(impl, name, dim, gqa, block_size, dtype):
    seq_lens = [1, 37, 300, 16, 129]  # not multiples of the block size, and one exact
    codec, cache, table, _, _ = build_cache(name, dim, 2, block_size, seq_lens)
    q = torch.randn(len(seq_lens), 2 * gqa, dim).to(dtype)
    out = torch.empty(len(seq_lens), 2 * gqa, dim, dtype=dtype)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, seq_lens, [1] * len(seq_lens), codec, dtype)
    tol = ATOL if dtype == torch.float32 else 2 ** -8 * ref.abs().max().item()  # bf16 output rounding
    assert (out.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dim", [64, 128])
def test_native_decode_takes_every_preset(name, dim):
    """The native kernel reads a tile's key codes and sign bits as 4-byte words (up to 3
    bytes past them, inside the slot) and refuses a layout where that would leave the
    slot: every preset's layout must be one it takes, and give the reference's result."""
    _require_native()
    seq_lens = [16, 21]  # a full tile, and a partial one whose other lanes read unused slots
    codec, cache, table, _, _ = build_cache(name, dim, 2, 16, seq_lens)
    q = torch.randn(len(seq_lens), 6, dim)
    out = torch.empty_like(q)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, seq_lens, [1] * len(seq_lens), codec, torch.float32)
    assert (out - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("gqa", [4, 5, 6, 9, 16])
@pytest.mark.parametrize("name", ["tq3", "tq2.5-qjl"])
def test_decode_every_gqa_width(impl, name, gqa):
    """The native kernel is compiled per GQA group size 1-8 (accumulators in registers)
    plus one body for any size up to 16; the sizes the grid above misses, with split
    groups of 1 to 4 bits."""
    seq_lens = [45, 17]
    codec, cache, table, _, _ = build_cache(name, 64, 2, 16, seq_lens)
    q = torch.randn(len(seq_lens), 2 * gqa, 64)
    out = torch.empty_like(q)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, seq_lens, [1] * len(seq_lens), codec, torch.float32)
    assert (out - ref).abs().max().item() <= ATOL


def test_decode_long_context_uses_splits_and_stays_exact(impl):
    codec, cache, table, _, _ = build_cache("tq3.5", 64, 1, 16, [2100])
    assert cpu_ops.num_splits(2100) > 1
    q = torch.randn(1, 3, 64)
    out = torch.empty(1, 3, 64)
    cpu_ops.decode(q, cache, table, torch.tensor([2100]), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, [2100], [1], codec, torch.float32)
    assert (out - ref).abs().max().item() <= ATOL


def test_decode_is_deterministic(impl):
    codec, cache, table, _, _ = build_cache("tq4-qjl", 64, 2, 16, [700, 33])
    q = torch.randn(2, 6, 64)
    a, b = torch.empty(2, 6, 64), torch.empty(2, 6, 64)
    cpu_ops.decode(q, cache, table, torch.tensor([700, 33]), codec, 0.3, a)
    cpu_ops.decode(q, cache, table, torch.tensor([700, 33]), codec, 0.3, b)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["tq4", "tq3.5-qjl", "tq2.5-mse", "tq4.5", "tq2.5-trellis"])
@pytest.mark.parametrize("dim,gqa,block_size", [(64, 3, 16), (128, 7, 32)])
def test_prefill_matches_reference(impl, name, dim, gqa, block_size):
    seq_lens = [37, 50, 129]
    q_lens = [5, 50, 1]  # continuation chunk, whole prompt from the cache, one token
    codec, cache, table, _, _ = build_cache(name, dim, 2, block_size, seq_lens)
    q = torch.randn(sum(q_lens), 2 * gqa, dim)
    ref, qsl = _reference(q, cache, table, seq_lens, q_lens, codec, torch.float32)
    out = torch.zeros_like(q)
    cpu_ops.prefill(q, None, None, cache, table, torch.tensor(seq_lens), qsl, 0, codec, 0.3, out,
                    fresh_exact=False)
    assert (out - ref).abs().max().item() <= ATOL


def _values_as_trellis(name: str, state_bits: int):
    """``name`` with its values alone as trellis codes of ``state_bits`` state bits."""
    p = PRESETS[name]
    value = p.value.model_copy(update={"trellis": state_bits})
    return p.model_copy(update={"name": f"{name}@vtrellis={state_bits}", "value": value})


@pytest.mark.parametrize("preset", [trellis_preset(3, "tq3-mse"), trellis_preset(3, "tq2.5-mse"),
                                    _values_as_trellis("tq3.5", 3), _values_as_trellis("tq3", 3)],
                         ids=lambda p: p.name)
def test_small_trellis_tables_decode_and_prefill_match_reference(impl, preset):
    """Trellis tables of at most 64 entries (S + B <= 6: 3 state bits with 1-3-bit codes)
    are read by register permutes in the AVX-512 build, larger ones by gathers: decode and
    prefill of such codes (both tensors, two groups of 3 and 2 bits, values only beside
    scalar keys rounded with feedback) against the reference."""
    seq_lens, q_lens = [37, 130], [5, 1]
    codec, cache, table, _, _ = build_cache(preset, 64, 2, 16, seq_lens)
    q = torch.randn(len(seq_lens), 6, 64)
    out = torch.empty_like(q)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, seq_lens, [1] * len(seq_lens), codec, torch.float32)
    assert (out - ref).abs().max().item() <= ATOL
    qp = torch.randn(sum(q_lens), 6, 64)
    ref, qsl = _reference(qp, cache, table, seq_lens, q_lens, codec, torch.float32)
    outp = torch.zeros_like(qp)
    cpu_ops.prefill(qp, None, None, cache, table, torch.tensor(seq_lens), qsl, 0, codec, 0.3,
                    outp, fresh_exact=False)
    assert (outp - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["tq3.5", "tq4-qjl", "tq3.5-trellis"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [3, 7, 9])  # paired chunks, single chunks, the generic body
def test_prefill_rows_equal_decode_steps_bit_for_bit(impl, name, dtype, gqa):
    """A prompt recomputed after preemption, chunked, or read from the prefix cache must
    give the bits its decode steps gave: every prefill row is that decode step (the native
    prefill shares each decoded tile between rows; the arithmetic per row is decode's)."""
    seq_lens = [700, 90]  # 100 cached tokens + a 600-token chunk crossing a KV split; 50 + 40
    q_lens = [600, 40]
    codec, cache, table, _, _ = build_cache(name, 64, 2, 16, seq_lens)
    q = torch.randn(sum(q_lens), 2 * gqa, 64).to(dtype)
    whole = torch.empty_like(q)
    cpu_ops.prefill(q, None, None, cache, table, torch.tensor(seq_lens), torch.tensor([0, 600, 640]),
                    0, codec, 0.3, whole, fresh_exact=False)
    s, n = seq_lens[0], q_lens[0]
    chunks = torch.empty_like(q[:n])
    for a, b in ((0, 250), (250, 251), (251, n)):
        cpu_ops.prefill(q[a:b], None, None, cache, table[:1], torch.tensor([s - n + b]),
                        torch.tensor([0, b - a]), 0, codec, 0.3, chunks[a:b], fresh_exact=False)
    assert torch.equal(chunks, whole[:n])
    steps = torch.empty_like(q)
    for row, seq, length in ((0, 0, 101), (1, 0, 102), (17, 0, 118), (411, 0, 512),
                             (412, 0, 513), (599, 0, 700), (600, 1, 51), (639, 1, 90)):
        cpu_ops.decode(q[row:row + 1], cache, table[seq:seq + 1], torch.tensor([length]), codec,
                       0.3, steps[row:row + 1])
        assert torch.equal(steps[row], whole[row]), (row, length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_fresh_exact_path_uses_fresh_kv(dtype):
    """fast-prefill's first chunk: exact attention over the fresh K/V, computed in the
    inputs' dtype (a bf16 model's runs bf16 SDPA, as vLLM's own attention does)."""
    codec, cache, table, kv, _ = build_cache("tq4", 64, 1, 16, [20])
    q = torch.randn(20, 3, 64).to(dtype)
    k, v = kv[0][0].to(dtype), kv[0][1].to(dtype)
    out = torch.zeros_like(q)
    cpu_ops.prefill(q, k, v, cache, table, torch.tensor([20]), torch.tensor([0, 20]),
                    0, codec, 0.125, out, fresh_exact=True)
    from tq_vllm.reference import exact_attention
    ref = exact_attention(q, k, v, 0.125, dtype=torch.float64)
    tol = ATOL if dtype == torch.float32 else 2 ** -8 * ref.abs().max().item()  # bf16 output rounding
    assert (out.double() - ref).abs().max().item() <= tol


def test_launcher_rejects_non_contiguous_slots():
    codec, cache, table, _, _ = build_cache("tq4", 64, 1, 16, [20])
    wide = torch.zeros(*cache.shape[:3], cache.shape[3] * 2, dtype=torch.uint8)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        cpu_ops.decode(torch.randn(1, 3, 64), wide, table, torch.tensor([20]), codec, 0.1,
                       torch.empty(1, 3, 64))


@pytest.mark.parametrize("name", ["tq4", "tq3.5", "tq3", "tq2.5-mse", "tq4-qjl", "tq3.5-qjl", "tq2.5-qjl", "tq4.5",
                                  "tq3-trellis", "tq2.5-trellis"])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [201, 6, 4, 2])
def test_store_bit_exact_with_reference(impl, name, dim, dtype, tokens):
    from tq_vllm.codec import LayerCodec
    from tq_vllm.config import PRESETS
    from tq_vllm.reference import tq_store

    offset = key_offset(PRESETS[name], 3, dim)
    codec = LayerCodec.create(PRESETS[name], dim, 3, key_offset=offset,
                              key_query_weight=query_weight(PRESETS[name], 3, dim))
    assert (codec.key.feedback is not None) == PRESETS[name].key.feedback
    slot = PRESETS[name].layout(dim).slot_bytes
    ref = torch.randint(0, 256, (40, 3, 16, slot), dtype=torch.uint8)
    ours = ref.clone()
    # 201 tokens: the native store takes them 16 (AVX2: 8) at a time in SIMD lanes; a
    # decode step's few (token 0 is padding): 5 and 3 rotated a vector at a time, then
    # rounded in lanes beside their offset alternatives (AVX2, 5: all in lanes), 1 a
    # vector at a time throughout
    k, v = (torch.randn(201, 3, dim) * 3).to(dtype), torch.randn(201, 3, dim).to(dtype)
    if offset is not None:  # keys near −offset: stored flagged
        k[::5] = (-offset + 0.3 * torch.randn(41, 3, dim)).to(dtype)
    k[7, 2, 5] = float("nan")
    v[9, 0, 1] = float("inf")
    k[11, 1] *= 1e4  # beyond fp16 for a norm only in float32/bf16
    sm = torch.randperm(40 * 16)[:201]
    sm[::9] = -1  # padding slots, at every position of a task's tokens
    k, v, sm = k[:tokens], v[:tokens], sm[:tokens]
    tq_store(k, v, ref, sm, codec)
    ref_stats = dict(codec.key.stats)
    codec.key.stats.update(nonfinite_vectors=0, saturated_norms=0)
    codec.value.stats.update(nonfinite_vectors=0)
    cpu_ops.store(k, v, ours, sm, codec)
    assert torch.equal(ours, ref)
    assert codec.key.stats == ref_stats


def test_store_bit_exact_with_offset_choice_on_qjl_keys(impl):
    """The offset choice on TurboQuant_prod keys: QJL signs and γ of the kept encoding."""
    from tq_vllm.codec import LayerCodec
    from tq_vllm.config import PRESETS
    from tq_vllm.reference import tq_store

    base = PRESETS["tq3.5-qjl"]
    tf = base.transform.model_copy(update={"key_mean": True, "key_offset_choice": True})
    preset = base.model_copy(update={"transform": tf})
    offset = 0.5 * torch.randn(2, 64)
    codec = LayerCodec.create(preset, 64, 2, key_offset=offset)
    ref = torch.randint(0, 256, (8, 2, 16, preset.layout(64).slot_bytes), dtype=torch.uint8)
    ours = ref.clone()
    k, v = torch.randn(60, 2, 64), torch.randn(60, 2, 64)
    k[::3] = -offset + 0.3 * torch.randn(20, 2, 64)
    sm = torch.randperm(128)[:60]
    tq_store(k, v, ref, sm, codec)
    cpu_ops.store(k, v, ours, sm, codec)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("rule", ["norm", "residual"])
def test_store_bit_exact_with_trellis_offset_rules(impl, rule):
    """Trellis keys with the offset choice by residual (the presets: two searches per key)
    and by norm (one): codes, choice and flags equal the reference's."""
    from tq_vllm.reference import tq_store

    base = PRESETS["tq3-trellis"]
    preset = base.model_copy(update={"transform": base.transform.model_copy(
        update={"key_offset_rule": rule})})
    offset = key_offset(preset, 2, 64)
    codec = LayerCodec.create(preset, 64, 2, key_offset=offset,
                              key_query_weight=query_weight(preset, 2, 64))
    ref = torch.randint(0, 256, (8, 2, 16, preset.layout(64).slot_bytes), dtype=torch.uint8)
    ours = ref.clone()
    k, v = torch.randn(60, 2, 64), torch.randn(60, 2, 64)
    k[::3] = -offset + 0.3 * torch.randn(20, 2, 64)
    sm = torch.randperm(128)[:60]
    sm[::7] = -1
    flags = codec.key.offset_flags(codec.key.encode(k[sm >= 0]).norms)
    assert flags.any() and not flags.all()  # the data exercises the choice both ways
    tq_store(k, v, ref, sm, codec)
    cpu_ops.store(k, v, ours, sm, codec)
    assert torch.equal(ours, ref)


def test_store_rejects_out_of_range_slots_before_writing(impl):
    from tq_vllm.codec import LayerCodec
    from tq_vllm.config import PRESETS

    codec = LayerCodec.create(PRESETS["tq4"], 64, 1)
    cache = torch.zeros(2, 1, 16, PRESETS["tq4"].layout(64).slot_bytes, dtype=torch.uint8)
    with pytest.raises(IndexError, match="beyond"):
        cpu_ops.store(torch.randn(2, 1, 64), torch.randn(2, 1, 64), cache, torch.tensor([3, 32]), codec)
    assert torch.all(cache == 0)


def test_decode_does_not_depend_on_the_batch(impl):
    """A sequence's output is bit-identical alone and beside a longer sequence (which
    raises the batch's split count): the split of a sequence depends on its length only."""
    seq_lens = [1500, 4000]
    codec, cache, table, _, _ = build_cache("tq3.5", 64, 2, 16, seq_lens)
    q = torch.randn(2, 6, 64)
    both = torch.empty(2, 6, 64)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, both)
    alone = torch.empty(1, 6, 64)
    cpu_ops.decode(q[:1], cache, table[:1], torch.tensor(seq_lens[:1]), codec, 0.3, alone)
    assert cpu_ops.num_splits(4000) > cpu_ops.num_splits(1500) > 1
    assert torch.equal(alone[0], both[0])


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_decode_carries_the_qjl_shrink_factor(impl, kind):
    """The kernels read the codec's QJL scale, so the shrunk estimator needs no kernel
    change: decode matches the reference, and differs from the unshrunk decode."""
    seq_lens = [37, 130]
    preset = shrunk_qjl_preset(kind)
    codec, cache, table, _, _ = build_cache(preset, 64, 2, 16, seq_lens)
    assert codec.key.qjl_scale < rotation.qjl_constant(64, kind)
    q = torch.randn(len(seq_lens), 6, 64)
    out = torch.empty_like(q)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, seq_lens, [1] * len(seq_lens), codec, torch.float32)
    assert (out - ref).abs().max().item() <= ATOL
    plain = LayerCodec.create(PRESETS["tq3.5-qjl"].model_copy(update={"sketch": kind}), 64, 2, layer=3)
    unshrunk, _ = _reference(q, cache, table, seq_lens, [1] * len(seq_lens), plain, torch.float32)
    assert (unshrunk - ref).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("kw", [{"qjl_rows": 2}, {"qjl_group": "outlier"}])
def test_kernels_refuse_reference_only_sketches(kw):
    base = PRESETS["tq3.5-qjl"]
    preset = base.model_copy(update={"key": mse_codec("2.5", qjl=True, **kw)})
    codec = LayerCodec.create(preset, 64, 2)
    with pytest.raises(ValueError, match="only the PyTorch reference runs"):
        cpu_ops.tables(codec)
    with pytest.raises(ValueError, match="only the PyTorch reference runs"):
        triton_ops._tables(codec.key)


@pytest.mark.parametrize("bits,state_bits,dim", [(4, 6, 64), (3, 6, 32), (2, 6, 64), (1, 5, 32),
                                                 (4, 4, 16), (3, 10, 16), (2, 7, 128)])
def test_trellis_search_matches_reference(impl, bits, state_bits, dim):
    """The store's trellis search (native SIMD or Numba) returns the reference's Viterbi
    codes bit for bit: same float32 arithmetic, branch order and ties (the unreachable
    states of the first steps, whose branches all cost inf, and a zero row included)."""
    from tq_vllm import trellis

    gen = torch.Generator().manual_seed(bits * dim + state_bits)
    tab = torch.randn(1 << (state_bits + bits), generator=gen) / dim ** 0.5
    u = torch.randn(300, dim, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    u[7] = 0.0
    got = cpu_ops.trellis_search(u, tab, bits, state_bits)
    assert torch.equal(got, trellis.encode(u, tab, bits, state_bits))


@pytest.mark.parametrize("bits,state_bits,dim,heads", [((4,), 6, 64, 3), ((4, 3), 6, 64, 2),
                                                       ((3, 2), 6, 128, 2), ((2,), 5, 256, 1),
                                                       ((1, 1), 4, 32, 2), ((3,), 10, 16, 1)])
def test_trellis_fed_search_matches_reference(impl, bits, state_bits, dim, heads):
    """The store's search against a query weight (native or Numba) returns
    :func:`trellis.encode_fed`'s codes bit for bit: per-survivor feedback rows, the
    weighted branch cost, ties and the unreachable first states (a zero row, a repeated
    row and rows of several heads: :func:`fed_search_case`)."""
    from tq_vllm import trellis

    y, norms, head, fb, wt, tabs = fed_search_case(bits, state_bits, dim, heads, rows=201)
    got = cpu_ops.trellis_search_fed(y, norms, head, fb, wt, tabs, list(bits), state_bits)
    want = trellis.encode_fed(y, norms, head, fb, wt, tabs, list(bits), state_bits)
    assert torch.equal(got, want)


def test_trellis_codes_with_a_qjl_sketch_match_reference(impl):
    """Trellis codes under ``tq4.5``'s shrunk QJL sketch: the residual the signs sketch is
    the trellis reconstruction's, stored and read back bit for bit."""
    from tq_vllm.reference import tq_store

    preset = trellis_preset(6, "tq4.5")
    seq_lens = [70, 33]
    codec, cache, table, _, _ = build_cache(preset, 64, 2, 16, seq_lens)
    q = torch.randn(2, 6, 64)
    out = torch.empty_like(q)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out)
    ref, _ = _reference(q, cache, table, seq_lens, [1, 1], codec, torch.float32)
    assert (out - ref).abs().max().item() <= ATOL
    k, v = torch.randn(50, 2, 64), torch.randn(50, 2, 64)
    a = torch.zeros(4, 2, 16, preset.layout(64).slot_bytes, dtype=torch.uint8)
    b = a.clone()
    tq_store(k, v, a, torch.arange(50), codec)
    cpu_ops.store(k, v, b, torch.arange(50), codec)
    assert torch.equal(a, b)


def test_kernels_refuse_what_they_cannot_read_before_writing():
    """5-bit codes (issue 7's reference-only A/B) are refused by the CPU and Triton stores
    by name, the cache left untouched."""
    preset = PRESETS["tq4-mse"].model_copy(update={"key": mse_codec("5"), "value": mse_codec("5")})
    codec = LayerCodec.create(preset, 64, 2)
    cache = torch.zeros(2, 2, 16, preset.layout(64).slot_bytes, dtype=torch.uint8)
    kv = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="at most 4 bits"):
        cpu_ops.store(kv, kv, cache, torch.tensor([0, 1, 2]), codec)
    assert not cache.any()
    with pytest.raises(ValueError, match="at most 4 bits"):
        triton_ops.store(kv, kv, cache, torch.tensor([0, 1, 2]), codec)
    assert not cache.any()


def _layer_transform(heads: int, dim: int, values: bool):
    """A calibrated-looking transform: key mean and scale (the recommended presets'), and
    with ``values`` a value mean and scale too."""
    from tq_vllm.calibration import LayerTransform

    scale = (lambda: torch.rand(heads, dim) + 0.5)
    return LayerTransform(k_mean=torch.randn(heads, dim), k_scale=scale(),
                          v_mean=torch.randn(heads, dim) if values else None,
                          v_scale=scale() if values else None)


def _qkv_views(n: int, hq: int, h: int, dim: int, dtype):
    """q ``[n, hq, d]``, k, v ``[n, h, d]`` as views into one fused projection row per token
    (vLLM's layout: row stride (hq + 2h) d, heads contiguous)."""
    qkv = (torch.randn(n, (hq + 2 * h) * dim) * 2).to(dtype)
    q = qkv[:, :hq * dim].view(n, hq, dim)
    k = qkv[:, hq * dim:(hq + h) * dim].view(n, h, dim)
    v = qkv[:, (hq + h) * dim:].view(n, h, dim)
    return q, k, v


@pytest.mark.parametrize("name", ["tq4", "tq3.5-qjl", "tq3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("values", [False, True])
def test_store_applies_the_transform_in_the_models_dtype(impl, name, dtype, values):
    """The launcher takes the model's strided K/V rows and the layer's transform: the same
    bytes and counts as ``LayerTransform.keys`` / ``values`` in PyTorch (float32 arithmetic,
    rounded back to the model's dtype) followed by the reference store."""
    from tq_vllm.reference import tq_store

    preset, h, dim = PRESETS[name], 2, 64
    codec = LayerCodec.create(preset, dim, h, key_offset=key_offset(preset, h, dim),
                              key_query_weight=query_weight(preset, h, dim))
    tf = _layer_transform(h, dim, values)
    _, k, v = _qkv_views(45, 6, h, dim, dtype)
    k[3, 1, 7] = float("nan")  # non-finite policy after the transform
    assert not k.is_contiguous()
    ref = torch.randint(0, 256, (6, h, 16, preset.layout(dim).slot_bytes), dtype=torch.uint8)
    ours = ref.clone()
    sm = torch.randperm(96)[:45]
    sm[::8] = -1
    tq_store(tf.keys(k), tf.values(v), ref, sm, codec)
    ref_stats = dict(codec.key.stats)
    codec.key.stats.update(nonfinite_vectors=0, saturated_norms=0)
    cpu_ops.store(k, v, ours, sm, codec, transform=tf)
    assert torch.equal(ours, ref)
    assert codec.key.stats == ref_stats


def test_store_applies_a_float64_transform_in_pytorch(impl):
    """A transform the kernels do not take (float64 channels) runs in PyTorch first."""
    from tq_vllm.calibration import LayerTransform
    from tq_vllm.reference import tq_store

    codec = LayerCodec.create(PRESETS["tq4"], 64, 2)
    f32 = _layer_transform(2, 64, True)
    tf = LayerTransform(*(t.double() for t in (f32.k_mean, f32.k_scale, f32.v_mean, f32.v_scale)))
    _, k, v = _qkv_views(20, 2, 2, 64, torch.bfloat16)
    ref = torch.zeros(4, 2, 16, PRESETS["tq4"].layout(64).slot_bytes, dtype=torch.uint8)
    ours = ref.clone()
    sm = torch.randperm(64)[:20]
    tq_store(tf.keys(k), tf.values(v), ref, sm, codec)
    cpu_ops.store(k, v, ours, sm, codec, transform=tf)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gqa", [1, 3, 7])
@pytest.mark.parametrize("name", ["tq4", "tq3.5-qjl"])
def test_decode_applies_the_query_scale_in_the_models_dtype(impl, name, dtype, gqa):
    """Decode reads strided model-dtype queries, applies the layer's query scale and writes
    a strided model-dtype output: the same bits as ``LayerTransform.queries`` in PyTorch,
    a float32 decode, and PyTorch's rounding of its output to the model's dtype."""
    seq_lens = [1, 37, 300, 129]
    h, dim = 2, 64
    codec, cache, table, _, _ = build_cache(name, dim, h, 16, seq_lens)
    tf = _layer_transform(h, dim, False)
    q, _, _ = _qkv_views(len(seq_lens), gqa * h, h, dim, dtype)
    out = torch.full((len(seq_lens), gqa * h + 3, dim), float("nan"), dtype=dtype)[:, :gqa * h]
    want = torch.empty(len(seq_lens), gqa * h, dim)
    cpu_ops.decode(tf.queries(q).float(), cache, table, torch.tensor(seq_lens), codec, 0.3, want)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out, transform=tf)
    assert torch.equal(out, want.to(dtype))


def test_store_and_decode_follow_a_changed_cache_dtype_or_transform(impl):
    """The launchers keep each codec's last resolved call (cache, dtypes, strides,
    transform) between calls: alternating caches, dtypes and transforms on one codec still
    gives each call its own reference bytes and outputs."""
    from tq_vllm.reference import tq_store

    preset, h, dim, gqa = PRESETS["tq4"], 2, 64, 3
    codec = LayerCodec.create(preset, dim, h, key_offset=key_offset(preset, h, dim),
                              key_query_weight=query_weight(preset, h, dim))
    slot = preset.layout(dim).slot_bytes
    caches = [torch.zeros(4, h, 16, slot, dtype=torch.uint8) for _ in range(2)]
    refs = [c.clone() for c in caches]
    transforms = [_layer_transform(h, dim, False), None, _layer_transform(h, dim, True)]
    table, seq = torch.tensor([[0, 1, 2, 3]]), torch.tensor([20])
    for step, (c, tf, dtype) in enumerate([(0, 0, torch.bfloat16), (0, 1, torch.bfloat16),
                                           (0, 2, torch.bfloat16), (1, 2, torch.bfloat16),
                                           (1, 2, torch.float16), (0, 0, torch.float32)]):
        q, k, v = _qkv_views(20, gqa * h, h, dim, dtype)
        sm = torch.arange(20) + 16 * (step % 2)
        t = transforms[tf]
        tq_store(k if t is None else t.keys(k), v if t is None else t.values(v), refs[c], sm, codec)
        cpu_ops.store(k, v, caches[c], sm, codec, transform=t)
        assert torch.equal(caches[c], refs[c]), step
        want = torch.empty(1, gqa * h, dim)
        cpu_ops.decode((q[:1] if t is None else t.queries(q[:1])).float(), caches[c], table,
                       seq, codec, 0.3, want)
        out = torch.empty(1, gqa * h, dim, dtype=dtype)
        cpu_ops.decode(q[:1], caches[c], table, seq, codec, 0.3, out, transform=t)
        assert torch.equal(out, want.to(dtype)), step


def test_decode_follows_a_changed_transform_on_the_same_tensors(impl):
    """Two transforms in turn on the same query, cache and output tensors."""
    seq_lens = [20, 7]
    codec, cache, table, _, _ = build_cache("tq4", 64, 2, 16, seq_lens)
    q, _, _ = _qkv_views(2, 6, 2, 64, torch.bfloat16)
    transforms = [_layer_transform(2, 64, False), None, _layer_transform(2, 64, False)]
    wants = []
    for t in transforms:
        want = torch.empty(2, 6, 64)
        cpu_ops.decode((q if t is None else t.queries(q)).float(), cache, table,
                       torch.tensor(seq_lens), codec, 0.3, want)
        wants.append(want.to(torch.bfloat16))
    out = torch.empty(2, 6, 64, dtype=torch.bfloat16)
    for t, want in zip(transforms, wants):
        cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, 0.3, out, transform=t)
        assert torch.equal(out, want)
