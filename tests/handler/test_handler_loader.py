"""Handler resolution (module[:function], classes, builtins, registry, module isolation)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from handler_testlib import (
    MLP_CLASS_HANDLER,
    MLP_SOURCE,
    body,
    json_request,
    make_mlp_dir,
    spec,
    write,
)

from flambeau.handler.base_handler import BaseHandler
from flambeau.handler.defaults.image_classifier import ImageClassifier
from flambeau.handler.errors import HandlerLoadError
from flambeau.handler.loader import (
    BUILTIN_HANDLERS,
    activate_model_dir,
    deactivate_model_dir,
    entry_point_from_module,
    load_entry_point,
    parse_handler,
)


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        ("my_handler", ("my_handler", None)),
        ("my_handler.py", ("my_handler", None)),
        ("/abs/path/my_handler.py:infer", ("my_handler", "infer")),
        ("rel/dir/my_handler:infer", ("my_handler", "infer")),
        ("pkg.mod:fn", ("pkg.mod", "fn")),
        ("image_classifier", ("image_classifier", None)),
        ("h.py:", ("h", None)),
    ],
)
def test_parse_handler(handler, expected):
    assert parse_handler(handler) == expected


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(source, module.__dict__)
    for value in vars(module).values():
        if isinstance(value, type):
            value.__module__ = name
    return module


def test_function_named_handle_wins_over_classes():
    module = _module("m1", "class A:\n    pass\n\ndef handle(data, context):\n    return data\n")
    entry = entry_point_from_module(module)
    assert entry.handle is module.handle
    assert entry.instance is None


def test_single_class_is_instantiated():
    module = _module(
        "m2",
        "class H:\n    def initialize(self, ctx):\n        self.ctx = ctx\n"
        "    def handle(self, data, context):\n        return data\n",
    )
    entry = entry_point_from_module(module)
    assert isinstance(entry.instance, module.H)
    entry.initialize("ctx")
    assert entry.instance.ctx == "ctx"


def test_the_one_class_with_handle_is_chosen_among_several():
    module = _module(
        "m3",
        "class Net:\n    pass\n\n"
        "class H:\n    def handle(self, data, context):\n        return 1\n",
    )
    assert isinstance(entry_point_from_module(module).instance, module.H)


def test_ambiguous_or_missing_classes_are_rejected():
    two = _module("m4", "class A:\n    def handle(self, d, c): pass\nclass B(A):\n    pass\n")
    with pytest.raises(ValueError, match="Expected only one class"):
        entry_point_from_module(two)
    none = _module("m5", "X = 1\n")
    with pytest.raises(ValueError, match="Expected only one class"):
        entry_point_from_module(none)
    no_handle = _module("m6", "class A:\n    pass\n")
    with pytest.raises(ValueError, match="Expect handle method"):
        entry_point_from_module(no_handle)
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        entry_point_from_module(no_handle, "nope")


def test_module_colon_class_names_a_class_handler():
    module = _module(
        "m7", "class A:\n    def handle(self, d, c): return 'a'\nclass B(A):\n    pass\n"
    )
    assert isinstance(entry_point_from_module(module, "B").instance, module.B)


def test_builtin_names_resolve_to_default_handlers():
    assert type(load_entry_point("image_classifier").instance) is ImageClassifier
    assert type(load_entry_point("base_handler").instance) is BaseHandler
    assert set(BUILTIN_HANDLERS) >= {
        "base_handler",
        "image_classifier",
        "text_classifier",
        "object_detector",
        "image_segmenter",
    }


def test_registry_names_resolve_to_plugin_targets():
    entry = load_entry_point("echo", registry={"echo": "json:dumps"})
    assert entry.handle is sys.modules["json"].dumps


def test_a_file_in_the_model_dir_wins_over_a_builtin_name(tmp_path: Path):
    model_dir = tmp_path / "m"
    write(model_dir / "image_classifier.py", "def handle(data, context):\n    return ['mine']\n")
    token = activate_model_dir(model_dir)
    try:
        entry = load_entry_point("image_classifier", model_dir)
        assert entry.handle(None, None) == ["mine"]
    finally:
        deactivate_model_dir(token)
        sys.modules.pop("image_classifier", None)


def test_unknown_module_error_names_the_places_searched(tmp_path: Path):
    with pytest.raises(ModuleNotFoundError, match="not found in the model directory") as info:
        load_entry_point("nowhere_handler", tmp_path)
    assert "image_classifier" in str(info.value)


def test_two_models_with_same_module_names_stay_apart(tmp_path: Path, load_service):
    """Thread workers share sys.modules: each model must still get its own model.py."""
    first_dir, first = make_mlp_dir(tmp_path, "first", seed=1)
    second_dir = tmp_path / "second"
    write(
        second_dir / "model.py",
        """
        import torch
        from torch import nn


        class Doubler(nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = nn.Parameter(torch.tensor(2.0))

            def forward(self, x):
                return x * self.scale
        """,
    )
    write(second_dir / "mlp_handler.py", MLP_CLASS_HANDLER.replace("range(3)", "range(4)"))
    torch.save({"scale": torch.tensor(2.0)}, second_dir / "weights.pt")
    write(
        second_dir / "MAR-INF" / "MANIFEST.json",
        '{"model": {"modelFile": "model.py", "serializedFile": "weights.pt"}}',
    )

    one = load_service(spec(first_dir, "mlp_handler"))
    two = load_service(spec(second_dir, "mlp_handler"))

    row = [1.0, 2.0, 3.0, 4.0]
    got_one = body(one.predict([json_request("a", row)]).responses[0])
    got_two = body(two.predict([json_request("a", row)]).responses[0])
    with torch.no_grad():
        expected_one = first(torch.tensor([row]))[0].tolist()
    assert torch.allclose(torch.tensor(got_one["logits"]), torch.tensor(expected_one))
    assert got_two["logits"] == [2.0, 4.0, 6.0, 8.0]
    assert type(one.handler.model).__name__ == "TinyMLP"
    assert type(two.handler.model).__name__ == "Doubler"


def test_load_error_for_module_without_entry_point(tmp_path: Path, load_service):
    model_dir = tmp_path / "m"
    write(model_dir / "empty_handler.py", "VALUE = 1\n")
    with pytest.raises(HandlerLoadError, match="Expected only one class"):
        load_service(spec(model_dir, "empty_handler"))


def test_concurrent_loads_in_threads_stay_apart(tmp_path: Path):
    """Thread workers load at the same time; each must end up with its own model.py."""
    from concurrent.futures import ThreadPoolExecutor

    from flambeau.handler.service import ModelService

    dirs = [make_mlp_dir(tmp_path, f"m{seed}", seed=seed) for seed in range(4)]
    for seed, (model_dir, _) in enumerate(dirs):  # a different model.py in every dir
        forward = "self.fc2(torch.relu(self.fc1(x)))"
        write(model_dir / "model.py", MLP_SOURCE.replace(forward, f"{forward} * 0 + {seed}"))
    with ThreadPoolExecutor(4) as pool:
        services = list(pool.map(lambda d: ModelService.load(spec(d[0], "mlp_handler")), dirs))
    try:
        row = [0.3, -0.2, 1.0, 2.0]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda s: s.predict([json_request("a", row)]), services))
        logits = [body(r.responses[0])["logits"] for r in results]
        assert logits == [[float(seed)] * 3 for seed in range(4)]
    finally:
        for service in services:
            service.close()
