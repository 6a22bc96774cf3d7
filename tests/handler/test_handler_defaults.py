"""The builtin handlers on plain-torch models (no torchvision, Pillow, torchtext here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from handler_testlib import (
    body,
    json_request,
    namespace_of,
    raw_request,
    spec,
    write,
    write_manifest,
)

from flambeau.handler.defaults.text_handler import basic_english_tokenize, ngrams_iterator
from flambeau.handler.utils import load_label_mapping

CONV_SOURCE = """
import torch
from torch import nn


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
"""

SEGMENT_SOURCE = """
import torch
from torch import nn


class TinySegmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"out": self.conv(x), "aux": None}
"""

DETECTOR_SOURCE = """
import torch
from torch import nn


class FixedDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        out = []
        for image in images:
            level = float(image.mean())
            out.append({
                "boxes": torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3], [0.5, 0.5, 1, 1]]).float(),
                "labels": torch.tensor([1, 2, 3]),
                "scores": torch.tensor([0.9, 0.4, min(level, 1.0)]),
            })
        return out
"""

TEXT_SOURCE = """
import torch
from torch import nn


class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.EmbeddingBag(20, 5, mode="mean")
        self.fc = nn.Linear(5, 3)

    def forward(self, text, offsets):
        return self.fc(self.embedding(text, offsets))
"""

IMAGES = [
    [[[0.12 * (c + y + x) for x in range(5)] for y in range(5)] for c in range(3)],
    [[[0.3 * ((c * y + x) % 4) for x in range(5)] for y in range(5)] for c in range(3)],
]


def _eager_dir(root: Path, name: str, source: str, handler: str) -> tuple[Path, torch.nn.Module]:
    model_dir = root / name
    write(model_dir / "net.py", source)
    torch.manual_seed(7)
    (cls,) = [
        v for v in namespace_of(source).values() if isinstance(v, type) and v.__name__ != "nn"
    ]
    model = cls().eval()
    torch.save(model.state_dict(), model_dir / "net.pt")
    write_manifest(model_dir, handler=handler, modelFile="net.py", serializedFile="net.pt")
    return model_dir, model


def test_image_classifier_top5_with_labels(tmp_path: Path, load_service):
    model_dir, model = _eager_dir(tmp_path, "classifier", CONV_SOURCE, "image_classifier")
    labels = {str(i): ["n0", f"class-{i}"] for i in range(6)}
    write(model_dir / "index_to_name.json", json.dumps(labels))
    service = load_service(spec(model_dir, "image_classifier"))

    result = service.predict(
        [json_request(f"r{i}", img, name="data") for i, img in enumerate(IMAGES)]
    )

    assert result.code == 200
    with torch.no_grad():
        probs = model(torch.tensor(IMAGES)).softmax(1)
    for response, row in zip(result.responses, probs, strict=True):
        out = body(response)
        top = torch.topk(row, 5)
        assert list(out) == [f"class-{i}" for i in top.indices.tolist()]
        assert list(out.values()) == pytest.approx(top.values.tolist(), abs=1e-6)


def test_image_segmenter_per_pixel_class_and_probability(tmp_path: Path, load_service):
    model_dir, model = _eager_dir(tmp_path, "segmenter", SEGMENT_SOURCE, "image_segmenter")
    service = load_service(spec(model_dir, "image_segmenter"))

    (response,) = service.predict([json_request("a", IMAGES[1])]).responses

    grid = torch.tensor(body(response))
    assert grid.shape == (5, 5, 2)
    with torch.no_grad():
        prob = model(torch.tensor(IMAGES[1:]))["out"].softmax(1)[0]
    assert torch.equal(grid[..., 0].long(), prob.argmax(0))
    assert torch.allclose(grid[..., 1], prob.max(0).values, atol=1e-6)


def test_object_detector_keeps_confident_boxes(tmp_path: Path, load_service):
    model_dir, _ = _eager_dir(tmp_path, "detector", DETECTOR_SOURCE, "object_detector")
    write(
        model_dir / "index_to_name.json",
        json.dumps({"object_type_names": ["bg", "cat", "dog", "eel"]}),
    )
    service = load_service(spec(model_dir, "object_detector"))

    result = service.predict([json_request("a", IMAGES[0]), json_request("b", IMAGES[1])])

    first, second = (body(r) for r in result.responses)
    bright = float(torch.tensor(IMAGES[0]).mean())
    assert bright > 0.5
    assert first == [
        {"cat": [0.0, 0.0, 2.0, 2.0], "score": pytest.approx(0.9)},
        {"eel": [0.5, 0.5, 1.0, 1.0], "score": pytest.approx(min(bright, 1.0))},
    ]
    assert float(torch.tensor(IMAGES[1]).mean()) < 0.5
    assert second == [{"cat": [0.0, 0.0, 2.0, 2.0], "score": pytest.approx(0.9)}]


def test_text_classifier_classifies_every_request(tmp_path: Path, load_service):
    model_dir, model = _eager_dir(tmp_path, "text", TEXT_SOURCE, "text_classifier")
    words = ["<unk>", "the", "movie", "was", "not", "good", "great", "the movie", "was not"]
    vocab = {w: i for i, w in enumerate(words)}
    torch.save(vocab, model_dir / "source_vocab.pt")
    write(model_dir / "index_to_name.json", json.dumps({"0": "neg", "1": "neutral", "2": "pos"}))
    service = load_service(spec(model_dir, "text_classifier"))
    texts = ["The <b>movie</b> wasn't good!", "Great, great movie."]

    result = service.predict(
        [raw_request(str(i), t.encode(), "text/plain") for i, t in enumerate(texts)]
    )

    assert result.code == 200
    tokens = [
        ["the", "movie", "was", "not", "good"],
        ["great", "great", "movie"],
    ]
    ids = [[vocab.get(g, 0) for g in ngrams_iterator(t, 2)] for t in tokens]
    assert ids[0][:5] == [1, 2, 3, 4, 5]
    assert 7 in ids[0]
    assert 8 in ids[0]
    text = torch.tensor(ids[0] + ids[1])
    offsets = torch.tensor([0, len(ids[0])])
    with torch.no_grad():
        probs = model(text, offsets).softmax(1)
    for response, row in zip(result.responses, probs, strict=True):
        out = body(response)
        assert list(out) == ["neg", "neutral", "pos"]
        assert list(out.values()) == pytest.approx(row.tolist(), abs=1e-6)


def test_basic_english_tokenizer_and_ngrams():
    assert basic_english_tokenize("Hello, World! It's (me).") == [
        "hello",
        ",",
        "world",
        "!",
        "it",
        "'",
        "s",
        "(",
        "me",
        ")",
        ".",
    ]
    assert list(ngrams_iterator(["a", "b", "c"], 3)) == ["a", "b", "c", "a b", "b c", "a b c"]


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed"
)
def test_image_bytes_without_torchvision_fail_clearly(tmp_path: Path, load_service, caplog):
    model_dir, _ = _eager_dir(tmp_path, "classifier", CONV_SOURCE, "image_classifier")
    service = load_service(spec(model_dir, "image_classifier"))
    result = service.predict([raw_request("a", b"\x89PNG...", "image/png")])
    assert (result.code, result.message) == (503, "Prediction failed")
    assert "pip install torchvision pillow" in caplog.text


def test_label_mapping_formats(tmp_path: Path):
    assert load_label_mapping(tmp_path / "absent.json") is None
    write(tmp_path / "a.json", '{"0": ["n01", "tench"], "1": "goldfish"}')
    assert load_label_mapping(tmp_path / "a.json") == {"0": "tench", "1": "goldfish"}
    write(tmp_path / "b.json", "[1, 2]")
    with pytest.raises(ValueError, match="format"):
        load_label_mapping(tmp_path / "b.json")
