"""Reference paged store/attention vs exact float32 attention on the dequantized cache."""

import pytest
import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS, with_trellis
from tq_vllm.reference import dequantize_sequence, exact_attention, tq_paged_attention, tq_store


def key_offset(preset, kv_heads, dim):
    """A random key offset ``[H, d]`` for presets with the key offset choice, else None."""
    return 0.5 * torch.randn(kv_heads, dim) if preset.transform.key_offset_choice else None


def query_weight(preset, kv_heads, dim):
    """A random anisotropic, correlated query second moment ``[H, d, d]`` for presets whose
    keys round with feedback, else None."""
    if not preset.key.feedback:
        return None
    a = torch.randn(kv_heads, dim, dim) * torch.logspace(-1, 1, dim)
    return a @ a.mT / dim


def fed_search_case(bits, state_bits, dim, heads, rows):
    """Inputs of :func:`trellis.encode_fed` after its own signature — (rows ``y``, group
    norms, head per row, feedback ``F``, weights, tables) — drawn on the CPU: ``F`` from an
    anisotropic query moment, random weights and tables, rows of uneven scale with a zero
    row (index 2) and a repeated one (4 = 1), so ties and unreachable states are met."""
    gen = torch.Generator().manual_seed(dim + state_bits + sum(bits))
    tabs = [torch.randn(1 << (state_bits + b), generator=gen) / dim ** 0.5 for b in bits]
    a = torch.randn(heads, dim, dim, generator=gen) * torch.logspace(-1, 1, dim)
    u = torch.linalg.cholesky(torch.linalg.inv(a @ a.mT + torch.eye(dim)), upper=True)
    fb = (u / u.diagonal(dim1=-2, dim2=-1)[..., None]).triu(1).float()
    wt = torch.rand(heads, dim, generator=gen) + 0.5
    y = torch.randn(rows, dim, generator=gen) * torch.linspace(0.2, 3, dim)
    y[2] = 0.0
    y[4] = y[1]
    norms = torch.stack([c.norm(dim=-1) for c in y.chunk(len(bits), -1)], -1).clamp_min(1e-30)
    head = torch.randint(0, heads, (rows,), generator=gen)
    return y, norms, head, fb, wt, tabs


def random_keys(s, kv_heads, dim, offset):
    """Keys ``[s, H, d]``; with an offset every 5th lies near ``−offset`` (a sink far from
    the mean), which the offset choice stores flagged, so both kinds are exercised."""
    k = torch.randn(s, kv_heads, dim)
    if offset is not None:
        k[::5] = -offset + 0.3 * torch.randn_like(k[::5])
    return k


def shrunk_qjl_preset(kind):
    """``tq3.5-qjl`` with ``kind`` sketch rows and the QJL term scaled by its optimal factor
    (issue 7's A/B): the kernels must carry the codec's scale."""
    base = PRESETS["tq3.5-qjl"]
    return base.model_copy(update={"sketch": kind,
                                   "key": base.key.model_copy(update={"qjl_shrink": True})})


def trellis_preset(state_bits, name="tq3.5-mse"):
    """``name`` with its K and V codes as bitshift-trellis codes of ``state_bits`` state bits
    (0: scalar codes), for the state counts and bases the named presets do not cover."""
    return with_trellis(PRESETS[name], state_bits)


def build_cache(name, dim, kv_heads, block_size, seq_lens, dtype=torch.float32,
                spare_blocks=3, device=torch.device("cpu")):
    """Random K/V of ragged sequences stored by :func:`reference.tq_store` through
    scattered blocks of a cache pre-filled with random bytes. Presets with a calibrated
    split get random outlier halves, presets with the key offset choice a random offset
    (and keys near it, :func:`random_keys`), keys with feedback rounding a random query
    weight (:func:`query_weight`). Drawn on the CPU (same bits on every
    device), then moved to ``device``.

    Returns (codec, cache, block_table int32 [B, M], [(k, v)] per sequence, unused blocks).
    """
    preset = PRESETS[name] if isinstance(name, str) else name  # a name or a Preset
    perms = [torch.stack([torch.randperm(dim) for _ in range(kv_heads)])
             if preset.transform.calibrated_split and c.split else None
             for c in (preset.key, preset.value)]  # calibrated outlier halves: any order
    offset = key_offset(preset, kv_heads, dim)
    codec = LayerCodec.create(preset, dim, kv_heads, layer=3, key_perm=perms[0],
                              value_perm=perms[1], key_offset=offset,
                              key_query_weight=query_weight(preset, kv_heads, dim))
    slot = preset.layout(dim).slot_bytes
    per_seq = [max(1, -(-s // block_size)) for s in seq_lens]
    num_blocks = sum(per_seq) + spare_blocks
    cache = torch.randint(0, 256, (num_blocks, kv_heads, block_size, slot), dtype=torch.uint8)
    order = torch.randperm(num_blocks)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = order[used:used + n]
        used += n
    kv = []
    for b, s in enumerate(seq_lens):
        k, v = random_keys(s, kv_heads, dim, offset).to(dtype), torch.randn(s, kv_heads, dim).to(dtype)
        pos = torch.arange(s)
        tq_store(k, v, cache, table[b, pos // block_size].long() * block_size + pos % block_size, codec)
        kv.append((k, v))
    if device.type != "cpu":
        codec, cache, table = codec.to(device), cache.to(device), table.to(device)
        kv = [(k.to(device), v.to(device)) for k, v in kv]
    return codec, cache, table, kv, order[used:]


@pytest.mark.parametrize("name", ["tq4-mse", "tq3.5-qjl", "tq2.5-mse", "tq3-qjl", "tq3.5"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 3, 7])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_equals_attention_on_dequantized_cache(name, dim, gqa, block_size):
    kv_heads = 2
    seq_lens = [37, 1, 50, 16]
    q_lens = [5, 1, 50, 1]  # continuation chunk, decode, full prefill, decode
    codec, cache, table, _, _ = build_cache(name, dim, kv_heads, block_size, seq_lens)
    q = torch.randn(sum(q_lens), kv_heads * gqa, dim)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    out = tq_paged_attention(q, cache, table, torch.tensor(seq_lens), qsl, codec)
    for b, s in enumerate(seq_lens):
        k, v = dequantize_sequence(cache, table[b], s, codec)
        ref = exact_attention(q[qsl[b]:qsl[b + 1]], k, v)
        assert torch.allclose(out[qsl[b]:qsl[b + 1]], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantization_error_is_small_vs_exact(dtype):
    """End-to-end sanity: 4-bit attention output stays close to exact attention."""
    codec, cache, table, kv, _ = build_cache("tq4-mse", 64, 1, 16, [64], dtype=dtype)
    q = torch.randn(64, 3, 64)
    out = tq_paged_attention(q, cache, table, torch.tensor([64]), torch.tensor([0, 64]), codec)
    ref = exact_attention(q, kv[0][0].float(), kv[0][1].float())
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.15


def test_store_skips_padding_and_leaves_other_slots_untouched():
    codec = LayerCodec.create(PRESETS["tq3.5"], 64, 2)
    slot = PRESETS["tq3.5"].layout(64).slot_bytes
    cache = torch.randint(0, 256, (4, 2, 16, slot), dtype=torch.uint8)
    before = cache.clone()
    sm = torch.tensor([5, -1, 17, -1])
    tq_store(torch.randn(4, 2, 64), torch.randn(4, 2, 64), cache, sm, codec)
    changed = (cache != before).any(-1).any(1)  # [blocks, block_size]
    flat = changed.flatten().nonzero().flatten().tolist()
    assert set(flat) <= {5, 17} and 5 in flat


def test_store_rejects_out_of_range_slot_before_writing():
    codec = LayerCodec.create(PRESETS["tq4"], 64, 1)
    cache = torch.zeros(2, 1, 16, PRESETS["tq4"].layout(64).slot_bytes, dtype=torch.uint8)
    with pytest.raises(IndexError, match="beyond"):
        tq_store(torch.randn(2, 1, 64), torch.randn(2, 1, 64), cache, torch.tensor([3, 32]), codec)
    assert torch.all(cache == 0)


def test_cache_shape_mismatch_is_a_clear_error():
    codec = LayerCodec.create(PRESETS["tq4"], 64, 2)
    with pytest.raises(ValueError, match="68-byte slots"):
        tq_store(torch.randn(1, 2, 64), torch.randn(1, 2, 64),
                 torch.zeros(2, 2, 16, 64, dtype=torch.uint8), torch.tensor([0]), codec)


def test_nonfinite_token_does_not_disturb_neighbours():
    codec, cache, table, kv, _ = build_cache("tq4-qjl", 64, 1, 16, [20])
    before = cache.clone()
    bad = torch.full((1, 1, 64), float("nan"))
    slot = int(table[0, 0]) * 16 + 4
    tq_store(bad, bad, cache, torch.tensor([slot]), codec)
    diff = (cache != before).any(-1).flatten().nonzero().flatten().tolist()
    assert diff == [slot]
    out = tq_paged_attention(torch.randn(1, 1, 64), cache, table, torch.tensor([20]),
                             torch.tensor([0, 1]), codec)
    assert torch.isfinite(out).all()
