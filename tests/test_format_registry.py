"""User data formats: a registered format gives exactly the tokens, labels and packed rows of the built-in format
it maps to, and the same errors."""

from __future__ import annotations

import pytest

from phi3tune import DataFormatError, DataSpec, prepare_dataset, register_format, registered_formats
from phi3tune.data.registry import unregister_format

QA = [{"q": f"copy {w}", "a": w, "id": i} for i, w in enumerate(["ab", "cdefg", "h", "abcabcabc", "gg", "fedcba"])]


@pytest.fixture
def tokenizer(tiny_model):
    from phi3tune.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(autouse=True)
def _clean_registry():
    before = set(registered_formats())
    yield
    for name in set(registered_formats()) - before:
        unregister_format(name)


def _rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


@pytest.mark.parametrize("packing", [False, True])
def test_registered_prompt_completion_format_equals_the_builtin(tokenizer, packing):
    @register_format("qa", columns=["q", "a"])
    def qa(row):
        return {"prompt": row["q"], "completion": row["a"]}

    kw = dict(max_seq_length=40, packing=packing, system_prompt="Be exact.")
    ours = prepare_dataset(DataSpec(source=QA, format="qa", **kw), tokenizer)
    builtin = prepare_dataset(DataSpec(source=[{"prompt": r["q"], "completion": r["a"]} for r in QA],
                                       format="prompt_completion", **kw), tokenizer)
    assert _rows(ours) == _rows(builtin)
    assert any(t == -100 for t in ours[0]["labels"]) and any(t != -100 for t in ours[0]["labels"])  # masked


def test_registered_messages_format_equals_the_builtin(tokenizer):
    @register_format("sharegpt_pairs")
    def pairs(row):
        return [{"from": "human", "value": row["q"]}, {"from": "gpt", "value": row["a"]}]

    ours = prepare_dataset(DataSpec(source=QA, format="sharegpt_pairs", max_seq_length=16), tokenizer)
    builtin = prepare_dataset(DataSpec(source=[{"messages": pairs(r)} for r in QA], format="messages",
                                       max_seq_length=16), tokenizer)
    assert _rows(ours) == _rows(builtin)  # including truncation at 16 tokens


def test_same_errors_as_the_builtins(tokenizer):
    register_format("qa", columns=["q", "a"])(lambda row: {"prompt": row["q"], "completion": row["a"]})
    with pytest.raises(DataFormatError, match=r"data.format='qa' needs column\(s\) \['a'\], but the dataset has"):
        prepare_dataset(DataSpec(source=[{"q": "x"}], format="qa"), tokenizer)
    register_format("user_only")(lambda row: [{"role": "user", "content": row["q"]}])
    with pytest.raises(DataFormatError, match="no assistant turn"):
        prepare_dataset(DataSpec(source=QA, format="user_only"), tokenizer)
    register_format("broken")(lambda row: row["missing"])
    with pytest.raises(DataFormatError, match=r"data.format='broken': the format function raised KeyError"):
        prepare_dataset(DataSpec(source=QA, format="broken"), tokenizer)
    register_format("wrong_shape")(lambda row: "text")
    with pytest.raises(DataFormatError, match="must return a list of"):
        prepare_dataset(DataSpec(source=QA, format="wrong_shape"), tokenizer)


def test_unknown_format_lists_the_known_ones(tokenizer):
    register_format("qa")(lambda row: {"prompt": row["q"], "completion": row["a"]})
    with pytest.raises(DataFormatError, match=r"data.format='qq' is no known format; use one of \['auto', 'text', "
                                              r".*'guanaco', 'qa'\]"):
        prepare_dataset(DataSpec(source=QA, format="qq"), tokenizer)


def test_format_by_import_path(tokenizer):
    spec = DataSpec(source=QA, format="plugin_formats:qa_pairs", max_seq_length=40)
    ours = prepare_dataset(spec, tokenizer)
    builtin = prepare_dataset(DataSpec(source=[{"prompt": r["q"], "completion": r["a"]} for r in QA],
                                       format="prompt_completion", max_seq_length=40), tokenizer)
    assert _rows(ours) == _rows(builtin)
    with pytest.raises(DataFormatError, match="has no attribute 'nope'"):
        prepare_dataset(DataSpec(source=QA, format="plugin_formats:nope"), tokenizer)


def test_registration_refuses_builtin_names_and_silent_replacement():
    with pytest.raises(ValueError, match="taken"):
        register_format("alpaca")
    register_format("qa")(lambda row: [])
    with pytest.raises(ValueError, match="replace=True"):
        register_format("qa")(lambda row: [])
    register_format("qa", replace=True)(lambda row: [])
