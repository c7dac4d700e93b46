"""Every data format: the right tokens trained, auto-detection, determinism, summary."""

from __future__ import annotations

import json

import pytest
from helpers import ALPACA_JSON, needs_shared

from phi3tune import ConfigError, DataFormatError, DataSpec, prepare_dataset
from phi3tune.data import IGNORE, prepare_data
from phi3tune.data.formats import detect_format, split_guanaco

pytestmark = needs_shared

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And a number?"},
    {"role": "assistant", "content": "Seven, or maybe 42."},
]


def _trained_text(tok, row) -> str:
    return tok.decode([t for t in row["labels"] if t != IGNORE])


def _segments(tok, row) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    out, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


@pytest.fixture(scope="module")
def alpaca_rows():
    return json.loads(ALPACA_JSON.read_text())


def test_alpaca_trains_exactly_the_output_and_end(phi3_tokenizer, alpaca_rows):
    rows = alpaca_rows[:40]
    ds = prepare_dataset(DataSpec(source=rows, max_seq_length=1024), phi3_tokenizer)
    assert len(ds) == len(rows)
    for raw, row in zip(rows, ds):
        assert _segments(phi3_tokenizer, row) == [raw["output"] + "<|end|>"]
        prompt = phi3_tokenizer.decode(row["input_ids"])
        assert raw["instruction"] in prompt and (raw["input"] or "") in prompt
        # the whole prompt, system/user markers included, is untrained
        first = row["labels"].index(next(t for t in row["labels"] if t != IGNORE))
        assert phi3_tokenizer.decode(row["input_ids"][:first]).endswith("<|assistant|>\n")


def test_messages_multi_turn_trains_every_assistant_turn(phi3_tokenizer):
    ds = prepare_dataset(DataSpec(source=[{"messages": CHAT}]), phi3_tokenizer)
    assert _segments(phi3_tokenizer, ds[0]) == ["Blue.<|end|>", "Seven, or maybe 42.<|end|>"]
    text = phi3_tokenizer.decode(ds[0]["input_ids"])
    assert text.startswith("<|system|>\nYou are terse.<|end|>\n<|user|>\nName a colour.<|end|>\n<|assistant|>\n")


def test_sharegpt_conversations_and_prompt_completion(phi3_tokenizer):
    share = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]}]
    ds = prepare_dataset(DataSpec(source=share), phi3_tokenizer)
    assert _segments(phi3_tokenizer, ds[0]) == ["Hello there<|end|>"]
    pc = [{"prompt": "2+2=", "completion": "4"}]
    ds = prepare_dataset(DataSpec(source=pc), phi3_tokenizer)
    assert _segments(phi3_tokenizer, ds[0]) == ["4<|end|>"]


def test_guanaco_text_split_into_turns_completion_only(phi3_tokenizer):
    text = "### Human: What is 1+1? ### Assistant: 2. ### Human: And 2+2? ### Assistant: 4."
    assert [m["role"] for m in split_guanaco(text)] == ["user", "assistant", "user", "assistant"]
    ds = prepare_dataset(DataSpec(source=[{"text": text}], format="guanaco"), phi3_tokenizer)
    assert _segments(phi3_tokenizer, ds[0]) == ["2.<|end|>", "4.<|end|>"]
    # the same row as plain text trains every token (the classic recipe)
    plain = prepare_dataset(DataSpec(source=[{"text": text}]), phi3_tokenizer)
    assert plain[0]["labels"] == plain[0]["input_ids"]


def test_train_on_all_for_chat_and_completion_error_for_text(phi3_tokenizer):
    ds = prepare_dataset(DataSpec(source=[{"messages": CHAT}], train_on="all"), phi3_tokenizer)
    assert ds[0]["labels"] == ds[0]["input_ids"]
    with pytest.raises(ConfigError, match="train_on"):
        prepare_dataset(DataSpec(source=[{"text": "hi"}], train_on="completion"), phi3_tokenizer)


@pytest.mark.parametrize("columns,fmt", [
    (["text"], "text"), (["instruction", "input", "output"], "alpaca"), (["messages"], "messages"),
    (["conversations", "id"], "messages"), (["prompt", "completion"], "prompt_completion"),
])
def test_auto_detection(columns, fmt):
    assert detect_format(columns, "text") == fmt


@pytest.mark.parametrize("columns", [["body"], ["text", "instruction", "output"]])
def test_auto_detection_errors_list_columns_and_formats(columns):
    with pytest.raises(DataFormatError) as err:
        detect_format(columns, "text")
    msg = str(err.value)
    assert all(c in msg for c in columns)
    assert all(f in msg for f in ("alpaca", "messages", "prompt_completion", "guanaco"))


def test_auto_logs_its_choice(phi3_tokenizer, caplog):
    prepare_dataset(DataSpec(source=[{"prompt": "a", "completion": "b"}]), phi3_tokenizer)
    assert "prompt_completion" in caplog.text


def test_missing_column_for_explicit_format(phi3_tokenizer):
    with pytest.raises(DataFormatError, match="instruction"):
        prepare_dataset(DataSpec(source=[{"text": "x"}], format="alpaca"), phi3_tokenizer)


def test_processing_is_deterministic_and_summary_counts(phi3_tokenizer, alpaca_rows):
    spec = DataSpec(source=alpaca_rows[:200], max_seq_length=64, eval_fraction=0.1)
    a, b = prepare_data(spec, phi3_tokenizer, seed=3), prepare_data(spec, phi3_tokenizer, seed=3)
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["input_ids"] == b.eval["input_ids"]
    c = prepare_data(spec, phi3_tokenizer, seed=4)
    assert c.eval["input_ids"] != a.eval["input_ids"]
    s = a.summary
    assert s.examples == 180 and len(a.eval) == 20
    full = prepare_data(spec.model_copy(update={"max_seq_length": 4096}), phi3_tokenizer, seed=3)
    assert s.truncated == sum(len(x) > 64 for x in full.train["input_ids"]) > 0
    assert s.tokens == sum(len(x) for x in a.train["input_ids"])
    assert 0 < s.trained_fraction < 1
    assert "truncated" in s.render() and "trained tokens" in s.render()


def test_mixed_messages_and_conversations_columns(phi3_tokenizer, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                 '{"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}\n')
    ds = prepare_dataset(DataSpec(source=str(f)), phi3_tokenizer)
    assert [_segments(phi3_tokenizer, r) for r in ds] == [["b<|end|>"], ["d<|end|>"]]
