"""Checks of the FineTuner's own arguments and of the model's files, before output_dir is claimed.

Spec fields are validated by pydantic; these are the values that are not in a spec (``trust_remote_code``,
``quantized``, ``attn_implementation``, the model argument) and what only the checkpoint's files can tell
(``attn_implementation`` supported by this model, weight files readable and of the config's shapes). All of it
reads configs and file headers only: no weights load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelSourceError

log = logging.getLogger("phi3tune")


def as_bool(value: Any, field: str) -> bool:
    """A bool as pydantic reads spec fields: True/False, 1/0, "true"/"false", "yes"/"no", "on"/"off"; never
    bool("false") == True."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return bool(TypeAdapter(bool).validate_python(value))
    except ValidationError:
        raise ConfigError(f"{field} must be true or false, got {value!r} ({type(value).__name__}); "
                          f"use {field}=True or {field}=False (in a config file: true / false)") from None


def model_argument(model: Any) -> str:
    """The model argument: a hub id or a local directory. A loaded model object is refused in one line."""
    import os

    if hasattr(model, "state_dict") and hasattr(model, "config"):
        where = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
        hint = f" (this one was loaded from {where!r})" if where else ""
        raise ConfigError(
            f"model: FineTuner takes a hub id or a local directory, not a loaded {type(model).__name__}{hint}. "
            "phi3tune loads the base itself (quantized to 4 bits): pass the path or hub id, or save yours first "
            "with model.save_pretrained(dir) and tokenizer.save_pretrained(dir) and pass dir")
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model: give a hub id like microsoft/Phi-3-mini-4k-instruct or a local directory, not "
                          f"a {type(model).__name__}")
    text = str(model)
    if not text.strip():
        raise ConfigError("model: give a hub id like microsoft/Phi-3-mini-4k-instruct or a local directory")
    return text


def attn_implementation(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"attn_implementation must be a name such as \"sdpa\" or \"eager\" (or null for the "
                          f"default), got {value!r}")
    return value


def check_model_loads(info: Any, attn: str | None, trust_remote_code: bool) -> None:
    """attn_implementation supported by this model and installed; local weight files readable, of the right shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn:
        from . import varlen_attention

        kwargs["attn_implementation"] = varlen_attention.registered(attn)
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(info.config, **kwargs)
    except (ValueError, ImportError) as exc:
        if not attn:
            raise
        raise ConfigError(f"attn_implementation={attn!r} cannot be used with this model here: "
                          f"{str(exc).splitlines()[0][:400]}. Use \"sdpa\" or \"eager\", or leave "
                          "attn_implementation unset (null) for phi3tune's default") from exc
    path = Path(info.source)
    if path.is_dir():
        _check_weight_files(path, meta, info.config)


def _check_weight_files(path: Path, meta: Any, config: Any) -> None:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelSourceError(f"model directory {str(path)!r}: {index.name} is not a valid weight index "
                                   f"({exc}); re-save the model with save_pretrained") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelSourceError(f"model directory {str(path)!r}: {index.name} lists weight files that are "
                                   f"missing: {missing[:5]}; give a directory that holds all of them (copy or "
                                   "download them again)")
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    quantized = getattr(config, "quantization_config", None) is not None  # packed shapes differ from the config's
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    shape = tuple(handle.get_slice(key).get_shape())
                    want = expected.get(key)
                    if want is not None and not quantized and shape != want:
                        raise ModelSourceError(
                            f"model weights {str(f)!r}: tensor {key!r} has shape {list(shape)} but config.json "
                            f"says {list(want)}; the weights and config.json are of different models. Give a "
                            "directory whose config.json was saved with these weights")
        except ModelSourceError:
            raise
        except Exception as exc:  # safetensors' own error type, OSError
            raise ModelSourceError(
                f"model weights {str(f)!r} cannot be read ({exc.__class__.__name__}: {str(exc)[:200]}); the file is "
                "damaged or incomplete (an interrupted download or copy?). Download or copy it again, or re-save "
                "the model with save_pretrained(dir, safe_serialization=True)") from exc


def check_sections(config: dict[str, Any]) -> None:
    """Each spec section of a config document is a mapping of fields (``quant`` may be null)."""
    for key in ("quant", "adapter", "data", "training"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"config {key}: is {value!r} ({type(value).__name__}), but it must be a section of fields, e.g. "
                f"--set {key}.FIELD=VALUE or, in the file, '{key}: {{FIELD: VALUE}}'"
                + (" (quant: null trains plain LoRA on an unquantized base)" if key == "quant" else ""))


_SPEC_ARGS = {"QuantSpec": "quant / .quantize()", "AdapterSpec": "adapter / .adapter()", "DataSpec": "data / .data()",
              "TrainSpec": "training / .training()"}


def spec_argument(cls: Any, value: Any, protocol: type = object, field: str = "") -> Any:
    """A spec argument of FineTuner / its builder methods: the spec itself, a dict of its fields, None, or a user's
    plugin implementing ``protocol`` (docs/extending.md). A built-in spec of another kind is refused in one line."""
    from .plugins import check_spec

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    if type(value).__name__ not in _SPEC_ARGS or type(value).__module__ != cls.__module__:
        return check_spec(value, protocol, field or cls.__name__)
    raise ConfigError(f"{_SPEC_ARGS[cls.__name__]} takes a {cls.__name__} (or a dict of its fields), got a "
                      f"{type(value).__name__}; pass .{_SPEC_ARGS[cls.__name__].split('.')[-1][:-2]}"
                      f"({cls.__name__}(...)) or keyword arguments")


def spec_values(spec: Any) -> dict[str, Any]:
    """The fields of a spec, to build a new one from: plain values copied (a caller's later changes to their list
    of rows do not reach the run), datasets objects passed as they are (a dump would turn a DatasetDict into a
    plain dict of Datasets, which DataSpec refuses)."""
    values = spec.model_dump()
    for name in values:
        original = getattr(spec, name)
        if type(original).__module__.split(".")[0] == "datasets":
            values[name] = original
    return values


def merge_spec(cls: Any, current: Any, spec: Any, kwargs: dict[str, Any], protocol: type, field: str) -> Any:
    """A fresh spec of the same class (a subclass keeps its class; a dict of fields builds the built-in); keywords
    override its fields. A plugin that is not pydantic is used as given."""
    from .plugins import check_spec

    base = spec_argument(cls, spec, protocol, field) if spec is not None else current
    if base is not None and not hasattr(base, "model_validate"):
        if kwargs:
            raise ConfigError(f"{field}: keyword arguments need a pydantic spec; build your "
                              f"{type(base).__name__} with them instead")
        return base
    cls = type(base) if base is not None else cls
    values = spec_values(base) if base is not None else {}
    return check_spec(cls(**{**values, **kwargs}), protocol, field)


def check_specs(data: Any, train: Any) -> None:
    """Combinations of fields of different specs that cannot work (each spec checks its own fields); ``data`` is
    the data spec's ``plugins.DataFacts``."""
    if data.streaming and train.max_steps is None:
        raise ConfigError("data.streaming=True needs training.max_steps: a stream's length is unknown, so "
                          f"num_epochs={train.num_epochs} cannot be turned into steps; set max_steps (the stream "
                          "starts over at its end), or set streaming=False")
    if train.eval_steps and data.has_eval is False:
        raise ConfigError(
            f"training.eval_steps={train.eval_steps} but there is no eval data; set data.eval_fraction (e.g. 0.05) "
            "or data.eval_source to evaluate, or training.eval_steps=None to train without evaluation")
