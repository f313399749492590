"""qtsplus-vllm: serve QTSplus long-video multimodal LLMs with vLLM.

Importing this package is cheap: it imports neither torch models nor vLLM. The torch-only core
lives in ``config``, ``checkpoint``, ``selector``, ``vision``, ``video`` and ``kernels``.
"""

__version__ = "0.1.0"
