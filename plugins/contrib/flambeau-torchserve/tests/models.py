"""Tiny plain-torch models and their files, as a TorchServe user would have them on disk.

``tiny_net`` is the eager model the class handlers load (``model.py`` + a state_dict); the
text classifier is an ``EmbeddingBag`` model with ``source_vocab.pt`` and
``index_to_name.json`` for TorchServe's builtin ``text_classifier`` handler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HANDLERS = Path(__file__).parent / "handlers"

TINY_LABELS = {"0": "cat", "1": "dog", "2": "bird"}

TEXT_MODEL = """\
import torch
from torch import nn


class TextClassificationModel(nn.Module):
    def __init__(self, vocab_size=4, embed_dim=2, num_class=2):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, mode="mean")
        self.fc = nn.Linear(embed_dim, num_class)

    def forward(self, text, offsets):
        return self.fc(self.embedding(text, offsets))
"""
TEXT_VOCAB = {"<unk>": 0, "good": 1, "bad": 2, "movie": 3}
TEXT_LABELS = {"0": "positive", "1": "negative"}


def tiny_state_dict() -> dict[str, torch.Tensor]:
    """Deterministic weights for handlers/tiny_model.py's TinyNet (4 inputs, 3 classes)."""
    import torch

    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10 - 0.5
    return {"linear.weight": weight, "linear.bias": torch.tensor([0.1, -0.2, 0.3])}


def expected_tiny(values: list[float]) -> dict[str, float]:
    """What the class handler must answer for ``values``, computed here with torch."""
    import torch

    state = tiny_state_dict()
    logits = torch.as_tensor(values) @ state["linear.weight"].T + state["linear.bias"]
    probs = torch.softmax(logits, dim=0).tolist()
    return {TINY_LABELS[str(i)]: p for i, p in enumerate(probs)}


def write_tiny_files(directory: Path) -> dict[str, Path]:
    """The weights and label map the class handler's archive packs."""
    import torch

    weights = directory / "tiny.pt"
    torch.save(tiny_state_dict(), weights)
    labels = directory / "index_to_name.json"
    labels.write_text(json.dumps(TINY_LABELS))
    return {"weights": weights, "labels": labels}


def write_text_classifier(directory: Path) -> None:
    """model.py, model.pt, source_vocab.pt, index_to_name.json and two sample texts.

    "good" pushes class 0 (positive) and "bad" class 1 (negative): embedding rows one-hot,
    classifier weights 10 x identity, so the answer is certain, not a coin toss.
    """
    import torch

    (directory / "model.py").write_text(TEXT_MODEL)
    embedding = torch.zeros(4, 2)
    embedding[1, 0] = 1.0
    embedding[2, 1] = 1.0
    state = {
        "embedding.weight": embedding,
        "fc.weight": torch.eye(2) * 10,
        "fc.bias": torch.zeros(2),
    }
    torch.save(state, directory / "model.pt")
    torch.save(TEXT_VOCAB, directory / "source_vocab.pt")
    (directory / "index_to_name.json").write_text(json.dumps(TEXT_LABELS))
    (directory / "sample_text.txt").write_text("What a good movie!\n")
    (directory / "sample_text_bad.txt").write_text("A bad, BAD movie.\n")
