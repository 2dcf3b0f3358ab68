"""Developer tools for tq-vllm."""
