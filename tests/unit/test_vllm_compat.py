"""vLLM 0.32.x and 0.33.x from one code path (issue 13): the compat shims, devices per API server,
and the plugin run against vLLM 0.33's own Python source next to the installed 0.32.

``scripts/setup.sh`` unpacks the pinned vLLM 0.33.0 wheel's ``vllm/**/*.py`` (sha256-checked) into
``.venv/vllm-src/0.33.0``. The overlay test runs ``vllm_compat_probe.py`` twice at once, in
subprocesses: once with ``PYTHONPATH`` starting at that source (0.33's Python over the installed
build: no compiled ops, so no forward pass and no ``vllm serve``), once on the installed 0.32. Both
must give the same expanded prompts, hashes, rows, deployment verdicts and model class.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtsplus_vllm.runtime import check_server_settings, default_device
from qtsplus_vllm.serving import compat
from qtsplus_vllm.serving.deployment import device_for_rank, selection_devices

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_compat_probe.py")
VLLM033_SRC = Path(os.environ.get("QTSPLUS_VLLM033_SRC") or Path(sys.prefix) / "vllm-src" / "0.33.0")


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
    assert compat.api_server_rank() == 0  # one API server runs in the main process
    api_server(3)
    assert compat.api_server_rank() == 3


def test_api_server_rank_in_multi_port_data_parallel(monkeypatch):
    monkeypatch.setattr(multiprocessing.current_process(), "name", "APIServer_DPRank_5")
    assert compat.api_server_rank() == 5
    monkeypatch.setattr(multiprocessing.current_process(), "name", "EngineCore_DP1")
    assert compat.api_server_rank() == 0  # not an API server


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
    assert compat.check_vllm_version("0.32.0")
    assert compat.check_vllm_version("0.33.1+cpu")
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert not compat.check_vllm_version("0.34.0")
    assert "0.32.x, 0.33.x" in caplog.text and "0.34.0" in caplog.text
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


# --- the plugin on vLLM 0.33's source, next to the installed 0.32 -------------------------------


def _setup_ran() -> bool:
    return any(Path(sys.prefix).glob(".qtsplus-setup-*"))


def _probe_env(tmp: Path, overlay: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    for key in (
        "QTSPLUS_DEVICE",
        "QTSPLUS_TRUST_CLIENT_UUIDS",
        "VLLM_PLUGINS",
        "VLLM_WORKER_MULTIPROC_METHOD",
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


@pytest.mark.slow
def test_plugin_on_vllm_033_source_equals_032(tmp_path):
    """Registration, model class, processor path and deployment checks: 0.33.0 == installed 0.32."""
    pytest.importorskip("vllm")
    if not (VLLM033_SRC / "vllm" / "__init__.py").is_file():
        if _setup_ran():  # setup.sh ran in this environment and must have unpacked it: a set-up bug
            pytest.fail(f"vLLM 0.33.0's source is missing from {VLLM033_SRC}: re-run bash scripts/setup.sh")
        pytest.skip(
            f"vLLM 0.33.0's source is not in {VLLM033_SRC} (this environment was not made by "
            "scripts/setup.sh, which unpacks it; or set QTSPLUS_VLLM033_SRC)"
        )
    from qtsplus_vllm.testing import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny", seed=3)  # one path: it is part of every hash
    runs = {}
    for name, overlay in (("0.33", VLLM033_SRC), ("0.32", None)):
        work = tmp_path / name
        work.mkdir()
        log = open(work / "probe.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(ckpt), str(work)],
            env=_probe_env(work, overlay),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        runs[name] = (proc, log)
    results = {}
    for name, (proc, log) in runs.items():
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        results[name] = _result(proc, log.read())
        log.close()
    new, old = results["0.33"], results["0.32"]

    assert new["vllm"].startswith("0.33.") and Path(new["vllm_file"]).is_relative_to(VLLM033_SRC)
    assert old["vllm"].startswith("0.32.") and not Path(old["vllm_file"]).is_relative_to(VLLM033_SRC)

    # what the plugin does, on 0.33 and identically on 0.32
    for result in (new, old):
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
        verdicts = {
            name: {where: v and v["error"] for where, v in d.items()}
            for name, d in result["deployment"].items()
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

    # the shims: what differs between the versions, and only that
    assert old["compat"]["download_size_errors"][2] == "_RequestDownloadCapAbsent"
    assert new["compat"]["download_size_errors"][2] == "MediaRequestDownloadSizeExceededError"
    assert (old["compat"]["decoded_budget"], new["compat"]["decoded_budget"]) == (False, True)
    assert (old["compat"]["image_io_kwargs"], new["compat"]["image_io_kwargs"]) == ([], ["decoded_budget"])
    assert new["compat"]["verified"] and old["compat"]["verified"]

    def same(result: dict) -> dict:
        return {k: v for k, v in result.items() if k not in ("vllm", "vllm_file", "seconds", "compat")}

    assert same(new) == same(old)
