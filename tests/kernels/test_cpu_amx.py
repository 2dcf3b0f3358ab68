"""The native kernel's AMX bodies (kernels/csrc/tq_attend_amx.h): bf16 models' decode and
prefill on bf16 products — AMX tiles, and the same products on vdpbf16ps (CPUs without
AMX; both engines where the CPU has AMX) — against the PyTorch reference on the
dequantized cache.

Their arithmetic is bf16-class (queries, centroids and softmax weights rounded to bf16,
float32 sums inside the tile products), so the tolerance is the error of PyTorch's own
bf16 attention on the same dequantized cache (flash-attention's policy: a multiple of the
reference's error in the kernel's precision), never float32's 2e-5. What must hold
exactly: a prompt row has the bits of its decode step (both run these tiles), and calls
the bodies do not take stay on the float32 bodies bit for bit.
"""

import sys
from pathlib import Path

import pytest
import torch

from tq_vllm.kernels import cpu_native, cpu_ops
from tq_vllm.reference import dequantize_sequence, exact_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_reference import build_cache  # noqa: E402

SCALE = 0.3
TORCH_BF16_MULTIPLE = 2.0
"""Kernel error allowed, as a multiple of PyTorch's bf16 attention error on the same inputs
(flash-attention's policy; measured over the decode grid below: 0.21-1.07 of it, the float32
bodies with bf16 queries 0.09-0.49)."""


OFF, AUTO, ON = 0, 1, 2  # cpu_native.set_amx modes


@pytest.fixture(params=["amx", "dp"])
def amx(request):
    """The tile bodies on for every GQA width, their products on AMX tiles or on vdpbf16ps
    (skipped where the CPU or build has neither), the default mode and engine restored
    after."""
    dp = request.param == "dp"
    cpu_native.load.cache_clear()
    if (cpu_native.load() is None or (not dp and not cpu_native._cpu_has_amx())
            or cpu_native.set_amx(ON, dp=dp) != ON):
        cpu_native.set_amx(cpu_native.amx_default(), dp=not cpu_native._cpu_has_amx())
        pytest.skip(f"no {request.param} products on this CPU (AMX-BF16 / AVX512-BF16 / VBMI) "
                    "or no AVX-512 build here")
    yield
    cpu_native.set_amx(cpu_native.amx_default(), dp=not cpu_native._cpu_has_amx())


def _torch_bf16_error(q, cache, table, seq_lens, q_lens, codec):
    """float32 reference [rows, Hq, d] and the max error of PyTorch's bf16 attention on the
    same dequantized cache (queries of row r attend causally to the first seq_lens[i] -
    q_lens[i] + j + 1 tokens)."""
    ref32, ref16, at = [], [], 0
    for i, (s, n) in enumerate(zip(seq_lens, q_lens)):
        k, v = dequantize_sequence(cache, table[i].long(), s, codec)
        qi = q[at:at + n].float()
        ref32.append(exact_attention(qi, k, v, SCALE, torch.float32))
        ref16.append(exact_attention(qi, k, v, SCALE, torch.bfloat16).float())
        at += n
    ref32, ref16 = torch.cat(ref32), torch.cat(ref16)
    return ref32, (ref16 - ref32).abs().max().item()


def _fma(fn):
    """fn() run on the float32 bodies, AMX back on after."""
    cpu_native.set_amx(OFF)
    try:
        return fn()
    finally:
        cpu_native.set_amx(ON)


@pytest.mark.parametrize("name", ["tq4", "tq3.5", "tq3", "tq2.5-mse", "tq4-mse"])
@pytest.mark.parametrize("dim,gqa,block_size", [(64, 3, 16), (64, 7, 128), (64, 1, 32),
                                                  (128, 16, 16), (256, 2, 128)])
def test_amx_decode_within_torch_bf16_error(amx, name, dim, gqa, block_size):
    seq_lens = [1, 37, 300, 513, 1100]  # one token, partial 32-token steps, past a 512 split
    codec, cache, table, _, _ = build_cache(name, dim, 2, block_size, seq_lens)
    q = torch.randn(len(seq_lens), 2 * gqa, dim).to(torch.bfloat16)
    out = torch.empty_like(q)
    cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, SCALE, out)
    ref, torch_err = _torch_bf16_error(q, cache, table, seq_lens, [1] * len(seq_lens), codec)
    err = (out.float() - ref).abs().max().item()
    assert err <= TORCH_BF16_MULTIPLE * torch_err, (err, torch_err)


@pytest.mark.parametrize("name", ["tq4", "tq3", "tq2.5-mse"])
@pytest.mark.parametrize("dim,gqa,block_size", [(64, 3, 16), (64, 7, 128), (128, 16, 32)])
def test_amx_prefill_within_torch_bf16_error(amx, name, dim, gqa, block_size):
    seq_lens, q_lens = [700, 90, 40], [600, 40, 40]  # cached context + chunk; a fresh prompt
    codec, cache, table, _, _ = build_cache(name, dim, 2, block_size, seq_lens)
    q = torch.randn(sum(q_lens), 2 * gqa, dim).to(torch.bfloat16)
    out = torch.empty_like(q)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    cpu_ops.prefill(q, None, None, cache, table, torch.tensor(seq_lens), qsl, 0, codec, SCALE, out,
                    fresh_exact=False)
    ref, torch_err = _torch_bf16_error(q, cache, table, seq_lens, q_lens, codec)
    err = (out.float() - ref).abs().max().item()
    assert err <= TORCH_BF16_MULTIPLE * torch_err, (err, torch_err)


def test_amx_runs_and_differs_from_float32_bodies(amx):
    """The bodies are taken (their bf16 products round differently from the float32
    bodies') for an eligible call, and not for QJL keys, trellis codes or float32 queries."""
    seq_lens = [300, 77]

    def both(name, dtype):
        codec, cache, table, _, _ = build_cache(name, 64, 2, 16, seq_lens)
        q = torch.randn(2, 6, 64).to(dtype)
        a, b = torch.empty_like(q), torch.empty_like(q)
        cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, SCALE, a)
        _fma(lambda: cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, SCALE, b))
        return a, b

    a, b = both("tq4", torch.bfloat16)
    assert not torch.equal(a, b)
    for name, dtype in (("tq4-qjl", torch.bfloat16), ("tq3.5-trellis", torch.bfloat16),
                        ("tq4", torch.float32)):
        a, b = both(name, dtype)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["tq4", "tq3.5", "tq3"])
@pytest.mark.parametrize("gqa,block_size", [(3, 16), (7, 128), (16, 32), (1, 16)])
def test_amx_prefill_rows_equal_decode_steps_bit_for_bit(amx, name, gqa, block_size):
    """Prefill runs pairs of several rows through one tile product, decode one row's: a
    row's bits must not depend on that (nor on chunking, nor on the other rows of its
    pass), so a recomputed or prefix-cached prompt gives its decode steps' bits."""
    seq_lens, q_lens = [1300, 90], [1200, 40]  # 100 cached + a chunk over two 512 splits
    codec, cache, table, _, _ = build_cache(name, 64, 2, block_size, seq_lens)
    q = torch.randn(sum(q_lens), 2 * gqa, 64).to(torch.bfloat16)
    whole = torch.empty_like(q)
    cpu_ops.prefill(q, None, None, cache, table, torch.tensor(seq_lens),
                    torch.tensor([0, 1200, 1240]), 0, codec, SCALE, whole, fresh_exact=False)
    s, n = seq_lens[0], q_lens[0]
    chunks = torch.empty_like(q[:n])
    for a, b in ((0, 333), (333, 334), (334, n)):
        cpu_ops.prefill(q[a:b], None, None, cache, table[:1], torch.tensor([s - n + b]),
                        torch.tensor([0, b - a]), 0, codec, SCALE, chunks[a:b], fresh_exact=False)
    assert torch.equal(chunks, whole[:n])
    steps = torch.empty_like(q)
    for row, seq, length in ((0, 0, 101), (31, 0, 132), (411, 0, 512), (412, 0, 513),
                             (413, 0, 514), (924, 0, 1025), (1199, 0, 1300), (1200, 1, 51),
                             (1239, 1, 90)):
        cpu_ops.decode(q[row:row + 1], cache, table[seq:seq + 1], torch.tensor([length]), codec,
                       SCALE, steps[row:row + 1])
        assert torch.equal(steps[row], whole[row]), (row, length)


def test_amx_auto_takes_short_rows_of_wide_groups_only(amx):
    """The default mode runs GQA groups of 6 query heads or more on AMX (where its decode
    wins) and narrower ones on the float32 bodies, bit for bit (rows shorter than 2048
    tokens: below)."""
    seq_lens = [300, 77]
    for gqa, takes in ((3, False), (5, False), (6, True), (8, True)):
        codec, cache, table, _, _ = build_cache("tq4", 64, 2, 16, seq_lens)
        q = torch.randn(2, 2 * gqa, 64).to(torch.bfloat16)
        outs = {}
        for mode in (OFF, AUTO, ON):
            cpu_native.set_amx(mode)
            outs[mode] = torch.empty_like(q)
            cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, SCALE, outs[mode])
        assert torch.equal(outs[AUTO], outs[ON if takes else OFF]), gqa
        assert not torch.equal(outs[ON], outs[OFF]), gqa



def test_amx_auto_takes_long_rows_at_any_group_size(amx):
    """The default mode also runs rows that attend to AMX_MIN_LEN (2048) tokens or more on
    AMX at GQA 3 (where a long prompt's prefill gains most), each row by its own length:
    in a mixed batch every row has the bits it has alone in its body's mode, and a prompt
    crossing the length keeps its decode steps' bits on both sides."""
    seq_lens = [300, 2047, 2048, 2600]
    codec, cache, table, _, _ = build_cache("tq4", 64, 2, 128, seq_lens)
    q = torch.randn(len(seq_lens), 6, 64).to(torch.bfloat16)
    outs = {}
    for mode in (OFF, AUTO, ON):
        cpu_native.set_amx(mode)
        outs[mode] = torch.empty_like(q)
        cpu_ops.decode(q, cache, table, torch.tensor(seq_lens), codec, SCALE, outs[mode])
    for i, s in enumerate(seq_lens):
        assert not torch.equal(outs[ON][i], outs[OFF][i]), s
        assert torch.equal(outs[AUTO][i], outs[ON if s >= 2048 else OFF][i]), s
    cpu_native.set_amx(AUTO)
    s, n = 2600, 700  # rows attend to 1901 .. 2600 tokens
    qp = torch.randn(n, 6, 64).to(torch.bfloat16)
    whole = torch.empty_like(qp)
    cpu_ops.prefill(qp, None, None, cache, table[3:], torch.tensor([s]), torch.tensor([0, n]), 0,
                    codec, SCALE, whole, fresh_exact=False)
    for length in (1901, 2047, 2048, 2049, 2600):
        row = length - (s - n) - 1
        step = torch.empty_like(qp[:1])
        cpu_ops.decode(qp[row:row + 1], cache, table[3:], torch.tensor([length]), codec, SCALE,
                       step)
        assert torch.equal(step[0], whole[row]), length
        cpu_native.set_amx(ON if length >= 2048 else OFF)
        cpu_ops.decode(qp[row:row + 1], cache, table[3:], torch.tensor([length]), codec, SCALE,
                       step)
        cpu_native.set_amx(AUTO)
        assert torch.equal(step[0], whole[row]), length

def test_amx_modes_and_environment(amx, monkeypatch):
    assert cpu_native.amx_mode() == ON
    assert cpu_native.set_amx(OFF) == OFF and cpu_native.amx_mode() == OFF
    assert cpu_native.set_amx(AUTO) == AUTO and cpu_native.amx_mode() == AUTO
    auto = AUTO if cpu_native._cpu_has_amx() else ON  # without AMX every row takes the tiles
    for value, mode in (("0", OFF), ("auto", auto), ("1", ON)):
        monkeypatch.setenv(cpu_native.AMX_ENV, value)
        assert cpu_native.amx_default() == mode
    monkeypatch.delenv(cpu_native.AMX_ENV)
    assert cpu_native.amx_default() == auto
    monkeypatch.setenv(cpu_native.AMX_ENV, "yes")
    with pytest.raises(ValueError, match=cpu_native.AMX_ENV):
        cpu_native.amx_default()


@pytest.mark.parametrize("has_amx", [True, False])
def test_environment_picks_the_vdpbf16ps_engine_on_any_cpu(has_amx, monkeypatch):
    """``TQ_VLLM_CPU_AMX=dp``: every row on the tile bodies, their products on vdpbf16ps
    even where the CPU has AMX tiles; ``auto`` and ``1`` keep the CPU's own engine (AMX
    tiles where it has them). Flags stubbed: the choice, not the hardware, is tested."""
    monkeypatch.setattr(cpu_native, "_cpu_has_amx", lambda: has_amx)
    monkeypatch.setattr(cpu_native, "_cpu_has_dp", lambda: True)
    monkeypatch.setattr(cpu_native, "_dp_told", None)
    for value, mode, dp in (("dp", ON, True), ("auto", AUTO if has_amx else ON, not has_amx),
                            ("1", ON, not has_amx), ("0", OFF, not has_amx)):
        monkeypatch.setenv(cpu_native.AMX_ENV, value)
        assert (cpu_native.amx_default(), cpu_native._dp()) == (mode, dp), value
    monkeypatch.setattr(cpu_native, "_cpu_has_dp", lambda: False)
    monkeypatch.setenv(cpu_native.AMX_ENV, "dp")
    assert cpu_native.amx_default() == OFF  # no AVX512-BF16: nothing to run them on
