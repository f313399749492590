"""Layering (issue 21 item 5): the torch core never imports the serving layer, and imports without vLLM.

The core is every module of the package except the vLLM-facing ones (``serving/``, ``plugin.py``,
which registers with vLLM), the evaluation client (``eval/``), the testing utilities (``testing/``,
which start ``vllm serve``) and ``demo.py`` (which runs a server through them); plus the kernels
(``kernels/``, shipped as ``qtsplus_vllm.kernels``). Settings and device parsing live in the core
(``settings.py``, ``devices.py``) so that both the selection runtime and the serving layer take them
from below.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "qtsplus_vllm"
NOT_CORE = {"serving", "eval", "testing", "plugin.py", "demo.py"}


def _core_modules() -> dict[str, Path]:
    modules = {}
    for file in sorted(PACKAGE.glob("*.py")):
        if file.name not in NOT_CORE and file.name != "__init__.py":
            modules[f"qtsplus_vllm.{file.stem}"] = file
    for file in sorted((REPO / "kernels").glob("*.py")):
        if file.name != "__init__.py":
            modules[f"qtsplus_vllm.kernels.{file.stem}"] = file
    return modules


def _imported(module: str, tree: ast.AST) -> set[str]:
    """Every module name ``tree`` imports, at the top or inside a function, relative ones resolved."""
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_the_core_never_imports_the_serving_layer():
    modules = _core_modules()
    assert {
        "qtsplus_vllm.runtime",
        "qtsplus_vllm.settings",
        "qtsplus_vllm.devices",
        "qtsplus_vllm.limits",
    } <= set(modules)
    offenders = {
        module: sorted(
            n for n in _imported(module, ast.parse(file.read_text())) if n.startswith("qtsplus_vllm.serving")
        )
        for module, file in modules.items()
    }
    assert not {m: names for m, names in offenders.items() if names}


def test_settings_and_limits_import_neither_torch_nor_vllm():
    """The settings and the limits stay light: no torch, no vLLM."""
    for module in ("qtsplus_vllm.settings", "qtsplus_vllm.limits"):
        names = _imported(module, ast.parse(_core_modules()[module].read_text()))
        assert not {n for n in names if n.split(".")[0] in ("torch", "vllm")}, module


_BLOCKED = """
import importlib, importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"{name} is blocked: the core must import without vLLM")
        return None

sys.meta_path.insert(0, Blocked())
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "vllm" or m.startswith(("vllm.", "qtsplus_vllm.serving")))
print(json.dumps(loaded))
"""


def test_the_core_imports_without_vllm():
    modules = sorted(_core_modules())
    run = subprocess.run(
        [sys.executable, "-c", _BLOCKED, json.dumps(modules)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
