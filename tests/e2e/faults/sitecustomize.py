"""Fault injection for end-to-end tests (on ``PYTHONPATH`` of a test server only).

With ``QTSPLUS_TEST_OOM_WIDTH=W`` set, the selection runtime raises ``torch.OutOfMemoryError`` for
any video whose frames are W pixels wide, as a GPU would on a giant input: the test checks that
the request gets an error response and the server keeps serving everyone else.

With ``QTSPLUS_TEST_LOAD_FAILURES=oom,sticky,...`` set, the n-th attempt to load the selection
runtime fails as the n-th entry says (``oom``: ``torch.OutOfMemoryError``; ``sticky``: a CUDA
error that poisons the device), later attempts load normally; each attempt writes
``QTSPLUS-TEST: runtime load attempt N`` to stderr, so a test can count them in the server's log.
"""

import os
import sys

_WIDTH = os.environ.get("QTSPLUS_TEST_OOM_WIDTH")
_LOAD_FAILURES = [f.strip() for f in os.environ.get("QTSPLUS_TEST_LOAD_FAILURES", "").split(",") if f.strip()]

if _WIDTH:
    import qtsplus_vllm.runtime as _runtime

    _select = _runtime.SelectionRuntime.select

    def _select_or_fail(self, frames, question_ids, options):
        if frames.shape[2] == int(_WIDTH):
            import torch

            raise torch.OutOfMemoryError(f"injected out of memory for frames {list(frames.shape)}")
        return _select(self, frames, question_ids, options)

    _runtime.SelectionRuntime.select = _select_or_fail

if _LOAD_FAILURES:
    import qtsplus_vllm.runtime as _runtime

    _init = _runtime.SelectionRuntime.__init__
    _attempts = []

    def _init_or_fail(self, *args, **kwargs):
        _attempts.append(1)
        print(f"QTSPLUS-TEST: runtime load attempt {len(_attempts)}", file=sys.stderr, flush=True)
        failure = _LOAD_FAILURES[len(_attempts) - 1] if len(_attempts) <= len(_LOAD_FAILURES) else None
        if failure == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        if failure == "sticky":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        _init(self, *args, **kwargs)

    _runtime.SelectionRuntime.__init__ = _init_or_fail
