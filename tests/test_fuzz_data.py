"""Fuzz the data path: random rows in every format go through prepare_data and the collator.

Whatever the rows hold (unicode, empty strings, huge fields, missing keys, wrong types), the only errors that
may escape are phi3tune's named ones; and when data is accepted, every trained label is the input token at its
position and no trained label ever sits on a pad.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phi3tune import DataSpec, Phi3TuneError
from phi3tune.batching import Collator
from phi3tune.data import IGNORE, prepare_data
from phi3tune.model import load_tokenizer

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

text = st.one_of(st.text(max_size=40),  # any unicode (no surrogates), often empty
                 st.sampled_from(["", " ", "\n", "<|end|>", "<|assistant|>\n", "### Assistant:", "\x00", "é" * 3]),
                 st.integers(300, 5000).map(lambda n: "ab\u00e9\U0001f600" * n))  # huge, beyond any max length
wrong = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.lists(st.text(max_size=3),
                                                                                                   max_size=2))
value = st.one_of(*[text] * 6, wrong)  # mostly text


def rows_with(keys: list[str], extra: tuple[str, ...] = ("extra",), field: Any = value) -> Any:
    """Lists of rows: mostly with every key, sometimes with keys missing; ``field`` draws each value."""
    full = st.fixed_dictionaries({k: field for k in keys}, optional={k: field for k in extra})
    partial = st.fixed_dictionaries({}, optional={k: field for k in [*keys, *extra]})
    return st.lists(st.one_of(*[full] * 5, partial), min_size=1, max_size=5)


def typed_rows(keys: list[str]) -> Any:
    """Well-typed rows (every key holds text, maybe empty or huge): what real data looks like."""
    return st.lists(st.fixed_dictionaries({k: text for k in keys}), min_size=1, max_size=5)


def guanaco(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "text": f"### Human: {r['text']} ### Assistant: {r['text']}"} if isinstance(r.get("text"), str)
            else r for r in rows]


def message_rows(turn: Any, content: Any) -> Any:
    rows = st.lists(st.fixed_dictionaries({"messages": content}), min_size=1, max_size=4)
    return rows | rows.map(lambda rs: [{"conversations": r["messages"]} for r in rs])  # ShareGPT column name


role = st.sampled_from(["user", "assistant", "assistant", "system", "human", "gpt", "Robot", None, 3])
turn = st.one_of(
    *[st.fixed_dictionaries({"role": role, "content": value})] * 4,
    st.fixed_dictionaries({"from": role, "value": value}),  # ShareGPT
    st.fixed_dictionaries({}, optional={"role": role, "content": value, "value": text}),  # keys missing
)
good_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text})
reply = st.fixed_dictionaries({"role": st.just("assistant"), "content": text})  # a conversation to learn from

# format -> (hostile rows: anything at all, typed rows: right keys holding unicode/empty/huge text)
SOURCES = {
    "text": (rows_with(["text"]), typed_rows(["text"])),
    "guanaco": (rows_with(["text"]).map(guanaco) | rows_with(["text"]), typed_rows(["text"]).map(guanaco)),
    "alpaca": (rows_with(["instruction", "output"], ("input",)), typed_rows(["instruction", "input", "output"])),
    "prompt_completion": (rows_with(["prompt", "completion"]), typed_rows(["prompt", "completion"])),
    "messages": (message_rows(turn, st.one_of(*[st.lists(turn, max_size=4)] * 6, wrong)),
                 message_rows(good_turn, st.tuples(st.lists(good_turn, max_size=3), reply).map(
                     lambda t: [*t[0], t[1]]))),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def check_prepared(rows: Any, tok: Any, max_len: int) -> None:
    """Labels are IGNORE or the token at that position; pads are never trained, padded or padding-free."""
    examples = [rows[i] for i in range(len(rows))]
    assert examples, "prepare_data returned no rows without raising"
    for ex in examples:
        assert len(ex["input_ids"]) == len(ex["labels"]) <= max_len
        assert all(la in (IGNORE, tok_id) for la, tok_id in zip(ex["labels"], ex["input_ids"]))
    for padding_free in (False, True):
        batch = Collator(tok.pad_token_id, padding_free=padding_free)(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        trained = labels != IGNORE
        assert torch.equal(labels[trained], ids[trained])
        if not padding_free:
            for i, ex in enumerate(examples):
                assert not trained[i, len(ex["input_ids"]):].any(), "a trained label on a pad position"
        assert int(batch["num_real_tokens"]) == sum(len(ex["input_ids"]) for ex in examples)


def fuzz_once(rows: list[dict[str, Any]], fmt: str, tok: Any, max_len: int, packing: bool,
              train_on: str, system_prompt: str | None) -> None:
    spec = DataSpec(source=rows, format=fmt, max_seq_length=max_len, packing=packing,  # type: ignore[arg-type]
                    train_on=train_on, system_prompt=system_prompt)  # type: ignore[arg-type]
    try:
        data = prepare_data(spec, tok)
    except Phi3TuneError as exc:
        assert str(exc).strip()  # a named error with a message is the accepted way to refuse
        event(f"refused: {type(exc).__name__}: {str(exc)[:40]}")
        return
    event("accepted")
    check_prepared(data.train, tok, max_len)


common = dict(max_len=st.integers(8, 96), packing=st.booleans(),
              train_on=st.sampled_from(["auto", "all", "completion"]),
              system_prompt=st.one_of(st.none(), st.text(max_size=10)))


@pytest.mark.parametrize("kind", ["hostile", "typed"])
@pytest.mark.parametrize("fmt", list(SOURCES))
@FUZZ
@given(data=st.data(), **common)
def test_fuzz_each_format(tokenizer, fmt, kind, data, max_len, packing, train_on, system_prompt):
    rows = data.draw(SOURCES[fmt][kind == "typed"], label="rows")
    fuzz_once(rows, fmt, tokenizer, max_len, packing, train_on, system_prompt)


@FUZZ
@given(rows=st.one_of(*(s for pair in SOURCES.values() for s in pair)), **common)
def test_fuzz_auto_format(tokenizer, rows, max_len, packing, train_on, system_prompt):
    fuzz_once(rows, "auto", tokenizer, max_len, packing, train_on, system_prompt)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"text": st.text(alphabet="ab ", min_size=1, max_size=30)}),
                     min_size=1, max_size=6), max_len=st.integers(8, 40), packing=st.booleans())
def test_fuzz_plain_text_is_always_accepted(tokenizer, rows, max_len, packing):
    """Non-empty text rows are good data: they must be accepted, fully trained but for the packing boundary."""
    data = prepare_data(DataSpec(source=rows, max_seq_length=max_len, packing=packing), tokenizer)
    check_prepared(data.train, tokenizer, max_len)
    assert data.summary.trained_tokens > 0


@pytest.mark.parametrize("fmt", ["messages", "alpaca", "guanaco"])
@settings(FUZZ, max_examples=25)
@given(data=st.data(), **common)
def test_fuzz_with_the_real_phi3_tokenizer(phi3_tokenizer, fmt, data, max_len, packing, train_on, system_prompt):
    """The same with Phi-3's own tokenizer, whose tokens span several characters (offsets, merges)."""
    rows = data.draw(SOURCES[fmt][1], label="rows")
    fuzz_once(rows, fmt, phi3_tokenizer, max_len, packing, train_on, system_prompt)
