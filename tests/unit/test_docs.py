"""The documentation site builds strictly, and the README stays a short entry point (issue 21).

``mkdocs build --strict`` fails on a broken link, a missing page, an anchor that does not exist, a
plot of benchmarks/results/ that is not there, or an API page whose object was renamed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_LIMIT = 10_000
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/python -m pytest"


def test_mkdocs_build_is_strict_and_complete(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra: pip install '.[dev]'")
    pytest.importorskip("material", reason="mkdocs-material is in the dev extra")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    nav = re.findall(r"^\s+- (?:[^:]+: )?([\w./-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M)
    for page in nav:  # every page of the navigation was rendered
        out = site / (page[: -len(".md")] + "/index.html" if page != "index.md" else "index.html")
        assert out.is_file(), page
    for page in (REPO / "docs").glob("*.md"):  # and every page is in the navigation
        assert page.name in nav, f"docs/{page.name} is not in mkdocs.yml's nav"
    assert list((site / "results").rglob("*.png")), "the committed benchmark plots are not published"


def test_readme_is_short_and_keeps_the_test_command():
    text = (REPO / "README.md").read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters (limit {README_LIMIT})"
    assert TEST_COMMAND in text
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci  # .ci/run calls the command the README gives


def test_introspection_docs_list_exactly_the_response_fields():
    """docs/introspection.md's Response table names every top-level field the endpoint returns, and no other."""
    from qtsplus_vllm.serving.introspection import SelectionResponse

    text = (REPO / "docs" / "introspection.md").read_text()
    section = text.split("### Response", 1)[1].split("\n### ", 1)[0]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([A-Za-z_]+)`", line.split("|")[1]))
    assert documented == set(SelectionResponse.model_fields) - {"object"}
