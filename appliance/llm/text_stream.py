"""A sequence's answer as text: the bytes of its token pieces in, text out, held back only as
long as it may be the start of a stop string or an incomplete UTF-8 character."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Bytes of token pieces in, text out: incomplete UTF-8 waits for its next bytes, and
    text that may be the start of a stop string is held back until it is known not to be."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._bytes = b""
        self._held = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """The text that can be sent now; sets `stopped` when a stop string appears."""
        self._bytes += piece
        try:
            text = self._bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                text = self._bytes.decode("utf-8", "replace")
            else:
                text = self._bytes[: exc.start].decode("utf-8")
                self._bytes = self._bytes[exc.start :]
                return self._release(text)
        self._bytes = b""
        return self._release(text)

    def finish(self) -> str:
        """What is still held, at the end of a sequence that did not stop on a string."""
        text = self._held + self._bytes.decode("utf-8", "ignore")
        self._held, self._bytes = "", b""
        return "" if self.stopped else text

    def _release(self, text: str) -> str:
        held = self._held + text
        if not self._stops:
            self._held = ""
            return held
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return held[:cut]
        keep = max((overlap(held, stop) for stop in self._stops), default=0)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]


def overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop`."""
    # Such an end starts with stop's first character, within its last len(stop) - 1.
    first, start = stop[0], max(0, len(text) - len(stop) + 1)
    at = text.find(first, start)
    while at >= 0:
        if stop.startswith(text[at:]):
            return len(text) - at
        at = text.find(first, at + 1)
    return 0
