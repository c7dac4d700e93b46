"""Export an adapter for serving engines that expect separate projections (``--layout split``).

Phi-3 fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``. A LoRA update of a fused layer
is ``B @ A``: ``A`` reads the layer's input (shared by every slice) and each output row of ``B`` belongs to one
slice of the fused output (``qkv_proj`` = [q (heads x head_dim), k (kv_heads x head_dim), v (kv_heads x
head_dim)], ``gate_up_proj`` = [gate, up]). So on split layers the same update is exact: ``A`` copied to
``q_proj``/``k_proj``/``v_proj`` (``gate_proj``/``up_proj``) and ``B`` cut by rows. Nothing is approximated;
a split-layout copy of the base with the exported adapter gives the fused model's logits (tested).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelSourceError, OutputDirError
from .files import EXPORT_META_NAME as EXPORT_META_NAME
from .files import META_NAME, atomic_dir

LAYOUTS = ("split",)
SPLIT_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_WEIGHTS = "adapter_model.safetensors"
_NOT_COPIED = {_WEIGHTS, "adapter_config.json", "adapter_model.bin", META_NAME}
_SHARED = ("lora_A.weight",)  # reads the fused layer's input: the same for every slice
_BY_ROWS = ("lora_B.weight", "lora_B.bias")  # one row per output feature of the fused layer
_REWRITES_BASE = ("olora", "pissa", "corda")  # PEFT inits that subtract the adapter's start from the base weights


def fused_slices(config: Any) -> dict[str, list[tuple[str, int, int]]]:
    """Output-row slices of each fused layer: {"qkv_proj": [("q_proj", 0, q), ("k_proj", q, q + kv), …], …}."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, kv, ff = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    return {"qkv_proj": [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)],
            "gate_up_proj": [("gate_proj", 0, ff), ("up_proj", ff, 2 * ff)]}


def _split_name(name: str) -> list[str]:
    """"…qkv_proj" -> ["…q_proj", "…k_proj", "…v_proj"]; other names stay as they are."""
    fused = next((f for f in SPLIT_NAMES if f in name), None)
    return [name.replace(fused, s) for s in SPLIT_NAMES[fused]] if fused else [name]


def _rename(names: Any, what: str) -> Any:
    """Fused names in a target list (or in the keys of a rank/alpha pattern) -> their split names."""
    if isinstance(names, dict):
        return {new: value for key, value in names.items() for new in _split_name(key)}
    if isinstance(names, str):
        if any(f in names for f in SPLIT_NAMES):
            raise ConfigError(f"export: adapter_config.json {what} is a regular expression ({names!r}); export needs "
                              "a list of layer names. Re-train with target_modules as a list (phi3tune always "
                              "writes one)")
        return names
    return sorted({new for name in names for new in _split_name(name)})


def _check_splittable(cfg: dict[str, Any], path: Path) -> None:
    """Refuse adapters whose saved tensors are not plain LoRA A/B of the fused layers."""
    where = f"export: {str(path / 'adapter_config.json')!r}"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be split")
    if cfg.get("use_dora"):
        raise ConfigError(f"{where} is a DoRA adapter (use_dora=true): its magnitude vectors are not exported. "
                          "Serve it with the fused layout, or merge it (phi3tune merge) and serve the merged model")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        raise ConfigError(f"{where} was initialised with init_lora_weights={init!r}: that init rewrites the base "
                          "weights (base minus the adapter's start), so the original split base plus this adapter "
                          "is not the trained model. Merge it instead (phi3tune merge) and serve the merged model")
    fused_saved = [m for m in cfg.get("modules_to_save") or [] if any(f in m for f in SPLIT_NAMES)]
    if fused_saved:
        raise ConfigError(f"{where}: modules_to_save {fused_saved} are fused layers trained in full; a split "
                          "engine cannot load them as an adapter. Merge instead (phi3tune merge)")
    if cfg.get("target_parameters"):
        raise ConfigError(f"{where}: target_parameters {cfg['target_parameters']} cannot be split; merge instead")


def _split_tensors(tensors: dict[str, Any], slices: dict[str, list[tuple[str, int, int]]],
                   path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, t in tensors.items():
        m = re.search(r"\.(qkv_proj|gate_up_proj)\.(.+)$", key)
        if m is None:
            out[key] = t  # o_proj, down_proj, embeddings, …: the same name in both layouts
            continue
        fused, rest = m.group(1), m.group(2)
        parts = slices[fused]
        if rest in _SHARED:
            out.update({key.replace(f".{fused}.", f".{name}."): t.clone() for name, _, _ in parts})
        elif rest in _BY_ROWS:
            if t.shape[0] != parts[-1][2]:
                raise ConfigError(
                    f"export: {key} has {t.shape[0]} output rows but the base config gives {fused} "
                    f"{parts[-1][2]} ({', '.join(f'{n} {b - a}' for n, a, b in parts)}); pass base_model= with the "
                    "base the adapter was trained on")
            out.update({key.replace(f".{fused}.", f".{name}."): t[a:b].clone() for name, a, b in parts})
        else:
            raise ConfigError(f"export: {str(path / _WEIGHTS)!r} holds {key!r}, which is not a LoRA A/B matrix of "
                              f"{fused} and cannot be split; merge the adapter instead (phi3tune merge)")
    return out


def export_adapter(adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], layout: str = "split",
                   base_model: str | None = None, served_base: str | None = None, overwrite: bool = False,
                   trust_remote_code: bool = False) -> Path:
    """Write an equivalent adapter for engines that expect separate q/k/v and gate/up projections.

    ``base_model``: where to read the fused base's config (default: adapter_config.json's base).
    ``served_base``: the split-layout base the engine serves, written as ``base_model_name_or_path`` of the
    exported adapter (default: the original base's name). Tokenizer files are copied along.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from .inference import _base_of, read_adapter_meta

    if layout not in LAYOUTS:
        raise ConfigError(f"export: layout={layout!r}; use one of {list(LAYOUTS)}")
    path = Path(adapter_dir).expanduser()
    meta = read_adapter_meta(path)
    if not (path / _WEIGHTS).is_file():
        raise ModelSourceError(f"export: {str(path)!r} has no {_WEIGHTS}; re-save the adapter with "
                               "save_pretrained(safe_serialization=True)")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputDirError(f"export: {str(out)!r} exists and is not empty; choose a new directory or pass "
                             "overwrite=True (phi3tune export --overwrite)")
    cfg = json.loads((path / "adapter_config.json").read_text())
    _check_splittable(cfg, path)
    base = _base_of(path, meta, base_model)
    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"export: could not read the config of base model {base!r} ({str(exc)[:200]}); "
                               "pass base_model= with a local directory holding its config.json") from exc
    tensors = _split_tensors(load_file(str(path / _WEIGHTS)), fused_slices(base_config), path)
    new_cfg = dict(cfg)
    new_cfg["target_modules"] = _rename(cfg.get("target_modules"), "target_modules")
    for key in ("exclude_modules", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            new_cfg[key] = _rename(cfg[key], key)
    new_cfg["base_model_name_or_path"] = served_base or cfg.get("base_model_name_or_path") or base
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, "the exported adapter", full_disk_hint=None) as tmp:
        for f in path.iterdir():
            if f.is_file() and f.name not in _NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True))
        (tmp / EXPORT_META_NAME).write_text(json.dumps(
            {"exported_from": str(path.resolve()), "layout": layout, "fused_base": base,
             "split": {f: [n for n, _, _ in s] for f, s in fused_slices(base_config).items()}}, indent=1))
    return out
