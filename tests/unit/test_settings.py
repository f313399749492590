"""The QTSPLUS_* settings (issue 21 item 3): declared once, validated at start-up with one error
format, read nowhere else, and the configuration reference page generated from them."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from qtsplus_vllm import settings as settings_module
from qtsplus_vllm.limits import Limits
from qtsplus_vllm.runtime import check_server_settings
from qtsplus_vllm.settings import (
    TEST_VARIABLES,
    Settings,
    SettingsError,
    kind_of,
    settings,
    unknown_variables,
    variable,
)

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "qtsplus_vllm"
PAGE = REPO / "docs" / "configuration.md"
# QTSPLUS_-prefixed words that are no environment variable, and why
NOT_VARIABLES = {
    "QTSPLUS_3B": "qtsplus_vllm/memory.py: the 3B model's shapes (a Python name)",
    "QTSPLUS_7B": "qtsplus_vllm/memory.py: the 7B model's shapes (a Python name)",
    "QTSPLUS_PROBE": "tests/unit/vllm_compat_probe.py: the prefix of its output line",
    "QTSPLUS_X": "tests/unit/test_limits.py: a made-up variable name in a message test",
    "QTSPLUS_MAX_": "docs and docker/README.md: QTSPLUS_MAX_* names the limits as a group",
    "QTSPLUS_VLLM033_SRC": "docs/vllm-0.33-compat.md: the porting notes of that work (history)",
    "QTSPLUS_VLLM033_WHEEL": "docs/vllm-0.33-compat.md: the porting notes of that work (history)",
}
SCANNED = ["qtsplus_vllm", "tests", "benchmarks", "scripts", "docker", "docs", ".ci", "README.md", "kernels"]
ONE_LINE = re.compile(r"^(QTSPLUS_[A-Z0-9_]+)=(.+): must be (.+) \((.+)\)$")


def _declared() -> set[str]:
    return {variable(name) for name in Settings.model_fields}


def _refusal(monkeypatch, name: str, value: str) -> SettingsError:
    """The start-up check's error for ``QTSPLUS_<NAME>=value``, checked against the one format."""
    monkeypatch.setenv(variable(name), value)
    with pytest.raises(SettingsError) as info:
        check_server_settings()
    message = str(info.value)
    match = ONE_LINE.match(message)
    assert match, message
    assert match[1] == variable(name) and match[2] == repr(value.strip())
    assert match[3] == kind_of(name).allowed()
    assert match[4] == Settings.model_fields[name].description
    assert info.value.problems == [(variable(name), value.strip())]
    return info.value


# --- one refusal format per class of value -------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_frames", "1"),
        ("max_frames", "many"),
        ("max_frames", "1.0"),
        ("cpu_threads", "0"),
        ("stream_chunk_frames", "7"),
    ],
)
def test_a_bad_integer_stops_the_start_up(monkeypatch, name, value):
    _refusal(monkeypatch, name, value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_video_bytes", "-5"),
        ("max_video_bytes", "0"),
        ("feature_cache_bytes", "4GiB"),
        ("feature_cache_host_bytes", "1e9"),
    ],
)
def test_a_bad_byte_count_stops_the_start_up(monkeypatch, name, value):
    _refusal(monkeypatch, name, value)


@pytest.mark.parametrize("value", ["maybe", "2", "yes please"])
def test_a_bad_boolean_stops_the_start_up(monkeypatch, value):
    _refusal(monkeypatch, "trust_client_uuids", value)


@pytest.mark.parametrize("value", ["cuda:1,,cuda:2", "gpu:0", "meta", ",", "cuda:1,cuda:x", "CUDA"])
def test_a_bad_device_list_stops_the_start_up(monkeypatch, value):
    _refusal(monkeypatch, "device", value)


@pytest.mark.parametrize(
    "name, value",
    [("prepare_in_loader", "maybe"), ("selector_impl", "cuda-magic"), ("vit_attention", "magic")],
)
def test_a_bad_choice_stops_the_start_up(monkeypatch, name, value):
    _refusal(monkeypatch, name, value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("fetch_deadline_seconds", "nan"),
        ("fetch_deadline_seconds", "0"),
        ("runtime_retry_seconds", "-1"),
        ("feature_cache_device", "cuda:0,cpu"),
    ],
)
def test_a_bad_number_or_device_stops_the_start_up(monkeypatch, name, value):
    _refusal(monkeypatch, name, value)


def test_every_bad_variable_is_named_at_once(monkeypatch):
    monkeypatch.setenv("QTSPLUS_MAX_FRAMES", "lots")
    monkeypatch.setenv("QTSPLUS_DEVICE", "gpu")
    monkeypatch.setenv("QTSPLUS_TRUST_CLIENT_UUIDS", "perhaps")
    with pytest.raises(SettingsError) as info:
        check_server_settings()
    lines = str(info.value).splitlines()
    assert [ONE_LINE.match(line)[1] for line in lines] == [
        "QTSPLUS_MAX_FRAMES",
        "QTSPLUS_DEVICE",
        "QTSPLUS_TRUST_CLIENT_UUIDS",
    ]
    assert isinstance(info.value, ValueError)  # what vLLM's start-up reports and the old checks raised


# --- what is read -------------------------------------------------------------------------------


def test_defaults_and_accepted_forms():
    defaults = Settings.from_environ({})  # nothing set: the declared defaults
    assert all(getattr(defaults, name) == field.default for name, field in Settings.model_fields.items())
    values = Settings.from_environ(
        {
            "QTSPLUS_MAX_FRAMES": " 12 ",
            "QTSPLUS_MAX_VIDEO_SECONDS": "1.5",
            "QTSPLUS_DEVICE": "cuda:1, cpu",
            "QTSPLUS_FEATURE_CACHE_BYTES": "0",
            "QTSPLUS_FEATURE_CACHE_DEVICE": "cuda",
            "QTSPLUS_PREPARE_IN_LOADER": "ON",
            "QTSPLUS_TRUST_CLIENT_UUIDS": "Yes",
            "QTSPLUS_SELECTOR_IMPL": "Torch",
            "QTSPLUS_CPU_THREADS": "",  # empty: the default
            "QTSPLUS_STREAM_CHUNK_FRAMES": "   ",  # blank: the default
            "QTSPLUS_SOMETHING_ELSE": "x",  # not a setting: ignored here, warned about at start-up
        }
    )
    assert values.max_frames == 12 and values.max_video_seconds == 1.5
    assert values.device == ("cuda:1", "cpu") and values.feature_cache_device == "cuda"
    assert values.feature_cache_bytes == 0 and values.feature_cache_host_bytes is None
    assert values.prepare_in_loader == "1" and values.trust_client_uuids is True
    assert values.selector_impl == "torch" and values.cpu_threads is None and values.stream_chunk_frames == 32


def test_the_process_settings_follow_the_environment(monkeypatch):
    """Read once per environment: the same object until a QTSPLUS_* variable changes (tests set them)."""
    monkeypatch.delenv("QTSPLUS_MAX_FRAMES", raising=False)
    first = settings()
    assert settings() is first
    monkeypatch.setenv("QTSPLUS_MAX_FRAMES", "9")
    assert settings().max_frames == 9 and Limits.from_env().max_frames == 9
    monkeypatch.setenv("QTSPLUS_MAX_FRAMES", "bad")
    with pytest.raises(SettingsError, match="QTSPLUS_MAX_FRAMES='bad'"):
        settings()


def test_limits_take_their_defaults_and_checks_from_the_settings():
    assert Limits() == Limits.from_settings(Settings.from_environ({}))
    for name in Limits.__dataclass_fields__:
        assert name in Settings.model_fields
        assert Settings.model_fields[name].json_schema_extra["group"] == "limits"
    assert {n for n, f in Settings.model_fields.items() if f.json_schema_extra["group"] == "limits"} == set(
        Limits.__dataclass_fields__
    )


def test_unknown_variables_are_warned_about(monkeypatch, caplog):
    assert unknown_variables(
        {"QTSPLUS_MAX_FRAME": "9", "QTSPLUS_TEST_LOAD_FAILURES": "oom", "PATH": "/"}
    ) == ["QTSPLUS_MAX_FRAME"]
    monkeypatch.setenv("QTSPLUS_MAX_FRAME", "9")  # a typo of QTSPLUS_MAX_FRAMES
    with caplog.at_level(logging.WARNING, logger="qtsplus_vllm.runtime"):
        check_server_settings()
    assert "QTSPLUS_MAX_FRAME is set but is no QTSplus setting" in caplog.text


def test_every_setting_is_declared_completely():
    from qtsplus_vllm import vision

    assert settings_module.VIT_ATTENTION_CHOICES == vision.ATTENTION_CHOICES
    for name, field in Settings.model_fields.items():
        assert field.description and "\n" not in field.description, name
        assert field.json_schema_extra["group"] in settings_module.GROUPS, name
        kind_of(name)  # every field has a class of value


# --- declared once, read only here, documented from here ----------------------------------------


def _scanned_files():
    for entry in SCANNED:
        path = REPO / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if (
                file == Path(__file__)  # names typos and made-up variables on purpose
                or file.suffix in (".png", ".json", ".pyc", ".parquet", ".mp4", ".jpg", ".svg")
                or "__pycache__" in file.parts
            ):
                continue
            yield file


def test_every_qtsplus_variable_in_the_repository_is_declared():
    """A QTSPLUS_* name used by the code, tests, scripts or docs is a setting, a test-suite variable
    (settings.TEST_VARIABLES) or listed here as no variable: a new one cannot go undeclared."""
    declared = _declared() | set(TEST_VARIABLES) | set(NOT_VARIABLES)
    undeclared = {}
    for file in _scanned_files():
        for name in re.findall(r"QTSPLUS_[A-Z0-9_]+", file.read_text(errors="replace")):
            if name not in declared:
                undeclared.setdefault(name, str(file.relative_to(REPO)))
    assert not undeclared, f"declare these in qtsplus_vllm/settings.py: {undeclared}"
    assert not (_declared() & set(TEST_VARIABLES)), "a variable is either a setting or a test knob"


def _environ_reads(tree: ast.AST):
    """(line, key) of every read of one environment variable: os.environ[...] / .get / .pop /
    .setdefault, os.getenv; key is None when it is not a literal."""
    for node in ast.walk(tree):
        key_node, line = None, getattr(node, "lineno", 0)
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key_node = node.slice
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if (
                func in ("os.getenv", "os.environ.get", "os.environ.pop", "os.environ.setdefault")
                and node.args
            ):
                key_node = node.args[0]
        else:
            continue
        if key_node is not None:
            yield line, key_node.value if isinstance(key_node, ast.Constant) else None


def test_no_module_but_settings_reads_a_qtsplus_variable():
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.name == "settings.py" and file.parent == PACKAGE:
            continue
        for line, key in _environ_reads(ast.parse(file.read_text())):
            if key is None or str(key).startswith("QTSPLUS_"):
                offenders.append(f"{file.relative_to(REPO)}:{line} reads {key or 'a computed variable'}")
    assert not offenders, offenders


def test_every_setting_is_used():
    """Each field is read somewhere: ``settings().<name>``, a limit through Limits, or ``read_one``."""
    attributes = set()
    for file in PACKAGE.rglob("*.py"):
        if file.name != "settings.py":
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Attribute):
                    attributes.add(node.attr)
                elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("read_one"):
                    attributes.add(node.args[0].value)  # settings.read_one("name"): a development tool
    unused = [
        n for n in Settings.model_fields if n not in attributes and n not in Limits.__dataclass_fields__
    ]
    assert not unused, unused


def test_the_configuration_page_is_generated_from_the_settings():
    expected = settings_module.markdown()
    assert PAGE.read_text() == expected, (
        "docs/configuration.md is stale: python -m qtsplus_vllm.settings --markdown docs/configuration.md"
    )
    for name in _declared() | set(TEST_VARIABLES):
        assert f"`{name}`" in expected
