"""Triton kernels for the QTS+ gate, shipped as ``qtsplus_vllm.kernels``."""
