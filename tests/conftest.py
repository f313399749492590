"""Shared test set-up.

Without CUDA, Triton kernels run in the interpreter on CPU tensors. Triton reads TRITON_INTERPRET
when a kernel is decorated, i.e. when qtsplus_vllm.kernels is first imported, so set it here,
before any test module imports the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
