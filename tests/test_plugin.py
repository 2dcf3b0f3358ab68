"""Plugin registration: idempotence, routing, clear errors, loud failure."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tq_vllm import plugin
from tq_vllm.config import PRESET_NAMES, PRESETS


def sel(**kw):
    base = dict(head_size=64, use_mla=False, use_sparse=False, has_sliding_window=False,
                has_sink=False, attn_type="decoder")
    return SimpleNamespace(**(base | kw))


def test_register_is_idempotent_and_registers_every_preset():
    plugin.register()
    plugin.register()
    assert plugin.registration_error() is None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from tq_vllm.backend import BACKENDS
    for name in PRESET_NAMES:
        cls = BACKENDS[name]
        assert AttentionBackendEnum[cls.get_name()].get_path() == plugin.backend_class_path(name)


def test_route_sends_tq_dtypes_to_our_backend_and_others_through():
    assert plugin.route("auto", sel()) is None
    assert plugin.route("fp8", sel()) is None
    assert plugin.route("tq3.5", sel()).endswith("TqVllmTq35Backend")


@pytest.mark.parametrize("kw,match", [
    (dict(use_mla=True), "MLA"), (dict(has_sliding_window=True), "sliding-window"),
    (dict(head_size=80), "head_size 80"), (dict(attn_type="encoder"), "encoder"),
    (dict(has_sink=True), "sinks")])
def test_unsupported_models_get_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        plugin.route("tq4", sel(**kw))
    assert "auto or fp8" in str(e.value)


def test_cpu_routing_patch_rejects_vllm_turboquant_on_cpu():
    plugin.register()
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16,
                                  kv_cache_dtype="turboquant_4bit_nc", block_size=128)
    with pytest.raises(ValueError, match="silently"):
        CpuPlatform.get_attn_backend_cls(None, cfg)
    ours = cfg._replace(kv_cache_dtype="tq4")
    assert CpuPlatform.get_attn_backend_cls(None, ours).endswith("TqVllmTq4Backend")
    exact = cfg._replace(kv_cache_dtype="auto")
    assert CpuPlatform.get_attn_backend_cls(None, exact).endswith("CPUAttentionBackend")


def test_backend_spec_uses_config_slot_bytes():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tq_vllm.backend import BACKENDS
    for name in ("tq4", "tq3.5-qjl", "tq2.5"):
        spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.uint8)
        out = BACKENDS[name].customize_spec(spec)
        assert out.state_content_bytes == PRESETS[name].layout(64).slot_bytes
        assert out.page_size_bytes == 3 * 128 * PRESETS[name].layout(64).slot_bytes


def test_failed_registration_makes_tq_engines_fail_loudly():
    code = r'''
import tq_vllm.plugin as p
import tq_vllm.version as v
v.SUPPORTED_VLLM = ((9, 0), (9, 1))   # pretend this vLLM is unsupported
p.register()
from vllm.engine.arg_utils import EngineArgs
try:
    EngineArgs(model="x", kv_cache_dtype="tq4").create_engine_config()
except RuntimeError as e:
    print("RAISED", e)
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RAISED --kv-cache-dtype tq4 needs the tq-vllm plugin, which failed to load" in out.stdout
    assert "UnsupportedVllmVersion" in out.stdout


def test_importing_plugin_and_kernels_leaves_numba_unloaded():
    """vLLM 0.32-CPU's worker start scans every loaded module for Triton kernels and fails on
    llvmlite's objects (AttributeError '_lib_fn_wrapper' ... 'get'), so an in-process engine
    built after numba was imported dies: importing tq-vllm's plugin, backend and CPU
    launchers must not import numba (its kernels load on first use, where the native ones
    are missing)."""
    code = ("import sys; import tq_vllm, tq_vllm.plugin, tq_vllm.backend, tq_vllm.api, "
            "tq_vllm.kernels.ops, tq_vllm.kernels.cpu_ops; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
