"""Why a generation could not be served; `status` and `code` shape the HTTP answer."""

from __future__ import annotations


class InferenceError(Exception):
    """A generation could not be served; `status` and `code` shape the HTTP answer."""

    status = 500
    code = "inference_error"


class WorkerCrashed(InferenceError):
    status = 503
    code = "worker_crashed"

    def __init__(self, detail: str = "") -> None:
        super().__init__("model worker crashed; retry" + (f" ({detail})" if detail else ""))


class QueueFull(InferenceError):
    status = 429
    code = "queue_full"


class DeadlineExceeded(InferenceError):
    status = 504
    code = "deadline_exceeded"


class ModelFailed(InferenceError):
    """The worker refused the request (bad prompt, model that does not load...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
