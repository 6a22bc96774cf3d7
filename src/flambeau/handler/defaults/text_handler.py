"""TextHandler: the base of the text handlers (TorchServe's ``text_handler``).

Text cleanup helpers (HTML tags, contractions, accents, punctuation), torchtext's
``basic_english`` tokenizer and ``ngrams_iterator`` re-implemented in plain Python, and the
``source_vocab.pt`` vocabulary: a ``{token: index}`` dict, or any object indexable by token
(a torchtext ``Vocab`` loads when torchtext is installed).
"""

from __future__ import annotations

import logging
import os
import re
import string
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flambeau.handler.base_handler import BaseHandler
from flambeau.handler.context import Context
from flambeau.handler.defaults.contractions import CONTRACTION_MAP

__all__ = ["TextHandler", "basic_english_tokenize", "ngrams_iterator"]

logger = logging.getLogger(__name__)

CLEANUP_REGEX = re.compile(r"<.*?>|&([a-z0-9]+|#[0-9]{1,6}|#x[0-9a-f]{1,6});")
CONTRACTIONS_PATTERN = re.compile(
    "({})".format("|".join(re.escape(k) for k in CONTRACTION_MAP)), flags=re.IGNORECASE
)
_BASIC_ENGLISH = [
    (re.compile(r"\'"), " '  "),
    (re.compile(r"\""), ""),
    (re.compile(r"\."), " . "),
    (re.compile(r"<br \/>"), " "),
    (re.compile(r","), " , "),
    (re.compile(r"\("), " ( "),
    (re.compile(r"\)"), " ) "),
    (re.compile(r"\!"), " ! "),
    (re.compile(r"\?"), " ? "),
    (re.compile(r"\;"), " "),
    (re.compile(r"\:"), " "),
    (re.compile(r"\s+"), " "),
]


def basic_english_tokenize(line: str) -> list[str]:
    """torchtext's ``get_tokenizer("basic_english")``: lowercase, split off punctuation."""
    line = line.lower()
    for pattern, replacement in _BASIC_ENGLISH:
        line = pattern.sub(replacement, line)
    return line.split()


def ngrams_iterator(token_list: Sequence[str], ngrams: int) -> Iterator[str]:
    """The tokens, then every n-gram up to ``ngrams`` joined by spaces (torchtext's)."""
    yield from token_list
    for n in range(2, ngrams + 1):
        for gram in zip(*[token_list[i:] for i in range(n)], strict=False):
            yield " ".join(gram)


def load_vocab(path: str) -> Any:
    """Load ``source_vocab.pt``: tensors-only pickles first, full unpickling as fallback
    (the archive's own code runs in this worker anyway, so it is already trusted)."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception:
        logger.debug("%s is not a plain vocabulary; unpickling it fully", path)
        return torch.load(path, weights_only=False)


class TextHandler(BaseHandler):
    """Adds ``source_vocab`` and the text cleanup helpers to BaseHandler."""

    def __init__(self) -> None:
        super().__init__()
        self.source_vocab: Any = None
        self.tokenizer = basic_english_tokenize
        self.input_text: Any = None
        self.lig: Any = None

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        self.initialized = False
        model_info = (self.manifest or {}).get("model") or {}
        source_vocab = model_info.get("sourceVocab")
        if source_vocab:  # backward compatibility with old manifests
            path = os.path.join(context.system_properties["model_dir"], source_vocab)
        else:
            path = self.get_source_vocab_path(context)
        self.source_vocab = load_vocab(path)
        self.initialized = True

    def get_source_vocab_path(self, ctx: Context) -> str:
        model_dir = ctx.system_properties.get("model_dir")
        source_vocab_path = os.path.join(str(model_dir), "source_vocab.pt")
        if os.path.isfile(source_vocab_path):
            return source_vocab_path
        raise FileNotFoundError(
            "Missing the source_vocab file. Refer default handler documentation for details "
            "on using text_handler."
        )

    def vocab_index(self, token: str) -> int:
        """Index of ``token``; unknown tokens map to ``<unk>`` (or 0) in a dict vocabulary."""
        vocab = self.source_vocab
        if isinstance(vocab, Mapping):
            return int(vocab.get(token, vocab.get("<unk>", 0)))
        return int(vocab[token])

    def _expand_contractions(self, text: str) -> str:
        def expand_match(contraction: re.Match[str]) -> str:
            match = contraction.group(0)
            expanded = CONTRACTION_MAP.get(match) or CONTRACTION_MAP.get(match.lower(), match)
            return match[0] + expanded[1:]

        text = CONTRACTIONS_PATTERN.sub(expand_match, text)
        return re.sub("'", "", text)

    def _remove_accented_characters(self, text: str) -> str:
        return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("utf-8")

    def _remove_html_tags(self, text: str) -> str:
        return CLEANUP_REGEX.sub("", text)

    def _remove_puncutation(self, *args: Any, **kwargs: Any) -> str:
        """The original, misspelled name, kept for compatibility."""
        return self._remove_punctuation(*args, **kwargs)

    def _remove_punctuation(self, text: str) -> str:
        return text.translate(str.maketrans("", "", string.punctuation))

    def _tokenize(self, text: str) -> list[str]:
        return self.tokenizer(text)

    @staticmethod
    def summarize_attributions(attributions: Any) -> Any:
        attributions = attributions.sum(dim=-1).squeeze(0)
        return attributions / attributions.norm()
