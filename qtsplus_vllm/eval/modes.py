"""Evaluation modes: the per-request settings one pass over the items sends.

A mode is written ``on``, ``off``, ``default``, or comma-separated ``key=value`` settings, e.g.
``rho_max=0.25`` or ``off,fps=0.5,max_frames=256``:

- ``on`` / ``select=on``: ``mm_processor_kwargs.qtsplus_select = true`` (QTSplus selection);
- ``off`` / ``select=off``: ``qtsplus_select = false`` (all ViT tokens: the baseline in the same server);
- ``default``: no settings at all (the server's defaults; the mode for a stock vLLM endpoint, which
  does not know the QTSplus keys);
- ``rho_max=X``: ``qtsplus_rho_max`` (implies ``on``); ``rho_min=X``, ``rho_scale=X`` likewise;
- ``fps=X``, ``max_frames=N``: frame sampling, sent as ``media_io_kwargs.video``.

Per-request settings need the server started with ``--trust-request-mm-kwargs``. A mode's name is
its canonical spelling, so a resumed run only skips items done under identical settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_PROCESSOR_KEYS = {
    "rho_max": "qtsplus_rho_max",
    "rho_min": "qtsplus_rho_min",
    "rho_scale": "qtsplus_rho_scale",
}
_ORDER = ("select", "rho_max", "rho_min", "rho_scale", "fps", "max_frames")


@dataclass(frozen=True)
class Mode:
    select: bool | None = None  # None: send no qtsplus_select
    rho_max: float | None = None
    rho_min: float | None = None
    rho_scale: float | None = None
    fps: float | None = None
    max_frames: int | None = None

    @property
    def name(self) -> str:
        parts = []
        if self.select is not None:
            parts.append("on" if self.select else "off")
        for key in _ORDER[1:]:
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value:g}")
        if parts and parts[0] == "on" and len(parts) > 1 and parts[1].startswith("rho_"):
            parts.pop(0)  # rho_* implies on
        return ",".join(parts) or "default"

    @property
    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _ORDER if getattr(self, k) is not None}

    def extra_body(self) -> dict[str, Any]:
        """The request fields of this mode (merged into the chat completion body)."""
        body: dict[str, Any] = {}
        processor: dict[str, Any] = {}
        if self.select is not None:
            processor["qtsplus_select"] = self.select
        for key, target in _PROCESSOR_KEYS.items():
            if getattr(self, key) is not None:
                processor[target] = getattr(self, key)
        if processor:
            body["mm_processor_kwargs"] = processor
        video: dict[str, Any] = {}
        if self.fps is not None:
            video["fps"] = self.fps
        if self.max_frames is not None:
            video["max_frames"] = self.max_frames
        if video:
            body["media_io_kwargs"] = {"video": video}
        return body

    def with_defaults(self, fps: float | None = None, max_frames: int | None = None) -> Mode:
        """This mode with ``fps`` / ``max_frames`` filled in where it sets none."""
        return Mode(
            select=self.select,
            rho_max=self.rho_max,
            rho_min=self.rho_min,
            rho_scale=self.rho_scale,
            fps=self.fps if self.fps is not None else fps,
            max_frames=self.max_frames if self.max_frames is not None else max_frames,
        )


def parse_mode(spec: str) -> Mode:
    """``"on"``, ``"off"``, ``"default"`` or ``"key=value,..."`` -> :class:`Mode` (ValueError if invalid)."""
    fields: dict[str, Any] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part or part == "default":
            continue
        key, _, value = part.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if key in ("on", "off") and not value:
            key, value = "select", key
        if key.startswith("qtsplus_"):
            key = key[len("qtsplus_") :]
        if key == "select":
            if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise ValueError(f"mode {spec!r}: select must be on or off")
            fields["select"] = value.lower() in ("on", "true", "1")
        elif key in ("rho_max", "rho_min", "rho_scale", "fps"):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"mode {spec!r}: {key} needs a number") from None
            if not number > 0:
                raise ValueError(f"mode {spec!r}: {key} must be > 0")
            fields[key] = number
        elif key == "max_frames":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"mode {spec!r}: max_frames needs a positive integer")
            fields[key] = int(value)
        else:
            raise ValueError(
                f"mode {spec!r}: unknown setting {key!r} (on, off, default, rho_max, rho_min, rho_scale, "
                "fps, max_frames)"
            )
    if fields.get("select") is False and any(k.startswith("rho_") for k in fields):
        raise ValueError(f"mode {spec!r}: rho settings need selection on")
    if any(k.startswith("rho_") for k in fields):
        fields.setdefault("select", True)
    return Mode(**fields)


def build_modes(
    specs: list[str],
    rho_sweep: list[float] | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> list[Mode]:
    """The run's modes, in order, duplicates removed; ``fps`` / ``max_frames`` apply where a mode sets none."""
    modes = [parse_mode(spec) for spec in specs]
    modes += [Mode(select=True, rho_max=value) for value in rho_sweep or []]
    out: list[Mode] = []
    for mode in modes:
        mode = mode.with_defaults(fps, max_frames)
        if mode.name not in {m.name for m in out}:
            out.append(mode)
    return out
