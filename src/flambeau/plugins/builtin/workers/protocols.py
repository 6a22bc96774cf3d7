"""The asyncio protocols of the process backend: frames from the worker's socket, lines from
its output pipes.

Both only split bytes and hand the pieces on; what a frame or a line means is
:mod:`.process`'s business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from flambeau.plugins.builtin.workers.frames import FrameError, FrameSplitter

_LINE_MAX = 1 << 16  # a longer "line" is cut rather than buffered forever


class FrameProtocol(asyncio.Protocol):
    """Hands each frame body from the worker's socket to ``on_frame``."""

    def __init__(
        self,
        on_frame: Callable[[bytes], None],
        on_error: Callable[[Exception], None],
        on_lost: Callable[[Exception | None], None],
        max_frame_bytes: int,
    ) -> None:
        self._splitter = FrameSplitter(max_frame_bytes)
        self._on_frame = on_frame
        self._on_error = on_error
        self._on_lost = on_lost
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self._splitter.feed(data)
        except FrameError as exc:
            self._on_error(exc)
            return
        for body in bodies:
            if self._transport is not None and self._transport.is_closing():
                return  # an earlier frame was a protocol error: nothing after it is trusted
            self._on_frame(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)


class OutputPump(asyncio.Protocol):
    """Reads one of the worker's output pipes and hands complete lines to ``write``.

    Reading continuously is what keeps a chatty worker from blocking on a full pipe.
    """

    def __init__(
        self,
        prefix: str,
        write: Callable[[str, list[bytes]], None],
        done: asyncio.Future[None],
    ) -> None:
        self._prefix = prefix
        self._write = write
        self._pending = b""
        self._transport: asyncio.BaseTransport | None = None
        self.done = done

    def itself(self) -> OutputPump:
        """The protocol factory for ``connect_read_pipe``."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) >= _LINE_MAX:  # an endless line is cut, not buffered forever
            lines.append(self._pending)
            self._pending = b""
        if lines:
            self._write(self._prefix, lines)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending:
            self._write(self._prefix, [self._pending])
            self._pending = b""
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
