"""flambeau's HTTP/1.1 connection layer: asyncio protocols that drive Tornado applications.

Tornado's own server reads every request through an ``IOStream`` and a coroutine per message;
on the inference hot path that machinery cost about as much CPU as everything else the server
does per request (docs/performance.md). :class:`HttpServer` keeps Tornado's application side
-- routing, ``RequestHandler``, :class:`~flambeau.web.Endpoint` -- and replaces the connection
side with one :class:`HttpProtocol` per connection that parses requests from the bytes asyncio
hands it and implements Tornado's ``HTTPConnection`` interface for each exchange.

It keeps Tornado's behaviour where a client can see it: keep-alive rules for HTTP/1.0 and 1.1,
pipelined requests answered in order, fixed-length and chunked request bodies,
``Expect: 100-continue``, a chunked answer when the application streams, ``Connection: close``
after an answer sent before its request was read, 400 and a closed connection for malformed
requests, header-injection checks, TLS and Unix sockets. It adds TCP_NODELAY on every
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.httputil
import tornado.iostream
from tornado.http1connection import is_transfer_encoding_chunked, parse_int
from tornado.httputil import HTTPHeaders, HTTPInputError, RequestStartLine, ResponseStartLine

log = logging.getLogger("flambeau.http")

MAX_HEADER_BYTES = 65536
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 (Continue)\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
_READ_HIGH_WATER = 1 << 20  # bytes buffered past the current request before reads pause


class _Context:
    """What Tornado's ``HTTPServerRequest`` reads from ``connection.context``."""

    __slots__ = ("address", "protocol", "remote_ip")

    def __init__(self, address: Any, protocol: str) -> None:
        self.address = address
        self.protocol = protocol
        self.remote_ip = address[0] if isinstance(address, tuple) and address else "127.0.0.1"


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class Exchange:
    """One request and its answer: Tornado's ``HTTPConnection`` interface, per request."""

    def __init__(self, protocol: HttpProtocol, start: RequestStartLine, headers: HTTPHeaders):
        self._protocol = protocol
        self.context = protocol.context
        self.start_line = start
        self.max_body_size = protocol.server.max_body_size
        self.close_callback: Callable[[], None] | None = None
        self.chunked_output = False
        self._body_allowed = True
        self.head_written = False
        self.finished = False
        connection = headers.get("Connection", "").lower()
        if start.version == "HTTP/1.1":
            self.keep_alive = connection != "close"
        else:
            self.keep_alive = connection == "keep-alive"

    # -- tornado.httputil.HTTPConnection -------------------------------------------------

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        self.close_callback = callback

    def set_max_body_size(self, max_body_size: int) -> None:
        self.max_body_size = max_body_size

    def set_body_timeout(self, timeout: float) -> None:
        """Accepted for Tornado's interface; bodies are bounded by size, not time."""

    def write_headers(
        self,
        start_line: RequestStartLine | ResponseStartLine,
        headers: HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        assert isinstance(start_line, ResponseStartLine)
        request = self.start_line
        status = start_line.code
        self.chunked_output = (
            request.version == "HTTP/1.1"
            and status not in _NO_BODY_STATUS
            and status >= 200
            and "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
        )
        self._body_allowed = request.method != "HEAD" and status not in _NO_BODY_STATUS
        if request.version == "HTTP/1.0" and self.keep_alive:
            headers["Connection"] = "Keep-Alive"
        if self.chunked_output:
            headers["Transfer-Encoding"] = "chunked"
        elif "Content-Length" not in headers and self._body_allowed:
            # An HTTP/1.0 answer of unknown length ends when the connection does.
            self.keep_alive = False
        if not self.keep_alive and request.version == "HTTP/1.1" and "Connection" not in headers:
            headers["Connection"] = "close"
        lines = [f"HTTP/1.1 {status} {start_line.reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers.get_all())
        for line in lines:
            if "\r" in line or "\n" in line:
                # Nothing can be answered on this connection any more: close it, as Tornado.
                self.keep_alive = False
                self._protocol.close()
                raise ValueError(f"Illegal characters (CR or LF) in header: {line!r}")
        head = "\r\n".join(lines)
        self.head_written = True
        data = (head + "\r\n\r\n").encode("latin-1")
        if chunk:
            data += self._frame(chunk)
        return self._protocol.send(data)

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        if not chunk:
            return _done()
        return self._protocol.send(self._frame(chunk))

    def finish(self) -> None:
        if self.finished:
            return
        if self.chunked_output and self._body_allowed:
            self._protocol.send(b"0\r\n\r\n")
        self.finished = True
        self.close_callback = None
        self._protocol.exchange_finished(self)

    def close(self) -> None:
        """Close the connection (after what was written is sent)."""
        self.close_callback = None
        self._protocol.close()

    def _frame(self, chunk: bytes) -> bytes:
        if not self._body_allowed:
            return b""
        if self.chunked_output:
            return b"%x\r\n%s\r\n" % (len(chunk), chunk)
        return chunk


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests and feeds them to the application in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.context: _Context
        self._buffer = bytearray()
        self._exchange: Exchange | None = None
        self._delegate: tornado.httputil.HTTPMessageDelegate | None = None
        self._body_left = 0  # bytes of a fixed-length body still to come
        self._chunked = False  # reading a chunked body
        self._reading_body = False
        self._received_chunked = 0
        self._waiting = False  # the delegate asked us to wait before more body
        self._closed = False
        self._closing = False  # close() was called: parse nothing more
        self._paused_reading = False
        self._write_paused = False
        self._drained: list[asyncio.Future[None]] = []
        self.last_active = time.monotonic()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol = "https" if transport.get_extra_info("sslcontext") is not None else "http"
        self.context = _Context(transport.get_extra_info("peername"), protocol)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self._buffer += data
        self._process()

    @property
    def idle(self) -> bool:
        """Between requests: nothing being answered."""
        return self._exchange is None

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        exchange, delegate = self._exchange, self._delegate
        self._exchange = self._delegate = None
        if delegate is not None and self._reading_body:
            # The delegate tells its handler; the handler's close callback would repeat it.
            delegate.on_connection_close()
        elif exchange is not None and not exchange.finished and exchange.close_callback:
            callback, exchange.close_callback = exchange.close_callback, None
            callback()
        for future in self._drained:
            if not future.done():
                future.set_result(None)
        self._drained.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    # -- sending ----------------------------------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future[None]:
        if self._closed or self.transport is None or self.transport.is_closing():
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(tornado.iostream.StreamClosedError())
            future.exception()  # as Tornado: a client that left is no error worth logging
            return future
        if data:
            self.transport.write(data)
        if not self._write_paused:
            return _done()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drained.append(waiter)
        return waiter

    def close(self) -> None:
        self._closing = True
        if self.transport is not None and not self._closed:
            self.transport.close()

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self._exchange:
            return
        if self._delegate is not None:
            # Answered before the request was handed over whole (413, 401...): as Tornado,
            # close, the only way not to read the rest of the body.
            self._exchange = self._delegate = None
            self._reading_body = False
            self.close()
            return
        self._exchange = None
        if not exchange.keep_alive:
            self.close()
            return
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        if self._buffer:
            # The next pipelined request; not from inside the application's own call stack.
            asyncio.get_running_loop().call_soon(self._process)

    # -- parsing ----------------------------------------------------------------------------

    def _process(self) -> None:
        try:
            while not self._closing and not self._closed and not self._waiting:
                if self._reading_body:
                    if not self._read_body():
                        return
                    continue
                if self._exchange is not None:
                    # Answering: pipelined bytes wait, within bounds.
                    if len(self._buffer) > _READ_HIGH_WATER and self.transport is not None:
                        self._paused_reading = True
                        self.transport.pause_reading()
                    return
                if not self._read_head():
                    return
        except HTTPInputError as exc:
            self._bad_request(str(exc))

    def _read_head(self) -> bool:
        buffer = self._buffer
        # Tolerate blank lines before a request (RFC 9112 2.2).
        start = 0
        while buffer[start : start + 2] == b"\r\n" or buffer[start : start + 1] == b"\n":
            start += 2 if buffer[start : start + 1] == b"\r" else 1
        end, size = buffer.find(b"\r\n\r\n", start), 4
        bare = buffer.find(b"\n\n", start)
        if bare >= 0 and (end < 0 or bare < end):
            end, size = bare, 2
        if end < 0:
            if len(buffer) - start > MAX_HEADER_BYTES:
                raise HTTPInputError("request headers too large")
            if start:
                del buffer[:start]
            return False
        if end - start > MAX_HEADER_BYTES:
            raise HTTPInputError("request headers too large")
        text = buffer[start:end].decode("latin-1")
        del buffer[: end + size]
        line, _, rest = text.partition("\n")
        start_line = tornado.httputil.parse_request_start_line(line.rstrip("\r"))
        headers = HTTPHeaders.parse(rest)
        exchange = Exchange(self, start_line, headers)
        self._exchange = exchange
        length = self._body_length(headers)
        delegate = self.server.delegate.start_request(self, exchange)  # type: ignore[arg-type]
        self._delegate = delegate
        self._chunked = length is None
        self._body_left = length or 0
        self._reading_body = length != 0
        self._body_started = False
        self._expects_continue = (
            headers.get("Expect", "").lower() == "100-continue" and start_line.version == "HTTP/1.1"
        )
        ready = delegate.headers_received(start_line, headers)
        if self._closing or exchange.finished:
            return True  # answered from the headers alone (413, 401...)
        if not self._reading_body:
            self._after_headers(ready, self._finish_request)
        else:
            self._after_headers(ready, None)
        return True

    def _body_length(self, headers: HTTPHeaders) -> int | None:
        """The fixed body length, or None for a chunked body."""
        if is_transfer_encoding_chunked(headers):
            return None
        if "Content-Length" not in headers:
            return 0
        value = headers["Content-Length"]
        if "," in value:
            pieces = [piece.strip() for piece in value.split(",")]
            if any(piece != pieces[0] for piece in pieces):
                raise HTTPInputError(f"Multiple unequal Content-Lengths: {value!r}")
            value = headers["Content-Length"] = pieces[0]
        try:
            length = parse_int(value)
        except ValueError:
            raise HTTPInputError(f"Only integer Content-Length is allowed: {value}") from None
        return length

    def _after_headers(
        self, ready: Awaitable[None] | None, then: Callable[[], None] | None
    ) -> None:
        if ready is None:
            if then is not None:
                then()
            return
        # A streaming RequestHandler prepares on a later loop pass; its body waits for it.
        self._waiting = True

        def resume(_: Any) -> None:
            self._waiting = False
            if self._closed:
                return
            if then is not None:
                then()
            self._process()

        asyncio.ensure_future(ready).add_done_callback(resume)

    def _start_body(self, exchange: Exchange) -> None:
        """Once the application has seen the headers (and a streaming handler has run its
        ``prepare``, which may raise the limit or answer 413 itself): Tornado's limit check,
        then the 100 Continue the client waits for."""
        self._body_started = True
        if not self._chunked and self._body_left > exchange.max_body_size:
            raise HTTPInputError("Content-Length too long")
        if self._expects_continue:
            self.send(_CONTINUE)

    def _read_body(self) -> bool:
        exchange, delegate = self._exchange, self._delegate
        assert exchange is not None
        assert delegate is not None
        if exchange.finished:
            # Answered before the body (413...): exchange_finished closes the connection.
            return False
        if not self._body_started:
            self._start_body(exchange)
        buffer = self._buffer
        if not self._chunked:
            if not buffer:
                return False
            piece = bytes(buffer[: self._body_left])
            del buffer[: len(piece)]
            self._body_left -= len(piece)
            self._deliver(delegate, piece)
            if self._body_left == 0 and self._reading_body:
                self._reading_body = False
                self._finish_request()
            return True
        eol = buffer.find(b"\r\n")
        if eol < 0:
            if len(buffer) > 64:
                raise HTTPInputError("chunk size line too long")
            return False
        token = bytes(buffer[:eol]).split(b";", 1)[0].strip()
        if not _HEX.fullmatch(token):
            raise HTTPInputError("invalid chunk size")  # no 0x, signs or underscores
        size = int(token, 16)
        if self._received_chunked + size > exchange.max_body_size:
            raise HTTPInputError("chunked body too large")
        if size == 0:
            # The last chunk, then trailers up to an empty line.
            end = buffer.find(b"\r\n\r\n", eol)
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise HTTPInputError("chunked trailers too large")
                return False
            del buffer[: end + 4]
            self._reading_body = False
            self._finish_request()
            return True
        if len(buffer) < eol + 2 + size + 2:
            return False
        piece = bytes(buffer[eol + 2 : eol + 2 + size])
        if buffer[eol + 2 + size : eol + 4 + size] != b"\r\n":
            raise HTTPInputError("improperly terminated chunked request")
        del buffer[: eol + 4 + size]
        self._received_chunked += size
        self._deliver(delegate, piece)
        return True

    def _deliver(self, delegate: tornado.httputil.HTTPMessageDelegate, piece: bytes) -> None:
        if not piece or self._exchange is None or self._exchange.finished:
            return  # answered already: the rest of the body is read and dropped
        ready = delegate.data_received(piece)
        if ready is not None:
            self._after_headers(ready, None)

    def _finish_request(self) -> None:
        self._received_chunked = 0
        delegate = self._delegate
        exchange = self._exchange
        if delegate is None:
            return
        self._delegate = None
        if exchange is not None and exchange.finished:
            return
        delegate.finish()

    def _bad_request(self, reason: str) -> None:
        log.info("malformed HTTP request from %s: %s", self.context.remote_ip, reason)
        if self._exchange is None or not self._exchange.head_written:
            self.send(_BAD_REQUEST)
        if self._delegate is not None and self._reading_body:
            self._reading_body = False
            delegate, self._delegate = self._delegate, None
            delegate.on_connection_close()
        self.close()


class HttpServer:
    """Serves one Tornado application (any ``HTTPServerConnectionDelegate``) on sockets."""

    def __init__(
        self,
        delegate: tornado.httputil.HTTPServerConnectionDelegate,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body_size: int = 100 * 1024 * 1024,
        idle_timeout_s: float = 3600.0,
    ) -> None:
        self.delegate = delegate
        self.ssl_context = ssl_context
        self.max_body_size = max_body_size
        # As Tornado's server: a connection that sends nothing for an hour between (or in
        # the middle of) requests' headers is closed.
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[HttpProtocol] = set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def add_sockets(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(
                lambda: HttpProtocol(self), sock=sock, ssl=self.ssl_context
            )
            self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_idle())

    def stop(self) -> None:
        """Stop accepting connections; open ones go on."""
        for server in self._servers:
            server.close()

    async def _sweep_idle(self) -> None:
        # One timer for all connections, not one per request.
        period = min(60.0, self.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.idle_timeout_s
            for connection in list(self.connections):
                if connection.idle and connection.last_active < cutoff:
                    connection.close()

    async def close_all_connections(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            connection.close()
        # connection_lost comes a loop pass or two after close().
        while self.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
