"""Fixtures for the archiver tests: a small eager torch model laid out as a user would have it."""

from __future__ import annotations

from pathlib import Path

import pytest
from archiver_support import MODEL_PY, ModelInputs, write_model_inputs


@pytest.fixture(scope="session")
def state_dict_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real ``torch.save``-d state_dict of TinyNet (torch is imported once per session)."""
    torch = pytest.importorskip("torch")
    namespace: dict[str, object] = {}
    exec(MODEL_PY, namespace)
    torch.manual_seed(0)
    model = namespace["TinyNet"]()  # type: ignore[operator]
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path.read_bytes()


@pytest.fixture
def model_inputs(tmp_path: Path, state_dict_bytes: bytes) -> ModelInputs:
    """A fresh copy of the sample model sources under ``tmp_path/src``."""
    return write_model_inputs(tmp_path / "src", state_dict_bytes)
