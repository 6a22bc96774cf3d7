"""TextClassifier: ``{label: probability}`` per text (TorchServe's default handler).

The model is an ``EmbeddingBag`` style classifier called as ``model(tokens, offsets)``. Unlike
TorchServe's, which classifies only the first request, every request of a batch is classified
(all token ids concatenated, one offset per request).
"""

from __future__ import annotations

from typing import Any

from flambeau.handler.defaults.text_handler import TextHandler, ngrams_iterator
from flambeau.handler.utils import map_class_to_label, timed

__all__ = ["TextClassifier"]


class TextClassifier(TextHandler):
    """Bag-of-ngrams text classification with ``source_vocab.pt`` and ``index_to_name.json``."""

    ngrams = 2

    def __init__(self) -> None:
        super().__init__()
        self._offsets: Any = None
        self._tokens: list[list[str]] = []

    def _normalize(self, text: Any) -> list[str]:
        if isinstance(text, bytes | bytearray):
            text = text.decode("utf-8")
        text = self._remove_html_tags(str(text))
        text = text.lower()
        text = self._expand_contractions(text)
        text = self._remove_accented_characters(text)
        text = self._remove_punctuation(text)
        return self._tokenize(text)

    @timed
    def preprocess(self, data: list[dict[str, Any]]) -> Any:
        """Token ids of all requests, concatenated; the offsets are kept for inference."""
        import torch

        ids: list[int] = []
        offsets: list[int] = []
        self._tokens = []
        for row in data:
            tokens = self._normalize(row.get("data") or row.get("body") or "")
            self._tokens.append(tokens)
            offsets.append(len(ids))
            ids.extend(self.vocab_index(t) for t in ngrams_iterator(tokens, self.ngrams))
        self.input_text = self._tokens[0] if self._tokens else None
        self._offsets = torch.as_tensor(offsets, dtype=torch.long, device=self.device)
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    @timed
    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        offsets, self._offsets = self._offsets, None
        if offsets is None:  # a subclass's preprocess gave one request's ids
            offsets = torch.as_tensor([0], device=self.device)
        return super().inference(data, offsets, *args, **kwargs)

    @timed
    def postprocess(self, data: Any) -> list[dict[str, float]]:
        import torch.nn.functional as F

        return map_class_to_label(F.softmax(data, dim=1).tolist(), self.mapping)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any = 0) -> Any:
        """Layer-integrated-gradient word importances of the first request (needs Captum)."""
        import torch

        try:
            from captum.attr import LayerIntegratedGradients
        except ImportError as exc:
            raise ImportError("explanations need Captum: pip install captum") from exc
        if self.lig is None:
            self.lig = LayerIntegratedGradients(self.model, self.model.embedding)
        offsets = torch.as_tensor([0], device=self.device)
        attributions, delta = self.lig.attribute(
            tensor_data,
            additional_forward_args=offsets,
            target=target,
            return_convergence_delta=True,
        )
        importances = self.summarize_attributions(attributions)
        return [
            {
                "words": self.input_text,
                "importances": importances.tolist(),
                "delta": delta[0].tolist(),
            }
        ]
