"""Fixtures for the handler SDK tests: services are always closed after a test."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flambeau.api import ModelLoadSpec
from flambeau.handler.service import ModelService


@pytest.fixture
def load_service() -> Iterator[Callable[..., ModelService]]:
    loaded: list[ModelService] = []

    def _load(load_spec: ModelLoadSpec, **kwargs: Any) -> ModelService:
        service = ModelService.load(load_spec, **kwargs)
        loaded.append(service)
        return service

    yield _load
    for service in loaded:
        service.close()


@pytest.fixture(autouse=True)
def _handler_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flambeau.handler")
