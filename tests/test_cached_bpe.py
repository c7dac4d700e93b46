"""Cutting Phi-3 rows into pieces before BPE (data/cached_bpe.py) gives the tokenizer's own ids, and is refused
where it would not."""

from __future__ import annotations

import json

import pytest
from helpers import GUANACO_JSONL, needs_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3tune.data import cached_bpe
from phi3tune.data.cached_bpe import CachedBPE, unsupported

FRAGMENTS = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\u2581", "\u2581\u2581", "a", "the", "Hello", "é", "日本語",
             "🙂", "👩‍👩‍👧", "\u00a0", "12345", "### Human:", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>",
             "<unk>", "a▁b", "x ", " y"]
TEXTS = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=30).map("".join)


def _plain(tok, texts):
    return [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)]


@needs_shared
def test_phi3_is_cut_and_all_alpaca_rows_keep_their_ids(phi3_tokenizer):
    before = phi3_tokenizer.backend_tokenizer.to_str()
    cut = CachedBPE.for_tokenizer(phi3_tokenizer)
    assert cut is not None, unsupported(phi3_tokenizer.backend_tokenizer)
    texts = [json.loads(line)["text"] for line in GUANACO_JSONL.read_text().splitlines() if line.strip()]
    assert len(texts) >= 999
    for lo in range(0, len(texts), 250):  # batches, so later ones run on a warm cache
        assert cut.encode(texts[lo:lo + 250]) == _plain(phi3_tokenizer, texts[lo:lo + 250])
    assert phi3_tokenizer.backend_tokenizer.to_str() == before  # the user's tokenizer is not changed


@needs_shared
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(TEXTS, min_size=1, max_size=6))
def test_phi3_ids_are_the_same_on_drawn_strings(phi3_tokenizer, batch):
    """Runs of spaces, newlines, tabs, a literal '▁', unicode, emoji, special tokens in the text."""
    cut = CachedBPE.for_tokenizer(phi3_tokenizer)
    assert cut is not None
    assert cut.encode(batch) == _plain(phi3_tokenizer, batch)
    assert cut.encode(batch[::-1]) == _plain(phi3_tokenizer, batch[::-1])  # now from the cache


@needs_shared
def test_a_full_cache_keeps_its_size_and_the_ids_stay_the_same(phi3_tokenizer, monkeypatch):
    monkeypatch.setattr(cached_bpe, "MAX_CACHED", 50)
    cut = CachedBPE.for_tokenizer(phi3_tokenizer)
    assert cut is not None
    texts = [json.loads(line)["text"] for line in GUANACO_JSONL.read_text().splitlines()[:40]]
    for i in range(0, 40, 4):
        assert cut.encode(texts[i:i + 4]) == _plain(phi3_tokenizer, texts[i:i + 4])
        assert len(cut._cache) == 50  # filled up to the bound, never past it


def _tiny_metaspace(extra_merge: bool):
    """A from-scratch BPE with Phi-3's pre-tokenizer; ``extra_merge`` adds the merge a + ▁ -> "a▁" (a token across
    a '▁'), ranked first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "▁", "a", "b", "c", "▁a", "▁b", "ab"]
    merges = [("▁", "a"), ("▁", "b"), ("a", "b")]
    if extra_merge:
        chars.append("a▁")
        merges.insert(0, ("a", "▁"))
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_a_token_across_a_space_refuses_the_cut_which_would_change_ids():
    ok, crossing = _tiny_metaspace(False), _tiny_metaspace(True)
    texts = ["a b", "ba a", "cab  a b", "a"]
    assert unsupported(ok.backend_tokenizer) is None
    cut = CachedBPE.for_tokenizer(ok)
    assert cut is not None and cut.encode(texts) == _plain(ok, texts)
    assert "'a▁'" in (unsupported(crossing.backend_tokenizer) or "")
    assert CachedBPE.for_tokenizer(crossing) is None
    forced = CachedBPE(crossing.backend_tokenizer)  # what cutting would have given: other ids
    assert forced.encode(texts) != _plain(crossing, texts)


def test_other_tokenizers_are_not_cut():
    from phi3tune.tiny import build_char_tokenizer

    assert CachedBPE.for_tokenizer(build_char_tokenizer()) is None  # the tests' character tokenizer: no Metaspace
    tok = _tiny_metaspace(False)
    tok.backend_tokenizer.enable_truncation(8)
    assert "truncation" in (unsupported(tok.backend_tokenizer) or "")


@needs_shared
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS.filter(bool), min_size=1, max_size=5), max_len=st.sampled_from([6, 64, 4096]))
def test_the_text_format_path_gives_the_one_row_reference(phi3_tokenizer, texts, max_len):
    """Through make_encoder (what prepare_data maps): ids, labels, eos and truncation as formats.encode."""
    from phi3tune.data.formats import encode
    from phi3tune.data.tokenize import make_encoder

    out = make_encoder(phi3_tokenizer, "text", "all", "text", max_len, None)({"text": texts})
    for i, text in enumerate(texts):
        ref = encode({"text": text}, phi3_tokenizer, "text", "all", "text", max_len)
        assert list(out["input_ids"][i]) == ref["input_ids"] and list(out["labels"][i]) == ref["labels"]
        assert out["truncated"][i] == ref["truncated"]


@pytest.mark.parametrize("scheme", ["always", "never"])
def test_other_prepend_schemes_keep_the_ids(scheme):
    from tokenizers import pre_tokenizers

    tok = _tiny_metaspace(False)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                                   split=False)
    texts = ["a b", " ab", "ab  ", "▁a", "c c c"]
    cut = CachedBPE.for_tokenizer(tok)
    assert cut is not None and cut.encode(texts) == _plain(tok, texts)
