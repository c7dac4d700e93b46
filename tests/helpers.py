"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi3tune import FineTuner


def tiny_tuner(model: Path, out: Path, rows: Any, **train: Any) -> FineTuner:
    """Deterministic fp32 CPU run: dropout 0, small rank, quiet."""
    defaults: dict[str, Any] = dict(output_dir=str(out), batch_size=4, grad_accum=1, max_steps=1,
                                    logging_steps=1, save_strategy="no", progress_bar=False,
                                    learning_rate=1e-3, optimizer="adamw_torch")
    defaults.update(train)
    return (FineTuner(model).adapter(r=8, alpha=16, dropout=0.0)
            .data(source=rows, max_seq_length=64).training(**defaults))


def adapter_tensors(result: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
