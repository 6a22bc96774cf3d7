"""The REST management API against a real server: every endpoint's answers and errors.

One server for the module (model API on, URL registration allowed for file:// and one local
HTTP path, per-model requirements on); each test registers models under names of its own.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flambeau.testing.fixtures import ServerProcess

DESCRIBE_FIELDS = [
    "modelName",
    "modelVersion",
    "modelUrl",
    "runtime",
    "minWorkers",
    "maxWorkers",
    "batchSize",
    "maxBatchDelay",
    "responseTimeout",
    "startupTimeout",
    "maxRetryTimeoutInSec",
    "clientTimeoutInMills",
    "parallelType",
    "parallelLevel",
    "deviceType",
    "continuousBatching",
    "useJobTicket",
    "useVenv",
    "stateful",
    "sequenceMaxIdleMSec",
    "sequenceTimeoutMSec",
    "maxNumSequence",
    "maxSequenceJobQueueSize",
    "loadedAtStartup",
    "workers",
    "jobQueueStatus",
]
NO_WORKER = (
    'Model "{}" has no worker to serve inference request. Please use scale workers API to add '
    "workers. If this is a sequence inference, please check if it is closed, or expired; or "
    "exceeds maxSequenceJobQueueSize"
)


class ArchiveHost:
    """A local HTTP server: ``/allowed/<file>`` serves archives, ``/allowed/redirect.mar``
    redirects outside the allowed prefix."""

    def __init__(self, root: Path) -> None:
        root_dir = str(root)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=root_dir, **kwargs)

            def do_GET(self) -> None:
                if self.path.endswith("/redirect.mar"):
                    self.send_response(302)
                    self.send_header("Location", "/other/httpprobe.mar")
                    self.end_headers()
                    return
                self.path = self.path.replace("/allowed/", "/", 1).replace("/other/", "/", 1)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def host(sources: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArchiveHost]:
    root = tmp_path_factory.mktemp("www")
    shutil.copy2(sources.archive("probe"), root / "httpprobe.mar")
    archive_host = ArchiveHost(root)
    yield archive_host
    archive_host.close()


@pytest.fixture(scope="module")
def server(
    module_server: Any, sources: Any, e2e: Any, host: ArchiveHost, tmp_path_factory: Any
) -> ServerProcess:
    store = tmp_path_factory.mktemp("store")
    e2e.store_with(sources, store, "probe", "probe_dir", "probe_timeout", "tma_probe", "broken")
    e2e.store_with(sources, store, "uses_dep", "uses_dep_venv", "bad_dep")
    shutil.copy2(sources.archive("probe_v2"), store / "probe-2.0.mar")
    (store / "garbage.mar").write_bytes(b"this is not a zip file")
    allowed = rf"file://.*,http://127\.0\.0\.1:{host.port}/allowed/.*"
    return module_server(
        model_store=store,
        args=["--enable-model-api"],
        config={
            "allowed_urls": allowed,
            "install_py_dep_per_model": "true",
            # The test's own environment cache: nothing left in the user's ~/.cache.
            "model_env_cache": str(tmp_path_factory.mktemp("envs")),
        },
        # Requirements resolve from local paths only: no package index in tests.
        env={"PIP_NO_INDEX": "1"},
    )


def error(response: Any) -> tuple[int, str, str]:
    body = response.json()
    assert body["code"] == response.status
    return response.status, body["type"], body["message"]


def status(response: Any) -> tuple[int, str]:
    return response.status, response.json()["status"]


def test_api_description(server: ServerProcess, e2e: Any) -> None:
    doc = e2e.api(server, "OPTIONS", "/")
    assert doc.status == 200
    assert doc.json()["openapi"] == "3.0.1"
    assert "/models/{model_name}/{model_version}/set-default" in doc.json()["paths"]
    assert e2e.api(server, "GET", "/api-description").json() == doc.json()
    assert error(e2e.api(server, "GET", "/")) == (
        405,
        "MethodNotAllowedException",
        "Requested method is not allowed, please refer to API document.",
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", (400, "BadRequestException", "Parameter url is required.")),
        ("?url=", (404, "ModelNotFoundException", "empty url")),
        ("?url=missing.mar", (404, "ModelNotFoundException", "Model not found at: missing.mar")),
        (
            "?url=../probe.mar",
            (404, "ModelNotFoundException", "Relative path is not allowed in url: ../probe.mar"),
        ),
        (
            "?url=sub/probe.mar",
            (404, "ModelNotFoundException", "Model not found at: sub/probe.mar"),
        ),
        (
            "?url=https://example.com/x.mar",
            (
                404,
                "ModelNotFoundException",
                "Given URL https://example.com/x.mar does not match any allowed URL(s)",
            ),
        ),
        (
            "?url=probe.mar&runtime=java",
            (400, "BadRequestException", "Invalid RuntimeType value: java"),
        ),
        (
            "?url=probe.mar&model_name=bad/name",
            (400, "InvalidModelException", "Model name is not valid: bad/name"),
        ),
    ],
)
def test_register_errors(
    server: ServerProcess, e2e: Any, query: str, expected: tuple[int, str, str]
) -> None:
    assert error(e2e.api(server, "POST", f"/models{query}")) == expected


def test_register_a_broken_archive_or_body(server: ServerProcess, e2e: Any) -> None:
    status_code, kind, message = error(e2e.api(server, "POST", "/models?url=garbage.mar"))
    assert (status_code, kind) == (400, "InvalidModelException")
    assert "garbage.mar" in message
    bad_json = e2e.api(
        server, "POST", "/models", body="{nope", headers={"Content-Type": "application/json"}
    )
    assert error(bad_json) == (400, "BadRequestException", "Invalid JSON body")
    assert e2e.api(server, "GET", "/models/garbage").status == 404


def test_register_describe_scale_unregister(server: ServerProcess, e2e: Any) -> None:
    registered = e2e.api(server, "POST", "/models?url=probe.mar&model_name=life")
    assert status(registered) == (
        200,
        'Model "life" Version: 1.0 registered with 0 initial workers. '
        "Use scale workers API to add workers for the model.",
    )
    assert error(e2e.api(server, "POST", "/models?url=probe.mar&model_name=life")) == (
        409,
        "ConflictStatusException",
        "Model version 1.0 is already registered for model life",
    )
    described = e2e.api(server, "GET", "/models/life")
    assert described.body.endswith(b"]\n")
    info = described.json()[0]
    assert list(info) == DESCRIBE_FIELDS
    assert info["modelName"] == "life"
    assert info["modelUrl"] == "probe.mar"
    assert (info["minWorkers"], info["maxWorkers"], info["workers"]) == (0, 0, [])
    assert (info["batchSize"], info["maxBatchDelay"], info["responseTimeout"]) == (1, 100, 120)
    assert (info["deviceType"], info["parallelType"], info["loadedAtStartup"]) == ("cpu", "", False)
    assert info["jobQueueStatus"] == {"remainingCapacity": 100, "pendingRequests": 0}
    assert e2e.api(server, "GET", "/v1/models/life").json() == {"name": "life", "ready": False}
    assert error(e2e.predict(server, "/predictions/life", b"x")) == (
        503,
        "ServiceUnavailableException",
        NO_WORKER.format("life"),
    )
    assert error(e2e.api(server, "GET", "/models/life?customized=true")) == (
        503,
        "ServiceUnavailableException",
        'Model "life" has no worker to serve describe request. '
        "Please use scale workers API to add workers.",
    )

    # Scale: argument errors first, then a synchronous scale up.
    assert error(e2e.api(server, "PUT", "/models/life?min_worker=2&max_worker=1")) == (
        400,
        "BadRequestException",
        "max_worker cannot be less than min_worker.",
    )
    assert error(e2e.api(server, "PUT", "/models/life?min_worker=-1&max_worker=-1"))[0] == 400
    assert error(e2e.api(server, "PUT", "/models/nope?min_worker=1")) == (
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    )
    assert error(e2e.api(server, "PUT", "/models/life/9.9?min_worker=1")) == (
        404,
        "ModelVersionNotFoundException",
        "Model version: 9.9 does not exist for model: life",
    )
    scaled = e2e.api(server, "PUT", "/models/life?min_worker=1&synchronous=true")
    assert status(scaled) == (200, "Workers scaled to 1 for model: life")
    (worker,) = e2e.describe(server, "life")["workers"]
    assert list(worker) == ["id", "startTime", "status", "memoryUsage", "pid", "gpu", "gpuUsage"]
    assert worker["status"] == "READY"
    assert int(worker["id"]) >= 9000
    assert (worker["gpu"], worker["gpuUsage"]) == (False, "N/A")
    assert worker["memoryUsage"] > 0
    assert e2e.api(server, "GET", "/v1/models/life").json() == {"name": "life", "ready": True}
    answer = e2e.predict(server, "/predictions/life", b"hello")
    assert answer.status == 200
    assert answer.json()["pid"] == worker["pid"]
    customized = e2e.api(server, "GET", "/models/life?customized=true").json()[0]
    assert customized["customizedMetadata"] == {"handler": "probe", "pid": worker["pid"]}
    assert list(customized)[-1] == "customizedMetadata"

    # Asynchronous scale down, then unregister.
    assert status(e2e.api(server, "PUT", "/models/life/1.0?min_worker=0")) == (
        202,
        "Processing worker updates...",
    )
    e2e.wait_for(lambda: not e2e.describe(server, "life")["workers"], what="scale down")
    assert status(e2e.api(server, "DELETE", "/models/life")) == (200, 'Model "life" unregistered')
    assert error(e2e.api(server, "GET", "/models/life")) == (
        404,
        "ModelNotFoundException",
        "Model not found: life",
    )
    assert e2e.api(server, "DELETE", "/models/life").status == 404


def test_versions_and_default(server: ServerProcess, e2e: Any) -> None:
    assert e2e.api(server, "POST", "/models?url=probe.mar&model_name=multi").status == 200
    assert e2e.api(server, "POST", "/models?url=probe-2.0.mar&model_name=multi").status == 200
    listed = e2e.api(server, "GET", "/models").json()["models"]
    assert {"modelName": "multi", "modelUrl": "probe.mar"} in listed
    every = e2e.api(server, "GET", "/models/multi/all").json()
    assert [(v["modelVersion"], v["batchSize"]) for v in every] == [("1.0", 1), ("2.0", 2)]
    assert e2e.api(server, "GET", "/models/multi/2.0").json()[0]["modelUrl"] == "probe-2.0.mar"
    assert error(e2e.api(server, "GET", "/models/multi/3.0")) == (
        404,
        "ModelVersionNotFoundException",
        "Model version: 3.0 does not exist for model: multi",
    )
    assert status(e2e.api(server, "PUT", "/models/multi/2.0/set-default")) == (
        200,
        'Default version successfully updated for model "multi" to "2.0"',
    )
    assert e2e.describe(server, "multi")["modelVersion"] == "2.0"
    assert error(e2e.api(server, "PUT", "/models/multi/3.0/set-default")) == (
        404,
        "ModelVersionNotFoundException",
        "Model version 3.0 does not exist for model multi",
    )
    assert error(e2e.api(server, "PUT", "/models/nope/1.0/set-default")) == (
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    )
    assert error(e2e.api(server, "DELETE", "/models/multi")) == (
        403,
        "InvalidModelVersionException",
        "Cannot remove default version for model multi",
    )
    assert error(e2e.api(server, "DELETE", "/models/multi/9.9")) == (
        404,
        "ModelVersionNotFoundException",
        "Model version: 9.9 does not exist for model: multi",
    )
    assert e2e.api(server, "DELETE", "/models/multi/1.0").status == 200
    assert [v["modelVersion"] for v in e2e.api(server, "GET", "/models/multi/all").json()] == [
        "2.0"
    ]
    assert e2e.api(server, "DELETE", "/models/multi").status == 200


def test_json_body_and_asynchronous_register(server: ServerProcess, e2e: Any) -> None:
    body = {
        "url": "probe.mar",
        "model_name": "jsonreg",
        "initial_workers": 1,
        "synchronous": False,
        "batch_size": 3,
        "max_batch_delay": 7,
        "response_timeout": 9,
    }
    registered = e2e.api(
        server,
        "POST",
        "/models",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert status(registered) == (202, "Processing worker updates...")
    e2e.wait_for(lambda: e2e.ready_pids(server, "jsonreg"), what="the async worker")
    info = e2e.describe(server, "jsonreg")
    assert (info["minWorkers"], info["batchSize"], info["maxBatchDelay"]) == (1, 3, 7)
    assert info["responseTimeout"] == 9
    assert e2e.predict(server, "/predictions/jsonreg", b"x").json()["model"] == "jsonreg"
    assert e2e.api(server, "DELETE", "/models/jsonreg").status == 200


def test_settings_precedence(server: ServerProcess, e2e: Any) -> None:
    # probe_timeout's model-config: minWorkers 1, maxWorkers 1, responseTimeout 1.
    assert e2e.api(server, "POST", "/models?url=probe_timeout.mar&initial_workers=0").status == 200
    from_yaml = e2e.describe(server, "probe_timeout")
    assert (from_yaml["responseTimeout"], from_yaml["minWorkers"]) == (1, 1)
    assert e2e.api(server, "DELETE", "/models/probe_timeout").status == 200
    query = "url=probe_timeout.mar&response_timeout=5&batch_size=6&max_batch_delay=0"
    assert e2e.api(server, "POST", f"/models?{query}&synchronous=false").status == 202
    from_params = e2e.describe(server, "probe_timeout")
    assert (from_params["responseTimeout"], from_params["batchSize"]) == (5, 6)
    assert from_params["maxBatchDelay"] == 0
    assert e2e.api(server, "DELETE", "/models/probe_timeout").status == 200


def test_list_pagination(server: ServerProcess, e2e: Any) -> None:
    for name in ("page_a", "page_b", "page_c"):
        assert e2e.api(server, "POST", f"/models?url=probe.mar&model_name={name}").status == 200
    names = [m["modelName"] for m in e2e.api(server, "GET", "/models").json()["models"]]
    assert names == sorted(names)
    assert {"page_a", "page_b", "page_c"} <= set(names)
    count = len(names)

    def page(query: str) -> tuple[str | None, list[str]]:
        body = e2e.api(server, "GET", f"/models?{query}").json()
        assert list(body)[-1] == "models"
        return body.get("nextPageToken"), [m["modelName"] for m in body["models"]]

    assert page("limit=2") == ("2", names[:2])
    assert page("limit=2&next_page_token=1") == ("3", names[1:3])
    # A page that ends exactly at the end still carries a token; one that runs past does not.
    assert page(f"limit={count}") == (str(count), names)
    assert page(f"limit={count + 1}") == (None, names)
    assert page("limit=-1") == (None, names)
    assert page("limit=abc&next_page_token=-5") == (None, names)
    assert page(f"next_page_token={count}") == (None, [])
    for name in ("page_a", "page_b", "page_c"):
        assert e2e.api(server, "DELETE", f"/models/{name}").status == 200


def test_file_and_http_urls(
    server: ServerProcess, e2e: Any, sources: Any, host: ArchiveHost, tmp_path: Path
) -> None:
    store = server.model_store
    outside = tmp_path / "fileprobe.mar"
    shutil.copy2(sources.archive("probe"), outside)
    url = outside.as_uri()
    assert e2e.api(server, "POST", f"/models?url={url}&model_name=fromfile").status == 200
    assert (store / "fileprobe.mar").is_file()
    assert e2e.describe(server, "fromfile")["modelUrl"] == url
    assert error(e2e.api(server, "POST", f"/models?url={url}&model_name=again")) == (
        500,
        "InternalServerException",
        "Model file already exists fileprobe.mar",
    )
    assert e2e.api(server, "DELETE", "/models/fromfile").status == 200
    assert not (store / "fileprobe.mar").exists()
    assert outside.is_file()

    http_url = host.url("/allowed/httpprobe.mar")
    assert e2e.api(server, "POST", f"/models?url={http_url}&model_name=httpprobe").status == 200
    assert e2e.describe(server, "httpprobe")["modelUrl"] == http_url
    assert (store / "httpprobe.mar").is_file()
    assert e2e.api(server, "DELETE", "/models/httpprobe").status == 200
    assert not (store / "httpprobe.mar").exists()

    other = host.url("/other/httpprobe.mar")
    assert error(e2e.api(server, "POST", f"/models?url={other}")) == (
        404,
        "ModelNotFoundException",
        f"Given URL {other} does not match any allowed URL(s)",
    )
    redirect = host.url("/allowed/redirect.mar")
    assert error(e2e.api(server, "POST", f"/models?url={redirect}")) == (
        400,
        "DownloadArchiveException",
        f"Redirect to {other} does not match any allowed URL(s)",
    )
    missing = host.url("/allowed/missing.mar")
    assert error(e2e.api(server, "POST", f"/models?url={missing}")) == (
        400,
        "DownloadArchiveException",
        f"Failed to download archive from: {missing}",
    )
    leftovers = [p.name for p in store.iterdir() if p.name.startswith((".", "redirect", "miss"))]
    assert leftovers == []


def test_directory_registration(
    server: ServerProcess, e2e: Any, sources: Any, tmp_path: Path
) -> None:
    assert e2e.api(server, "POST", "/models?url=probe_dir").status == 200
    outside = tmp_path / "elsewhere"
    shutil.copytree(sources.archive("probe_dir"), outside)
    assert e2e.api(server, "POST", f"/models?url={outside}&model_name=absdir").status == 200
    assert (
        e2e.api(server, "POST", f"/models?url={outside.as_uri()}&model_name=uridir").status == 200
    )
    assert e2e.describe(server, "absdir")["modelUrl"] == str(outside)
    for name in ("probe_dir", "absdir", "uridir"):
        assert e2e.api(server, "DELETE", f"/models/{name}").status == 200
    # A directory is used in place and never deleted.
    assert (outside / "MAR-INF" / "MANIFEST.json").is_file()
    assert (server.model_store / "probe_dir" / "probe.py").is_file()


def test_worker_start_failure(server: ServerProcess, e2e: Any) -> None:
    assert error(e2e.api(server, "POST", "/models?url=broken.mar&initial_workers=1")) == (
        500,
        "InternalServerException",
        "Failed to start workers for model broken version: 1.0",
    )
    assert e2e.api(server, "GET", "/models/broken").status == 404
    assert e2e.api(server, "POST", "/models?url=broken.mar").status == 200
    assert status(e2e.api(server, "PUT", "/models/broken?min_worker=1&synchronous=true")) == (
        206,
        "Workers scaling in progress...",
    )
    assert e2e.api(server, "DELETE", "/models/broken").status == 200


def test_archive_from_real_torch_model_archiver(server: ServerProcess, e2e: Any) -> None:
    assert e2e.api(server, "POST", "/models?url=tma_probe.mar").status == 200
    scaled = e2e.api(server, "PUT", "/models/tma_probe?min_worker=1&synchronous=true")
    assert status(scaled) == (200, "Workers scaled to 1 for model: tma_probe")
    answer = e2e.predict(server, "/predictions/tma_probe", b"from tma")
    assert answer.json()["inputs"]["body"]["value"] == "from tma"
    assert e2e.api(server, "DELETE", "/models/tma_probe").status == 200
    assert (server.model_store / "tma_probe.mar").is_file()


def test_per_model_requirements(server: ServerProcess, e2e: Any) -> None:
    assert e2e.api(server, "POST", "/models?url=uses_dep.mar&initial_workers=1").status == 200
    plain = e2e.predict(server, "/predictions/uses_dep", b"x").json()
    assert plain["value"] == 42
    assert "/venv/" not in plain["file"]

    failed = error(e2e.api(server, "POST", "/models?url=bad_dep.mar&initial_workers=1"))
    assert failed[:2] == (400, "ModelException")
    assert failed[2].startswith("Custom pip package installation failed for model bad_dep: ERROR:")
    assert "flambeau-no-such-dist" in failed[2]
    assert e2e.api(server, "GET", "/models/bad_dep").status == 404
    model_log = (server.log_dir / "model_log.log").read_text()
    assert "bad_dep_1.0-pip" in model_log

    assert e2e.api(server, "POST", "/models?url=uses_dep_venv.mar&initial_workers=1").status == 200
    assert e2e.describe(server, "uses_dep_venv")["useVenv"] is True
    in_venv = e2e.predict(server, "/predictions/uses_dep_venv", b"x").json()
    assert in_venv["value"] == 42
    assert in_venv["prefix"].endswith("/venv")
    assert in_venv["file"].startswith(in_venv["prefix"])
    for name in ("uses_dep", "uses_dep_venv"):
        assert e2e.api(server, "DELETE", f"/models/{name}").status == 200
