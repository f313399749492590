"""Fetch the wheels benchmarks/gpu_suite.py installs on the GPU machine, and check the upload budget.

The GPU image (Python 3.12, torch 2.11 CUDA 13, transformers, Triton, torchvision, ...) lacks PyAV and
qwen-vl-utils and cannot reach a package index. The exact wheels are pinned, with sizes and sha256, in
``benchmarks/gpu_wheels.json``; they go to ``benchmarks/wheels/`` (git-ignored) and travel with the
working tree, which together must stay under the 64 MiB a device call carries.

    python scripts/fetch_gpu_wheels.py             # download (pip, Python 3.12 manylinux x86-64), verify, check budget
    python scripts/fetch_gpu_wheels.py --check     # no network: the files present are the pinned ones, within budget
    python scripts/fetch_gpu_wheels.py --dry-run   # no network, no files: pinned names and sizes, budget from the manifest

Exit status 0 when within budget and (for fetch/--check) every pinned wheel is present and verified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "benchmarks" / "gpu_wheels.json"
DEST = REPO / "benchmarks" / "wheels"
MIB = 2**20


def load_manifest(path: Path = MANIFEST) -> dict:
    manifest = json.loads(path.read_text())
    names = [w["filename"].split("-")[0].lower() for w in manifest["wheels"]]
    if len(names) != len(set(names)):
        raise SystemExit(f"{path}: one version per package, got {names}")
    return manifest


def travelling_files(repo: Path = REPO) -> list[Path]:
    """What a device call copies: tracked files and untracked files git does not ignore (shared/ too)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    files = {repo / name for name in out.decode().split("\0") if name}
    return sorted(p for p in files if p.is_file() and not p.is_symlink())


def tree_bytes(repo: Path = REPO) -> int:
    return sum(p.stat().st_size for p in travelling_files(repo))


def is_ignored(folder: Path, repo: Path = REPO) -> bool:
    """Whether git ignores wheels in ``folder`` (asked for a file in it: the folder may not exist yet)."""
    probe = folder / "probe-0-py3-none-any.whl"
    return subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=repo).returncode == 0


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def budget_report(tree: int, wheels: dict[str, int], limit: int, margin: int = 2 * MIB) -> dict:
    """Tree + wheels against the per-call limit, keeping ``margin`` bytes for files written meanwhile."""
    total = tree + sum(wheels.values())
    return {
        "tree_bytes": tree,
        "wheel_bytes": sum(wheels.values()),
        "wheels": wheels,
        "total_bytes": total,
        "limit_bytes": limit,
        "margin_bytes": margin,
        "within_budget": total + margin <= limit,
    }


def verify(dest: Path, manifest: dict) -> list[str]:
    """Problems with the wheels in ``dest``: missing, wrong hash, or strays (two versions stop pip)."""
    problems = []
    pinned = {w["filename"]: w for w in manifest["wheels"]}
    for name, wheel in pinned.items():
        path = dest / name
        if not path.is_file():
            problems.append(f"missing {path}")
        elif path.stat().st_size != wheel["size"] or sha256(path) != wheel["sha256"]:
            problems.append(f"{path} is not the pinned file (size or sha256 differ)")
    for path in sorted(dest.glob("*.whl")) if dest.is_dir() else []:
        if path.name not in pinned:
            problems.append(f"stray wheel {path} (not in {MANIFEST.name}): remove it")
    return problems


def download(manifest: dict, dest: Path) -> None:
    """pip download each pinned wheel that is not already present and verified (no dependencies)."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in manifest["wheels"]:
        target = dest / wheel["filename"]
        if target.is_file() and sha256(target) == wheel["sha256"]:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            platforms = [arg for p in manifest["platforms"] for arg in ("--platform", p)]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", manifest["python_version"], "--implementation", "cp",
                   *platforms, "-d", tmp, wheel["requirement"]]  # fmt: skip
            subprocess.run(cmd, check=True)
            got = Path(tmp) / wheel["filename"]
            if not got.is_file():
                raise SystemExit(f"pip fetched {os.listdir(tmp)}, expected {wheel['filename']}")
            if sha256(got) != wheel["sha256"]:
                raise SystemExit(f"{wheel['filename']}: sha256 differs from {MANIFEST.name}")
            shutil.move(str(got), target)
    pinned = {w["filename"] for w in manifest["wheels"]}
    for path in dest.glob("*.whl"):
        if path.name not in pinned:
            path.unlink()


def print_report(report: dict, sources: str) -> None:
    for name, size in report["wheels"].items():
        print(f"  {name:<56} {size / MIB:8.2f} MiB")
    print(f"  {'wheels (' + sources + ')':<56} {report['wheel_bytes'] / MIB:8.2f} MiB")
    print(f"  {'working tree (tracked + untracked, not ignored)':<56} {report['tree_bytes'] / MIB:8.2f} MiB")
    verdict = "within" if report["within_budget"] else "OVER"
    print(
        f"  {'total':<56} {report['total_bytes'] / MIB:8.2f} MiB: {verdict} the "
        f"{report['limit_bytes'] / MIB:.0f} MiB per call (keeping {report['margin_bytes'] / MIB:.0f} MiB spare)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="no network, no files: sizes from the manifest")
    mode.add_argument("--check", action="store_true", help="no network: verify the files present")
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--margin-mib", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.manifest)
    problems = []
    if args.dest.resolve().is_relative_to(args.repo.resolve()) and not is_ignored(args.dest, args.repo):
        problems.append(f"{args.dest} is not git-ignored: the wheels would be committed and counted twice")
    if args.dry_run:
        wheels, sources = {w["filename"]: w["size"] for w in manifest["wheels"]}, "manifest sizes"
    else:
        if not args.check:
            download(manifest, args.dest)
        problems += verify(args.dest, manifest)
        present = sorted(args.dest.glob("*.whl")) if args.dest.is_dir() else []
        wheels, sources = {p.name: p.stat().st_size for p in present}, f"files in {args.dest}"
    report = budget_report(
        tree_bytes(args.repo), wheels, manifest["budget_bytes"], int(args.margin_mib * MIB)
    )
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report, sources)
        for problem in problems:
            print(f"  problem: {problem}")
    return 0 if report["within_budget"] and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
