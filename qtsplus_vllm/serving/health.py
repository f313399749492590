"""``/health`` answers 503 once this API server's selection device has failed.

vLLM's ``/health`` asks the engine client (``AsyncLLM.check_health``), which knows only the
engine. The selection runtime lives in the API-server process: after a sticky CUDA error (an
illegal address, a device-side assert) its CUDA context is unusable and every video request
would fail, so the health check must say so and let an orchestrator replace the server.

The seam is one method: ``AsyncLLM.check_health`` is wrapped so that it raises vLLM's
``EngineDeadError`` (which ``/health`` answers with 503) while
:func:`qtsplus_vllm.runtime.device_failure` reports a failure, and otherwise defers to vLLM.
"""

from __future__ import annotations

import functools
import sys
import threading

from ..runtime import device_failure

_INSTALLED = False
_LOCK = threading.Lock()


def _wrap(check_health):
    @functools.wraps(check_health)
    async def check_health_with_selection(self) -> None:
        failure = device_failure()
        if failure is not None:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError(f"the QTSplus selection runtime failed: {failure}")
        await check_health(self)

    check_health_with_selection.qtsplus_wrapped = True
    return check_health_with_selection


def install_health_check() -> None:
    """Wrap ``AsyncLLM.check_health`` once per process (idempotent, no I/O).

    Only where vLLM's async engine client is already imported, i.e. in an API server: the engine
    core and the workers, which build processors too, are left alone.
    """
    global _INSTALLED
    with _LOCK:
        module = sys.modules.get("vllm.v1.engine.async_llm")
        if _INSTALLED or module is None:
            return
        AsyncLLM = module.AsyncLLM
        if not getattr(AsyncLLM.check_health, "qtsplus_wrapped", False):
            AsyncLLM.check_health = _wrap(AsyncLLM.check_health)
        _INSTALLED = True
