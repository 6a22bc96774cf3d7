"""The workflow spec parser: TorchServe's spec format, defaults, overrides and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flambeau.plugins.builtin.workflows.errors import WorkflowSpecError
from flambeau.plugins.builtin.workflows.spec import (
    NodeSettings,
    WorkflowSpec,
    check_functions,
    defined_names,
    parse_spec,
)

SEED_EXAMPLE = """
models:
  min-workers: 1
  max-workers: 4
  batch-size: 3
  max-batch-delay : 5000
  retry-attempts : 3
  timeout-ms : 5000
  m1:
    url : model1.mar
    min-workers: 1
    max-workers: 2
    batch-size: 4
  m2:
    url : model2.mar
  m3:
    url : model3.mar
    batch-size: 3
  m4:
    url : model4.mar
dag:
  pre_processing : [m1]
  m1 : [m2]
  m2 : [m3]
  m3 : [m4]
  m4 : [postprocessing]
"""


def spec_of(text: str) -> WorkflowSpec:
    return parse_spec(yaml.safe_load(text))


def test_seed_example_globals_and_per_model_overrides() -> None:
    spec = parse_spec(yaml.safe_load(SEED_EXAMPLE))
    assert spec.defaults == NodeSettings(1, 4, 3, 5000, 3, 5000)
    assert list(spec.nodes) == ["pre_processing", "m1", "m2", "m3", "m4", "postprocessing"]
    m1 = spec.nodes["m1"]
    assert (m1.kind, m1.url) == ("model", "model1.mar")
    assert m1.settings == NodeSettings(1, 2, 4, 5000, 3, 5000)
    assert spec.nodes["m2"].settings == spec.defaults
    assert spec.function_nodes == ("pre_processing", "postprocessing")
    # Function nodes: one worker, batch size 1, but the global retries and timeout.
    pre = spec.nodes["pre_processing"].settings
    assert (pre.min_workers, pre.max_workers, pre.batch_size) == (1, 1, 1)
    assert (pre.retry_attempts, pre.timeout_ms, pre.attempts) == (3, 5000, 4)
    assert spec.start_nodes == ("pre_processing",)
    assert spec.leaves == ("postprocessing",)
    assert spec.dag_string() == (
        "{pre_processing=[m1], m1=[m2], m2=[m3], m3=[m4], m4=[postprocessing]}"
    )


def test_parallel_dag_parents_and_torchserve_defaults() -> None:
    spec = spec_of(
        """
        models:
          model1: {url: a.mar}
          model2: {url: b.mar}
        dag:
          pre_processing: [model1, model2]
          model1: [aggregate_func]
          model2: [aggregate_func]
        """
    )
    assert spec.predecessors["aggregate_func"] == ("model1", "model2")
    assert spec.successors["pre_processing"] == ("model1", "model2")
    assert spec.defaults == NodeSettings(1, 1, 1, 50, 1, 10000)


def test_min_workers_override_lifts_inherited_max() -> None:
    spec = spec_of("models:\n  m: {url: m.mar, min-workers: 3}\ndag:\n  m: []\n")
    settings = spec.nodes["m"].settings
    assert (settings.min_workers, settings.max_workers) == (3, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dag:\n  a: [b]\n  b: [a]\n", "cycle: a -> b -> a"),
        ("dag:\n  a: [b]\n  b: [c]\n  c: [b]\n", "cycle: b -> c -> b"),
        ("dag:\n  a: [a]\n", "cycle: a -> a"),
        ("models: {}\n", "'dag' must be a non-empty mapping"),
        ("dag:\n  a: 3\n", "successors must be a list"),
        ("dag:\n  'a/b': []\n", "invalid node name"),
        ("models:\n  m: {url: m.mar}\ndag:\n  f: []\n", "m declared but not used"),
        ("models:\n  m: {min-workers: 1}\ndag:\n  m: []\n", "models.m: a model needs a url"),
        ("models:\n  m: {url: m.mar, workers: 2}\ndag:\n  m: []\n", "unknown key(s) workers"),
        ("models:\n  batch-size: two\ndag:\n  f: []\n", "batch-size must be an integer"),
        ("models:\n  batch-size: 0\ndag:\n  f: []\n", "batch-size must be at least 1"),
        ("models:\n  timeout-ms: true\ndag:\n  f: []\n", "timeout-ms must be an integer"),
        (
            "models:\n  m: {url: m.mar, min-workers: 3, max-workers: 2}\ndag:\n  m: []\n",
            "max-workers cannot be less than min-workers",
        ),
        ("models:\n  speed: 3\ndag:\n  f: []\n", "unknown property 'speed'"),
        ("dag:\n  f: []\nextra: 1\n", "unknown top-level key(s) extra"),
        ("- just a list\n", "must be a YAML mapping"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(WorkflowSpecError) as info:
        spec_of(text)
    assert message in info.value.message
    assert (info.value.status, info.value.error_type) == (400, "InvalidDAGException")


def test_function_nodes_must_be_defined_in_the_handler(tmp_path: Path) -> None:
    spec = parse_spec(yaml.safe_load("dag:\n  pre: [agg, helper]\n  agg: []\n"))
    handler = tmp_path / "h.py"
    handler.write_text(
        "import json\nfrom os import path as helper\n\ndef pre(data, context):\n    return data\n"
    )
    with pytest.raises(WorkflowSpecError, match=r"node\(s\) agg are neither models"):
        check_functions(spec, handler)
    handler.write_text("def pre(d, c): pass\nagg = lambda d, c: d\nhelper = None\n")
    check_functions(spec, handler)
    handler.write_text("def pre(d, c): pass\nasync def agg(d, c): pass\nhelper = 1\n")
    with pytest.raises(WorkflowSpecError, match="agg are async"):
        check_functions(spec, handler)
    with pytest.raises(WorkflowSpecError, match="no handler file"):
        check_functions(spec, None)
    handler.write_text("def pre(:\n")
    with pytest.raises(WorkflowSpecError, match="invalid Python at line 1"):
        check_functions(spec, handler)


def test_defined_names_reads_without_executing() -> None:
    names, coroutines = defined_names(
        "raise SystemExit('never run')\nclass K: pass\nx: int = 1\nimport a.b as c\n", "h.py"
    )
    assert names == {"K", "x", "c"}
    assert coroutines == set()
