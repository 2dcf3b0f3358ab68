"""The public codec API: the docstring example runs, shadow mode, memory report."""

import re

import pytest
import torch

import tq_vllm.api as api
from tq_vllm.api import KVCompressor


def test_module_example_runs():
    src = re.search(r"Example.*?::\n\n(.*?)\n\"\"\"", api.__doc__ + '\n"""', re.S).group(1)
    code = "\n".join(line[4:] for line in src.splitlines())
    ns: dict = {}
    exec(compile(code, "tq_vllm/api.py docstring", "exec"), ns)
    assert ns["scores"].shape == (1, 4, 100) and ns["out"].shape == (1, 4, 128)
    assert ns["report"]["score_rmse"] > 0


def test_encode_decode_roundtrip_shapes():
    kv = KVCompressor("tq4", head_dim=64, num_kv_heads=3)
    k, v = torch.randn(10, 3, 64), torch.randn(10, 3, 64)
    slots = kv.encode(k, v)
    assert slots.shape == (10, 3, 68) and slots.dtype == torch.uint8
    k2, v2 = kv.decode(slots)
    assert ((k2 - k).norm() / k.norm()) < 0.15 and ((v2 - v).norm() / v.norm()) < 0.15


def test_attend_matches_softmax_on_decoded():
    kv = KVCompressor("tq3-qjl", head_dim=64, num_kv_heads=1)
    kv.append(torch.randn(30, 1, 64), torch.randn(30, 1, 64))
    q = torch.randn(2, 3, 64)
    k, v = kv.decode(kv.slots)
    p = torch.softmax(torch.einsum("lhd,nd->lhn", q, k[:, 0]) / 8, -1)
    assert torch.allclose(kv.attend(q), torch.einsum("lhn,nd->lhd", p, v[:, 0]), atol=1e-5)


def test_memory_report_is_honest_about_shadows():
    kv = KVCompressor("tq3.5-qjl", head_dim=64, num_kv_heads=2, keep_exact_shadow=True)
    kv.append(torch.randn(50, 2, 64), torch.randn(50, 2, 64))
    r = kv.memory_report()
    assert r.packed_bytes == 50 * 2 * 66
    assert r.code_bytes + r.sign_bytes + r.norm_bytes + r.padding_bytes == r.packed_bytes
    assert r.shadow_bytes == 2 * 50 * 2 * 64 * 4
    assert r.resident_bytes == r.packed_bytes + r.shadow_bytes
    assert r.fp16_baseline_bytes == 50 * 2 * 2 * 64 * 2
    assert r.compression_vs_fp16 < 1  # the shadows cost more than the codes save
    plain = KVCompressor("tq3.5-qjl", head_dim=64, num_kv_heads=2)
    plain.append(torch.randn(50, 2, 64), torch.randn(50, 2, 64))
    assert plain.memory_report().compression_vs_fp16 == pytest.approx(256 / 66)


def test_shadow_scores_need_shadow_mode():
    kv = KVCompressor("tq4", head_dim=64)
    kv.append(torch.randn(4, 1, 64), torch.randn(4, 1, 64))
    with pytest.raises(RuntimeError, match="keep_exact_shadow"):
        kv.shadow_report(torch.randn(1, 1, 64))


def test_bad_inputs():
    with pytest.raises(ValueError, match="valid presets"):
        KVCompressor("turboquant_4bit_nc", head_dim=64)
    kv = KVCompressor("tq4", head_dim=64, num_kv_heads=2)
    with pytest.raises(ValueError, match="differ"):
        kv.encode(torch.randn(3, 2, 64), torch.randn(4, 2, 64))
    with pytest.raises(ValueError, match="multiple of 2"):
        kv.append(torch.randn(3, 2, 64), torch.randn(3, 2, 64)) or kv.scores(torch.randn(1, 3, 64))


def _offset_keys(n, h=2, d=64, seed=0):
    """Keys with a large per-channel offset, like real post-RoPE keys."""
    g = torch.Generator().manual_seed(seed)
    offset = 4 * torch.randn(h, d, generator=g)
    return torch.randn(n, h, d, generator=g) + offset, torch.randn(n, h, d, generator=g)


def test_recommended_preset_calibrates_on_first_append_and_beats_plain_mse():
    k, v = _offset_keys(300)
    q = torch.randn(4, 6, 64)
    errors = {}
    for name in ("tq4", "tq4-mse"):
        kv = KVCompressor(name, head_dim=64, num_kv_heads=2, keep_exact_shadow=True)
        kv.append(k, v)
        errors[name] = kv.shadow_report(q)["score_rmse"]
        k2, _ = kv.decode(kv.slots)  # decode returns the model's domain, offset included
        assert ((k2 - k).norm() / k.norm()) < 0.1
    assert errors["tq4"] < 0.5 * errors["tq4-mse"], errors


def test_explicit_calibration_and_its_order():
    from tq_vllm.calibration import KVStats

    k, v = _offset_keys(100)
    stats = KVStats.from_samples(k, v)
    a = KVCompressor("tq3", head_dim=64, num_kv_heads=2, calibration=stats)
    b = KVCompressor("tq3", head_dim=64, num_kv_heads=2)
    a.append(k, v)
    b.append(k, v)  # calibrates on the same vectors: the same bytes
    assert torch.equal(a.slots, b.slots)
    with pytest.raises(RuntimeError, match="before the first append"):
        a.calibrate(stats)


def test_readme_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using the codec outside vLLM", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md example", "exec"), ns)
    assert ns["scores"].shape == (1, 4, 100) and ns["out"].shape == (1, 4, 128)
    assert ns["kv"].memory_report().packed_bytes == 100 * 2 * 116
