"""A minimal byte-count progress bar for packing and extracting large archives.

It draws on stderr only when stderr is a terminal and the job is big enough to be worth
watching, so scripts, CI logs and the server's own logs stay clean.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

# Below this a job finishes before a bar would be readable.
MIN_BYTES = 8 * 1024 * 1024
_WIDTH = 30
_MIB = 1024 * 1024


class Progress:
    """Counts bytes towards ``total`` and redraws a one-line bar at most ten times a second."""

    __slots__ = ("_done", "_drawn_at", "_stream", "enabled", "label", "total")

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        min_bytes: int | None = None,
    ) -> None:
        self.label = label
        self.total = max(total, 0)
        self._stream = stream if stream is not None else sys.stderr
        self._done = 0
        self._drawn_at = 0.0
        isatty = getattr(self._stream, "isatty", None)
        threshold = MIN_BYTES if min_bytes is None else min_bytes
        self.enabled = bool(isatty and isatty()) and self.total >= threshold

    def advance(self, nbytes: int) -> None:
        """Record ``nbytes`` more bytes processed."""
        self._done += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self._draw()

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn at all)."""
        if self.enabled:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()
            self.enabled = False

    def _draw(self) -> None:
        fraction = min(self._done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        self._stream.write(
            f"\r{self.label} [{bar}] {fraction * 100:3.0f}% "
            f"{self._done / _MIB:.1f}/{self.total / _MIB:.1f} MiB"
        )
        self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
