"""The DAG executor: one workflow request through every node, branches concurrently.

Each node runs as an asyncio task as soon as all its parents are done, so parallel branches
overlap. A start node receives the request's inputs and headers; a node with one parent gets
that parent's output as input ``body``; a node with several parents gets one input per parent,
named after it (TorchServe's rules). Outputs travel as the worker returned them, bytes plus
content type, so tensors and binary data reach the next node untouched and a node that labels
its output ``application/json`` hands its successor a decoded object. Every node call has its
own timeout (``timeout-ms``) and ``retry-attempts`` retries; the first node that fails on every
attempt fails the request with a message naming it, and the other branches are cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from flambeau.api import FlambeauError, RequestInput, WorkerRequest, WorkerResponse
from flambeau.plugins.builtin.workflows.errors import NodeExecutionError
from flambeau.plugins.builtin.workflows.spec import WorkflowSpec

log = logging.getLogger("flambeau.workflows")

JSON = "application/json"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeSubmitter(Protocol):
    """How the executor reaches a node's model: the model manager's ``submit``."""

    def submit(
        self, name: str, version: str | None, request: WorkerRequest
    ) -> asyncio.Future[WorkerResponse]: ...


@dataclass(frozen=True, slots=True)
class NodeTarget:
    """The registered model version that serves a node."""

    model: str
    version: str


@dataclass(frozen=True, slots=True)
class NodeOutput:
    """What a node produced, exactly as its worker returned it."""

    node: str
    body: bytes
    content_type: str


class WorkflowMetrics:
    """Per-node and per-request families in the server's metrics (shown by ``/metrics``)."""

    def __init__(self, metrics: Any) -> None:
        node = ("workflow", "workflow_version", "node")
        # flambeau's own families: shown by /metrics, never written as TorchServe metric logs.
        extra = {"origin": "flambeau"}
        self.executions = metrics.family(
            "flambeau_workflow_node_executions_total", "counter", "Count", node,
            help="Node calls made, retries included", **extra,
        )  # fmt: skip
        self.failures = metrics.family(
            "flambeau_workflow_node_failures_total", "counter", "Count", (*node, "reason"),
            help="Node calls that failed (reason: error or timeout)", **extra,
        )  # fmt: skip
        self.latency = metrics.family(
            "flambeau_workflow_node_latency_seconds", "histogram", "Seconds", node,
            help="Node call latency, queueing included", buckets=LATENCY_BUCKETS, **extra,
        )  # fmt: skip
        self.requests = metrics.family(
            "flambeau_workflow_requests_total", "counter", "Count",
            ("workflow", "workflow_version", "outcome"),
            help="Workflow predictions by outcome (ok or error)", **extra,
        )  # fmt: skip
        self.request_latency = metrics.family(
            "flambeau_workflow_latency_seconds", "histogram", "Seconds",
            ("workflow", "workflow_version"),
            help="Whole workflow prediction latency", buckets=LATENCY_BUCKETS, **extra,
        )  # fmt: skip

    def node_call(self, labels: tuple[str, str, str], seconds: float, failure: str | None) -> None:
        self.executions.inc(labels)
        self.latency.observe(labels, seconds)
        if failure is not None:
            self.failures.inc((*labels, failure))

    def request(self, workflow: str, version: str, seconds: float, ok: bool) -> None:
        self.requests.inc((workflow, version, "ok" if ok else "error"))
        self.request_latency.observe((workflow, version), seconds)


class DagExecutor:
    """Runs requests through one registered workflow version; stateless between requests."""

    def __init__(
        self,
        workflow: str,
        version: str,
        spec: WorkflowSpec,
        targets: Mapping[str, NodeTarget],
        submitter: NodeSubmitter,
        metrics: WorkflowMetrics | None = None,
    ) -> None:
        missing = [n for n in spec.nodes if n not in targets]
        if missing:
            raise ValueError(f"no model registered for node(s) {missing}")
        self.workflow = workflow
        self.version = version
        self.spec = spec
        self.targets = dict(targets)
        self.submitter = submitter
        self.metrics = metrics

    async def execute(self, request: WorkerRequest) -> list[NodeOutput]:
        """Run the DAG; the leaves' outputs in DAG order, or NodeExecutionError."""
        spec = self.spec
        waiting = {name: len(parents) for name, parents in spec.predecessors.items()}
        outputs: dict[str, NodeOutput] = {}
        running: dict[asyncio.Task[NodeOutput], str] = {}

        def launch(node: str) -> None:
            task = asyncio.create_task(self._run_node(node, self._inputs(node, request, outputs)))
            running[task] = node

        for node in spec.start_nodes:
            launch(node)
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node = running.pop(task)
                    outputs[node] = task.result()
                    for child in spec.successors[node]:
                        waiting[child] -= 1
                        if waiting[child] == 0:
                            launch(child)
        finally:
            # A failed node (or a client that went away) stops the branches still running;
            # cancelling their futures drops jobs that have not reached a worker yet.
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return [outputs[leaf] for leaf in spec.leaves]

    def _inputs(
        self, node: str, request: WorkerRequest, outputs: Mapping[str, NodeOutput]
    ) -> WorkerRequest:
        parents = self.spec.predecessors[node]
        if not parents:
            inputs = [RequestInput(i.name, i.value, i.content_type) for i in request.inputs]
        elif len(parents) == 1:
            out = outputs[parents[0]]
            inputs = [RequestInput("body", out.body, out.content_type)]
        else:
            inputs = [RequestInput(p, outputs[p].body, outputs[p].content_type) for p in parents]
        return WorkerRequest("", dict(request.headers), inputs)

    async def _run_node(self, node: str, template: WorkerRequest) -> NodeOutput:
        settings = self.spec.nodes[node].settings
        target = self.targets[node]
        timeout_s = settings.timeout_ms / 1000.0
        labels = (self.workflow, self.version, node)
        reason = ""
        for attempt in range(1, settings.attempts + 1):
            # A fresh id per call: the worker pool matches responses to jobs by request id.
            request = WorkerRequest(str(uuid.uuid4()), template.headers, template.inputs)
            started = time.monotonic()
            failure = "error"
            try:
                future = self.submitter.submit(target.model, target.version, request)
                response = await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                failure = "timeout"
                reason = f"timed out after {settings.timeout_ms} ms"
            except FlambeauError as exc:
                reason = f"{exc.status} {exc.message}"
            else:
                if response.status < 400:
                    if self.metrics is not None:
                        self.metrics.node_call(labels, time.monotonic() - started, None)
                    return NodeOutput(node, response.body, response.content_type)
                detail = response.reason or response.body[:200].decode("utf-8", "replace")
                reason = f"{response.status} {detail}".rstrip()
            if self.metrics is not None:
                self.metrics.node_call(labels, time.monotonic() - started, failure)
            log.warning(
                "workflow %s node %s attempt %d/%d failed: %s",
                self.workflow, node, attempt, settings.attempts, reason,
            )  # fmt: skip
        raise NodeExecutionError(node, settings.attempts, reason)


def leaf_value(output: NodeOutput) -> Any:
    """A leaf's output as a JSON value, for the several-leaves answer: JSON (labelled or
    not) decoded, other UTF-8 text as a string, anything else base64-encoded."""
    media_type = output.content_type.split(";", 1)[0].strip().lower()
    try:
        text = output.body.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(output.body).decode("ascii")
    if media_type in {"", JSON} or media_type.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def render_leaves(leaves: list[NodeOutput]) -> tuple[bytes, str]:
    """TorchServe's answer: one leaf's bytes as they are (``application/json`` unless the
    node set a content type), or ``{leaf: value}`` for several leaves."""
    if len(leaves) == 1:
        return leaves[0].body, leaves[0].content_type or JSON
    document = {leaf.node: leaf_value(leaf) for leaf in leaves}
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode(), JSON
