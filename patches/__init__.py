"""Version-gated patches of vLLM internals (``tq_vllm.patches`` once installed).

One module per patched vLLM symbol, each with Why / How / Remove when and an
``apply`` that is idempotent and checks the vLLM version. The plugin applies them
explicitly, in order, from :func:`tq_vllm.plugin.register`.
"""
