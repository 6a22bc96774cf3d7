"""MANIFEST.json of .mar and .war archives, byte-for-byte as TorchServe's archivers write it.

The key order, the omitted-when-empty rules and the 2-space indent (no trailing newline) copy
``model_archiver.manifest_components`` 0.12.0 and ``workflow_archiver`` 0.2.15, so tools that
diff or parse manifests cannot tell our archives from theirs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

# The archiver versions we are wire-compatible with; TorchServe only warns when they are absent,
# but writing the same value keeps manifests identical to the real tools' output.
MODEL_ARCHIVER_VERSION = "0.12.0"
WORKFLOW_ARCHIVER_VERSION = "0.2.15"

MANIFEST_FILE_NAME = "MANIFEST.json"
MAR_INF = "MAR-INF"
WAR_INF = "WAR-INF"
MODEL_MANIFEST_PATH = f"{MAR_INF}/{MANIFEST_FILE_NAME}"
WORKFLOW_MANIFEST_PATH = f"{WAR_INF}/{MANIFEST_FILE_NAME}"

RUNTIMES = ("python", "python3", "LSP")
PYTHON_RUNTIMES = frozenset({"python", "python3"})

# Handler names resolved inside the server (``ts.torch_handler.<name>``): never copied.
BUILTIN_HANDLERS = frozenset(
    {
        "base_handler",
        "text_classifier",
        "image_classifier",
        "object_detector",
        "image_segmenter",
        "dali_image_classifier",
        "vllm_handler",
        "trt_llm_handler",
    }
)
LSP_BUILTIN_HANDLERS = frozenset({"BaseHandler", "TorchScriptHandler"})

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
ARCHIVE_SUFFIXES = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}


def created_on(now: datetime | None = None) -> str:
    """The ``createdOn`` stamp: local time as ``dd/MM/yyyy HH:mm:ss``."""
    return (now or datetime.now()).strftime("%d/%m/%Y %H:%M:%S")


def valid_name(name: str) -> bool:
    """Whether ``name`` is an acceptable model / workflow name for the archivers."""
    return NAME_PATTERN.match(name) is not None


def handler_file(handler: str, runtime: str = "python") -> str | None:
    """The file an archiver must copy for ``--handler``, or None for a builtin handler name.

    ``file.py``, ``file`` and ``file[.py]:function`` all name ``file.py`` (the real 0.12 tool
    fails on ``file.py:function``; we accept it because the docs and seed 002 use it). Only a
    colon in the last path component separates the function, so directories may contain one.
    """
    if runtime in PYTHON_RUNTIMES and handler in BUILTIN_HANDLERS:
        return None
    if runtime == "LSP" and handler in LSP_BUILTIN_HANDLERS:
        return None
    head, base = os.path.split(handler)
    path = os.path.join(head, base.split(":", 1)[0]) if head else base.split(":", 1)[0]
    if runtime == "LSP":
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        return path if path.endswith(suffix) else path + suffix
    return path if path.endswith(".py") else path + ".py"


def model_manifest(
    *,
    model_name: str,
    handler: str,
    version: str | None,
    runtime: str = "python",
    serialized_file: str | None = None,
    model_file: str | None = None,
    requirements_file: str | None = None,
    config_file: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The manifest dict torch-model-archiver 0.12.0 writes for these arguments.

    Paths are reduced to their base names exactly as the real tool does (``os.path.basename``
    for handler, serialized and config file, the last ``/`` component for model and
    requirements file); empty values are omitted, except ``handler`` which is always present.
    """
    model: dict[str, Any] = {"modelName": model_name}
    if serialized_file:
        model["serializedFile"] = os.path.basename(serialized_file)
    model["handler"] = os.path.basename(handler)
    if model_file:
        model["modelFile"] = model_file.split("/")[-1]
    if version:
        model["modelVersion"] = version
    if requirements_file:
        model["requirementsFile"] = requirements_file.split("/")[-1]
    if config_file:
        model["configFile"] = os.path.basename(config_file)
    return {
        "createdOn": created_on(now),
        "runtime": runtime,
        "model": model,
        "archiverVersion": MODEL_ARCHIVER_VERSION,
    }


def workflow_manifest(
    *, workflow_name: str, spec_file: str, handler: str, now: datetime | None = None
) -> dict[str, Any]:
    """The manifest dict torch-workflow-archiver 0.2.15 writes for these arguments."""
    return {
        "createdOn": created_on(now),
        "workflow": {
            "workflowName": workflow_name,
            "specFile": spec_file.rsplit("/", maxsplit=1)[-1],
            "handler": handler.rsplit("/", maxsplit=1)[-1],
        },
        "archiverVersion": WORKFLOW_ARCHIVER_VERSION,
    }


def dumps(manifest: Mapping[str, Any]) -> str:
    """Serialise a manifest the way the real tools do: 2-space indent, no trailing newline."""
    return json.dumps(manifest, indent=2)
