"""The start-up line that says how a QTSplus checkpoint is served.

One log line per process that builds the multimodal processor (the API server(s), and vLLM's engine
core, which builds one for profiling): the checkpoint's layout, the architecture name its
config.json gives and the class that serves it, the video loader bound and its sampling rules, the
dtypes, a tied or untied head, remote code and pickles that were ignored, and where the ViT and the
selector run. A user reading the log knows whether the model is served as it was trained.
"""

from __future__ import annotations

import logging

from ..checkpoint import CheckpointReader
from ..layout import inspect_layout
from ..options import SelectionOptions
from ..runtime import default_device, resolve_model_dir
from .video_loader import sampling_from_kwargs

logger = logging.getLogger("vllm.qtsplus")
_REPORTED: set[tuple[str, str]] = set()


def startup_report(model_config, defaults: SelectionOptions, loader: str) -> str:
    """The start-up line's text (see the module docstring)."""
    model_dir = resolve_model_dir(model_config.model, model_config.revision)
    reader = CheckpointReader(model_dir)
    layout = inspect_layout(model_dir, reader.keys())
    mm_config = model_config.multimodal_config
    video_kwargs = ((mm_config.media_io_kwargs if mm_config else None) or {}).get("video") or {}
    sampling = sampling_from_kwargs(video_kwargs)
    served_dtype = str(model_config.dtype).removeprefix("torch.")
    device = default_device()
    parts = [
        f"QTSplus checkpoint {model_config.model}",
        *layout.describe(),
        f"video loader: {loader!r} (qwen-vl-utils rules: fps {sampling.fps:g}, frames "
        f"{sampling.min_frames}..{sampling.max_frames}, pixels {defaults.min_pixels}..{defaults.max_pixels} "
        "per frame)",
        f"dtype: served {served_dtype}, weights {str(reader.dtype()).removeprefix('torch.')}",
        f"ViT and selector: {device} in the API server process; LM: vLLM's engine",
    ]
    return "; ".join(parts)


def report_startup(model_config, defaults: SelectionOptions, loader: str) -> None:
    """Log :func:`startup_report` once per process and checkpoint."""
    key = (str(model_config.model), str(model_config.revision))
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    logger.info("%s", startup_report(model_config, defaults, loader))
