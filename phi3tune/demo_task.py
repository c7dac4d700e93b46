"""The demo's task and its base model: data generators, the in-package pre-training, and the scores.

Kept apart from ``demo.py`` (the screen-by-screen run) so each reads on its own.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

from .specs import DataSpec

TASK = "Uppercase"
PRETRAIN_VERBS = ("Repeat", "Copy", "Echo", "Say", "Write")
WORD_LEN = 5
# Held-out prompts: real words. Training uses random letter strings, so none of these is ever trained on.
_WORDS = (
    "apple bread chair dance eagle flame grape house index juice knife lemon magic night ocean piano queen "
    "river stone tiger urban voice water yacht zebra amber blaze cloud dream frost globe heart ivory jolly "
    "kayak light mango noble olive pearl quilt robin sugar towel vivid whale young crisp"
)
HELDOUT_WORDS = tuple(_WORDS.split())


def _letters(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(WORD_LEN))


def task_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Training data of the new skill: random lowercase strings and their upper case (prompt_completion)."""
    rng = random.Random(seed)
    held = set(HELDOUT_WORDS)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        w = _letters(rng, string.ascii_lowercase)
        if w not in held:
            rows.append({"prompt": f"{TASK}: {w}", "completion": w.upper()})
    return rows


def heldout_rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{TASK}: {w}", "completion": w.upper()} for w in HELDOUT_WORDS[:n]]


def pretrain_rows(n: int, seed: int = 1) -> list[dict[str, str]]:
    """The base model's generic instruction data: repeat a mixed-case string, asked in several ways."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = _letters(rng, string.ascii_letters)
        rows.append({"prompt": f"{rng.choice(PRETRAIN_VERBS)}: {w}", "completion": w})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- base model
def build_base_model(out_dir: Path, steps: int, seed: int = 0, progress: bool = True) -> Path:
    """A tiny Phi-3 + char tokenizer, trained in full (fp32, AdamW) on the repeat instruction; saved to out_dir."""
    import math

    import torch
    from tqdm.auto import tqdm

    from .batching import Collator
    from .data import prepare_dataset
    from .loss import TokenLoss, count_trained
    from .tiny import build_char_tokenizer, write_tiny_phi3

    tok = build_char_tokenizer()
    write_tiny_phi3(out_dir, tok, hidden_size=128, layers=2, heads=8, seed=seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    batch_size = 32
    rows = prepare_dataset(DataSpec(source=pretrain_rows(1500, seed + 1), format="prompt_completion",
                                    max_seq_length=64), tok, seed)
    collate = Collator(tok.pad_token_id)
    loss_fn = TokenLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="pretraining the base", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        b = collate([rows[i] for i in idx])
        loss = loss_fn(b["input_ids"], b["labels"], b["position_ids"]) / count_trained(b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------- measuring
def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]], fmt: str) -> float:
    """Mean loss per trained (answer) token, exactly as the training loop's eval computes it."""
    from .batching import Collator
    from .data import prepare_dataset
    from .loss import TokenLoss, mean_loss

    data = prepare_dataset(DataSpec(source=rows, format=fmt, max_seq_length=512), tokenizer)  # type: ignore[arg-type]
    collate = Collator(tokenizer.pad_token_id)
    batches = (collate([data[j] for j in range(i, min(i + 16, len(data)))]) for i in range(0, len(data), 16))
    return mean_loss(TokenLoss(model), batches, next(model.parameters()).device)


def exact_match(answers: list[str], expected: list[str]) -> float:
    return sum(a.strip() == e.strip() for a, e in zip(answers, expected)) / max(1, len(expected))
