"""Tokenize SentencePiece-style BPE text (Phi-3's tokenizer.json) piece by piece through a word cache: the ids the
tokenizer gives, for less CPU time wherever words repeat (measured in docs/data.md).

Phi-3's pre-tokenizer (``Metaspace`` with ``split=False``) makes a whole row one BPE "word": the tokenizer merges
~800 characters per row from scratch and its own word cache never hits. Here a row is cut before every "▁"
that follows another character; each piece is looked up in a cache, and only pieces not seen yet go to the
tokenizer's own BPE model (read, never changed; the rest of the user's tokenizer is not used for them).

Why the ids are the same: a BPE merge joins two adjacent symbols into a token of the vocabulary. A merge across
a cut would make a token holding a non-"▁" character followed by "▁"; ``CachedBPE.for_tokenizer`` checks that no
token of the loaded vocabulary (which holds every merge's result) has one, so no merge crosses a cut and the
merges inside each piece are the ones (in the same order) made inside the whole row; byte fallback works per
character, so it is unchanged.
What the tokenizer does around the model is reproduced only where it is this simple (no normalizer, Metaspace,
no special tokens added); other tokenizers, empty rows and rows holding an added token (``<|user|>``) go to the
tokenizer itself.
"""

from __future__ import annotations

import logging
import re
from itertools import chain
from typing import Any

log = logging.getLogger("phi3tune")

SPACE = "\u2581"  # "▁", SentencePiece's space
_PIECE = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")  # cut before each "▁" that follows another character
_CROSSING = re.compile(f"[^{SPACE}]{SPACE}")
MAX_CACHED = 100_000  # pieces kept (~25 MB): once full, new pieces are tokenized but not kept (memory stays flat)


def crossing_tokens(vocab: Any) -> list[str]:
    """Tokens that hold a non-"▁" character followed by "▁": a merge could make one across a cut, so cutting is
    exact only when there is none. The vocabulary is enough: tokenizers refuses to load a BPE with a merge whose
    result is not in it."""
    return sorted(t for t in vocab if _CROSSING.search(t))


def unsupported(backend: Any) -> str | None:
    """Why ``backend`` (a ``tokenizers.Tokenizer``) cannot be cut into pieces exactly; None if it can."""
    from tokenizers import models, pre_tokenizers, processors

    model, pre, post = backend.model, backend.pre_tokenizer, backend.post_processor
    if backend.truncation is not None or backend.padding is not None:
        return "truncation or padding is set on it"
    if not isinstance(model, models.BPE) or model.dropout or model.ignore_merges:
        return "the model is not a plain BPE (no dropout, merges not ignored)"
    if model.continuing_subword_prefix or model.end_of_word_suffix:
        return "the BPE has a subword prefix or suffix"
    if backend.normalizer is not None:
        return "it has a normalizer"
    if not isinstance(pre, pre_tokenizers.Metaspace) or pre.replacement != SPACE or pre.split \
            or pre.prepend_scheme not in ("first", "always", "never"):
        return "its pre-tokenizer is not Metaspace('▁', split=False)"
    if post is not None and not (isinstance(post, processors.TemplateProcessing)
                                 and post.num_special_tokens_to_add(False) == 0):
        return "its post-processor adds tokens"
    vocab = backend.get_vocab(with_added_tokens=False)
    crossing = crossing_tokens(vocab)
    if crossing:
        return f"its vocabulary has tokens across a '▁' ({', '.join(map(repr, crossing[:3]))})"
    if SPACE not in vocab:
        return "its vocabulary has no '▁'"  # unknown characters on both sides of a cut would fuse
    return None


class CachedBPE:
    """``encode(texts)`` returns what ``backend_tokenizer.encode_batch_fast(texts)`` would, faster."""

    def __init__(self, backend: Any) -> None:
        from tokenizers import Tokenizer

        self._backend = backend  # the user's tokenizer, for rows we do not cut (used, never changed)
        self._bpe = Tokenizer(backend.model)  # its BPE model alone (shared, only read): one piece = one word
        self._prepend = backend.pre_tokenizer.prepend_scheme != "never"
        added = sorted((t.content for t in backend.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> CachedBPE | None:
        """A cutting encoder for ``tokenizer`` if cutting gives the same ids (``unsupported``), else None."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        why = "it is not a fast tokenizer" if backend is None else unsupported(backend)
        if why:
            log.debug("data: tokenizing whole rows: %s", why)
            return None
        return cls(backend)

    def _pieces(self, text: str) -> list[str] | None:
        if not text or (self._added is not None and self._added.search(text)):
            return None
        s = text.replace(" ", SPACE)
        return _PIECE.findall(SPACE + s if self._prepend and not s.startswith(SPACE) else s)

    def encode(self, texts: list[str]) -> list[list[int]]:
        cut = [self._pieces(t) for t in texts]
        new = list(set(chain.from_iterable(p for p in cut if p is not None)).difference(self._cache))
        if new:
            self._cache.update(zip(new, (e.ids for e in self._bpe.encode_batch_fast(new, add_special_tokens=False)),
                                   strict=True))
        whole = [t for t, p in zip(texts, cut, strict=True) if p is None]
        direct = iter([e.ids for e in self._backend.encode_batch_fast(whole, add_special_tokens=True)]
                      if whole else [])
        get = self._cache.__getitem__
        out = [next(direct) if p is None else list(chain.from_iterable(map(get, p))) for p in cut]
        for piece in new[:max(0, len(self._cache) - MAX_CACHED)]:  # full: keep the pieces seen first
            del self._cache[piece]
        return out
