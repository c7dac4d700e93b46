"""Use a trained adapter: load it for generation (quantized or not), or merge it into a standalone model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.formats import add_system_prompt
from .errors import OVERWRITE, ConfigError, ModelSourceError, OutputDirError, hint
from .files import CONFIG_NAME, MERGE_META_NAME, STATE_NAME, atomic_dir
from .files import META_NAME as META_NAME
from .logs import peft_wrapping
from .plugins import QuantizationSpec, spec_from_config
from .precision import DTYPES
from .specs import QuantSpec

SAME_AS_TRAINING = "same-as-training"  # load_finetuned(quant=...): as the adapter was trained
END_OF_TURN = "<|end|>"
MERGE_DTYPES = tuple(DTYPES)
# Keyword arguments that only make sense when sampling: giving any of them turns sampling on.
SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")

Messages = Sequence[dict[str, str]]
log = logging.getLogger("phi3tune")


@dataclass
class FineTunedModel:
    """A base model with its LoRA adapter, ready for inference."""

    model: Any
    tokenizer: Any
    adapter_dir: Path

    def generate(self, prompt_or_messages: str | Messages, max_new_tokens: int = 256, **sampling: Any) -> str:
        """The model's reply to a user message (str) or a conversation ([{role, content}, …]), new text only.

        The prompt goes through the tokenizer's chat template; generation stops at ``<|end|>`` or any eos
        id of the generation config. Greedy unless sampling arguments are given (``temperature=0.7``,
        ``top_p=0.9``, ``do_sample=True``, …); other ``model.generate`` arguments pass through.
        """
        return generate_text(self.model, self.tokenizer, prompt_or_messages, max_new_tokens, **sampling)


def as_messages(prompt_or_messages: str | Messages, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A str becomes one user message; a list of {role, content} dicts is checked and copied."""
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = [dict(m) for m in prompt_or_messages]
        bad = [m for m in messages if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)]
        if not messages or bad:
            raise ConfigError("generate: give a prompt string or a non-empty list of {'role': …, 'content': …} "
                              f"messages (role user/assistant/system); got {str(prompt_or_messages)[:120]!r}")
    return add_system_prompt(messages, system_prompt)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id generation should stop at: the generation config's eos ids (Phi-3: 32000, 32001, 32007),
    the tokenizer's eos and its end-of-turn token ``<|end|>`` when it has one."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.extend([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.append(end)
    return sorted(set(ids))


def generate_text(model: Any, tokenizer: Any, prompt_or_messages: str | Messages, max_new_tokens: int = 256,
                  **sampling: Any) -> str:
    """See FineTunedModel.generate; works on any causal LM with a chat-template tokenizer (e.g. a base model)."""
    import torch

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: give at least 1")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("generate: the tokenizer has no chat template; Phi-3 tokenizers ship one, so load the "
                          "tokenizer saved with the adapter or the base model's own")
    text = tokenizer.apply_chat_template(as_messages(prompt_or_messages), tokenize=False, add_generation_prompt=True)
    # The template already holds any special tokens it wants; the data pipeline tokenizes the same way.
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"do_sample": any(k in sampling for k in SAMPLING_KWARGS)}
    kwargs.update(sampling)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **kwargs)
    finally:
        model.train(was_training)
    new_tokens = out[0, enc["input_ids"].shape[1]:]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True))


def read_adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json (+ phi3tune.json when we wrote the adapter); errors name the missing file."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(
            f"adapter directory {str(adapter_dir)!r} has no adapter_config.json; give a directory written by "
            "phi3tune or PEFT's save_pretrained (e.g. results/final_checkpoint)"
        )
    meta = {"base_model": _json_file(cfg_path).get("base_model_name_or_path")}
    if (adapter_dir / META_NAME).is_file():
        meta.update(_json_file(adapter_dir / META_NAME))
    elif (adapter_dir / STATE_NAME).is_file() and (adapter_dir.parent / CONFIG_NAME).is_file():
        # a checkpoint-N of a run: the run's config says how it was trained (4-bit, like its final adapter)
        from .files import read_config

        run = read_config(adapter_dir.parent / CONFIG_NAME)
        meta.update(quant=run.get("quant"), trust_remote_code=bool(run.get("trust_remote_code", False)),
                    checkpoint_step=_json_file(adapter_dir / STATE_NAME).get("step"))
    return meta


def _json_file(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelSourceError(f"{str(path)!r} is not readable JSON ({exc}); give an adapter directory written by "
                               "phi3tune or PEFT's save_pretrained") from exc
    if not isinstance(doc, dict):
        raise ModelSourceError(f"{str(path)!r} holds a {type(doc).__name__}, not a JSON object; give an adapter "
                               "directory written by phi3tune or PEFT's save_pretrained")
    return doc


def _base_of(path: Path, meta: dict[str, Any], base_model: str | None) -> str:
    from .hub import check_hub_id

    base = base_model or meta.get("base_model")
    if not base:
        raise ModelSourceError(f"{str(path)!r}: adapter_config.json names no base model; pass base_model=")
    if not Path(str(base)).expanduser().is_dir():
        check_hub_id(str(base), f"the base model of adapter {str(path)!r} (pass base_model= to choose another)")
    return str(base)


def _load_base(base: str, path: Path, quant: Any, dtype: Any, device: Any, compute_dtype: Any = None,
               trust_remote_code: bool = False) -> Any:
    from .model import load_weights

    try:
        return load_weights(base, quant, dtype, device, compute_dtype=compute_dtype,
                            trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelSourceError(f"could not load base model {base!r} for adapter {str(path)!r}: {str(exc)[:200]}; "
                               "pass base_model= with a local directory") from exc


def _adapter_tokenizer(path: Path, base: str, trust_remote_code: bool) -> Any:
    from .model import load_tokenizer

    return load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base, trust_remote_code)


def load_finetuned(adapter_dir: str | os.PathLike[str], quant: QuantSpec | str | None = SAME_AS_TRAINING,
                   base_model: str | None = None, device: str = "auto",
                   trust_remote_code: bool = False) -> FineTunedModel:
    """Load base + adapter. ``quant`` defaults to the quantization the adapter was trained with; ``None``
    loads the base unquantized. The base model comes from adapter_config.json unless ``base_model`` is given."""
    from peft import PeftModel

    from .precision import auto_dtype, resolve_compute_dtype, resolve_device, resolve_precision

    path = Path(adapter_dir).expanduser()
    meta = read_adapter_meta(path)
    base = _base_of(path, meta, base_model)
    if quant == SAME_AS_TRAINING:
        saved = meta.get("quant")
        quant = spec_from_config("quant", saved, QuantSpec, QuantizationSpec) if saved else None
    elif isinstance(quant, str):
        raise ConfigError(f"load_finetuned: quant={quant!r}; give a QuantSpec, None (unquantized) or leave it out "
                          "(the quantization the adapter was trained with)")
    dev = resolve_device(device)
    if not isinstance(quant, QuantizationSpec):
        quant = None
    cdt = resolve_compute_dtype(quant, resolve_precision("auto", dev), dev) if quant is not None else None
    # quantized: every 4-bit layer on the CPU kernel training used, so the outputs are the trained model's
    model = _load_base(base, path, quant, auto_dtype(dev), dev, cdt, trust_remote_code)
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, str(path))
    peft_model.eval()
    log.info("loaded adapter %s%s on base %s, %s, on %s", path, _step_note(meta), base,
             _quant_note(quant, meta), dev)
    return FineTunedModel(peft_model, _adapter_tokenizer(path, base, trust_remote_code), path)


def _step_note(meta: dict[str, Any]) -> str:
    return f" (checkpoint of step {meta['checkpoint_step']})" if meta.get("checkpoint_step") is not None else ""


def _quant_note(quant: Any, meta: dict[str, Any]) -> str:
    if not isinstance(quant, QuantizationSpec):
        return "unquantized" + (" (trained on a quantized base)" if meta.get("quant") else "")
    return f"quantized {getattr(quant, 'bits', 4)}-bit" + (" as trained" if meta.get("quant") else "")


def _refuse_quantized_base(base: str, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"merge_adapter: could not read the config of base model {base!r} "
                               f"({str(exc)[:200]}); pass base_model= with a local directory") from exc
    qcfg = getattr(config, "quantization_config", None)
    if qcfg:
        method = qcfg.get("quant_method", "?") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", "?")
        raise ConfigError(
            f"merge_adapter: base model {base!r} is a quantized checkpoint ({method}). phi3tune never merges into a "
            "quantized base: the LoRA update would be rounded into 4-bit blocks and mostly lost. Pass base_model= "
            "with the original full-precision checkpoint (the one the 4-bit base was made from)"
        )


def merge_adapter(adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str = "bfloat16",
                  base_model: str | None = None, overwrite: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base and write a standalone model directory.

    The base is loaded **unquantized** in ``dtype`` (even when the adapter was trained on a 4-bit base, as in
    the QLoRA paper), the adapter is merged with PEFT's ``merge_and_unload``, and ``out_dir`` receives
    safetensors weights, config, generation config and tokenizer: ``AutoModelForCausalLM.from_pretrained``
    loads it without peft or phi3tune. ``out_dir`` must be new or empty unless ``overwrite=True``.
    """
    from peft import PeftModel

    if dtype not in MERGE_DTYPES:
        quantized = any(s in str(dtype).lower() for s in ("4", "8", "nf", "int", "fp4", "bnb"))
        why = " phi3tune never merges into a quantized base: the merged weights would be re-rounded to 4/8 bits " \
              "and the adapter's update mostly lost. Merge in 16/32 bits, then quantize the merged model if " \
              "you need to." if quantized else ""
        raise ConfigError(f"merge_adapter: dtype={dtype!r}; use one of {list(MERGE_DTYPES)}.{why}")
    path = Path(adapter_dir).expanduser()
    meta = read_adapter_meta(path)
    base = _base_of(path, meta, base_model)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputDirError(f"merge_adapter: {str(out)!r} exists and is not empty",
                             hint("; choose a new directory or pass {overwrite} to replace it", overwrite=OVERWRITE))
    _refuse_quantized_base(base, trust_remote_code)
    model = _load_base(base, path, None, DTYPES[dtype], torch.device("cpu"), trust_remote_code=trust_remote_code)
    with peft_wrapping():
        merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    log.info("merged adapter %s%s into base %s loaded unquantized in %s", path, _step_note(meta), base, dtype)
    tokenizer = _adapter_tokenizer(path, base, trust_remote_code)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, "the merged model", full_disk_hint=None) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if getattr(merged, "generation_config", None) is not None:
            merged.generation_config.save_pretrained(tmp)
        (tmp / MERGE_META_NAME).write_text(json.dumps(
            {"merged_from_adapter": str(path.resolve()), "base_model": base, "dtype": dtype,
             "adapter_trained_with_quant": meta.get("quant")}, indent=1))
    return out
