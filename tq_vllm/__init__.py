"""tq-vllm: a TurboQuant-compressed paged KV cache for vLLM.

Read in this order: ``plugin`` (how vLLM finds us) → ``config`` (presets and
bytes) → ``codec`` / ``layout`` / ``reference`` (the math and the byte map) →
``tq_vllm.kernels`` (fast paths). ``tq_vllm.api`` is the codec's public API
outside vLLM.
"""

__version__ = "0.1.0"
