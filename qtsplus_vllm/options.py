"""Per-request and server-wide selection settings, validated (no vLLM, no torch).

They arrive as ``mm_processor_kwargs``: server defaults with ``--mm-processor-kwargs '{...}'``,
per request with ``extra_body={"mm_processor_kwargs": {...}}`` (needs ``--trust-request-mm-kwargs``);
request values win. Keys:

==================  =========================================  ===========================
key                 meaning                                    allowed
==================  =========================================  ===========================
qtsplus_select      run the QTS+ gate; false keeps all M       true / false
                    ViT tokens (the no-selection baseline)
qtsplus_rho_scale   multiply the predicted keep ratio rho      0 < x <= 100
qtsplus_rho_min     lower bound on rho after scaling           0 <= x <= 1
qtsplus_rho_max     upper bound on rho after scaling           0 < x <= 1, >= rho_min
qtsplus_max_tokens  cap on n (the checkpoint's nmax caps too)  integer >= 1
max_pixels          per-frame pixel budget for resizing        integer 28*28 .. 16384*28*28
min_pixels          per-frame pixel floor for resizing         integer 28*28 .. max_pixels
                    (default 128*28*28, lowered to max_pixels
                    when only max_pixels is given)
==================  =========================================  ===========================

n = min(max(ceil(rho' * M), 1), nmax, qtsplus_max_tokens) with
rho' = clamp(rho * qtsplus_rho_scale, qtsplus_rho_min, qtsplus_rho_max).

The resize mode (``QTSPLUS_RESIZE``: exact or fast) is a server setting, not a key: it rides in the
options (and so in the cache key) because it changes the ViT's input pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .settings import settings
from .video import PreprocessConfig

_MIN_FRAME_PIXELS = 28 * 28
_MAX_FRAME_PIXELS = 16384 * 28 * 28


class OptionError(ValueError):
    """An invalid selection setting; ``key`` names it (vLLM answers HTTP 400)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"mm_processor_kwargs[{key!r}]: {message}")
        self.key = key


@dataclass(frozen=True)
class SelectionOptions:
    """Every setting that changes which rows a video contributes (so: part of the cache key)."""

    select: bool = True
    rho_scale: float = 1.0
    rho_min: float = 0.0
    rho_max: float = 1.0
    max_tokens: int | None = None
    max_pixels: int = PreprocessConfig.max_pixels
    min_pixels: int = PreprocessConfig.min_pixels
    resize: str = PreprocessConfig.resize  # QTSPLUS_RESIZE, filled in by parse_options

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(max_pixels=self.max_pixels, min_pixels=self.min_pixels, resize=self.resize)

    def cache_key(self) -> tuple:
        """A canonical, hashable form (vLLM hashes it with the video and the question)."""
        return tuple(sorted(asdict(self).items()))


def _number(key: str, value: object, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OptionError(key, f"expected a number, got {value!r}")
    if value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise OptionError(key, f"{value!r} is outside the allowed range {left}{lo}, {hi}]")
    return float(value)


def _integer(key: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise OptionError(key, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise OptionError(key, f"{int(value)} is outside the allowed range [{lo}, {hi}]")
    return int(value)


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise OptionError(key, f"expected true or false, got {value!r}")
    return value


_PARSERS = {
    "qtsplus_select": ("select", _boolean),
    "qtsplus_rho_scale": ("rho_scale", lambda k, v: _number(k, v, 0.0, 100.0, lo_open=True)),
    "qtsplus_rho_min": ("rho_min", lambda k, v: _number(k, v, 0.0, 1.0)),
    "qtsplus_rho_max": ("rho_max", lambda k, v: _number(k, v, 0.0, 1.0, lo_open=True)),
    "qtsplus_max_tokens": ("max_tokens", lambda k, v: _integer(k, v, 1, 1 << 30)),
    "max_pixels": ("max_pixels", lambda k, v: _integer(k, v, _MIN_FRAME_PIXELS, _MAX_FRAME_PIXELS)),
    "min_pixels": ("min_pixels", lambda k, v: _integer(k, v, _MIN_FRAME_PIXELS, _MAX_FRAME_PIXELS)),
}
OPTION_KEYS = frozenset(_PARSERS)


def parse_options(kwargs: Mapping[str, object], ignore: frozenset[str] = frozenset()) -> SelectionOptions:
    """Validate ``mm_processor_kwargs`` into :class:`SelectionOptions`; errors name the key.

    Keys in ``ignore`` (private keys of our own, for instance) are skipped; any other unknown key
    is an error, so that a typo never silently runs with the defaults.
    """
    values: dict[str, object] = {}
    for key, value in kwargs.items():
        if key in ignore:
            continue
        if key not in _PARSERS:
            raise OptionError(key, f"unknown key; accepted keys: {sorted(OPTION_KEYS)}")
        field, parse = _PARSERS[key]
        values[field] = parse(key, value)
    if "max_pixels" in values and "min_pixels" not in values:
        # a small max_pixels alone lowers the floor with it instead of contradicting the default floor
        values["min_pixels"] = min(SelectionOptions.min_pixels, values["max_pixels"])
    options = SelectionOptions(**values, resize=settings().resize)
    if options.rho_min > options.rho_max:
        raise OptionError("qtsplus_rho_min", f"{options.rho_min} is above qtsplus_rho_max={options.rho_max}")
    if options.min_pixels > options.max_pixels:
        raise OptionError("min_pixels", f"{options.min_pixels} is above max_pixels={options.max_pixels}")
    return options
