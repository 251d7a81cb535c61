"""llama.cpp's own log lines as records of the `appliance.llama` logger, at their level.

llama.cpp describes every model load at length (for a Gemma model about 740 lines:
metadata, tensors, buffers, graph reservations). llama-cpp-python's own callback prints
all of it to stderr, which the supervisor forwards to the journal line by line. Here its
INFO and DEBUG lines become DEBUG records (seen with APPLIANCE_LOG_LEVEL=DEBUG); its
warnings and errors stay warnings and errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from typing import Any, Final

import llama_cpp

LOGGER = logging.getLogger("appliance.llama")

# ggml_log_level as the llama.cpp inside llama-cpp-python 0.3.36 numbers it.
GGML_DEBUG: Final = 1
GGML_INFO: Final = 2
GGML_WARN: Final = 3
GGML_ERROR: Final = 4
GGML_CONT: Final = 5  # the rest of the previous message
_LEVELS: Final = {
    GGML_DEBUG: logging.DEBUG,
    GGML_INFO: logging.DEBUG,
    GGML_WARN: logging.WARNING,
    GGML_ERROR: logging.ERROR,
}


_installed: LlamaLog | None = None


class LlamaLog:
    """Receives llama.cpp's messages (in pieces: a message may end without a newline and
    go on in CONT pieces) and logs them one line at a time."""

    def __init__(self, logger: logging.Logger = LOGGER) -> None:
        self._logger = logger
        self._level = logging.DEBUG
        self._pending = ""
        self._answered = False
        # Kept referenced for as long as llama.cpp may call it.
        self._callback: Any = llama_cpp.llama_log_callback(self._from_llama)

    def install(self) -> None:
        """Route llama.cpp's (and ggml's) logging here, for the whole process."""
        global _installed
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        # llama.cpp holds only the C pointer: the installed log must outlive every caller's
        # reference to it (a collected callback is a crash at the next model load).
        _installed = self

    @contextlib.contextmanager
    def answered_elsewhere(self) -> Iterator[None]:
        """While llama.cpp checks what a client sent (a grammar): its errors are the
        client's, answered with a 400, so they are logged at DEBUG and not as the box's."""
        self.flush()
        self._answered = True
        try:
            yield
        finally:
            self.flush()
            self._answered = False

    def receive(self, level: int, text: str) -> None:
        if level != GGML_CONT:
            self.flush()
            self._level = logging.DEBUG if self._answered else _LEVELS.get(level, logging.ERROR)
        if not self._logger.isEnabledFor(self._level):
            return  # the usual case for load chatter: not even decoded into lines
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._logger.log(self._level, "%s", line.rstrip())

    def flush(self) -> None:
        pending, self._pending = self._pending, ""
        if pending.strip():
            self._logger.log(self._level, "%s", pending.rstrip())

    def _from_llama(self, level: int, text: bytes | None, user_data: Any) -> None:
        with contextlib.suppress(Exception):  # an exception must not cross into C
            self.receive(level, (text or b"").decode("utf-8", "replace"))


def answered_elsewhere() -> contextlib.AbstractContextManager[None]:
    """`LlamaLog.answered_elsewhere` of the installed log (nothing when none is)."""
    return contextlib.nullcontext() if _installed is None else _installed.answered_elsewhere()
