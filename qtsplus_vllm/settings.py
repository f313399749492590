"""Every ``QTSPLUS_*`` server setting, declared once: type, default, allowed values, description.

The settings are read from the environment of the ``vllm serve`` process (every process of a server
reads the same variables, so a client can never change them) into one frozen :class:`Settings`
object, validated as a whole. :func:`settings` is the accessor every module uses; nothing else in
the package reads a ``QTSPLUS_*`` variable. The server validates the object when it starts
(:func:`qtsplus_vllm.runtime.check_server_settings`), so a bad value stops ``vllm serve`` with one
error format, one line per bad variable::

    QTSPLUS_MAX_FRAMES='1': must be an integer >= 2 (frames kept per video ...)

An unset or empty (blank) variable takes the default. Values are classes of :class:`Kind`: integers,
numbers (seconds), bytes (a whole number, no unit suffix), booleans, choices, a device or a device
list. ``docs/configuration.md`` is generated from this module
(``python -m qtsplus_vllm.settings --markdown docs/configuration.md``; a unit test fails when the
page is stale or when the code names a ``QTSPLUS_*`` variable that is declared nowhere here).

Torch-free and vLLM-free: the limits, the selection runtime and the serving layer all import it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PREFIX = "QTSPLUS_"
MiB = 1 << 20
MIN_KEPT_FRAMES = 2  # a video is at least one temporal patch (qwen-vl-utils' FRAME_FACTOR)
# QTSPLUS_VIT_ATTENTION's names; qtsplus_vllm.vision.ATTENTION_CHOICES (a test keeps them equal)
VIT_ATTENTION_CHOICES = ("auto", "vllm_flash_attn", "flash_attn", "torch_varlen", "sdpa_padded", "sdpa")
# QTSPLUS_RESIZE's names; qtsplus_vllm.video.RESIZE_MODES (a test keeps them equal)
RESIZE_CHOICES = ("exact", "fast")
_DEVICE = re.compile(r"cpu|cuda(?::\d+)?")

# the groups of the reference page, in its order: (title, the page that explains them)
GROUPS = {
    "limits": (
        "Request limits",
        "What each limit bounds and where it is checked: [Limits and security](limits.md).",
    ),
    "runtime": (
        "Selection runtime",
        "Devices, threads and caches of the ViT and the selector: [Deploying](deploying.md) and "
        "[Long videos](long-videos.md).",
    ),
    "serving": ("Serving and security", "Media keys and client uuids: [Limits and security](limits.md)."),
    "development": ("Development tools", "Read by the repository's tools, not by a server."),
}

# QTSPLUS_* variables read only by the test suite and scripts/, never by the package: not settings
# of a server, so not in the object, but named here so that every QTSPLUS_* variable the repository
# reads is declared in one place (tests/unit/test_settings.py scans the code for others).
TEST_VARIABLES = {
    "QTSPLUS_TEST_LOAD_FAILURES": "tests/e2e/faults: make the n-th runtime load fail (oom, sticky, ...)",
    "QTSPLUS_TEST_OOM_WIDTH": "tests/e2e/faults: the runtime runs out of memory for frames this wide",
    "QTSPLUS_FUZZ_EXAMPLES": "tests/unit/test_fuzz.py: examples per property (default 100)",
    "QTSPLUS_SOAK_REQUESTS": "tests/e2e/test_isolation.py: requests of the soak (default 240)",
    "QTSPLUS_MEMORY_BOUND_MINUTES": "tests/e2e/test_memory_bound.py: minutes of video (default 2)",
    "QTSPLUS_CANCEL_MINUTES": "tests/e2e/test_cancellation.py: minutes of each aborted video (default 3)",
    "QTSPLUS_VLLM_SRC": "tests/unit/test_vllm_compat.py: where the vLLM sources of other releases are",
    "QTSPLUS_VENV": "scripts/setup.sh: the virtual environment to make (default .venv)",
}


# -- the classes of values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A class of setting values: how a variable's text is read and what it may be.

    ``parse`` takes the (stripped, non-empty) text of a variable, or a value given in Python, and
    returns the typed value or raises ``ValueError``; ``allowed`` is the text of the error message
    and of the reference page's "allowed" column.
    """

    name: ClassVar[str] = ""  # the class, as the reference page names it

    def allowed(self) -> str:
        raise NotImplementedError

    def parse(self, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Kind):
    name: ClassVar[str] = "integer"
    minimum: int = 1
    even: bool = False

    def allowed(self) -> str:
        return f"{'an even' if self.even else 'an'} integer >= {self.minimum}"

    def parse(self, value: Any) -> int:
        if isinstance(value, str):
            if not re.fullmatch(r"\d+", value):
                raise ValueError(self.allowed())
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise ValueError(self.allowed())
        if self.even and value % 2:
            raise ValueError(self.allowed())
        return value


@dataclass(frozen=True)
class Bytes(Integer):
    """A size in bytes: a whole number (no unit suffix)."""

    name: ClassVar[str] = "bytes"

    def allowed(self) -> str:
        return f"a whole number of bytes >= {self.minimum} (no unit suffix)"


@dataclass(frozen=True)
class Number(Kind):
    name: ClassVar[str] = "number"
    minimum: float = 0.0
    inclusive: bool = False  # minimum itself allowed

    def allowed(self) -> str:
        return f"a number {'>=' if self.inclusive else '>'} {self.minimum:g}"

    def parse(self, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(self.allowed()) from None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(self.allowed())
        if not (value >= self.minimum if self.inclusive else value > self.minimum):
            raise ValueError(self.allowed())
        return float(value)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Boolean(Kind):
    name: ClassVar[str] = "boolean"

    def allowed(self) -> str:
        return "0 or 1 (also false/true, no/yes, off/on)"

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(self.allowed())


@dataclass(frozen=True)
class Choice(Kind):
    name: ClassVar[str] = "choice"
    choices: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, choice)

    def allowed(self) -> str:
        names = []
        for choice in self.choices:
            also = [alias for alias, target in self.aliases if target == choice]
            names.append(f"{choice} (also {', '.join(also)})" if also else choice)
        return "one of " + ", ".join(names)

    def parse(self, value: Any) -> str:
        text = str(value).lower()
        text = dict(self.aliases).get(text, text)
        if text not in self.choices:
            raise ValueError(self.allowed())
        return text


@dataclass(frozen=True)
class Device(Kind):
    name: ClassVar[str] = "device"

    def allowed(self) -> str:
        return "cpu or cuda[:N]"

    def parse(self, value: Any) -> str:
        text = str(value)
        if not _DEVICE.fullmatch(text):
            raise ValueError(self.allowed())
        return text


@dataclass(frozen=True)
class DeviceList(Kind):
    name: ClassVar[str] = "device list"

    def allowed(self) -> str:
        return "cpu or cuda[:N], or a comma-separated list of them (one per API-server rank, round robin)"

    def parse(self, value: Any) -> tuple[str, ...]:
        entries = [e.strip() for e in value.split(",")] if isinstance(value, str) else list(value)
        if not entries or not all(isinstance(e, str) and _DEVICE.fullmatch(e) for e in entries):
            raise ValueError(self.allowed())
        return tuple(entries)


@dataclass(frozen=True)
class Folder(Kind):
    name: ClassVar[str] = "path"

    def allowed(self) -> str:
        return "a folder path"

    def parse(self, value: Any) -> str:
        return str(value)


def _typed(kind: Kind, python_type: Any, *extra: Any) -> Any:
    """``python_type`` read by ``kind`` (the kind stays in the field's metadata for messages and docs)."""
    return Annotated[(python_type, *extra, BeforeValidator(kind.parse), kind)]


def _setting(default: Any, group: str, description: str, default_text: str | None = None) -> Any:
    extra = {"group": group}
    if default_text is not None:
        extra["default_text"] = default_text
    return Field(default, description=description, json_schema_extra=extra)


# -- the settings -------------------------------------------------------------------------------


class Settings(BaseSettings):
    """The ``QTSPLUS_*`` settings of this process: field ``name`` is variable ``QTSPLUS_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True, validate_default=False)

    # request limits (qtsplus_vllm.limits.Limits takes the same names)
    max_video_bytes: _typed(Bytes(), int) = _setting(
        512 * MiB,
        "limits",
        "encoded size of one video: data URLs, file:// on disk, http(s) while downloading",
    )
    max_video_seconds: _typed(Number(), float) = _setting(
        7200.0, "limits", "duration of one video from its container header, before decoding", "7200 (2 h)"
    )
    max_source_frames: _typed(Integer(), int) = _setting(
        432_000,
        "limits",
        "frames the decoder walks through: from the header, then counted while decoding",
        "432,000 (2 h at 60 fps)",
    )
    max_frames: _typed(Integer(MIN_KEPT_FRAMES), int) = _setting(
        768,
        "limits",
        "frames kept per video, the largest max_frames a request may ask; 2 frames are one temporal patch",
    )
    max_frame_pixels: _typed(Integer(), int) = _setting(
        4096 * 4096,
        "limits",
        "width x height of the source frames, from the header, before decoding",
        "16,777,216 (4096²)",
    )
    decode_max_pixels: _typed(Integer(), int) = _setting(
        4 * 768 * 28 * 28,
        "limits",
        "frames larger than this are scaled down while they are decoded",
        "2,408,448 (4 · 768 · 28²)",
    )
    max_decode_work: _typed(Integer(), int | None) = _setting(
        None,
        "limits",
        "decoding work of one pass over a video: source frames x pixels per frame, at least 128^2 each",
        "QTSPLUS_MAX_SOURCE_FRAMES x QTSPLUS_MAX_FRAME_PIXELS",
    )
    decode_timeout_seconds: _typed(Number(), float) = _setting(
        600.0, "limits", "wall-clock seconds of one pass over a video; over it: HTTP 504"
    )
    max_vit_patches: _typed(Integer(), int) = _setting(
        396_288, "limits", "ViT patches of one video after resizing, before preprocessing"
    )
    max_question_tokens: _typed(Integer(), int) = _setting(
        512, "limits", "tokens of the question given to the selector"
    )
    fetch_deadline_seconds: _typed(Number(), float) = _setting(
        120.0,
        "limits",
        "wall-clock seconds of one http(s) video download, retries included; over it: HTTP 504",
    )

    # the selection runtime
    device: _typed(DeviceList(), tuple[str, ...], NoDecode) = _setting(
        (),
        "runtime",
        "where the ViT and the selector run; a list spreads --api-server-count N by rank",
        "cuda:0 when CUDA is available, else cpu",
    )
    cpu_threads: _typed(Integer(), int | None) = _setting(
        None, "runtime", "torch threads of the selection runtime on the CPU", "every core the process may use"
    )
    feature_cache_bytes: _typed(Bytes(0), int | None) = _setting(
        None,
        "runtime",
        "bound of the ViT-feature cache's first tier; 0 turns the cache off",
        "a quarter of the device's free memory when the runtime loads, at most 8 GiB",
    )
    feature_cache_host_bytes: _typed(Bytes(0), int | None) = _setting(
        None,
        "runtime",
        "bound of the host-memory tier behind a GPU first tier",
        "a quarter of the host's available memory, at most 16 GiB",
    )
    feature_cache_device: _typed(Device(), str | None) = _setting(
        None,
        "runtime",
        "where the feature cache's first tier lives; cpu: host memory, pinned with CUDA",
        "the runtime's device",
    )
    stream_chunk_frames: _typed(Integer(2, even=True), int) = _setting(
        32, "runtime", "sampled frames per chunk of a video streamed through the ViT: whole temporal patches"
    )
    prepare_in_loader: _typed(
        Choice(("vit", "auto", "1", "0"), (("true", "1"), ("on", "1"), ("false", "0"), ("off", "0"))),
        Literal["vit", "auto", "1", "0"],
    ) = _setting(
        "vit",
        "runtime",
        "where a video is decoded: vit = its media thread decodes it into the ViT and the processor only "
        "selects; 1 = decoded ahead in the loader, ViT in the processor; 0 = decoded in the processor; "
        "auto = 1 under load, 0 alone",
    )
    runtime_retry_seconds: _typed(Number(0.0, inclusive=True), float) = _setting(
        30.0,
        "runtime",
        "seconds a failed load of the selection runtime is not retried; its requests get HTTP 503",
    )
    selector_impl: _typed(Choice(("auto", "triton", "torch")), Literal["auto", "triton", "torch"]) = _setting(
        "auto",
        "runtime",
        "how the selector scores: the fused Triton kernel, PyTorch, or auto: Triton for CUDA tensors",
    )
    vit_attention: _typed(Choice(VIT_ATTENTION_CHOICES), str) = _setting(
        "auto", "runtime", "the ViT's attention kernel; auto picks the fastest exact one that runs"
    )
    resize: _typed(Choice(RESIZE_CHOICES), Literal["exact", "fast"]) = _setting(
        "exact",
        "runtime",
        "how sampled frames are scaled to the ViT's size: exact = full-size RGB, then the reference's "
        "bicubic (bit-exact); fast = FFmpeg's scaler inside the decoder's RGB conversion (faster, pixels "
        "differ slightly)",
    )

    # serving
    trust_client_uuids: _typed(Boolean(), bool) = _setting(
        False, "serving", "a client's media uuid may stand for the media: only when every client is trusted"
    )

    # development
    vllm_wheels: _typed(Folder(), str | None) = _setting(
        None,
        "development",
        "python -m qtsplus_vllm.vllm_releases unpack: a folder that may hold the vLLM wheels",
        "pip downloads them",
    )

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """Strip the text of every value; an empty or blank one takes the default."""
        if not isinstance(data, Mapping):
            return data
        return {
            key: value.strip() if isinstance(value, str) else value
            for key, value in data.items()
            if not (isinstance(value, str) and not value.strip())
        }

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings)  # the process environment only: no .env, no secrets folder

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Settings:
        """The settings from ``environ`` instead of the process environment (``QTSPLUS_<NAME>`` keys)."""
        values = {name: environ[variable(name)] for name in cls.model_fields if variable(name) in environ}
        return _validated(lambda: cls.model_validate(values))


class SettingsError(ValueError):
    """Bad ``QTSPLUS_*`` values: one line per variable, ``VARIABLE=value: must be ALLOWED (description)``.

    ``problems``: (variable, value) of each.
    """

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = [(name, value) for name, value, _ in problems]
        super().__init__("\n".join(line for _, _, line in problems))


def variable(name: str) -> str:
    """The environment variable of field ``name``: ``QTSPLUS_<NAME>``."""
    return PREFIX + name.upper()


def kind_of(name: str) -> Kind:
    """The :class:`Kind` of field ``name``."""
    return next(m for m in Settings.model_fields[name].metadata if isinstance(m, Kind))


def problem(name: str, value: Any) -> str:
    """The one error format: ``QTSPLUS_<NAME>=<value>: must be <allowed> (<description>)``."""
    field = Settings.model_fields[name]
    return f"{variable(name)}={value!r}: must be {kind_of(name).allowed()} ({field.description})"


def check_value(name: str, value: Any) -> Any:
    """``value`` for field ``name`` as the settings read it; :class:`SettingsError` when it is not allowed."""
    try:
        return kind_of(name).parse(value)
    except ValueError:
        raise SettingsError([(variable(name), value, problem(name, value))]) from None


def _validated(build) -> Settings:
    try:
        return build()
    except ValidationError as err:
        problems = []
        for error in err.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            if name not in Settings.model_fields:  # not expected: every field has a Kind
                raise
            problems.append((variable(name), error["input"], problem(name, error["input"])))
        raise SettingsError(problems) from None


_CACHED: tuple[tuple[tuple[str, str], ...], Settings] | None = None


def settings() -> Settings:
    """This process's settings, read from its environment and validated (:class:`SettingsError`).

    Read again only when a ``QTSPLUS_*`` variable of the process changed since the last call (a
    server's never do; tests set them), so calling it per request costs a scan of the environment.
    """
    global _CACHED
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX)))
    cached = _CACHED
    if cached is None or cached[0] != key:
        cached = (key, _validated(Settings))
        _CACHED = cached
    return cached[1]


def read_one(name: str) -> Any:
    """Setting ``name`` alone, from the process environment: for tools that are not a server (the
    development group), which should not fail on another variable's bad value."""
    raw = os.environ.get(variable(name), "").strip()
    return check_value(name, raw) if raw else Settings.model_fields[name].default


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``QTSPLUS_*`` variables of ``environ`` (default: the process's) that nothing reads: typos."""
    environ = os.environ if environ is None else environ
    known = {variable(name) for name in Settings.model_fields} | set(TEST_VARIABLES)
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in known)


# -- the reference page ------------------------------------------------------------------------


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    extra = field.json_schema_extra or {}
    if "default_text" in extra:
        return str(extra["default_text"])
    default = field.default
    if isinstance(default, bool):
        return "1" if default else "0"
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, int):
        return f"{default:,}" + (
            f" ({default // MiB} MiB)" if isinstance(kind_of(name), Bytes) and default % MiB == 0 else ""
        )
    return str(default)


def markdown() -> str:
    """docs/configuration.md: every setting by group, then the test suite's variables."""
    lines = [
        "<!-- Generated by `python -m qtsplus_vllm.settings --markdown docs/configuration.md` from",
        "     qtsplus_vllm/settings.py; edit that module, not this page (tests/unit/test_settings.py). -->",
        "",
        "# Configuration reference",
        "",
        "Every `QTSPLUS_*` variable a server reads. They are read from the environment of the",
        "`vllm serve` process (every process of the server reads the same ones; no client can change",
        "them) and validated together when the server starts: a bad value stops `vllm serve` with one",
        "line per bad variable,",
        "",
        "```text",
        problem("max_frames", "1"),
        "```",
        "",
        "An unset or empty variable takes the default. Integers and bytes are whole numbers (bytes take",
        "no unit suffix: `8589934592`, not `8GiB`); numbers may have a fraction (`7.5`). A `QTSPLUS_*`",
        "variable that nothing reads (a typo) is named in a warning at start-up.",
    ]
    for group, (title, intro) in GROUPS.items():
        names = [
            n for n, f in Settings.model_fields.items() if (f.json_schema_extra or {}).get("group") == group
        ]
        lines += [
            "",
            f"## {title}",
            "",
            intro,
            "",
            "| variable | class | default | allowed | what it sets |",
            "|---|---|---|---|---|",
        ]
        for name in names:
            kind = kind_of(name)
            description = Settings.model_fields[name].description
            lines.append(
                f"| `{variable(name)}` | {kind.name} | {_default_text(name)} | {kind.allowed()} | {description} |"
            )
    lines += [
        "",
        "## Test suite and scripts",
        "",
        "Read by the tests and `scripts/` only, never by a server: they are not validated at start-up.",
        "",
        "| variable | read by |",
        "|---|---|",
        *(f"| `{name}` | {text} |" for name, text in TEST_VARIABLES.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qtsplus_vllm.settings", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--markdown", metavar="PAGE", help="write the reference page (- for stdout)")
    args = parser.parse_args(argv)
    if args.markdown is None:
        try:
            print(settings().model_dump_json(indent=2))
        except SettingsError as err:
            sys.exit(str(err))
    elif args.markdown == "-":
        sys.stdout.write(markdown())
    else:
        with open(args.markdown, "w", encoding="utf-8") as page:
            page.write(markdown())


if __name__ == "__main__":
    main()
