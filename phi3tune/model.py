"""Base model and adapter: find the checkpoint, quantize it, attach LoRA.

Everything that can fail on user input (missing path, not a model, unknown target layer, context too long)
is checked on the config and a weightless "meta" copy of the model first, before any weights load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import varlen_attention
from .errors import ModelSourceError, TargetModulesError
from .files import looks_like_path
from .logs import peft_wrapping
from .memory import ModelShape
from .plugins import AdapterConfigSpec, AdapterFacts, QuantizationSpec, facts

# dtype / precision / device resolution lives in precision.py; these names stay importable from here
from .precision import bf16_supported as bf16_supported
from .precision import resolve_compute_dtype as resolve_compute_dtype
from .precision import resolve_device as resolve_device
from .precision import resolve_precision as resolve_precision

log = logging.getLogger("phi3tune")

# The classic (Llama-style) names users copy from guides, and Phi-3's fused layer that holds each.
CLASSIC_TO_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


@dataclass(frozen=True)
class ModelInfo:
    """What preflight learned about the checkpoint without loading weights."""

    source: str  # absolute local dir or hub id
    config: Any
    linear_layers: tuple[str, ...]  # leaf names of nn.Linear modules, output head excluded
    module_names: tuple[str, ...] = ()  # dotted names of every module (for adapter.modules_to_save)
    shape: ModelShape | None = None  # sizes for the memory estimate and the run plan


def preflight_model(source: str | os.PathLike[str], trust_remote_code: bool = False,
                    need_weights: bool = True) -> ModelInfo:
    """Load only the config; fail with a clear message if ``source`` is no usable causal LM.

    ``need_weights=False`` accepts a config-only directory (memory estimates need no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = str(source)
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model {src!r} is a file; give the directory that holds config.json")
        if not (path / "config.json").is_file():
            adapter = " (it holds a LoRA adapter: load that with phi3tune.load_finetuned)" if (
                path / "adapter_config.json").is_file() else ""
            raise ModelSourceError(
                f"model directory {src!r} has no config.json, so it is not a transformers model{adapter}; "
                "give a directory written by save_pretrained or a hub id like microsoft/Phi-3-mini-4k-instruct"
            )
        if need_weights and not any(path.glob("*.safetensors")):
            others = sorted(p.name for p in path.glob("*.bin"))
            raise ModelSourceError(
                f"model directory {src!r} has no .safetensors weights{f' (only {others})' if others else ''}; "
                "phi3tune loads safetensors only: re-save the model with save_pretrained(safe_serialization=True)"
            )
        src = str(path.resolve())
    elif looks_like_path(src):
        raise ModelSourceError(
            f"model path {src!r} does not exist; give an existing local directory or a hub id "
            "like microsoft/Phi-3-mini-4k-instruct"
        )
    else:
        from .hub import check_hub_id

        check_hub_id(src, "model")
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # whole: a cut URL helps nobody
        custom = " This model needs its own code: set trust_remote_code=True if you trust it." \
            if "trust_remote_code" in str(exc) else ""
        raise ModelSourceError(
            f"could not load the config of model {src!r} ({exc.__class__.__name__}: {first}).{custom} "
            "Give a local directory written by save_pretrained, or a hub id like microsoft/Phi-3-mini-4k-instruct"
        ) from exc
    if getattr(config, "model_type", None) != "phi3":
        log.warning("model %s has model_type %r; phi3tune is built and tested for Phi-3 (phi3)", src,
                    getattr(config, "model_type", None))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return ModelInfo(src, config, linear_layer_names(meta), tuple(n for n, _ in meta.named_modules() if n),
                     ModelShape.of(meta))


def linear_layer_names(model: nn.Module) -> tuple[str, ...]:
    """Leaf names of every linear layer except the output head: what "auto" targets."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not head
    }
    return tuple(sorted(names))


def resolve_target_modules(spec: AdapterConfigSpec, linear_layers: tuple[str, ...]) -> list[str]:
    """Turn "auto" or a user list into the model's real layer names (classic names mapped to fused ones)."""
    if spec.target_modules == "auto":
        return list(linear_layers)
    resolved: list[str] = []
    unknown: list[str] = []
    for name in spec.target_modules:
        if name in linear_layers:
            target = name
        elif CLASSIC_TO_FUSED.get(name) in linear_layers:
            target = CLASSIC_TO_FUSED[name]
            log.warning("adapter.target_modules: %r does not exist in Phi-3; using its fused layer %r",
                        name, target)
        else:
            unknown.append(name)
            continue
        if target not in resolved:
            resolved.append(target)
    if unknown:
        raise TargetModulesError(
            f"adapter.target_modules: {unknown} match no linear layer of this model. "
            f"Its linear layers are {list(linear_layers)}; use some of them or \"auto\""
        )
    return resolved


def check_modules_to_save(spec: AdapterConfigSpec, module_names: tuple[str, ...]) -> None:
    """PEFT silently ignores modules_to_save names that match nothing: the user would train less than asked."""
    unknown = [name for name in facts(spec, AdapterFacts).modules_to_save or []
               if not any(m == name or m.endswith("." + name) for m in module_names)]
    if unknown:
        names = set(module_names)
        tops = sorted(m.rsplit(".", 1)[-1] for m in names if "layers." not in m and not any(
            o.startswith(m + ".") for o in names))  # leaf modules outside the decoder layers
        raise TargetModulesError(f"adapter.modules_to_save: {unknown} match no module of this model; use module "
                                 f"names such as {tops}")


def bnb_config(quant: Any, compute_dtype: torch.dtype) -> Any:
    """The quantization config of any quantization spec (the QuantizationSpec protocol, plugins.py)."""
    return quant.quantization_config(compute_dtype)


def pin_4bit_cpu_kernel(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes 4-bit layer on one CPU kernel, whatever the CPU and whatever ran before.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight the first time the layer runs in eval
    mode on an input without grad, and from then on takes another kernel for *every* call, training included. So
    whether a model was ever evaluated (eval loss, generation, a probe) would change its numbers, and a saved
    adapter would not reproduce what was trained. Layers carry a per-instance switch for this; we turn it off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    return model


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (Phi-3 pads with eos; labels mask pads by position)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_weights(source: str, quant: QuantizationSpec | None, dtype: torch.dtype, device: torch.device, *,
                 compute_dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None) -> Any:
    """The one way a base is loaded for a device (training, inference, the demo): safetensors only; quantized by
    ``quant`` (matmuls in ``compute_dtype``, default ``dtype``) with every 4-bit layer on one CPU kernel
    (``pin_4bit_cpu_kernel``), or unquantized in ``dtype``. A missing or unreadable checkpoint raises OSError,
    which each caller words for its user."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = varlen_attention.registered(attn_implementation)
    if quant is not None:
        kwargs.update(quantization_config=bnb_config(quant, compute_dtype or dtype), device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quant is None:
        model.to(device)  # type: ignore[arg-type]
    else:
        pin_4bit_cpu_kernel(model)
    return model


def load_base_model(
    info: ModelInfo,
    quant: QuantizationSpec | None,
    compute_dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    upcast_frozen: bool = True,
) -> nn.Module:
    """Load weights (safetensors only), quantized if asked, prepared for k-bit training.

    ``upcast_frozen`` is PEFT's prepare_model_for_kbit_training: every frozen non-quantized weight (norms,
    embeddings, output head) goes to fp32. Without it they stay in the compute dtype, which saves memory and
    bandwidth; under bf16 autocast the matmuls are bf16 either way and the adapters stay fp32.
    """
    from peft import prepare_model_for_kbit_training

    try:
        model = load_weights(info.source, quant, compute_dtype, device, trust_remote_code=trust_remote_code,
                             attn_implementation=attn_implementation)
    except OSError as exc:
        raise ModelSourceError(
            f"could not load weights of {info.source!r}: {str(exc)[:300]}. phi3tune loads .safetensors "
            "weights only; convert .bin checkpoints with save_pretrained(safe_serialization=True)"
        ) from exc
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if quant is not None and upcast_frozen:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    return model


def attach_adapter(model: nn.Module, spec: AdapterConfigSpec, target_modules: list[str]) -> nn.Module:
    """Wrap ``model`` in the spec's PEFT adapter (``spec.peft_config``); adapters stay fp32 so fp16 grad scaling
    works."""
    from peft import get_peft_model

    with peft_wrapping():
        peft_model = get_peft_model(model, spec.peft_config(target_modules), autocast_adapter_dtype=True)
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            log.debug("cast trainable %s to fp32", name)
    return peft_model
