"""flambeau's HTTP/1.1 connection layer (core/http.py), byte for byte over real sockets.

A small Tornado application is served by :class:`~flambeau.core.http.HttpServer` on
127.0.0.1 and driven through raw ``asyncio`` streams, so every test controls the exact bytes a
client sends and checks the exact bytes that come back: framing, keep-alive and close,
pipelining, request bodies, 100-continue, malformed requests and early answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import tornado.netutil
import tornado.web

from flambeau.core.http import MAX_HEADER_BYTES, HttpServer

MAX_BODY = 64 * 1024  # the server's max_body_size
UPLOAD_LIMIT = 1024  # the refusing handler's own limit, checked in prepare() as ApiHandler does
TIMEOUT = 5.0  # seconds any single read may take before the test fails
QUIET = 0.2  # seconds of silence taken to mean "the connection stayed open"
STREAM_PARTS = (b"first", b"second", b"third")
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 (Continue)\r\n\r\n"
INJECTED = "safe\r\nX-Injected: yes"

T = TypeVar("T")


# -- the application ----------------------------------------------------------------------


@dataclass
class Recorder:
    """What the upload and slow handlers saw, for the test to inspect (and to hold back)."""

    chunks: list[bytes] = field(default_factory=list)
    closes: int = 0
    received: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class EchoHandler(tornado.web.RequestHandler):
    """Answers ``METHOD URI|BODY`` with a Content-Length (Tornado computes it in finish)."""

    def _echo(self) -> None:
        request = self.request
        self.set_header("Content-Type", "application/octet-stream")
        self.write(f"{request.method} {request.uri}|".encode() + request.body)

    def get(self) -> None:
        self._echo()

    def head(self) -> None:
        self._echo()

    def post(self) -> None:
        self._echo()


@tornado.web.stream_request_body
class UploadHandler(tornado.web.RequestHandler):
    """Records each body piece as it arrives, and its own on_connection_close calls."""

    def initialize(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def data_received(self, chunk: bytes) -> None:
        self.recorder.chunks.append(chunk)
        self.recorder.received.set()

    def post(self) -> None:
        self.write(b"pieces=%d|" % len(self.recorder.chunks) + b"".join(self.recorder.chunks))

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.recorder.closes += 1
        self.recorder.closed.set()


class LimitedUploadHandler(UploadHandler):
    """Refuses a big declared body from prepare(), before reading it, as ApiHandler does."""

    def prepare(self) -> None:
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > UPLOAD_LIMIT:
            self.set_status(413)
            self.set_header("Connection", "close")
            self.finish()
            self.request.connection.close()  # type: ignore[union-attr]


class StreamingHandler(tornado.web.RequestHandler):
    """Answers in parts, flushing between them: no Content-Length is known up front."""

    async def get(self) -> None:
        for part in STREAM_PARTS[:-1]:
            self.write(part)
            await self.flush()
        self.write(STREAM_PARTS[-1])

    async def head(self) -> None:
        await self.get()


class SlowHandler(tornado.web.RequestHandler):
    """Answers only when the test releases it, so that the client can leave first."""

    def initialize(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def get(self) -> None:
        self.recorder.started.set()
        await self.recorder.release.wait()
        self.write(b"late")

    def on_connection_close(self) -> None:
        self.recorder.closed.set()

    def on_finish(self) -> None:
        self.recorder.finished.set()


class InjectionHandler(tornado.web.RequestHandler):
    """Sets a header value with CR LF through the public API (Tornado refuses it)."""

    def get(self) -> None:
        self.set_header("X-Note", INJECTED)
        self.write(b"unreachable")


class RawInjectionHandler(tornado.web.RequestHandler):
    """Puts a CR LF header value past set_header's check, so only http.py can stop it."""

    def get(self) -> None:
        self._headers["X-Note"] = INJECTED
        self.write(b"body")


def make_application(recorder: Recorder) -> tornado.web.Application:
    recorded = {"recorder": recorder}
    return tornado.web.Application(
        [
            (r"/echo", EchoHandler),
            (r"/upload", UploadHandler, recorded),
            (r"/limited", LimitedUploadHandler, recorded),
            (r"/stream", StreamingHandler),
            (r"/slow", SlowHandler, recorded),
            (r"/inject", InjectionHandler),
            (r"/inject-raw", RawInjectionHandler),
        ]
    )


# -- a raw HTTP client ----------------------------------------------------------------------


async def within(awaitable: Awaitable[T], seconds: float = TIMEOUT) -> T:
    """Await with a deadline, so that a server that never answers fails the test quickly."""
    async with asyncio.timeout(seconds):
        return await awaitable


@dataclass
class Answer:
    """One answer as it came off the wire."""

    status_line: str
    headers: list[tuple[str, str]]
    body: bytes  # the payload, chunk framing removed
    wire_body: bytes  # the bytes after the head, chunk framing included

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ", 2)[1])

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


class RawClient:
    """One TCP connection to the server: writes exact bytes, reads answers as framed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await within(self.writer.drain())

    async def read_exactly(self, size: int) -> bytes:
        return await within(self.reader.readexactly(size))

    async def read_to_end(self) -> bytes:
        """Everything until the server closes the connection."""
        return await within(self.reader.read())

    async def read_answer(self, *, head_only: bool = False) -> Answer:
        """Read one answer: its head, then a body framed by Content-Length, by chunked
        transfer coding, or by the end of the connection (``head_only`` for HEAD)."""
        head = await within(self.reader.readuntil(b"\r\n\r\n"))
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers = []
        for line in lines:
            name, separator, value = line.partition(": ")
            assert separator, f"malformed header line {line!r}"
            headers.append((name, value))
        answer = Answer(status_line, headers, b"", b"")
        if head_only or answer.status in (204, 304) or answer.status < 200:
            return answer
        if answer.header("Transfer-Encoding") == "chunked":
            answer.wire_body, answer.body = await self._read_chunked()
        elif (length := answer.header("Content-Length")) is not None:
            answer.body = answer.wire_body = await self.read_exactly(int(length))
        else:
            answer.body = answer.wire_body = await self.read_to_end()
        return answer

    async def _read_chunked(self) -> tuple[bytes, bytes]:
        wire, body = bytearray(), bytearray()
        while True:
            size_line = await within(self.reader.readuntil(b"\r\n"))
            size = int(size_line[:-2], 16)
            data = await self.read_exactly(size + 2)
            assert data.endswith(b"\r\n"), f"chunk of {size} bytes not followed by CRLF"
            wire += size_line + data
            body += data[:-2]
            if size == 0:
                return bytes(wire), bytes(body)

    async def assert_closed(self) -> None:
        """The server closed the connection: end of stream, with nothing more sent."""
        assert await self.read_to_end() == b""

    async def assert_open(self) -> None:
        """The server neither closed the connection nor sent anything more."""
        with pytest.raises(TimeoutError):
            await within(self.reader.read(1), QUIET)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Served:
    """The running server, what its handlers recorded, and a way to connect to it."""

    server: HttpServer
    port: int
    recorder: Recorder
    clients: list[RawClient] = field(default_factory=list)

    async def connect(self) -> RawClient:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", self.port))
        client = RawClient(reader, writer)
        self.clients.append(client)
        return client

    async def exchange(self, data: bytes, *, head_only: bool = False) -> Answer:
        """Send one request on a new connection and read its answer."""
        client = await self.connect()
        await client.send(data)
        return await client.read_answer(head_only=head_only)


def request(
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    version: str = "HTTP/1.1",
    headers: tuple[str, ...] = (),
) -> bytes:
    """A request with a Host header, and a Content-Length when there is a body."""
    lines = [f"{method} {target} {version}", "Host: test", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    recorder = Recorder()
    server = HttpServer(make_application(recorder), max_body_size=MAX_BODY)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    await server.add_sockets(sockets)
    served = Served(server, sockets[0].getsockname()[1], recorder)
    yield served
    for client in served.clients:
        await client.close()
    server.stop()
    await within(server.close_all_connections())


async def assert_still_serving(served: Served) -> None:
    answer = await served.exchange(request("GET", "/echo?after"))
    assert (answer.status, answer.body) == (200, b"GET /echo?after|")


# -- keep-alive and close -------------------------------------------------------------------


async def test_http11_keeps_the_connection_for_the_next_request(served: Served) -> None:
    client = await served.connect()
    for n in (1, 2):
        await client.send(request("GET", f"/echo?n={n}"))
        answer = await client.read_answer()
        assert answer.status_line == "HTTP/1.1 200 OK"
        assert answer.body == f"GET /echo?n={n}|".encode()
        assert answer.header("Connection") is None
    await client.assert_open()


async def test_http11_connection_close_closes_after_the_answer(served: Served) -> None:
    client = await served.connect()
    await client.send(request("GET", "/echo", headers=("Connection: close",)))
    answer = await client.read_answer()
    assert (answer.status, answer.body) == (200, b"GET /echo|")
    await client.assert_closed()


async def test_requests_pipelined_after_connection_close_are_not_answered(
    served: Served,
) -> None:
    client = await served.connect()
    await client.send(
        request("GET", "/echo?1", headers=("Connection: close",)) + request("GET", "/echo?2")
    )
    assert (await client.read_answer()).body == b"GET /echo?1|"
    await client.assert_closed()


async def test_http11_connection_close_is_announced_in_the_answer(served: Served) -> None:
    answer = await served.exchange(request("GET", "/echo", headers=("Connection: close",)))
    assert answer.header("Connection") == "close"


async def test_http10_closes_after_the_answer_by_default(served: Served) -> None:
    client = await served.connect()
    await client.send(request("GET", "/echo", version="HTTP/1.0"))
    answer = await client.read_answer()
    assert answer.status_line == "HTTP/1.1 200 OK"
    assert (answer.header("Content-Length"), answer.body) == ("10", b"GET /echo|")
    assert answer.header("Connection") is None
    await client.assert_closed()


async def test_http10_keep_alive_is_kept_and_announced(served: Served) -> None:
    client = await served.connect()
    for n in (1, 2):
        keep = request(
            "GET", f"/echo?n={n}", version="HTTP/1.0", headers=("Connection: keep-alive",)
        )
        await client.send(keep)
        answer = await client.read_answer()
        assert answer.header("Connection") == "Keep-Alive"
        assert answer.body == f"GET /echo?n={n}|".encode()
    await client.assert_open()


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    client = await served.connect()
    await client.send(
        request("POST", "/echo?1", b"one")
        + request("GET", "/stream")
        + request("POST", "/echo?3", b"three")
    )
    first, second, third = [await client.read_answer() for _ in range(3)]
    assert first.body == b"POST /echo?1|one"
    assert (second.header("Transfer-Encoding"), second.body) == ("chunked", b"firstsecondthird")
    assert third.body == b"POST /echo?3|three"
    await client.assert_open()


async def test_blank_lines_before_the_request_line_are_skipped(served: Served) -> None:
    client = await served.connect()
    await client.send(b"\r\n\r\n\n" + request("GET", "/echo?1"))
    assert (await client.read_answer()).body == b"GET /echo?1|"
    # Also when the blank line arrives alone, before the rest of the request.
    await client.send(b"\r\n")
    await client.assert_open()
    await client.send(request("GET", "/echo?2"))
    assert (await client.read_answer()).body == b"GET /echo?2|"


async def test_bare_lf_request_is_accepted(served: Served) -> None:
    answer = await served.exchange(b"GET /echo?lf HTTP/1.1\nHost: test\n\n")
    assert (answer.status, answer.body) == (200, b"GET /echo?lf|")


async def test_bare_lf_request_pipelined_before_a_crlf_one(served: Served) -> None:
    client = await served.connect()
    await client.send(b"GET /echo?1 HTTP/1.1\nHost: test\n\n" + request("GET", "/echo?2"))
    assert (await client.read_answer()).body == b"GET /echo?1|"
    assert (await client.read_answer()).body == b"GET /echo?2|"


# -- request bodies -------------------------------------------------------------------------


async def test_content_length_body_in_several_writes(served: Served) -> None:
    client = await served.connect()
    await client.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\n\r\nhel")
    for piece in (b"lo ", b"wor", b"ld"):
        await asyncio.sleep(0.01)  # separate TCP segments, separate data_received calls
        await client.send(piece)
    answer = await client.read_answer()
    assert (answer.status, answer.body) == (200, b"POST /echo|hello world")
    await client.assert_open()


async def test_chunked_body_with_extension_and_trailers(served: Served) -> None:
    client = await served.connect()
    await client.send(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b"1\r\n \r\n"
    )
    await asyncio.sleep(0.01)
    await client.send(b"5\r\nworld\r\n0\r\nX-Checksum: 1234\r\nX-Other: 5\r\n\r\n")
    answer = await client.read_answer()
    assert (answer.status, answer.body) == (200, b"POST /echo|hello world")
    # The trailers were consumed: the next request on the connection parses cleanly.
    await client.send(request("GET", "/echo?next"))
    assert (await client.read_answer()).body == b"GET /echo?next|"


async def test_streamed_body_reaches_data_received(served: Served) -> None:
    client = await served.connect()
    await client.send(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 6\r\n\r\nabc")
    await within(served.recorder.received.wait())
    await client.send(b"def")
    answer = await client.read_answer()
    assert answer.status == 200
    assert served.recorder.chunks == [b"abc", b"def"]
    assert answer.body == b"pieces=2|abcdef"


async def test_chunked_body_reaches_data_received(served: Served) -> None:
    answer = await served.exchange(
        b"POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
    )
    assert answer.status == 200
    assert b"".join(served.recorder.chunks) == b"abcdef"


async def test_expect_100_continue_is_answered_before_the_body(served: Served) -> None:
    client = await served.connect()
    await client.send(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await client.read_exactly(len(CONTINUE)) == CONTINUE
    await client.send(b"hello")
    answer = await client.read_answer()
    assert (answer.status, answer.body) == (200, b"POST /echo|hello")


async def test_expect_100_continue_without_a_body_gets_only_the_answer(served: Served) -> None:
    client = await served.connect()
    await client.send(request("GET", "/echo", headers=("Expect: 100-continue",)))
    assert await client.read_exactly(len("HTTP/1.1 200")) == b"HTTP/1.1 200"


# -- answers --------------------------------------------------------------------------------


async def test_streamed_answer_is_chunked_for_http11(served: Served) -> None:
    client = await served.connect()
    await client.send(request("GET", "/stream"))
    answer = await client.read_answer()
    assert answer.status == 200
    assert answer.header("Transfer-Encoding") == "chunked"
    assert answer.header("Content-Length") is None
    assert answer.wire_body == b"5\r\nfirst\r\n6\r\nsecond\r\n5\r\nthird\r\n0\r\n\r\n"
    await client.assert_open()


async def test_streamed_answer_to_http10_is_raw_and_ends_with_the_connection(
    served: Served,
) -> None:
    client = await served.connect()
    await client.send(request("GET", "/stream", version="HTTP/1.0"))
    answer = await client.read_answer()  # no length: read until the server closes
    assert answer.status == 200
    assert answer.header("Transfer-Encoding") is None
    assert answer.header("Content-Length") is None
    assert answer.wire_body == b"firstsecondthird"


async def test_head_sends_headers_only(served: Served) -> None:
    client = await served.connect()
    await client.send(request("HEAD", "/echo") + request("GET", "/echo?next"))
    head = await client.read_answer(head_only=True)
    assert head.status == 200
    assert head.header("Content-Length") == str(len(b"HEAD /echo|"))
    # Had any body bytes followed the head, they would come before this status line.
    assert await client.read_exactly(len("HTTP/1.1 200")) == b"HTTP/1.1 200"


async def test_head_of_a_streamed_answer_sends_no_body(served: Served) -> None:
    client = await served.connect()
    await client.send(request("HEAD", "/stream") + request("GET", "/echo?next"))
    head = await client.read_answer(head_only=True)
    assert head.status == 200
    assert await client.read_exactly(len("HTTP/1.1 200")) == b"HTTP/1.1 200"


async def test_header_value_with_crlf_gets_500_without_the_injected_header(
    served: Served,
) -> None:
    client = await served.connect()
    await client.send(request("GET", "/inject"))
    answer = await client.read_answer()
    assert answer.status == 500
    assert answer.header("X-Injected") is None
    assert answer.header("X-Note") is None
    await client.assert_open()


async def test_crlf_past_set_header_never_reaches_the_wire(served: Served) -> None:
    # Only http.py's own check stands between this header and the wire: it refuses the head,
    # and the client must get a 500 or a closed connection, not the injected line.
    client = await served.connect()
    await client.send(request("GET", "/inject-raw", headers=("Connection: close",)))
    received = await client.read_to_end()
    assert received == b"" or received.startswith(b"HTTP/1.1 500 ")
    assert b"X-Injected" not in received
    assert b"X-Note" not in received


async def test_crlf_past_set_header_on_keep_alive_gets_an_answer_or_a_close(
    served: Served,
) -> None:
    client = await served.connect()
    await client.send(request("GET", "/inject-raw"))
    received = await within(client.read_to_end(), 1.0)
    assert received == b"" or received.startswith(b"HTTP/1.1 500 ")


# -- malformed requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"NOT-HTTP\r\n\r\n", id="bad-start-line"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: test\r\nno colon\r\n\r\n", id="bad-header"),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nContent-Length: 5x\r\n\r\nhello", id="content-length-text"
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\nhello", id="content-length-sign"
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            id="two-content-lengths",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
            id="content-length-over-limit",
        ),
        pytest.param(
            b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n",
            id="headers-over-64k",
        ),
        pytest.param(
            b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1),
            id="unfinished-headers-over-64k",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
            id="negative-chunk-size",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",
            id="chunk-without-crlf",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"8000\r\n" + b"x" * 0x8000 + b"\r\n") * 2
            + b"1\r\nx\r\n0\r\n\r\n",
            id="chunked-body-over-limit",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            id="chunked-and-content-length",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc", id="gzip-encoding"
        ),
    ],
)
async def test_malformed_request_gets_400_and_close(served: Served, data: bytes) -> None:
    client = await served.connect()
    await client.send(data)
    assert await client.read_to_end() == BAD_REQUEST
    await assert_still_serving(served)


async def test_malformed_request_after_a_good_one_on_the_same_connection(
    served: Served,
) -> None:
    client = await served.connect()
    await client.send(request("GET", "/echo?1") + b"GET /echo HTTP/1.1\r\nno colon\r\n\r\n")
    assert (await client.read_answer()).body == b"GET /echo?1|"
    assert await client.read_to_end() == BAD_REQUEST


@pytest.mark.parametrize("size", [b"0x3", b"+3", b"0_3"])
async def test_lenient_chunk_size_is_refused(served: Served, size: bytes) -> None:
    client = await served.connect()
    await client.send(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + size
        + b"\r\nabc\r\n0\r\n\r\n"
    )
    assert (await client.read_answer()).status == 400


async def test_chunk_size_over_the_limit_is_refused_before_its_data(served: Served) -> None:
    client = await served.connect()
    await client.send(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n" % (MAX_BODY + 1)
    )
    assert await within(client.read_to_end(), 1.0) == BAD_REQUEST


# -- early answers and disconnects ----------------------------------------------------------


async def test_early_413_closes_without_reading_the_body(served: Served) -> None:
    client = await served.connect()
    declared = UPLOAD_LIMIT * 10  # over the handler's limit, within the server's
    await client.send(
        b"POST /limited HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % declared
        + b"x" * 100
    )
    answer = await client.read_answer()
    assert answer.status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert (answer.header("Connection"), answer.body) == ("close", b"")
    await client.assert_closed()  # without the other 10,140 bytes ever being sent
    assert served.recorder.chunks == []
    await assert_still_serving(served)


async def test_early_413_also_for_a_body_over_the_server_limit(served: Served) -> None:
    answer = await served.exchange(
        b"POST /limited HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    )
    assert answer.status == 413


async def test_refused_request_gets_no_100_continue(served: Served) -> None:
    client = await served.connect()
    await client.send(
        b"POST /limited HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n"
        b"Expect: 100-continue\r\n\r\n" % (UPLOAD_LIMIT + 1)
    )
    answer = await client.read_answer()
    assert answer.status == 413


async def test_disconnect_mid_body_runs_on_connection_close(served: Served) -> None:
    client = await served.connect()
    await client.send(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nab")
    await within(served.recorder.received.wait())
    await client.close()
    await within(served.recorder.closed.wait())
    assert served.recorder.chunks == [b"ab"]


async def test_disconnect_mid_body_runs_on_connection_close_once(served: Served) -> None:
    client = await served.connect()
    await client.send(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nab")
    await within(served.recorder.received.wait())
    await client.close()
    await within(served.recorder.closed.wait())
    await asyncio.sleep(0.05)  # room for a second call, if one is coming
    assert served.recorder.closes == 1


async def test_answer_to_a_departed_client_logs_no_error(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    client = await served.connect()
    await client.send(request("GET", "/slow"))
    await within(served.recorder.started.wait())
    await client.close()
    await within(served.recorder.closed.wait())  # the server has seen the connection go
    served.recorder.release.set()
    await within(served.recorder.finished.wait())
    gc.collect()  # asyncio reports an unretrieved future's exception when it is collected
    assert "exception was never retrieved" not in caplog.text


# -- the server -----------------------------------------------------------------------------


async def test_stop_refuses_new_connections_but_serves_open_ones(served: Served) -> None:
    client = await served.connect()
    served.server.stop()
    with pytest.raises(ConnectionRefusedError):
        await served.connect()
    await client.send(request("GET", "/echo"))
    assert (await client.read_answer()).body == b"GET /echo|"


async def test_close_all_connections_closes_idle_keep_alive_connections(
    served: Served,
) -> None:
    clients = [await served.connect() for _ in range(2)]
    for client in clients:
        await client.send(request("GET", "/echo"))
        await client.read_answer()
    assert len(served.server.connections) == 2
    await within(served.server.close_all_connections())
    assert served.server.connections == set()
    for client in clients:
        await client.assert_closed()


async def test_connections_idle_past_the_timeout_are_closed() -> None:
    server = HttpServer(make_application(Recorder()), max_body_size=MAX_BODY, idle_timeout_s=0.2)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    await server.add_sockets(sockets)
    served = Served(server, sockets[0].getsockname()[1], Recorder())
    try:
        idle = await served.connect()
        await idle.send(request("GET", "/echo"))
        await idle.read_answer()
        silent = await served.connect()  # never sends a byte
        busy = await served.connect()
        for _ in range(6):  # keeps talking past the timeout
            await busy.send(request("GET", "/echo"))
            await busy.read_answer()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await idle.assert_closed()
        await silent.assert_closed()
    finally:
        for client in served.clients:
            await client.close()
        server.stop()
        await within(server.close_all_connections())
