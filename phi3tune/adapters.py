"""Adapter variants, all through PEFT: DoRA, and the LoRA initialisations PEFT supports on each kind of base.

Which ``adapter.init`` works where (measured with peft 0.21 on a bitsandbytes 4-bit base, CPU):

- ``default`` (A random, B zero) and ``gaussian``: any base.
- ``olora``: any base. PEFT dequantizes, takes a QR, and re-quantizes the residual; PEFT re-runs that
  (deterministic) init when it loads the adapter, so a plain ``PeftModel.from_pretrained`` reproduces the model.
- ``pissa`` and ``orthogonal``: an unquantized base only (PEFT's SVD needs float weights; orthogonal would make
  uint8 adapters on a 4-bit base).
- ``loftq``: a 4-bit base on CUDA (PEFT's ``replace_lora_weights_loftq``, which needs the checkpoint's
  .safetensors and CUDA).

LoRA+ (a higher learning rate for lora_B) is an optimizer setting: ``training.loraplus_lr_ratio`` (optim.py).
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import ConfigError
from .plugins import AdapterFacts, QuantFacts, facts

log = logging.getLogger("phi3tune")

# init -> the bases it works on: "unquantized", "4bit", "8bit"; loftq also needs CUDA
INITS: dict[str, tuple[str, ...]] = {
    "default": ("unquantized", "4bit", "8bit"),
    "gaussian": ("unquantized", "4bit", "8bit"),
    "olora": ("unquantized", "4bit", "8bit"),
    "pissa": ("unquantized",),
    "orthogonal": ("unquantized",),
    "loftq": ("4bit",),
}


def lora_config(spec: Any, target_modules: list[str]) -> Any:
    """LoraConfig of an AdapterSpec (or a subclass); PEFT's refusal of a combination becomes a ConfigError naming
    the fields."""
    from peft import LoraConfig

    init = spec.init
    try:
        return LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=target_modules,
            bias=spec.bias,
            use_rslora=spec.use_rslora,
            modules_to_save=spec.modules_to_save,
            use_dora=spec.use_dora,
            # loftq replaces A/B after attaching (apply_init): the saved adapter is then an ordinary one
            init_lora_weights=True if init in ("default", "loftq") else init,  # type: ignore[arg-type]
            task_type="CAUSAL_LM",
        )
    except ValueError as exc:
        raise ConfigError(f"adapter: PEFT cannot build this adapter (init={init!r}, use_dora="
                          f"{spec.use_dora}, bias={spec.bias!r}): {exc}") from exc


def base_kind(quant: Any) -> str:
    """"unquantized", "4bit" or "8bit" for a quantization spec (``plugins.QuantFacts``)."""
    if quant is None:
        return "unquantized"
    return "8bit" if facts(quant, QuantFacts).bits == 8 else "4bit"


def check_init(spec: Any, quant: Any, device_type: str) -> None:
    """Refuse an init PEFT cannot do on this base, before any weights load, saying what works."""
    a = facts(spec, AdapterFacts)
    init = a.init
    if init not in INITS:
        return
    kind = base_kind(quant)
    works = [name for name, kinds in INITS.items() if kind in kinds and (name != "loftq" or device_type == "cuda")]
    if kind not in INITS[init] or (init == "loftq" and device_type != "cuda"):
        where = {"pissa": "an unquantized base (quantize(None)); PEFT's SVD needs float weights",
                 "orthogonal": "an unquantized base (quantize(None))",
                 "loftq": "a 4-bit base on CUDA (PEFT's replace_lora_weights_loftq)"}[init]
        raise ConfigError(f"adapter.init={init!r} needs {where}; on this {kind} base on {device_type} use one of "
                          f"{works}")
    if a.use_dora and kind == "8bit" and device_type != "cuda":
        raise ConfigError(f"adapter.use_dora=True on an 8-bit base (quant.bits=8) needs CUDA: bitsandbytes cannot "
                          f"dequantize 8-bit weights on {device_type}, which DoRA does at every step. Use quant.bits=4 "
                          "or an unquantized base (quantize(None)) here, or train on a GPU")
    if a.use_dora and init == "loftq":
        raise ConfigError('adapter.init="loftq" with adapter.use_dora=True: PEFT\'s LoftQ replacement handles '
                          "plain LoRA layers only; use one or the other")


def apply_init(model: Any, spec: Any, source: str) -> None:
    """Inits that PEFT runs after the adapter exists: LoftQ from the checkpoint's unquantized weights."""
    if facts(spec, AdapterFacts).init != "loftq":
        return
    from pathlib import Path

    from peft import replace_lora_weights_loftq

    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    log.info("adapter.init=loftq: initialising LoRA weights from the unquantized checkpoint")
    replace_lora_weights_loftq(model, model_path=str(files[0]) if len(files) == 1 else None)
