"""Bitshift-trellis codes (tq_vllm.trellis): decoding rule, optimal encoding, distortion,
and the codec's use of them (the CPU kernels' equivalence: tests/kernels/test_cpu_ops.py)."""

import itertools
import math

import pytest
import torch

from tq_vllm import codebook, trellis
from tq_vllm.config import TensorCodec, get_preset, mse_codec
from tq_vllm.codec import LayerCodec
from tq_vllm.kernels import cpu_ops
from tq_vllm.tools.trellis_tables import preset_shapes

from test_reference import trellis_preset  # tests/ on sys.path (rootdir conftest)


@pytest.mark.parametrize("bits,state_bits", [(4, 6), (3, 6), (2, 6), (4, 4), (3, 8), (2, 5)])
def test_windows_follow_the_stream_state(bits, state_bits):
    """w_i = (c_i << S) | the S stream bits before code i, computed by shifting codes into
    a state register one at a time (what a sequential decoder does)."""
    codes = torch.randint(0, 1 << bits, (5, 21), generator=torch.Generator().manual_seed(bits))
    state, expect = torch.zeros(5, dtype=torch.long), []
    for i in range(codes.shape[1]):
        c = codes[:, i].long()
        expect.append((c << state_bits) | state)
        state = ((c << (state_bits - bits)) | (state >> bits)) & ((1 << state_bits) - 1)
    assert torch.equal(trellis.windows(codes, bits, state_bits), torch.stack(expect, 1))


def test_windows_read_lsb_first_stream_bits():
    """The window is bits [R·i − S, R·i + R) of the LSB-first bitstream the layout packs."""
    bits, state_bits, n = 3, 5, 10
    codes = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(3))
    stream = sum(int(c) << (bits * i) for i, c in enumerate(codes))
    w = trellis.windows(codes, bits, state_bits)
    for i in range(n):
        lo = bits * i - state_bits
        want = (stream >> lo if lo >= 0 else stream << -lo) & ((1 << (state_bits + bits)) - 1)
        assert int(w[i]) == want


def test_viterbi_finds_the_best_sequence():
    """Against every code sequence of a small trellis (R 2, S 2, 5 coordinates)."""
    bits, state_bits, n = 2, 2, 5
    tab = torch.randn(1 << (bits + state_bits), generator=torch.Generator().manual_seed(0))
    y = torch.randn(6, n, generator=torch.Generator().manual_seed(1))
    every = torch.tensor(list(itertools.product(range(1 << bits), repeat=n)))
    err = ((y[:, None, :] - trellis.decode(every, tab, bits, state_bits)[None]) ** 2).sum(-1)
    got = trellis.encode(y, tab, bits, state_bits)
    got_err = ((y - trellis.decode(got, tab, bits, state_bits)) ** 2).sum(-1)
    torch.testing.assert_close(got_err, err.min(1).values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,dim,min_gain_db", [(3, 32, 1.5), (2, 32, 1.0)])
def test_trellis_beats_lloyd_max_at_equal_bits(bits, dim, min_gain_db):
    """Held-out unit vectors: 64 states give ≥ 1–1.5 dB less distortion than the Lloyd–Max
    codebook of the same bits (measured 1.62 / 1.19 dB; 1.93 / 1.49 at 64 coordinates,
    where the fixed start state costs less) and stay above the rate-distortion bound."""
    d_tr = trellis.distortion(bits, 6, dim)
    d_lm = codebook.mse_distortion(bits, dim)
    assert 10 * math.log10(d_lm / d_tr) >= min_gain_db
    assert d_tr > 2.0 ** (-2 * bits)


def test_table_is_deterministic():
    trellis.table.cache_clear()
    a = trellis.table(2, 4, 16)
    trellis.table.cache_clear()
    assert torch.equal(a, trellis.table(2, 4, 16))


def test_shipped_tables_cover_every_trellis_preset():
    """Every channel group of every ``tq{b}-trellis`` preset (all head sizes) reads a
    shipped table of the current recipe, and :func:`trellis.table` returns it."""
    shipped = trellis.shipped_tables()
    shapes = preset_shapes()
    assert sorted(shipped) == sorted(trellis.table_key(*s) for s in shapes)
    for bits, state_bits, dim in shapes:
        tab = shipped[trellis.table_key(bits, state_bits, dim)]
        assert tab.dtype == torch.float32 and tab.shape == (1 << (bits + state_bits),)
        assert torch.equal(trellis.table(bits, state_bits, dim), tab)


@pytest.mark.parametrize("bits", [4, 2])
def test_shipped_tables_are_what_training_gives(bits):
    """A shipped table equals a fresh :func:`trellis.train_table` bit for bit (searched by
    the CPU kernel, which returns :func:`trellis.encode`'s codes: tests/kernels)."""
    fresh = trellis.train_table(bits, 6, 32, search=cpu_ops.trellis_search)
    assert torch.equal(fresh, trellis.shipped_tables()[trellis.table_key(bits, 6, 32)])


def test_bad_state_bits_rejected():
    with pytest.raises(ValueError, match="set trellis ≥ 4"):
        TensorCodec(bits_hi=4, bits_lo=4, split=False, trellis=3)
    with pytest.raises(ValueError, match="state bits"):
        trellis.table(4, 2, 16)


def _trellis_codec(state_bits: int) -> LayerCodec:
    return LayerCodec.create(trellis_preset(state_bits), 64, 2)


def test_codec_with_trellis_codes_beats_scalar_codes():
    """tq3.5-mse (split 4/3 keys) with trellis codes: lower relative error on Gaussian
    vectors than the scalar codes of the same bytes, and the decoded vectors are what
    ``unit_values`` gives for the stored codes."""
    x = torch.randn(400, 2, 64, generator=torch.Generator().manual_seed(5))
    tr, sc = _trellis_codec(6), _trellis_codec(0)
    for a, b in ((tr.key, sc.key), (tr.value, sc.value)):
        err_tr = ((a.decode(a.encode(x)) - x) ** 2).sum() / (x ** 2).sum()
        err_sc = ((b.decode(b.encode(x)) - x) ** 2).sum() / (x ** 2).sum()
        assert err_tr < 0.85 * err_sc
    enc = tr.key.encode(x)
    want = tr.key.group_norms(enc.norms) * tr.key.unit_values(enc.codes)
    torch.testing.assert_close(tr.key.decode_rotated(enc), want)


def test_scalar_codebooks_refused_for_trellis_codes():
    """A trellis codec has no scalar codebooks (asking names what to read instead); the
    kernels' tables hold each group's trellis table, zero padded."""
    codec = _trellis_codec(6)
    with pytest.raises(ValueError, match="read trellis_tables"):
        codec.key.group_codebooks()
    tabs = codec.key.trellis_tables()  # split 4/3-bit groups: 2**10 and 2**9 entries
    assert tabs.shape == (2, 1 << 10)
    assert torch.equal(tabs[1, : 1 << 9], codec.key.tables[1]) and not tabs[1, 1 << 9:].any()
    with pytest.raises(ValueError, match="scalar codes"):
        _trellis_codec(0).key.trellis_tables()


def test_kernels_refuse_five_bit_codes():
    """5-bit codebooks (the seventh round's k5 allocations) are reference-only too."""
    p = get_preset("tq4-mse")
    p = p.model_copy(update={"key": mse_codec("5")})
    codec = LayerCodec.create(p, 64, 2)
    x = torch.randn(50, 2, 64, generator=torch.Generator().manual_seed(2))
    err5 = ((codec.key.decode(codec.key.encode(x)) - x) ** 2).sum() / (x ** 2).sum()
    assert err5 < 0.5 * codebook.mse_distortion(4, 64)  # 5-bit Lloyd–Max: ~0.0025 vs 0.0091
    with pytest.raises(ValueError, match="at most 4 bits"):
        codec.key.group_codebooks()


@pytest.mark.parametrize("bits", [(4,), (4, 3), (3, 2)])
def test_fed_search_without_feedback_is_the_plain_search(bits):
    """With ``F = 0``, unit weights and unit norms the fed search is :func:`trellis.encode`
    on each group, bit for bit (the same costs, ties and start state)."""
    gen = torch.Generator().manual_seed(sum(bits))
    dim, state_bits = 64, 6
    dg = dim // len(bits)
    tabs = [torch.randn(1 << (state_bits + b), generator=gen) / dg ** 0.5 for b in bits]
    y = torch.randn(300, dim, generator=gen)
    y = torch.cat([c / c.norm(dim=-1, keepdim=True) for c in y.chunk(len(bits), -1)], -1)
    got = trellis.encode_fed(y, torch.ones(300, len(bits)), torch.zeros(300, dtype=torch.long),
                             torch.zeros(1, dim, dim), torch.ones(1, dim), tabs, list(bits),
                             state_bits)
    want = torch.cat([trellis.encode(c.contiguous(), t, b, state_bits)
                      for c, t, b in zip(y.chunk(len(bits), -1), tabs, bits)], -1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["tq4", "tq3"])
def test_fed_trellis_codes_cut_the_weighted_error(name):
    """Against an anisotropic query second moment ``W``, the expected logit error
    ``eᵀWe`` of ``tq{b}-trellis`` keys searched with feedback is below the plain trellis
    search's (measured 0.27× / 0.37×) and below scalar feedback rounding's (0.51× / 0.60×)
    on held-out Gaussian keys."""
    from tq_vllm.config import PRESETS

    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 64, 64, generator=g) * torch.logspace(-1, 1, 64)
    w = a @ a.mT / 64
    x = torch.randn(2000, 1, 64, generator=g)
    err = {}
    for key, preset_name, weight in (("trellis fed", f"{name}-trellis", w),
                                     ("trellis", f"{name}-trellis", None),
                                     ("scalar fed", name, w)):
        p = PRESETS[preset_name]
        p = p.model_copy(update={"transform": p.transform.model_copy(
            update={"key_offset_choice": False})})
        c = LayerCodec.create(p, 64, 1, key_query_weight=weight).key
        assert (c.feedback is not None) == (weight is not None)
        e = (c.decode(c.encode(x)) - x)[:, 0]
        err[key] = float(torch.einsum("nd,de,ne->n", e, w[0], e).mean())
    assert err["trellis fed"] < 0.6 * err["trellis"], err
    assert err["trellis fed"] < 0.8 * err["scalar fed"], err


def test_fed_search_inputs_are_checked():
    """Shapes and dtypes that do not fit are refused with what is wrong, by the reference
    and the CPU and Triton launchers alike (they share the check, before any launch)."""
    from test_reference import fed_search_case

    from tq_vllm.kernels import triton_ops

    y, norms, head, fb, wt, tabs = fed_search_case((4,), 6, 64, 2, rows=8)
    good = (y, norms, head, fb, wt, tabs, [4], 6)
    bad = {
        "float32 \\[N, d\\]": (y.double(), *good[1:]),
        "norms must be \\[8, 1\\]": (y, norms[:4], *good[2:]),
        "head an integer": (y, norms, head.float(), *good[3:]),
        "weight \\[H, 64\\]": (y, norms, head, fb, wt[:, :32], *good[5:]),
        "2\\^10 entries": (y, norms, head, fb, wt, [tabs[0][:100]], [4], 6),
        "1 or 2 equal channel groups": (y, norms, head, fb, wt, tabs, [4, 4], 6),
    }
    for match, args in bad.items():
        for search in (trellis.encode_fed, cpu_ops.trellis_search_fed,
                       triton_ops.trellis_search_fed):
            with pytest.raises(ValueError, match=match):
                search(*args)
