"""An envelope around the model manager's data plane, for any transport.

:func:`envelope_for` picks the envelope of a model version (``envelope:`` in its
model-config, else the server's ``service_envelope``, else none); :class:`Submission` queues
the decoded rows of one client request all at once (or none: a queue without room for every
row is a 503 before anything is queued), waits for every row, and cancels the rest when one
fails or the client goes away. Example::

    envelope = envelope_for(server, mv)
    answer = await Submission.run(server, mv, envelope, request)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from flambeau.api import (
    Decoded,
    Envelope,
    FlambeauError,
    InternalServerError,
    ModelRef,
    ServiceUnavailableError,
    WorkerRequest,
    WorkerResponse,
)


class NoEnvelope:
    """No envelope (TorchServe's default): the request goes to the handler as it came."""

    name = ""

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded:
        return Decoded(request, model, (request,))

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse:
        return responses[0]

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]:
        from flambeau.envelopes.body import BodyEnvelope

        return BodyEnvelope().render_error(error)


def envelope_named(server: Any, name: str) -> Envelope:
    """The envelope registered as ``name`` (``""``: none); unknown names are a 500."""
    if not name:
        return NoEnvelope()
    spec = server.envelopes.get(name)
    if spec is None:
        raise InternalServerError(f"envelope {name!r} is not provided by any plugin")
    envelope: Envelope = spec.factory()
    return envelope


def envelope_for(server: Any, mv: Any) -> Envelope:
    """The envelope a model version is configured with (model-config, then server)."""
    name = mv.settings.envelope or server.config.get_str("service_envelope")
    return envelope_named(server, name)


class Submission:
    """The queued rows of one client request and their futures."""

    def __init__(self, futures: list[asyncio.Future[WorkerResponse]]) -> None:
        self.futures = futures

    @classmethod
    def submit(
        cls, server: Any, mv: Any, rows: Sequence[WorkerRequest], version: str | None = None
    ) -> Submission:
        """Queue every row on ``mv`` (``version`` is what the client asked for, None for the
        default: it only shapes TorchServe's no-worker message)."""
        room = getattr(mv.queue, "remaining_capacity", None)
        if room is not None and len(rows) > room:
            raise ServiceUnavailableError(
                f"Model {mv.name} job queue has room for {room} requests, "
                f"this request needs {len(rows)}"
            )
        futures: list[asyncio.Future[WorkerResponse]] = []
        try:
            for row in rows:
                futures.append(server.models.submit(mv.name, version, row))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return cls(futures)

    def cancel(self) -> None:
        for future in self.futures:
            if not future.done():
                future.cancel()

    async def responses(self) -> list[WorkerResponse]:
        """Every row's response in order; the first failure cancels the rest and is raised."""
        if not self.futures:
            return []
        try:
            return list(await asyncio.gather(*self.futures))
        finally:
            self.cancel()

    @classmethod
    async def run(
        cls,
        server: Any,
        mv: Any,
        envelope: Envelope,
        request: WorkerRequest,
        *,
        version: str | None = None,
        on_submitted: Callable[[Submission], None] | None = None,
    ) -> WorkerResponse:
        """Decode, queue, wait and encode one client request."""
        decoded = envelope.decode(request, ModelRef(mv.name, mv.version))
        submission = cls.submit(server, mv, decoded.rows, version)
        if on_submitted is not None:
            on_submitted(submission)
        return envelope.encode(decoded, await submission.responses())
