"""The workflow spec (the .war's YAML): parsed, checked, and turned into an immutable DAG.

A spec has a ``models:`` section (global node properties, then one mapping per model node with
its ``url`` and overrides) and a ``dag:`` section (node -> successors). A DAG node that is not a
model is a function node, defined in the workflow's handler file. Everything that can be wrong
with a spec is found here, before anything is registered: bad values, unknown or unused nodes,
cycles, functions missing from the handler (read with :mod:`ast`, never imported in the server).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from flambeau.plugins.builtin.workflows.errors import WorkflowSpecError

NODE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-.]*$")

# Spec key -> NodeSettings field. ``batch-size-delay`` is what TorchServe's first releases read.
PROPERTY_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "min-workers": "min_workers",
        "max-workers": "max_workers",
        "batch-size": "batch_size",
        "max-batch-delay": "max_batch_delay_ms",
        "batch-size-delay": "max_batch_delay_ms",
        "retry-attempts": "retry_attempts",
        "timeout-ms": "timeout_ms",
    }
)
_MINIMUM = {
    "min_workers": 0,
    "max_workers": 0,
    "batch_size": 1,
    "max_batch_delay_ms": 0,
    "retry_attempts": 0,
    "timeout_ms": 1,
}


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """A node's properties; the defaults are TorchServe's documented ones.

    ``retry_attempts`` counts retries after the first call, as TorchServe's DagExecutor does,
    so a node is called at most ``attempts`` = 1 + ``retry_attempts`` times.
    """

    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 50
    retry_attempts: int = 1
    timeout_ms: int = 10000

    @property
    def attempts(self) -> int:
        return 1 + self.retry_attempts

    def to_json(self) -> dict[str, int]:
        return {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "retryAttempts": self.retry_attempts,
            "timeoutMs": self.timeout_ms,
        }


NodeKind = Literal["model", "function"]


@dataclass(frozen=True, slots=True)
class Node:
    """One DAG node: a model (``url`` of its archive) or a function of the handler file."""

    name: str
    kind: NodeKind
    settings: NodeSettings
    url: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """A validated, acyclic workflow. Node order is the order of first appearance in ``dag:``."""

    defaults: NodeSettings
    nodes: Mapping[str, Node]
    successors: Mapping[str, tuple[str, ...]]
    predecessors: Mapping[str, tuple[str, ...]]
    dag_section: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def start_nodes(self) -> tuple[str, ...]:
        return tuple(name for name in self.nodes if not self.predecessors[name])

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(name for name in self.nodes if not self.successors[name])

    @property
    def function_nodes(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes.values() if n.kind == "function")

    @property
    def model_nodes(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes.values() if n.kind == "model")

    def dag_string(self) -> str:
        """The ``dag:`` section as Java's ``Map.toString()`` renders it (TorchServe's
        ``workflowDag``): ``{pre=[m1, m2], m1=[post]}``."""
        items = (f"{node}=[{', '.join(succ)}]" for node, succ in self.dag_section)
        return "{" + ", ".join(items) + "}"


def _int_property(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkflowSpecError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _apply(base: NodeSettings, entries: Mapping[str, Any], where: str) -> NodeSettings:
    changes: dict[str, int] = {}
    for key, value in entries.items():
        field = PROPERTY_KEYS[key]
        number = _int_property(value, key, where)
        if number < _MINIMUM[field]:
            raise WorkflowSpecError(f"{where}: {key} must be at least {_MINIMUM[field]}")
        changes[field] = number
    settings = replace(base, **changes)
    if settings.max_workers < settings.min_workers:
        if "max_workers" in changes:
            raise WorkflowSpecError(f"{where}: max-workers cannot be less than min-workers")
        # Only min-workers was raised here: the inherited maximum follows it up.
        settings = replace(settings, max_workers=settings.min_workers)
    return settings


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NODE_NAME.match(name):
        raise WorkflowSpecError(
            f"{where}: invalid node name {name!r} (allowed: {NODE_NAME.pattern})"
        )
    return name


def _parse_models(section: Any) -> tuple[NodeSettings, dict[str, tuple[str, Mapping[str, Any]]]]:
    if section is None:
        return NodeSettings(), {}
    if not isinstance(section, Mapping):
        raise WorkflowSpecError("spec: 'models' must be a mapping")
    global_props = {k: v for k, v in section.items() if k in PROPERTY_KEYS}
    defaults = _apply(NodeSettings(), global_props, "models")
    models: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for key, value in section.items():
        if key in PROPERTY_KEYS:
            continue
        if not isinstance(value, Mapping):
            raise WorkflowSpecError(
                f"models: unknown property {key!r} (properties: {', '.join(PROPERTY_KEYS)}; "
                "a model is a mapping with a url)"
            )
        name = _check_name(key, "models")
        unknown = sorted(str(k) for k in value if k != "url" and k not in PROPERTY_KEYS)
        if unknown:
            raise WorkflowSpecError(f"models.{name}: unknown key(s) {', '.join(unknown)}")
        url = value.get("url")
        if not isinstance(url, str) or not url.strip():
            raise WorkflowSpecError(f"models.{name}: a model needs a url")
        models[name] = (url.strip(), {k: v for k, v in value.items() if k != "url"})
    return defaults, models


def _parse_dag(section: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(section, Mapping) or not section:
        raise WorkflowSpecError("spec: 'dag' must be a non-empty mapping of node: [successors]")
    entries: list[tuple[str, tuple[str, ...]]] = []
    for key, value in section.items():
        node = _check_name(key, "dag")
        if value is None:
            successors: list[Any] = []
        elif isinstance(value, str):
            successors = [value]
        elif isinstance(value, list):
            successors = value
        else:
            raise WorkflowSpecError(f"dag.{node}: successors must be a list of node names")
        names = [_check_name(s, f"dag.{node}") for s in successors]
        entries.append((node, tuple(dict.fromkeys(names))))
    return tuple(entries)


def _find_cycle(successors: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None if the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in successors[node]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in successors:
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def parse_spec(data: Mapping[str, Any] | Any) -> WorkflowSpec:
    """Check a loaded spec and build its DAG; raises :class:`WorkflowSpecError` (400)."""
    if not isinstance(data, Mapping):
        raise WorkflowSpecError("spec: the workflow spec must be a YAML mapping")
    unknown = sorted(str(k) for k in data if k not in {"models", "dag"})
    if unknown:
        raise WorkflowSpecError(f"spec: unknown top-level key(s) {', '.join(unknown)}")
    defaults, models = _parse_models(data.get("models"))
    dag_section = _parse_dag(data.get("dag"))

    order: dict[str, None] = {}
    for node, succ in dag_section:
        order.setdefault(node)
        for s in succ:
            order.setdefault(s)
    successors: dict[str, tuple[str, ...]] = dict.fromkeys(order, ()) | dict(dag_section)
    predecessors: dict[str, list[str]] = {name: [] for name in order}
    for node, succ in dag_section:
        for s in succ:
            predecessors[s].append(node)
    cycle = _find_cycle(successors)
    if cycle:
        raise WorkflowSpecError(f"dag: the graph has a cycle: {' -> '.join(cycle)}")
    unused = [name for name in models if name not in order]
    if unused:
        raise WorkflowSpecError(
            f"models: {', '.join(unused)} declared but not used in the dag (a typo?)"
        )
    nodes: dict[str, Node] = {}
    for name in order:
        if name in models:
            url, overrides = models[name]
            settings = _apply(defaults, overrides, f"models.{name}")
            nodes[name] = Node(name, "model", settings, url)
        else:
            # TorchServe serves function nodes with one worker and batch size 1; the global
            # retry-attempts and timeout-ms still apply to them.
            settings = replace(
                defaults, min_workers=1, max_workers=1, batch_size=1, max_batch_delay_ms=0
            )
            nodes[name] = Node(name, "function", settings)
    return WorkflowSpec(
        defaults=defaults,
        nodes=MappingProxyType(nodes),
        successors=MappingProxyType(successors),
        predecessors=MappingProxyType({k: tuple(v) for k, v in predecessors.items()}),
        dag_section=dag_section,
    )


def defined_names(source: str, filename: str) -> tuple[set[str], set[str]]:
    """Top-level names a handler module defines (functions, classes, assignments, imports)
    and, apart, its ``async def`` functions; read without executing the module."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise WorkflowSpecError(
            f"handler {filename}: invalid Python at line {exc.lineno}: {exc.msg}"
        ) from None
    names: set[str] = set()
    coroutines: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.AsyncFunctionDef):
            coroutines.add(stmt.name)
        elif isinstance(stmt, ast.FunctionDef | ast.ClassDef):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            names.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            names.add(stmt.target.id)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in stmt.names)
    return names - coroutines, coroutines


def check_functions(spec: WorkflowSpec, handler: Path | None) -> None:
    """Refuse function nodes the handler file does not define (or no handler at all)."""
    functions = spec.function_nodes
    if not functions:
        return
    listing = ", ".join(functions)
    if handler is None:
        raise WorkflowSpecError(
            f"dag: node(s) {listing} are not models under 'models:' and the archive has no "
            "handler file to define them as functions"
        )
    source = handler.read_text(encoding="utf-8", errors="replace")
    names, coroutines = defined_names(source, handler.name)
    asynchronous = [f for f in functions if f in coroutines]
    if asynchronous:
        raise WorkflowSpecError(
            f"handler {handler.name}: function node(s) {', '.join(asynchronous)} are async; "
            "workers call node functions synchronously"
        )
    missing = [f for f in functions if f not in names]
    if missing:
        raise WorkflowSpecError(
            f"dag: node(s) {', '.join(missing)} are neither models under 'models:' nor "
            f"functions defined in the handler {handler.name}"
        )
