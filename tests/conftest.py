"""Shared fixtures: tiny random Phi-3 checkpoints built here, never downloaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ../shared beside the checkout; PHI3TUNE_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("PHI3TUNE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
PHI3_DIR = SHARED / "models" / "phi3-mini-4k-instruct"
ALPACA_JSON = SHARED / "data" / "alpaca_en_demo.json"
GUANACO_JSONL = SHARED / "data" / "alpaca1k_guanaco_text.jsonl"

needs_shared = pytest.mark.skipif(not PHI3_DIR.is_dir(), reason="../shared (Phi-3 tokenizer, data) is absent")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Phi3ForCausalLM with a character tokenizer (always available)."""
    from phi3tune.tiny import write_tiny_phi3

    return write_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def phi3_tokenizer():
    if not PHI3_DIR.is_dir():
        pytest.skip("../shared/models/phi3-mini-4k-instruct is absent")
    from phi3tune.model import load_tokenizer

    return load_tokenizer(str(PHI3_DIR))


@pytest.fixture(scope="session")
def tiny_model_phi3_tok(tmp_path_factory: pytest.TempPathFactory, phi3_tokenizer) -> Path:
    """A tiny random Phi-3 that uses the real Phi-3 tokenizer and chat template."""
    from phi3tune.tiny import write_tiny_phi3

    return write_tiny_phi3(tmp_path_factory.mktemp("tiny-real-tok") / "model", tokenizer=phi3_tokenizer)


@pytest.fixture(autouse=True)
def _phi3tune_logs(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="phi3tune")
    yield


def rows_of_text(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Examples of varied length: a copy task the tiny model can learn."""
    import random

    rng = random.Random(seed)
    out = []
    for _i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 24)))
        out.append({"text": f"### Human: copy {word} ### Assistant: {word}"})
    return out
