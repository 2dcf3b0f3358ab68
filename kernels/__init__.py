"""Fast kernels for the packed TurboQuant cache (``tq_vllm.kernels`` once installed).

Never imports vLLM. Each kernel has a same-named pure-PyTorch reference in
:mod:`tq_vllm.reference` and an equivalence test under ``tests/kernels``.
"""
