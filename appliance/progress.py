"""A one-line progress bar for long CLI work (imports, verification, key rotation)."""

from __future__ import annotations

import sys
import time
from typing import Final, TextIO

BAR_WIDTH: Final = 30
MB: Final = 1024 * 1024


class ProgressBar:
    """A one-line progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, unit: str = "bytes") -> None:
        self.label = label
        self.unit = unit
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        fraction = done / total if total else 1.0
        filled = int(BAR_WIDTH * fraction)
        amount = f"{done // MB}/{total // MB} MB" if self.unit == "bytes" else f"{done}/{total}"
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} {amount}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
