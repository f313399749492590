"""How QTSplus fits vLLM's deployment options: what is supported, what is refused at start-up.

Importing this module imports neither vLLM nor torch; :func:`check_deployment` imports vLLM when
called. The selection device itself (``QTSPLUS_DEVICE``, by API-server rank) is read in
:mod:`qtsplus_vllm.devices`, below both this layer and the selection runtime.

QTSplus runs its vision encoder (ViT) and selector in the multimodal processor, in the API-server
process, because the number of selected tokens n fixes the prompt length before vLLM schedules the
request (DESIGN §4). The engine-side model is the language model alone. vLLM's multimodal deployment
options therefore fare as follows (docs/deploying.md, "Scaling out"):

- ``--mm-processor-device cpu|cuda`` (``mm_processor_kwargs["device"]``): **refused**. It moves the
  Hugging Face processor's transforms; QTSplus preprocesses frames, runs the ViT and the selector on
  its selection device, ``QTSPLUS_DEVICE``. The default ``auto`` sets nothing and is fine.
- ``--mm-tensor-ipc torch_shm``: **supported** (the n selected rows reach the engine through shared
  memory instead of the RPC socket; vLLM's own limits apply: TP = DP = PP = 1 and
  ``VLLM_WORKER_MULTIPROC_METHOD=spawn``).
- ``--mm-ipc-gpu-memory-gb G``: **supported**. vLLM takes G GiB out of each engine worker's KV-cache
  budget for API-server GPU work; that headroom is what a selection runtime on the engine's GPU
  needs. The runtime does not draw from vLLM's frontend decode pool (it is sized for hardware video
  decoding, which QTSplus does not use).
- encode/prefill/decode disaggregation (``--ec-transfer-config``, any EC role, or
  ``mm_encoder_only``): **refused**. An encode-only instance runs the model's vision tower in the
  engine, and our model has none; and every instance that takes a request must run the ViT and the
  selector in its API server anyway to know n, so there is nothing left for an encoder instance to
  take over or for an EC consumer to receive.
"""

from __future__ import annotations

from typing import Any

from ..settings import variable

_DEVICE_VAR = variable("device")


class DeploymentError(ValueError):
    """A vLLM deployment option QTSplus cannot serve; the message says why and what to use instead."""


def _vllm_and_model_config(config: Any) -> tuple[Any | None, Any]:
    """(the ``VllmConfig`` or None, the ``ModelConfig``) from either of them.

    The processor is built from the model config alone. Where vLLM has set the current config for
    the process (engine workers), that config is used when it belongs to the same model config, so
    the EC role is known there; in the API server only the model config's derived fields are.
    """
    if hasattr(config, "model_config"):
        return config, config.model_config
    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    if current is not None and current.model_config is config:
        return current, config
    return None, config


def check_deployment(config: Any) -> None:
    """Refuse, at start-up, vLLM multimodal deployment options that QTSplus cannot serve.

    ``config``: the ``VllmConfig``, or the ``ModelConfig`` the multimodal processor is built from.
    Raises :class:`DeploymentError` (a ``ValueError``) with the reason and the alternative; warns
    (never fails) on a vLLM minor release this plugin is not verified with.
    """
    from .compat import check_vllm_version

    check_vllm_version()
    vllm_config, model_config = _vllm_and_model_config(config)
    if getattr(model_config, "trust_remote_code", False):
        raise DeploymentError(
            "--trust-remote-code is not used with QTSplus checkpoints: this plugin registers their config and "
            "model classes, so a repository's Python files (auto_map) are never needed, and with the flag "
            "vLLM imports them. Drop --trust-remote-code."
        )
    mm_config = getattr(model_config, "multimodal_config", None)
    if mm_config is None:
        return
    device = (mm_config.mm_processor_kwargs or {}).get("device")
    if device is not None:
        raise DeploymentError(
            f"--mm-processor-device (mm_processor_kwargs device={str(device)!r}) does not apply to QTSplus: "
            "its multimodal processor preprocesses frames and runs the ViT and the selector on the "
            f"selection device, {_DEVICE_VAR} (cpu or cuda[:N], a comma-separated list to spread API "
            f"servers). Drop --mm-processor-device (keep the default 'auto') and set {_DEVICE_VAR} instead."
        )
    ec_config = getattr(vllm_config, "ec_transfer_config", None) if vllm_config is not None else None
    ec_role = getattr(ec_config, "ec_role", None) if ec_config is not None else None
    if getattr(mm_config, "mm_encoder_only", False) or (
        ec_config is not None and getattr(ec_config, "ec_connector", None) is not None
    ):
        role = f"ec_role={ec_role!r}" if ec_role else "an encode-only instance"
        raise DeploymentError(
            f"encode/prefill/decode disaggregation (--ec-transfer-config, {role}) is not supported by "
            "QTSplus: its ViT and selector run in the API server's multimodal processor on every instance "
            "that accepts a request, because the number of selected tokens fixes the prompt length, and "
            "its engine-side model is the language model alone (no vision tower for an encoder instance "
            "to run, no encoder output for a consumer to receive). Drop --ec-transfer-config; to give "
            f"selection its own GPU, set {_DEVICE_VAR} (e.g. cuda:1)."
        )
