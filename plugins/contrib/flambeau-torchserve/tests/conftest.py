"""Fixtures of the compatibility tests; the helpers they use live in ``support``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import compat_env, kill_leftover


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    kill_leftover(compat_env(tmp_path))
