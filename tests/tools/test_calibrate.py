"""The per-model calibration: computed on the bundled model, cached, deterministic."""

from __future__ import annotations

import torch
import pytest

from tq_vllm.calibration import KVStats
from tq_vllm.tools import calibrate
from tq_vllm.tools.models import fetch_model


@pytest.fixture(scope="module")
def smollm2_stats():
    """The bundled model's calibration, in the default cache that vLLM runs use too
    (computed here once on a fresh machine), then read back from the file."""
    calibrate.model_calibration.cache_clear()
    path = fetch_model("smollm2")
    first = calibrate.model_calibration(path)
    calibrate.model_calibration.cache_clear()
    second = calibrate.model_calibration(path)
    return path, first, second


def test_calibration_covers_every_layer_and_head(smollm2_stats):
    path, stats, _ = smollm2_stats
    assert sorted(stats) == list(range(30))
    for st in stats.values():
        for f in KVStats.FIELDS:
            t = getattr(st, f)
            shape = (3, 64, 64) if f == "q_cov" else (3, 64)
            assert t.shape == shape and torch.isfinite(t).all(), f
        assert torch.allclose(st.q_cov.diagonal(dim1=-2, dim2=-1), st.q_sq, rtol=1e-4)
        assert (st.k_sq >= st.k_mean.pow(2) - 1e-3).all()  # a second moment bounds the mean
    assert calibrate.calibration_path(path).is_file()


def test_cached_calibration_reads_back_bit_identical(smollm2_stats):
    _, first, second = smollm2_stats
    for i in first:
        for f in KVStats.FIELDS:
            assert torch.equal(getattr(first[i], f), getattr(second[i], f))


def test_keys_have_the_offset_that_mean_removal_targets(smollm2_stats):
    """Real post-RoPE keys are far from zero-mean in some channels (the reason for
    key mean removal): the mean carries a sizeable share of the key energy."""
    _, stats, _ = smollm2_stats
    share = [float(st.k_mean.pow(2).sum() / st.k_sq.sum()) for st in stats.values()]
    assert max(share) > 0.2, share


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local Hugging Face folder"):
        calibrate.calibration_path(tmp_path)


def test_calibration_text_is_long_enough_for_the_recipe():
    text = calibrate.calibration_text()
    assert len(text) > 100_000
