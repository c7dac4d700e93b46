"""Shared fixtures: tiny random Phi-3 checkpoints built here, never downloaded; the resume reference run.
Shared constants and functions are in helpers.py."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared rows are cached (phi3tune/data/build.py): the tests' entries go to a fresh directory, not the user's cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="phi3tune-tests-datasets-"))

from helpers import PHI3_DIR, resume_tuner

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
    import torch

    torch.set_num_threads(1)
    # and so do the processes a test starts (the notebook's kernel, the demo, the CLI): with a second thread each,
    # beside the other workers, OpenMP's waiting threads took the notebook test from 21 s alone to 205 s
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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
def _ctrl_c_as_in_a_terminal():
    """Started under nohup, from a background job or without a terminal, SIGINT starts out ignored; tests that
    send it (Ctrl-C) see it as a terminal delivers it, and the launcher's disposition comes back afterwards."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(autouse=True)
def _phi3tune_logs(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="phi3tune")
    yield


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The uninterrupted resume run (helpers.resume_tuner) that resumed and interrupted runs must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return resume_tuner(tiny_model, out).run()


@pytest.fixture
def traced_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled layers split into forward and backward by inductor's partitioner (same decompositions, without
    inductor's own graph passes), then run as traced, with no code generated (compiled_layers.backend's
    ``generate=False``): for tests of what the loop does around compiled layers, where inductor's CPU code
    generation only costs minutes. What inductor itself builds (tests/test_compiled_layers.py' twins and saved
    tensors, tests/test_modes.py, tests/test_dequantized.py, tests/test_varlen_attention.py) compiles with inductor."""
    import functools

    from phi3tune import compiled_layers

    monkeypatch.setattr(compiled_layers, "backend", functools.partial(compiled_layers.backend, generate=False))
