"""The selection device of this process: ``QTSPLUS_DEVICE`` by API-server rank (torch only, no vLLM).

``QTSPLUS_DEVICE`` is one device (``cpu``, ``cuda``, ``cuda:1``) for every API server, or a
comma-separated list (``cuda:1,cuda:2``) that spreads the API servers of ``--api-server-count N``
(or ``--data-parallel-size N``) by rank, round robin. The text is validated with the other settings
(:mod:`qtsplus_vllm.settings`); here it becomes torch devices, and the CUDA checks that need this
process's view of the GPUs run when the runtime picks its device. The runtime and the serving layer
both take the device from here.
"""

from __future__ import annotations

import multiprocessing
import re

import torch

from .settings import check_value, settings, variable

DEVICE_VARIABLE = variable("device")
# how vLLM names the process of each of N > 1 API servers (api_server_rank's docstring)
_API_SERVER_NAME = re.compile(r"(?:ApiServer_|APIServer_DPRank_)(\d+)$")


def api_server_rank() -> int:
    """This process's rank among the API servers of ``--api-server-count N`` (0 when there is one).

    vLLM 0.32 to 0.34 start each of N > 1 API servers as a spawned ``multiprocessing`` process named
    ``ApiServer_<rank>`` (``v1/utils.py`` ``APIServerProcessManager``) and hand the same rank to its
    config as ``parallel_config._api_process_rank``, which the multimodal processor cannot see (it is
    built from the model config alone). With one API server it runs in the main process: rank 0.
    In the multi-port external load-balancing mode (``--data-parallel-multi-port-external-lb``) each
    local data-parallel rank gets its own API server, ``APIServer_DPRank_<dp rank>``: that rank.
    """
    match = _API_SERVER_NAME.search(multiprocessing.current_process().name)
    return int(match[1]) if match else 0


def selection_devices(value: str | None = None) -> list[torch.device]:
    """``QTSPLUS_DEVICE`` (or ``value``, read the same way) as torch devices: [] when unset.

    Raises :class:`~qtsplus_vllm.settings.SettingsError` (a ``ValueError`` naming the variable) for
    an entry that is not ``cpu`` or ``cuda[:N]``; touches no CUDA.
    """
    if value is None:
        entries = settings().device
    else:
        entries = check_value("device", value.strip()) if value.strip() else ()
    return [torch.device(entry) for entry in entries]


def device_for_rank(devices: list[torch.device], rank: int) -> torch.device:
    """The entry of ``devices`` that the API server of ``rank`` uses (round robin)."""
    return devices[rank % len(devices)]


def default_device() -> torch.device:
    """This process's selection device: its entry of ``QTSPLUS_DEVICE`` if set, else cuda:0 when
    CUDA is available, else cpu. ``RuntimeError`` for a CUDA device this process cannot see."""
    devices = selection_devices()
    if not devices:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    name = ",".join(settings().device)
    rank = api_server_rank()
    device = device_for_rank(devices, rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_VARIABLE}={name!r} but CUDA is not available in this process")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(
            f"{DEVICE_VARIABLE}={name!r} gives API server {rank} {device}, but this process sees "
            f"{torch.cuda.device_count()} CUDA device(s) (CUDA_VISIBLE_DEVICES renumbers them)"
        )
    return device


def feature_cache_device() -> torch.device | None:
    """``QTSPLUS_FEATURE_CACHE_DEVICE`` as a torch device; None (unset): the runtime's device."""
    name = settings().feature_cache_device
    return torch.device(name) if name else None
