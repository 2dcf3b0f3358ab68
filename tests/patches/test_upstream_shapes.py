"""Each patch's assumptions about vLLM, checked against the installed vLLM.

These fail when vLLM changes under a patch (the symbol moves, its type or signature
changes), which is the signal to revisit or delete that patch.
"""

import inspect
import typing

import pytest
import torch

from tq_vllm.config import PRESET_NAMES
from tq_vllm.plugin import register


def test_cache_dtype_is_the_literal_every_reader_holds():
    from vllm.config import cache
    from vllm.engine import arg_utils
    from vllm.v1.attention import selector

    assert typing.get_origin(cache.CacheDType) is typing.Literal
    assert {"auto", "fp8"} <= set(typing.get_args(cache.CacheDType))
    assert cache.CacheConfig.__dataclass_fields__["cache_dtype"].type in (cache.CacheDType, "CacheDType")
    assert selector.CacheDType is cache.CacheDType
    assert "CacheDType" in inspect.getsource(arg_utils.EngineArgs)


def test_cache_dtype_patch_makes_config_and_cli_accept_presets():
    register()
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert CacheConfig(cache_dtype="tq3.5").cache_dtype == "tq3.5"
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for name in PRESET_NAMES:
        assert parser.parse_args(["--kv-cache-dtype", name]).kv_cache_dtype == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "tq9"])


def test_torch_dtype_map_is_what_vllm_reads():
    from vllm.utils import torch_utils

    assert isinstance(torch_utils.STR_DTYPE_TO_TORCH_DTYPE, dict)
    assert "STR_DTYPE_TO_TORCH_DTYPE" in inspect.getsource(torch_utils.kv_cache_dtype_str_to_dtype)
    register()
    assert torch_utils.kv_cache_dtype_str_to_dtype("tq4", None) is torch.uint8


def test_cpu_platform_selector_signature_and_original_behaviour():
    from vllm.platforms.cpu import CpuPlatform

    from tq_vllm.patches import cpu_attn_backend

    register()
    fn = CpuPlatform.get_attn_backend_cls
    original = getattr(fn, cpu_attn_backend._MARK, fn.__func__)
    params = list(inspect.signature(original).parameters)
    assert params[:3] == ["cls", "selected_backend", "attn_selector_config"]
    # the reason for the patch: unpatched, CPU ignores the cache dtype entirely
    assert "kv_cache_dtype" not in inspect.getsource(original)


def test_engine_args_guard_target_exists():
    from vllm.engine.arg_utils import EngineArgs

    assert callable(EngineArgs.create_engine_config)
    assert "kv_cache_dtype" in EngineArgs.__dataclass_fields__


def test_backend_hooks_still_exist():
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.attention.backends.registry import register_backend
    from vllm.v1.kv_cache_interface import AttentionSpec

    assert "state_content_bytes" in AttentionSpec.__dataclass_fields__
    for hook in ("customize_spec", "supported_kv_cache_layouts", "get_supported_kernel_block_sizes",
                 "supports_kv_cache_dtype"):
        assert hasattr(AttentionBackend, hook)
    assert "backend" in inspect.signature(register_backend).parameters
