"""Patch ``vllm.engine.arg_utils.EngineArgs.create_engine_config``: fail loudly when
tq-vllm could not load.

Why: ``vllm.plugins.load_general_plugins`` only logs a plugin's exceptions, so a
broken install would otherwise run ``--kv-cache-dtype tq*`` into a confusing
KeyError deep in model loading, or worse.
How: installed only on the failure path of :func:`tq_vllm.plugin.register`:
any engine configured with a ``tq*`` dtype raises, naming the plugin's error.
Remove when: vLLM propagates plugin load errors.
"""

from __future__ import annotations

TARGET = "vllm.engine.arg_utils.EngineArgs.create_engine_config"
_MARK = "_tq_vllm_original"


def apply(error_message: str, names: tuple[str, ...]) -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs.create_engine_config, _MARK, EngineArgs.create_engine_config)

    def create_engine_config(self, *args, **kwargs):
        if getattr(self, "kv_cache_dtype", None) in names:
            raise RuntimeError(f"--kv-cache-dtype {self.kv_cache_dtype} needs the tq-vllm "
                               f"plugin, which failed to load: {error_message}")
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _MARK, original)
    EngineArgs.create_engine_config = create_engine_config
