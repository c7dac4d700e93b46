"""Config templates shipped inside the package, and the commented config ``phi3tune init`` writes.

``path("qlora_phi3")`` is a shipped template's file (it works from an installed package, not only a clone).
``commented_config(config)`` writes a ``FineTuner.to_config()`` document as YAML with every field, its
default and a line of help taken from the specs' pydantic field descriptions, so it never drifts from them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOP_LEVEL_HELP = {  # FineTuner's own arguments; the sections' help comes from the specs
    "model": "hub id or local directory (config.json + .safetensors)",
    "trust_remote_code": "run the model repo's own code (Phi-3 needs none with transformers >= 5)",
    "attn_implementation": "null: phi3tune picks (SDPA, or FlexAttention for packed rows on CUDA)",
    "quant": "how the frozen base is quantized; null = plain LoRA on an unquantized base",
}


def names() -> list[str]:
    """The shipped templates, by the name ``path`` and ``phi3tune init --template`` take."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def path(name: str) -> Path:
    """The file of a shipped template, e.g. ``path("qlora_phi3")``."""
    from ..errors import ConfigError

    found = HERE / f"{name}.yaml"
    if name not in names():
        raise ConfigError(f"template {name!r} does not exist; shipped templates: {names()}")
    return found


def _spec_classes() -> dict[str, type]:
    from ..specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec

    return {"quant": QuantSpec, "adapter": AdapterSpec, "data": DataSpec, "training": TrainSpec}


def _value(value: Any) -> str:
    """One YAML scalar or flow collection, as ``yaml.safe_load`` reads it back."""
    import yaml

    return str(yaml.safe_dump(value, default_flow_style=True, width=10_000)).removesuffix("\n...\n").strip()


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 116 - len(indent))]


def commented_config(config: dict[str, Any], header: str = "") -> str:
    """``config`` (a ``FineTuner.to_config()`` dict of built-in specs) as YAML: each field preceded by its help
    and its default (where the value differs from it)."""
    specs = _spec_classes()
    lines = _comment(header, "") if header else []
    for key, value in config.items():
        spec = specs.get(key)
        help_text = TOP_LEVEL_HELP.get(key) or ((spec.__doc__ if spec else None) or key).strip().splitlines()[0]
        lines += ["", *_comment(help_text, "")] if isinstance(value, dict) else _comment(help_text, "")
        if not isinstance(value, dict):
            lines.append(f"{key}: {_value(value)}")
            continue
        lines.append(f"{key}:")
        assert spec is not None, key
        for name, field in spec.model_fields.items():  # type: ignore[attr-defined]
            default = field.get_default(call_default_factory=True)
            note = field.description or ""
            if value.get(name, default) != default:
                note += f" (default: {_value(default)})"
            lines += _comment(note, "  ")
            lines.append(f"  {name}: {_value(value.get(name, default))}")
    return "\n".join(lines) + "\n"


def init_text(template: str | None = None, model: str | None = None, data: str | None = None) -> str:
    """What ``phi3tune init`` writes: a shipped template as it is, or the defaults (with ``model`` and ``data``
    where given) as a commented config."""
    from .. import __version__
    from ..errors import ConfigError
    from ..finetuner import FineTuner

    if template:
        if model or data:
            raise ConfigError("init: --template copies the template as it is; leave out --model/--data and give "
                              "them at train time: phi3tune train PATH --model MODEL --data DATA")
        return path(template).read_text()
    ft = FineTuner(model) if model else FineTuner()
    if data:
        ft.data(source=data)
    return commented_config(ft.to_config(), f"A phi3tune run config (phi3tune {__version__}): `phi3tune train "
                            "THIS_FILE`. Every field shows its default; delete the ones you keep as they are.")
