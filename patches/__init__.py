"""Version-gated patches of vLLM internals (``tq_vllm.patches`` once installed).

One module per patched vLLM symbol, each with Why / How / Remove when, applied
explicitly by :func:`tq_vllm.plugin.register`, idempotent.
"""
