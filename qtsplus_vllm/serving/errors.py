"""Our request errors as vLLM HTTP errors (vLLM answers ``GracefulHTTPError`` with its status).

The torch-only core raises :class:`~qtsplus_vllm.limits.RequestError` (400, or the status a
subclass declares: a failed video fetch is 400, 502 or 504, see ``media.py``),
:class:`~qtsplus_vllm.limits.LimitExceeded` (413) and
:class:`~qtsplus_vllm.limits.SelectionUnavailable` (503). vLLM maps a plain ``ValueError`` to 400
and anything else to 500, so the vLLM-facing layer re-raises them as :class:`QTSplusHTTPError`,
which carries the status. It is also a ``ValueError``, so code that only knows "bad input" still
treats it as a client-side error.
"""

from __future__ import annotations

from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError


class QTSplusHTTPError(GracefulHTTPError, ValueError):
    def __init__(self, message: str, http_status: HTTPStatus):
        GracefulHTTPError.__init__(self, message, http_status)

    def __str__(self) -> str:
        return self.message


def as_http_error(err: Exception) -> QTSplusHTTPError:
    """``err`` with the HTTP status its class declares (400 when it declares none), counted in metrics."""
    from .metrics import observe_rejection

    status = HTTPStatus(getattr(err, "http_status", HTTPStatus.BAD_REQUEST))
    observe_rejection(status)
    return QTSplusHTTPError(str(err), status)
