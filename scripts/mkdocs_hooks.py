"""MkDocs hooks (mkdocs.yml ``hooks``): the committed benchmark results become part of the site.

Plots and JSON under ``benchmarks/results/`` are published as ``results/...`` without copying them
into ``docs/``, so the pages link the very files the benchmarks wrote (``![...](results/...png)``)
and ``mkdocs build --strict`` fails on a link to a result that does not exist.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PUBLISHED = (".png", ".svg", ".json", ".csv")


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in PUBLISHED:
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
