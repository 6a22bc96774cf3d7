"""Fixtures for the workflow plugin tests (helpers live in ``workflow_support``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from workflow_support import InProcessServer


@pytest.fixture(scope="module")
def inproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("inproc"), {})
    yield server
    server.stop()
