"""Use a trained adapter: load it on its base model (quantized or not) for inference."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelSourceError
from .specs import QuantSpec

META_NAME = "phi3tune.json"
_SAME = "same-as-training"


@dataclass
class FineTunedModel:
    """A base model with its LoRA adapter, ready for inference."""

    model: Any
    tokenizer: Any
    adapter_dir: Path


def read_adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json (+ phi3tune.json when we wrote the adapter); errors name the missing file."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(
            f"adapter directory {str(adapter_dir)!r} has no adapter_config.json; give a directory written by "
            "phi3tune or PEFT's save_pretrained (e.g. results/final_checkpoint)"
        )
    meta = {"base_model": json.loads(cfg_path.read_text()).get("base_model_name_or_path")}
    if (adapter_dir / META_NAME).is_file():
        meta.update(json.loads((adapter_dir / META_NAME).read_text()))
    return meta


def load_finetuned(adapter_dir: str | os.PathLike[str], quant: QuantSpec | str | None = _SAME,
                   base_model: str | None = None, device: str = "auto",
                   trust_remote_code: bool = False) -> FineTunedModel:
    """Load base + adapter. ``quant`` defaults to the quantization the adapter was trained with."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import bnb_config, load_tokenizer, resolve_device

    path = Path(adapter_dir).expanduser()
    meta = read_adapter_meta(path)
    base = base_model or meta.get("base_model")
    if not base:
        raise ModelSourceError(f"{str(path)!r}: adapter_config.json names no base model; pass base_model=")
    if quant == _SAME:
        saved = meta.get("quant")
        quant = QuantSpec(**saved) if saved else None
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else (
        torch.float16 if dev.type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if isinstance(quant, QuantSpec):
        cdt = dtype if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
        kwargs.update(quantization_config=bnb_config(quant, cdt), device_map={"": dev})
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise ModelSourceError(f"could not load base model {base!r} for adapter {str(path)!r}: {str(exc)[:200]}; "
                               "pass base_model= with a local directory") from exc
    if not isinstance(quant, QuantSpec):
        model.to(dev)  # type: ignore[arg-type]
    peft_model = PeftModel.from_pretrained(model, str(path))
    peft_model.eval()
    tokenizer = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base, trust_remote_code)
    return FineTunedModel(peft_model, tokenizer, path)
