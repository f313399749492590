"""Test utilities shipped with the package, for tests, benchmarks and users without real weights.

- :func:`write_tiny_checkpoint`: a random-weight QTSplus checkpoint in exactly the released format.
- :func:`make_video`: a real mp4 (PyAV) whose content moves over time.

Imported lazily, so that using one does not import the other's dependencies.
"""

from __future__ import annotations

__all__ = ["make_video", "write_tiny_checkpoint"]


def __getattr__(name: str):
    if name == "write_tiny_checkpoint":
        from .tiny_checkpoint import write_tiny_checkpoint

        return write_tiny_checkpoint
    if name == "make_video":
        from .videos import make_video

        return make_video
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
