"""Registers the builtin envelopes: ``body``, ``json`` (alias ``vertex``), ``kserve``,
``kservev2`` and ``seldon``.

Each factory imports its module when an envelope is first built, not when the plugin loads.
At start-up the lifespan checks that ``service_envelope`` names an envelope some plugin
provides, so a typo fails the start instead of every request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from flambeau.api import ConfigError, Envelope, EnvelopeSpec, hookimpl


def _body() -> Envelope:
    from flambeau.envelopes.body import BodyEnvelope

    return BodyEnvelope()


def _json() -> Envelope:
    from flambeau.envelopes.json_envelope import JsonEnvelope

    return JsonEnvelope()


def _kserve() -> Envelope:
    from flambeau.envelopes.kserve import KServeEnvelope

    return KServeEnvelope()


def _kservev2() -> Envelope:
    from flambeau.envelopes.kservev2 import KServeV2Envelope

    return KServeV2Envelope()


def _seldon() -> Envelope:
    from flambeau.envelopes.seldon import SeldonEnvelope

    return SeldonEnvelope()


@hookimpl
def flambeau_envelopes(config: Any) -> list[EnvelopeSpec]:
    del config  # envelopes have no settings of their own
    return [
        EnvelopeSpec("body", _body),
        EnvelopeSpec("json", _json),
        EnvelopeSpec("vertex", _json),
        EnvelopeSpec("kserve", _kserve),
        EnvelopeSpec("kservev2", _kservev2),
        EnvelopeSpec("seldon", _seldon),
    ]


@contextlib.asynccontextmanager
async def _check_service_envelope(server: Any) -> AsyncIterator[None]:
    name = server.config.get_str("service_envelope")
    if name and name not in server.envelopes:
        raise ConfigError(
            f"service_envelope: unknown envelope {name!r} "
            f"(available: {', '.join(sorted(server.envelopes))})"
        )
    yield


@hookimpl
def flambeau_lifespan(server: Any) -> AbstractAsyncContextManager[None]:
    return _check_service_envelope(server)
