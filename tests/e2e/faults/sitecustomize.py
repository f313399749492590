"""Fault injection for end-to-end tests (on ``PYTHONPATH`` of a test server only).

With ``QTSPLUS_TEST_OOM_WIDTH=W`` set, the selection runtime raises ``torch.OutOfMemoryError`` for
any video whose frames are W pixels wide, as a GPU would on a giant input: the test checks that
the request gets an error response and the server keeps serving everyone else.
"""

import os

_WIDTH = os.environ.get("QTSPLUS_TEST_OOM_WIDTH")

if _WIDTH:
    import qtsplus_vllm.runtime as _runtime

    _select = _runtime.SelectionRuntime.select

    def _select_or_fail(self, frames, question_ids, options):
        if frames.shape[2] == int(_WIDTH):
            import torch

            raise torch.OutOfMemoryError(f"injected out of memory for frames {list(frames.shape)}")
        return _select(self, frames, question_ids, options)

    _runtime.SelectionRuntime.select = _select_or_fail
