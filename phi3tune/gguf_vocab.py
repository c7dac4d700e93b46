"""The tokenizer half of a GGUF file, read from the model directory's ``tokenizer.json``.

llama.cpp (and so Ollama and LM Studio) tokenizes with its own code from what the file lists: the vocabulary,
a score per token (SentencePiece "llama" vocabularies merge the pair whose result scores highest) or the merges
(byte-level "gpt2" vocabularies), a type per token (normal, control, byte, …), the special ids and the chat
template. Which kind a tokenizer is, is read from ``tokenizer.json``:

- BPE with ``byte_fallback`` (Phi-3, Llama-2 style): "llama". ``tokenizer.json`` holds merges, not the
  SentencePiece scores, so each token's score is minus the rank of the first merge that makes it: llama.cpp's
  highest-score-first order is then the merges' lowest-rank-first order.
- Byte-level BPE (Phi-4-mini's 200k vocabulary): "gpt2" with the merges, and the pre-tokenizer named by the
  split regex it uses (only regexes whose llama.cpp name is known are accepted).
- A BPE over raw characters with no merges and no pre-tokenizer (phi3tune's tiny demo model): "llama" with
  the space spelled "▁" and no merges to score, so llama.cpp cuts text into the same single characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
_ADDED_SCORE, _UNUSED_SCORE = -1000.0, -10000.0  # what llama.cpp's converter gives added and padding tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """Everything under ``tokenizer.ggml.*`` except the special ids and the chat template."""

    model: str  # "llama" or "gpt2"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None


def _where(model_dir: Path) -> str:
    return f"export_gguf: {str(model_dir / 'tokenizer.json')!r}"


def read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{_where(model_dir)} does not exist; GGUF export reads the fast tokenizer's "
                          "tokenizer.json (phi3tune saves one with every adapter and merged model)")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _parts(node: Any) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder as a flat list of its steps."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    return [p for sub in inner for p in _parts(sub)] if inner is not None else [node]


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    merges = model.get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def _kind(tj: dict[str, Any], model_dir: Path) -> str:
    model = tj.get("model") or {}
    pre = _parts(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE":
        raise ConfigError(f"{_where(model_dir)}: a {model.get('type')} tokenizer; GGUF export writes BPE "
                          "tokenizers (Phi-3's SentencePiece-style BPE, Phi-4-mini's byte-level BPE)")
    if model.get("byte_fallback"):
        return "llama"
    if any(p.get("type") == "ByteLevel" for p in pre):
        return "gpt2"
    if not model.get("merges") and not pre and not tj.get("normalizer"):
        return "chars"
    raise ConfigError(f"{_where(model_dir)}: a BPE tokenizer that is neither SentencePiece-style (byte_fallback) "
                      "nor byte-level; llama.cpp has no tokenizer that cuts text the same way")


def _pre_name(tj: dict[str, Any], model_dir: Path) -> str:
    """llama.cpp's name for a byte-level tokenizer's split regex (the names transformers' GGUF reader knows)."""
    splits = [p for p in _parts(tj.get("pre_tokenizer")) if p.get("type") == "Split"]
    if not splits:
        return "gpt-2"  # ByteLevel's own regex
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    regex = (splits[0].get("pattern") or {}).get("Regex")
    name = next((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)
    if name is None:
        raise ConfigError(f"{_where(model_dir)}: the pre-tokenizer splits with {str(regex)[:80]!r}, which has no "
                          "llama.cpp name phi3tune knows; GGUF export cannot say how to cut text for it")
    return name


def _space_prefix(tj: dict[str, Any]) -> bool:
    """Does the tokenizer put "▁" before the text after a special token (llama.cpp's add_space_prefix)?

    An old-style ``Prepend("▁")`` normalizer does (it runs on every piece between special tokens); a Metaspace
    pre-tokenizer with ``prepend_scheme: first`` (what transformers 5 saves) only at the very start of a text,
    which a chat never has: it starts with a special token. So ``first`` is written as False.
    """
    if any(p.get("type") == "Prepend" for p in _parts(tj.get("normalizer"))):
        return True
    meta = [p for p in _parts(tj.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
    return bool(meta) and meta[0].get("prepend_scheme", "always") == "always"


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer in ``model_dir``, padded to the model's ``n_vocab`` embedding rows."""
    tj = read_tokenizer_json(model_dir)
    kind = _kind(tj, model_dir)
    model = tj["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise ConfigError(f"{_where(model_dir)} has token id {max(by_id)} but the model has {n_vocab} embedding "
                          "rows; export the tokenizer the model was trained with")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [NORMAL if i in by_id else UNUSED for i in range(n_vocab)]
    for i, a in added.items():
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    pairs = _merge_pairs(model)
    if kind == "gpt2":
        return Vocab("gpt2", _pre_name(tj, model_dir), tokens, types, merges=[f"{a} {b}" for a, b in pairs])
    if kind == "chars":  # SentencePiece spells a space "▁"; nothing else changes
        if "\u2581" in model["vocab"]:
            raise ConfigError(f"{_where(model_dir)}: a character vocabulary that already has '\u2581'; it cannot "
                              "be written as a SentencePiece vocabulary")
        tokens = [t.replace(" ", "\u2581") if types[i] == NORMAL else t for i, t in enumerate(tokens)]
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    scores = [float(-rank.get(t, 0)) for t in tokens]
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and _BYTE_TOKEN.fullmatch(t):
            types[i] = BYTE
        elif types[i] in (CONTROL, USER_DEFINED):
            scores[i] = _ADDED_SCORE
        elif types[i] == UNUSED:
            scores[i] = _UNUSED_SCORE
    return Vocab("llama", "default", tokens, types, scores, add_space_prefix=kind == "llama" and _space_prefix(tj))


def add_vocab(writer: Any, vocab: Vocab, tokenizer: Any) -> None:
    """Write the vocabulary, the special ids, whether bos/eos are added, and the chat template."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        writer.add_eot_token_id(end)  # llama.cpp stops generating at it (end of turn)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]  # what our tokenizer adds around a text
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
