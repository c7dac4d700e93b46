"""Turn one raw row into tokens and labels, for every supported data format.

Every format but plain text becomes a list of chat messages rendered by the tokenizer's own chat template.
Which tokens are trained is decided on characters, not token ids: we find where each assistant reply (and
its closing end-of-turn marker) sits in the rendered string, then label exactly the tokens inside those
spans. Phi-3 pads with its eos token, so masking by id would also mask the real end of every answer.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..errors import ConfigError, DataFormatError

log = logging.getLogger("phi3tune")

IGNORE = -100
def fence(labels: list[int]) -> list[int]:
    """An example's labels where it follows another in one row: its first token is not trained, since predicting
    it from the previous example is the "straddling pair" that must not be learned (unpacked, that token has no
    predecessor either). Dataset-time packing and loop-time padding-free rows both use this one rule."""
    return [IGNORE, *labels[1:]]


FORMATS = ("text", "alpaca", "messages", "prompt_completion", "guanaco")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "bot": "assistant", "model": "assistant", "system": "system"}
_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def detect_format(columns: list[str], text_field: str) -> str:
    """Pick the format from the column names; raise if none or several fit."""
    cols = set(columns)
    found = []
    if {"messages", "conversations"} & cols:
        found.append("messages")
    if {"instruction", "output"} <= cols:
        found.append("alpaca")
    if {"prompt", "completion"} <= cols:
        found.append("prompt_completion")
    if text_field in cols:
        found.append("text")
    if len(found) != 1:
        why = "several formats fit" if found else "no format fits"
        raise DataFormatError(
            f"data.format=\"auto\": {why} the columns {sorted(cols)}. Set data.format to one of {list(FORMATS)}: "
            f"text needs {text_field!r} (data.text_field), alpaca needs instruction/input/output, messages needs "
            "messages or conversations, prompt_completion needs prompt/completion"
        )
    return found[0]


def required_columns(fmt: str, text_field: str) -> list[str]:
    if fmt not in FORMATS:  # a register_format() format: the columns it declared
        from .registry import columns_of

        return columns_of(fmt)
    return {
        "text": [text_field],
        "guanaco": [text_field],
        "alpaca": ["instruction", "output"],
        "prompt_completion": ["prompt", "completion"],
        "messages": ["messages|conversations"],
    }[fmt]


def check_columns(fmt: str, columns: list[str], text_field: str) -> None:
    missing = [c for c in required_columns(fmt, text_field) if not set(c.split("|")) & set(columns)]
    if missing:
        hint = " (set data.text_field to the column that holds the text)" if fmt in ("text", "guanaco") else ""
        raise DataFormatError(
            f"data.format={fmt!r} needs column(s) {missing}, but the dataset has {sorted(columns)}{hint}"
        )


def resolve_train_on(fmt: str, train_on: str) -> str:
    if train_on == "auto":
        return "all" if fmt == "text" else "completion"
    if train_on == "completion" and fmt == "text":
        raise ConfigError(
            'data.train_on="completion" needs a format with prompts and answers; plain "text" has none. '
            'Use format="guanaco" for "### Human/### Assistant" text, or train_on="all"'
        )
    return train_on


def _str(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"column {key!r} must hold text, got {type(value).__name__}: {str(value)[:80]!r}")
    return value


def _normalize_messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise DataFormatError(f"a messages row must be a list of turns, got {type(turns).__name__}")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataFormatError(f"each message must be a dict with role/content, got {str(turn)[:80]!r}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if turn.get("tool_calls") or turn.get("function_call") or str(role).lower() in ("tool", "function", "ipython"):
            raise DataFormatError(
                f"message {str(turn)[:80]!r}: tool and function calls are not supported; give conversations of "
                "system/user/assistant turns with text content (or drop the rows that call tools)")
        if role is None or content is None or str(role).lower() not in _ROLE_ALIASES:
            raise DataFormatError(
                f"message {str(turn)[:80]!r} needs role/content (or ShareGPT from/value) with role one of "
                f"{sorted(set(_ROLE_ALIASES))}"
            )
        out.append({"role": _ROLE_ALIASES[str(role).lower()], "content": _content_text(content, turn)})
    return out


def _content_text(content: Any, turn: dict[str, Any]) -> str:
    """A message's content as text: a string, or OpenAI-style parts [{"type": "text", "text": ...}, ...] joined
    with newlines. Anything else (images, audio, a dict, a number) is refused, never trained as its repr."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a {kind!r} part" if kind else f"the part {str(part)[:60]!r}"
                raise DataFormatError(
                    f"message {str(turn)[:80]!r}: content holds {what}; phi3tune trains on text only. Give content "
                    'as a string or a list of {"type": "text", "text": ...} parts (drop image/audio parts)')
            texts.append(part["text"])
        return "\n".join(texts)
    raise DataFormatError(f"message {str(turn)[:80]!r}: content must be text (a string, or a list of "
                          f'{{"type": "text", "text": ...}} parts), got {type(content).__name__}')


def split_guanaco(text: str) -> list[dict[str, str]]:
    """'### Human: a ### Assistant: b ...' -> [{user: a}, {assistant: b}, ...]."""
    parts = _GUANACO_TURN.split(text)
    messages = []
    for i in range(1, len(parts) - 1, 2):
        role = "user" if parts[i].lower() == "human" else "assistant"
        messages.append({"role": role, "content": parts[i + 1].strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"guanaco text has no '### Assistant:' turn: {text[:80]!r}")
    return messages


def add_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``system_prompt`` as the first message unless the conversation has a system message (in place; returned).
    Training (``data.system_prompt``) and generation (``--system``) add it the same way."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def to_messages(row: dict[str, Any], fmt: str, text_field: str, system_prompt: str | None) -> list[dict[str, str]]:
    if fmt not in FORMATS:  # a register_format() format: its output takes the built-in messages/prompt_completion path
        from .registry import as_builtin_row

        row, fmt = as_builtin_row(row, fmt)
    if fmt == "alpaca":
        instruction, extra = _str(row, "instruction"), _str(row, "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _str(row, "output")}]
    elif fmt == "prompt_completion":
        prompt = row.get("prompt")
        messages = _normalize_messages(prompt) if isinstance(prompt, list) else [
            {"role": "user", "content": _str(row, "prompt")}]
        messages.append({"role": "assistant", "content": _str(row, "completion")})
    elif fmt == "guanaco":
        messages = split_guanaco(_str(row, text_field))
    else:
        # a file may mix both column names; datasets fills the absent one with None
        messages = _normalize_messages(row.get("messages") or row.get("conversations"))
    add_system_prompt(messages, system_prompt)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"example has no assistant turn to learn from: {str(messages)[:120]!r}")
    return messages


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; return the text and the [start, end) chars of each reply + its end marker."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    closers = [t for t in ("<|end|>", tokenizer.eos_token) if t]
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i
                  else _opening_prompt(tokenizer, full, msg["content"]))
        if not full.startswith(prefix):
            raise DataFormatError("the tokenizer's chat template does not render conversations incrementally; "
                                  "use data.train_on=\"all\" with this tokenizer")
        start = len(prefix)
        text = msg["content"] if msg["content"] in full[start:] else msg["content"].strip()  # templates that trim
        pos = full.find(text, start)
        if pos < 0:
            raise DataFormatError(f"the tokenizer's chat template changes the reply {text[:60]!r} as it renders it, "
                                  "so its tokens cannot be found; use data.train_on=\"all\" with this tokenizer")
        end = pos + len(text)
        for closer in closers:
            if full.startswith(closer, end):
                end += len(closer)
                break
        spans.append((start, end))
    return full, spans


def _opening_prompt(tokenizer: Any, full: str, content: str) -> str:
    """What the template renders before a reply that opens the conversation (its role marker, never trained):
    the generation prompt of an empty conversation, or else everything before the reply's text."""
    try:
        prompt = tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
    except Exception:  # templates that index messages[0]
        prompt = None
    if isinstance(prompt, str) and prompt and full.startswith(prompt):
        return prompt
    pos = full.find(content) if content else -1
    return full[:pos] if pos > 0 else ""


def require_chat_template(tokenizer: Any, fmt: str) -> None:
    """Every format but text is rendered with the tokenizer's chat template: say so if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(
            f"data.format={fmt!r} renders each row as chat messages with the tokenizer's chat template, but this "
            "tokenizer has none; use data.format=\"text\" (the column named by data.text_field) for plain text, or "
            "a model whose tokenizer ships a chat template (Phi-3's does)")


def encode(row: dict[str, Any], tokenizer: Any, fmt: str, train_on: str, text_field: str,
           max_len: int, system_prompt: str | None = None) -> dict[str, Any]:
    """One row -> input_ids, labels (IGNORE where not trained), truncated flag."""
    if fmt == "text":
        ids = list(tokenizer(_str(row, text_field), add_special_tokens=True)["input_ids"])
        truncated = len(ids) + 1 > max_len
        # A cut example gets no eos: it would teach the model to stop mid-sentence.
        ids = ids[:max_len] if truncated else [*ids, tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids), "truncated": truncated}
    require_chat_template(tokenizer, fmt)
    messages = to_messages(row, fmt, text_field, system_prompt)
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [tok if any(a < e and b > s for s, e in spans) else IGNORE
                  for tok, (a, b) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": truncated}
