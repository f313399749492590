"""vLLM general-plugin entry point (``vllm.general_plugins`` -> ``qtsplus``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers, its
model-inspection subprocess). It must stay cheap, idempotent and free of CUDA: it registers the
config class, the model by a lazy ``"module:Class"`` string, the video loader and the media
connector that applies our limits to video fetches, and loads nothing.
"""

from __future__ import annotations

MODEL_CLASS = "qtsplus_vllm.serving.model:QTSplusQwen2_5_VLForCausalLM"


def register() -> None:
    """Register the QTSplus config, architecture and video loader with transformers and vLLM."""
    from vllm import ModelRegistry

    from .config import ARCHITECTURE, register_config
    from .serving.media import register_media_connector
    from .serving.video_loader import register_video_loader

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    register_video_loader()
    register_media_connector()
