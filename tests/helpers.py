"""Helpers shared by tests (test files import this module, never each other; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from phi3tune import FineTuner

TESTS = Path(__file__).resolve().parent
# ../shared beside the checkout; PHI3TUNE_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("PHI3TUNE_SHARED") or TESTS.parent.parent / "shared")
PHI3_DIR = SHARED / "models" / "phi3-mini-4k-instruct"
ALPACA_JSON = SHARED / "data" / "alpaca_en_demo.json"
GUANACO_JSONL = SHARED / "data" / "alpaca1k_guanaco_text.jsonl"

needs_shared = pytest.mark.skipif(not PHI3_DIR.is_dir(), reason="../shared (Phi-3 tokenizer, data) is absent")


def rows_of_text(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Examples of varied length: a copy task the tiny model can learn."""
    import random

    rng = random.Random(seed)
    out = []
    for _i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 24)))
        out.append({"text": f"### Human: copy {word} ### Assistant: {word}"})
    return out


def tiny_tuner(model: Path, out: Path, rows: Any, **train: Any) -> FineTuner:
    """Deterministic fp32 CPU run: dropout 0, small rank, quiet."""
    defaults: dict[str, Any] = dict(output_dir=str(out), batch_size=4, grad_accum=1, max_steps=1,
                                    logging_steps=1, save_strategy="no", progress_bar=False,
                                    learning_rate=1e-3, optimizer="adamw_torch")
    defaults.update(train)
    return (FineTuner(model).adapter(r=8, alpha=16, dropout=0.0)
            .data(source=rows, max_seq_length=64).training(**defaults))


def run_counting_graphs(tuner: FineTuner) -> tuple[Any, list[int]]:
    """``tuner.run()`` from a fresh dynamo cache, and how many graphs dynamo had built after each step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    result = tuner.run(callbacks=[lambda e: graphs.append(counters["stats"]["unique_graphs"])])
    return result, graphs


def lora_on_4bit(model: Path, dtype: Any, dropout: float = 0.0) -> Any:
    """A PEFT LoRA model (r=4 on every linear layer) on ``model``'s 4-bit base, matmuls in ``dtype``, seeded, with
    every adapter weight drawn: LoRA B starts at zero, and drawn, the adapter's path counts in outputs and grads."""
    import torch

    from phi3tune.model import attach_adapter, load_weights
    from phi3tune.specs import AdapterSpec, QuantSpec

    torch.manual_seed(0)
    base = load_weights(str(model), QuantSpec(compute_dtype=str(dtype).removeprefix("torch.")), dtype,
                        torch.device("cpu"))
    peft = attach_adapter(base, AdapterSpec(r=4, dropout=dropout), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    for p in peft.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return peft


def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the base model fail: a test that expects an error "before weights load" proves it."""
    def fail(*_: Any, **__: Any) -> None:
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr("phi3tune.model.load_base_model", fail)


def adapter_tensors(result: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------- resume
ROWS = rows_of_text(12, seed=3)


def resume_tuner(model: Path, out: Path, **train: Any) -> FineTuner:
    """9 train rows -> 5 micro-batches of 2 -> 3 steps an epoch (the last one short); 8 steps = 3 epochs.
    LoRA dropout on, bitsandbytes AdamW, warmup + cosine, eval every 4 steps, a log line every 3."""
    args: dict[str, Any] = dict(batch_size=2, grad_accum=2, max_steps=8, save_strategy="steps", save_steps=1,
                                logging_steps=3, eval_steps=4, optimizer="paged_adamw_32bit", warmup_ratio=0.25,
                                learning_rate=5e-3)
    args.update(train)
    return tiny_tuner(model, out, ROWS, **args).adapter(dropout=0.1).data(eval_fraction=0.25)


def _metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without tokens/s (wall-clock time is the one thing a resumed run cannot repeat)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in lines]


def _history(res: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in res.history]


def assert_same_run(got: Any, ref: Any) -> None:
    """Final adapters equal tensor by tensor (torch.equal, not allclose); logged numbers equal."""
    import torch
    from safetensors.torch import load_file

    a = load_file(str(got.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(ref.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} adapter tensors differ, e.g. {different[:3]}"
    assert _history(got) == _history(ref)
    assert _metrics(got.output_dir) == _metrics(ref.output_dir)


def kill_after(ref_out: Path, dst: Path, n: int) -> Path:
    """The output_dir as a kill right after checkpoint-n was renamed into place would leave it."""
    from phi3tune import checkpoints as ckpt

    shutil.copytree(ref_out, dst)
    for p in [dst / ckpt.FINAL_DIR, dst / "loss.png"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in dst.glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > n:
            shutil.rmtree(p)
    partial = dst / f".checkpoint-{n + 1}.k1ll3d00"  # the next save, cut off mid-write
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    return dst


# ---------------------------------------------------------------------------------------------- several processes
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_script(cmd: list[str], cwd: Path, ok: bool = True, timeout: int = 300, **env_vars: str) -> Any:
    """Run ``cmd`` quietly (one thread, offline, plus ``env_vars``) in its own process group; assert it succeeded
    unless ``ok=False``."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           **env_vars}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          start_new_session=True)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun(n: int) -> list[str]:
    """The launcher prefix for ``n`` CPU (gloo) processes on a free port."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
            str(free_port())]
