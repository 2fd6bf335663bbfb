"""Inference: the engine (prefill + decode with a KV cache), sampling, quantisation, prefix caching, prompting
techniques, and the platform-specific CPU code the runtime calls at start-up (chatstack.infer.cpu)."""
