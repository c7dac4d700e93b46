"""Packing: best fit, nothing lost or duplicated, positions restart, no attention across examples."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from helpers import rows_of_text, tiny_tuner

from phi3tune import DataSpec, prepare_dataset
from phi3tune.batching import Collator
from phi3tune.data import IGNORE
from phi3tune.data.packing import pack_best_fit
from phi3tune.loss import TokenLoss
from phi3tune.model import load_tokenizer


def _split_rows(ds):
    """Cut packed rows back into examples at every position-id restart."""
    out = []
    for row in ds:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in itertools.pairwise(starts):
            out.append((row["input_ids"][a:b], row["labels"][a:b], row["position_ids"][a:b]))
    return out


def test_best_fit_places_every_example_once_within_capacity():
    lengths = [5, 9, 3, 7, 7, 1, 10, 2, 12]
    rows = pack_best_fit(lengths, 10)
    placed = sorted(i for r in rows for i in r)
    assert placed == list(range(len(lengths)))
    assert all(sum(min(lengths[i], 10) for i in r) <= 10 for r in rows)
    assert len(rows) == 6  # 56 tokens (12 truncated to 10) need >= 6 rows of 10; best fit achieves it


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_packed_rows_restart_positions_and_lose_nothing(tok):
    rows = rows_of_text(40)
    plain = prepare_dataset(DataSpec(source=rows, max_seq_length=256), tok)
    packed = prepare_dataset(DataSpec(source=rows, max_seq_length=256, packing=True), tok)
    assert len(packed) < len(plain) / 2
    assert all(len(r["input_ids"]) <= 256 for r in packed)
    pieces = _split_rows(packed)
    assert Counter(tuple(p[0]) for p in pieces) == Counter(tuple(x) for x in plain["input_ids"])
    for ids, labels, pos in pieces:
        assert pos == list(range(len(ids)))
        assert labels[0] == IGNORE  # the pair straddling the boundary is never trained
        assert labels[1:] == ids[1:]


def test_long_example_is_truncated_not_split(tok):
    rows = [{"text": "z" * 300}, {"text": "short"}]
    packed = prepare_dataset(DataSpec(source=rows, max_seq_length=64, packing=True), tok)
    pieces = _split_rows(packed)
    assert sorted(len(p[0]) for p in pieces) == [6, 64]  # "short"+eos, and the long one cut at 64


def _losses(model, ds, tok):
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    loss = TokenLoss(model)
    with torch.no_grad():
        total = loss(batch["input_ids"], batch["labels"], batch["position_ids"])
        leaky = loss(batch["input_ids"], batch["labels"], None)  # positions not restarted: one long document
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return float(total) / n, float(leaky) / n


def test_packed_loss_equals_unpacked_and_leakage_would_show(tiny_model, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = rows_of_text(12, seed=1)
    plain = prepare_dataset(DataSpec(source=rows, max_seq_length=256), tok)
    packed = prepare_dataset(DataSpec(source=rows, max_seq_length=256, packing=True), tok)
    assert len(packed) < len(plain)
    # unpacked reference with the boundary token's label dropped, like packing does
    ref_rows = [{"input_ids": r["input_ids"], "labels": [IGNORE, *r["labels"][1:]]} for r in plain]
    ref, _ = _losses(model, ref_rows, tok)
    got, leaky = _losses(model, packed, tok)
    assert got == pytest.approx(ref, rel=1e-5)
    assert abs(leaky - ref) > 1e-4  # attending across examples would change the loss


def test_first_step_packed_equals_unpacked(tiny_model, tmp_path):
    rows = rows_of_text(8, seed=2)
    plain = tiny_tuner(tiny_model, tmp_path / "u", rows, batch_size=8).data(max_seq_length=256).run()
    packed = tiny_tuner(tiny_model, tmp_path / "p", rows, batch_size=8).data(max_seq_length=256, packing=True).run()
    a, b = plain.history[0], packed.history[0]
    assert a["trained_tokens"] == b["trained_tokens"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_padding_fraction_counts_right_padding():
    from phi3tune.batching import padding_fraction

    # batches [2, 4] -> 8 slots, 6 real; [3, 3] -> 6 slots, 6 real
    assert padding_fraction([2, 4, 3, 3], [0, 1, 2, 3], 2) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([5, 5], [0, 1], 2) == 0
