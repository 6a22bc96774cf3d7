"""What the OIP REST routes and gRPC service share: the switch, health and metadata.

Model metadata comes from an optional ``oip:`` section of the model's model-config.yaml
(``platform``, ``inputs`` and ``outputs`` as lists of ``{name, datatype, shape}``), since a
.mar archive says nothing about its tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flambeau import __version__

SERVER_NAME = "flambeau"
EXTENSIONS = ("binary_tensor_data",)


def oip_enabled(config: Any) -> bool:
    """``ts_open_inference_protocol=true`` (or env ``TS_OPEN_INFERENCE_PROTOCOL=oip``)."""
    return bool(config.get_bool("ts_open_inference_protocol", False))


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_ready(mv: Any) -> bool:
    """Ready = at least one worker of this version can take a request now."""
    return bool(mv.pool.ready_count() > 0)


def _tensor_metadata(items: Any) -> list[dict[str, Any]]:
    tensors = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            continue
        shape = item.get("shape", [])
        tensors.append(
            {
                "name": item["name"],
                "datatype": str(item.get("datatype", "")),
                "shape": [int(d) for d in shape] if isinstance(shape, list) else [],
            }
        )
    return tensors


def model_metadata(server: Any, mv: Any) -> dict[str, Any]:
    config = mv.archive.model_config if mv.archive is not None else {}
    section = config.get("oip") if isinstance(config, Mapping) else None
    section = section if isinstance(section, Mapping) else {}
    return {
        "name": mv.name,
        "versions": [v.version for v in server.models.versions_of(mv.name)],
        "platform": str(section.get("platform", "pytorch")),
        "inputs": _tensor_metadata(section.get("inputs")),
        "outputs": _tensor_metadata(section.get("outputs")),
    }
