"""The serving layer's defences (issue 11): cache keys, start-up checks, resolution, failures, metrics.

These run vLLM's own pieces in-process (hashing, parse classes, the engine client's health check)
around our processor helpers, without a server; the e2e modules check the same rules over HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import weakref
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems  # noqa: E402
from vllm.multimodal.processing import ProcessorInputs  # noqa: E402

from qtsplus_vllm import runtime as runtime_module  # noqa: E402
from qtsplus_vllm.checkpoint import CheckpointError, CheckpointReader, validate_checkpoint  # noqa: E402
from qtsplus_vllm.config import SELECTOR_PREFIX  # noqa: E402
from qtsplus_vllm.limits import SelectionUnavailable  # noqa: E402
from qtsplus_vllm.options import SelectionOptions  # noqa: E402
from qtsplus_vllm.runtime import (  # noqa: E402
    check_server_settings,
    device_failure,
    get_runtime,
    resolve_model_dir,
    trust_client_uuids,
)
from qtsplus_vllm.serving import processor as processor_module  # noqa: E402
from qtsplus_vllm.serving.errors import QTSplusHTTPError  # noqa: E402
from qtsplus_vllm.serving.processor import content_keyed_uuids  # noqa: E402
from qtsplus_vllm.testing import write_tiny_checkpoint  # noqa: E402
from qtsplus_vllm.testing.videos import render_frames  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hardening") / "m", seed=5)


def _items(*videos) -> MultiModalDataItems:
    items = MultiModalDataItems()
    items["video"] = VideoProcessorItems(list(videos))
    return items


def _hashes(items: MultiModalDataItems, uuids) -> list[str]:
    inputs = ProcessorInputs(
        prompt=[1, 2, 3],
        mm_data_items=items,
        mm_uuid_items=uuids,
        hf_processor_mm_kwargs={processor_module.SELECTION_KEY: ((5, 6), ())},
    )
    return inputs.get_mm_hashes("model", "blake3")["video"]


# --- item 1: a client uuid never stands for media that carries data -----------------------------


def test_same_uuid_with_other_media_gets_another_key():
    """The attack at the key level: vLLM keys two different videos sent under one uuid alike."""
    x, y = render_frames(4, (32, 32), seed=1), render_frames(4, (32, 32), seed=2)
    shared = {"video": ["tenant-shared-1"]}
    assert _hashes(_items(x), shared) == _hashes(_items(y), shared)  # vLLM's rule: the leak
    keyed_x = content_keyed_uuids(_items(x), shared)
    keyed_y = content_keyed_uuids(_items(y), shared)
    assert keyed_x == keyed_y == {"video": [None]}
    assert _hashes(_items(x), keyed_x) != _hashes(_items(y), keyed_y)
    # the content key is the key vLLM gives the same media sent without a uuid
    assert _hashes(_items(x), keyed_x) == _hashes(_items(x), None)


def test_uuid_only_items_keep_their_uuid():
    x = render_frames(4, (32, 32), seed=1)
    keyed = content_keyed_uuids(_items(x, None), {"video": ["a", "b"]})
    assert keyed == {"video": [None, "b"]}
    assert processor_module._uuid_only_items(keyed) == ["video[1]"]
    assert content_keyed_uuids(_items(x), None) is None


@pytest.mark.parametrize(
    "raw, expected", [("", False), ("0", False), ("off", False), ("1", True), ("true", True)]
)
def test_trust_client_uuids_setting(monkeypatch, raw, expected):
    monkeypatch.setenv("QTSPLUS_TRUST_CLIENT_UUIDS", raw)
    assert trust_client_uuids() is expected


# --- item 5: bad settings and broken checkpoints stop the server at start-up --------------------


@pytest.mark.parametrize(
    "variable, value",
    [
        ("QTSPLUS_MAX_FRAMES", "many"),
        ("QTSPLUS_MAX_VIDEO_BYTES", "-5"),
        ("QTSPLUS_CPU_THREADS", "0"),
        ("QTSPLUS_FEATURE_CACHE_BYTES", "1e9"),
        ("QTSPLUS_TRUST_CLIENT_UUIDS", "maybe"),
        ("QTSPLUS_RUNTIME_RETRY_SECONDS", "soon"),
        ("QTSPLUS_DEVICE", "gpu:0"),
        ("QTSPLUS_DEVICE", "meta"),
    ],
)
def test_bad_settings_are_refused_at_start_up(monkeypatch, model, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        check_server_settings(str(model))


def test_good_settings_and_checkpoint_pass(model):
    check_server_settings(str(model))


def test_a_hub_id_that_cannot_be_resolved_stops_the_start_up(monkeypatch, tmp_path):
    """A Hub id is resolved when the server starts (issue 18): no snapshot and offline is a start-up error."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(runtime_module, "_RESOLVED", {})
    with pytest.raises(CheckpointError, match="AlpachinoNLP/QTSplus-7B.*HF_HUB_OFFLINE"):
        check_server_settings("AlpachinoNLP/QTSplus-7B")


def _break(model: Path, tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).symlink_to(item)
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, broken / "model.safetensors")
    return broken


def test_a_missing_selector_tensor_is_refused_at_start_up(model, tmp_path):
    key = SELECTOR_PREFIX + "budget.mlp.2.weight"
    broken = _break(model, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="budget.mlp.2.weight"):
        check_server_settings(str(broken))


def test_the_engine_checks_the_streamed_vit_and_selector_shapes(model, tmp_path):
    """``load_weights`` (the worker, at start-up) sees every tensor: it checks what it skips."""
    from qtsplus_vllm.serving.model import _StreamedShapes

    reader = CheckpointReader(model)
    config = runtime_module.load_config(model)
    streamed = _StreamedShapes()
    streamed.all.update(reader.shapes())
    validate_checkpoint(config, streamed)
    key = SELECTOR_PREFIX + "scoring_layers.0.k_proj.weight"
    streamed.all[key] = [streamed.all[key][0] + 1, streamed.all[key][1]]
    with pytest.raises(CheckpointError, match="k_proj"):
        validate_checkpoint(config, streamed)


# --- item 2: a Hub id is resolved once, from the local cache first ------------------------------


def _fake_hub_cache(root: Path, model: Path, repo: str = "org/qtsplus-tiny") -> str:
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for item in model.iterdir():
        (snapshot / item.name).symlink_to(item)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    return repo


def test_hub_id_resolves_once_and_offline(monkeypatch, tmp_path, model):
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = _fake_hub_cache(cache, model)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls = []
    real = huggingface_hub.snapshot_download

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs, cache_dir=str(cache))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", counting)
    monkeypatch.setattr(runtime_module, "_RESOLVED", {})
    first = resolve_model_dir(repo)
    assert first.name == "0123456789abcdef0123456789abcdef01234567"
    assert (first / "config.json").exists()
    for _ in range(5):  # later requests: no call at all
        assert resolve_model_dir(repo) == first
    assert len(calls) == 1 and calls[0]["local_files_only"] is True


# --- items 5 and 7: load failures, out of memory, a poisoned device ------------------------------


@pytest.fixture
def clean_runtime_state(monkeypatch):
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    monkeypatch.setattr(runtime_module, "_FAILED_LOADS", {})
    monkeypatch.setattr(runtime_module, "_DEVICE_FAILURE", None)


def test_an_oom_while_loading_is_503_and_not_retried_at_once(monkeypatch, model, clean_runtime_state):
    attempts = []

    def fail(*args, **kwargs):
        attempts.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime_module, "SelectionRuntime", fail)
    monkeypatch.setenv("QTSPLUS_RUNTIME_RETRY_SECONDS", "60")
    for _ in range(3):
        with pytest.raises(SelectionUnavailable, match="could not be loaded") as err:
            get_runtime(model, torch.float32, torch.device("cpu"))
        assert err.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE
    assert len(attempts) == 1  # the checkpoint is not reloaded by every request
    monkeypatch.setenv("QTSPLUS_RUNTIME_RETRY_SECONDS", "0")
    with pytest.raises(SelectionUnavailable):
        get_runtime(model, torch.float32, torch.device("cpu"))
    assert len(attempts) == 2  # after the retry window it tries again


def test_a_sticky_device_error_while_loading_marks_the_runtime_dead(monkeypatch, model, clean_runtime_state):
    """Not a failed load to retry later on a poisoned CUDA context: the process's runtime is dead,
    /health says so and no later request loads it again (tests/e2e/test_runtime_failures.py checks
    the answers a real client gets)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from qtsplus_vllm.serving.health import _wrap

    attempts = []

    def fail(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runtime_module, "SelectionRuntime", fail)
    monkeypatch.setenv("QTSPLUS_RUNTIME_RETRY_SECONDS", "0")
    with pytest.raises(SelectionUnavailable, match="failed while loading.*illegal memory access.*restarted"):
        get_runtime(model, torch.float32, torch.device("cpu"))
    assert "illegal memory access" in device_failure()
    for _ in range(3):  # no retry, whatever QTSPLUS_RUNTIME_RETRY_SECONDS says
        with pytest.raises(SelectionUnavailable, match="failed earlier.*restarted"):
            get_runtime(model, torch.float32, torch.device("cpu"))
    assert len(attempts) == 1

    async def engine_health(self):
        pass

    with pytest.raises(EngineDeadError, match="illegal memory access"):
        asyncio.run(_wrap(engine_health)(object()))


def test_a_runtime_that_cannot_load_is_the_requests_503(monkeypatch, model, clean_runtime_state):
    """The processor's and the introspection endpoint's way to the runtime: a load failure is a
    ``GracefulHTTPError`` with status 503 (a bare ``SelectionUnavailable`` is vLLM's 500)."""
    from vllm.exceptions import GracefulHTTPError

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime_module, "SelectionRuntime", fail)
    config = type("C", (), {"model": str(model), "dtype": torch.float32, "revision": None})()
    with pytest.raises(GracefulHTTPError, match="could not be loaded: OutOfMemoryError") as err:
        processor_module.load_runtime(get_runtime, config)
    assert err.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE
    monkeypatch.setattr(runtime_module, "_DEVICE_FAILURE", "cuda:0: CUDA error: an illegal memory access")
    with pytest.raises(GracefulHTTPError, match="failed earlier.*restarted") as err:
        processor_module.load_runtime(get_runtime, config)
    assert err.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE


class _FailingRuntime:
    device = torch.device("cpu")

    def __init__(self, error: BaseException):
        self.error = error
        self.tensor_ref = None

    def select(self, frames, question_ids, options):
        held = torch.empty(1 << 20)  # what the failed call held; the traceback keeps it alive
        self.tensor_ref = weakref.ref(held)
        raise type(self.error)(*self.error.args)  # a fresh exception per call, as a real failure


def test_oom_memory_is_released_after_the_traceback_is_gone(monkeypatch):
    failing = _FailingRuntime(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"))
    alive_at_release = []
    monkeypatch.setattr(
        processor_module,
        "release_device_memory",
        lambda device: alive_at_release.append(failing.tensor_ref() is not None),
    )
    frames = render_frames(2, (28, 28), seed=0)
    with pytest.raises(QTSplusHTTPError) as err:
        processor_module._select(failing, frames, [1, 2], SelectionOptions())
    assert err.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE
    assert alive_at_release == [False]  # released once, when nothing held the failed tensors


def test_sticky_cuda_error_reports_unhealthy(monkeypatch, clean_runtime_state):
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    from qtsplus_vllm.serving.health import _wrap

    failing = _FailingRuntime(RuntimeError("CUDA error: an illegal memory access was encountered"))
    key = ("m", "cuda:1", torch.float32)
    runtime_module._RUNTIMES[key] = failing
    frames = render_frames(2, (28, 28), seed=0)
    with pytest.raises(QTSplusHTTPError, match="restarted") as err:
        processor_module._select(failing, frames, [1, 2], SelectionOptions())
    assert err.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE
    assert key not in runtime_module._RUNTIMES and "illegal memory access" in device_failure()
    with pytest.raises(SelectionUnavailable, match="restarted"):
        get_runtime("anything", torch.float32, torch.device("cpu"))

    engine_checked = []

    async def engine_health(self):
        engine_checked.append(True)

    check = _wrap(engine_health)
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        asyncio.run(check(object()))
    monkeypatch.setattr(runtime_module, "_DEVICE_FAILURE", None)
    asyncio.run(check(object()))
    assert engine_checked == [True]
    assert hasattr(AsyncLLM, "check_health")


def test_other_errors_are_not_swallowed(clean_runtime_state):
    failing = _FailingRuntime(RuntimeError("shape mismatch in the ViT"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        processor_module._select(failing, render_frames(2, (28, 28), seed=0), [1], SelectionOptions())
    assert device_failure() is None


# --- item 5: metrics are created once even when threads race for them ---------------------------


def test_metrics_are_created_once_under_concurrency(monkeypatch):
    from prometheus_client import REGISTRY

    from qtsplus_vllm.serving import metrics as metrics_module

    def ours() -> set:
        return {c for n, c in list(REGISTRY._names_to_collectors.items()) if n.startswith("qtsplus_")}

    before = ours()
    for collector in before:  # start from a registry without our metrics ...
        REGISTRY.unregister(collector)
    monkeypatch.setattr(metrics_module, "_METRICS", None)
    real, created = metrics_module._create, []

    def slow_create():
        time.sleep(0.05)  # widen the window in which a second thread could also create them
        created.append(1)
        return real()

    monkeypatch.setattr(metrics_module, "_create", slow_create)
    barrier, errors, results = threading.Barrier(8), [], []

    def first_use():
        barrier.wait()
        try:
            results.append(metrics_module.metrics())
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(created) == 1
        assert all(result is results[0] for result in results)
    finally:  # ... and leave it as it was for the tests after this one
        for collector in ours():
            REGISTRY.unregister(collector)
        for collector in before:
            REGISTRY.register(collector)


# --- item 4: the introspection endpoint keeps the event loop free --------------------------------


def test_introspection_loads_and_selects_off_the_event_loop(monkeypatch):
    from qtsplus_vllm.runtime import VideoSelection
    from qtsplus_vllm.serving import introspection

    def slow_runtime(*args, **kwargs):
        time.sleep(0.6)  # a runtime loading its checkpoint
        runtime = _FailingRuntime(RuntimeError("unused"))
        runtime.feature_cache = type("Cache", (), {"stats": lambda self: {}})()
        return runtime

    selection = VideoSelection(
        embeds=torch.zeros(2, 4),
        indices=torch.tensor([0, 3]),
        num_visual_tokens=4,
        rho=0.5,
        num_frames=2,
        grid_thw=(1, 4, 4),
        scores=torch.tensor([0.4, 0.1, 0.2, 0.3]),
    )
    monkeypatch.setattr(introspection, "get_runtime", slow_runtime)
    monkeypatch.setattr(introspection, "_select", lambda *args: selection)
    reported = []
    monkeypatch.setattr(introspection, "_report", lambda *args: reported.append(args[1]))
    monkeypatch.setattr(introspection, "selection_inputs", lambda *args: ([1, 2], SelectionOptions()))

    class Tokenizer:
        def decode(self, ids):
            return "question"

    inspector = introspection.SelectionInspector.__new__(introspection.SelectionInspector)
    inspector.online_renderer = type(
        "R", (), {"renderer": type("T", (), {"get_tokenizer": lambda self: Tokenizer()})()}
    )()
    inspector.models = type("M", (), {"model_name": lambda self: "m"})()
    inspector.model_config = type("C", (), {"model": "m", "dtype": torch.float32, "revision": None,
                                            "multimodal_config": None})()  # fmt: skip

    async def render(body):
        return [1, 2, 3], np.zeros((2, 28, 28, 3), np.uint8), {"frames_indices": [0, 1], "fps": 1.0}

    inspector._render = render
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.02)

    async def main():
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        answer = await inspector.inspect(introspection.SelectionRequest(video="file:///x.mp4", question="q"))
        task.cancel()
        return answer

    answer = asyncio.run(main())
    assert answer.n == 2 and not hasattr(answer, "cache_hit")
    assert reported == [selection]  # the operator's log line and metrics still see it
    gaps = np.diff(ticks)
    assert len(ticks) > 10 and gaps.max() < 0.3, f"the event loop stalled for {gaps.max():.2f} s"
    json.dumps(answer.model_dump())  # serialisable
    gc.collect()


@pytest.mark.parametrize(
    ("defaults", "argv", "expected"),
    [
        ({}, ["vllm", "serve", "m"], 256),  # selection always on: nmax
        ({"qtsplus_select": False}, ["vllm", "serve", "m"], 4096),  # off by default: the context
        ({}, ["vllm", "serve", "m", "--trust-request-mm-kwargs"], 4096),  # a request may turn it off
        ({}, ["vllm", "serve", "m", "--trust-request-mm-kwargs=true"], 4096),
        ({"qtsplus_select": True, "qtsplus_max_tokens": 9}, ["vllm", "serve", "m"], 256),
    ],
)
def test_the_encoder_cache_holds_an_unselected_item_when_a_request_can_ask_for_one(
    monkeypatch, defaults, argv, expected
):
    """vLLM sizes its encoder cache from the largest item; an unselected video brings all M rows.

    Declaring only nmax made vLLM refuse every unselected item above ``--max-num-batched-tokens``
    ("exceeds the pre-allocated encoder cache size"), i.e. it forced one-step prefills.
    """
    from types import SimpleNamespace

    monkeypatch.setattr("sys.argv", argv)
    model_config = SimpleNamespace(multimodal_config=SimpleNamespace(mm_processor_kwargs=defaults))
    config = SimpleNamespace(qts_plus_nmax=256)
    assert processor_module.max_item_tokens(model_config, config, seq_len=4096) == expected
    # bounded by the largest video the limits admit, never below nmax
    big = processor_module.max_item_tokens(model_config, config, seq_len=10**7)
    assert big in (256, processor_module.server_limits().max_vit_patches // 4)
    assert processor_module.max_item_tokens(model_config, config, seq_len=100) == 256
