"""The spec protocols and plugin loading: what FineTuner calls on each spec, and how a config file names user code.

A spec is any object with the methods below: a subclass of the built-in spec, or a class of your own. Beyond
these, the plan, the preflight checks and the distributed checks read only the facts declared here
(``QuantFacts``, ``AdapterFacts``, ``DataFacts``): a spec declares one by having an attribute of that name, and
one it lacks is taken at the default written there. So a new quantization, adapter or data pipeline needs no
fork (docs/extending.md). In a config file a plugin spec is ``{"class": "mypkg.specs:MySpec", <its fields>}``;
loading such a file imports ``mypkg.specs`` and so runs its code, like running a script.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from .errors import ConfigError

CLASS_KEY = "class"


@runtime_checkable
class QuantizationSpec(Protocol):
    """Turns into the transformers quantization config the base model is loaded with."""

    @property
    def compute_dtype(self) -> str:
        """"auto" (follow training.precision) or a torch dtype name such as "bfloat16"."""
        ...

    def quantization_config(self, compute_dtype: Any) -> Any:
        """The ``quantization_config=`` for ``from_pretrained`` (e.g. a BitsAndBytesConfig); ``compute_dtype``
        is the resolved torch dtype."""
        ...


@runtime_checkable
class AdapterConfigSpec(Protocol):
    """Turns into the PEFT config of the adapter, for the model's real layer names."""

    target_modules: Any  # "auto" or a list of layer names; resolved against the model before any weights load

    def peft_config(self, target_modules: list[str]) -> Any:
        """A ``peft.PeftConfig`` (e.g. LoraConfig) for ``target_modules``, the resolved layer names."""
        ...


@runtime_checkable
class DataPipelineSpec(Protocol):
    """Turns its rows into tokenized training examples (see phi3tune.data.PreparedData)."""

    max_seq_length: int
    packing: bool

    def prepare(self, tokenizer: Any, seed: int) -> Any:
        """Load, tokenize and mask the examples: a ``PreparedData`` (``PreparedData.from_examples`` builds one)."""
        ...


@dataclass(frozen=True)
class QuantFacts:
    """What is read of a quantization spec beyond ``QuantizationSpec`` (defaults: a plain 4-bit base)."""

    bits: int = 4  # 4 or 8: the memory estimate, which adapter inits work, FSDP (4 only)
    double_quant: bool = False  # the memory estimate
    quant_storage: str | None = None  # FSDP needs the compute dtype here (None: not declared)


@dataclass(frozen=True)
class AdapterFacts:
    """What is read of an adapter spec beyond ``AdapterConfigSpec`` (defaults: a rank-16 LoRA, no dropout)."""

    r: int = 16  # the memory estimate
    dropout: float = 0.0  # the memory estimate (dropout keeps more activations)
    init: str = "default"  # checked against the base before weights load (adapters.INITS)
    use_dora: bool = False  # refused with init="loftq"
    modules_to_save: list[str] | None = None  # each must name a module of the model


@dataclass(frozen=True)
class DataFacts:
    """What is read of a data spec beyond ``DataPipelineSpec``."""

    has_eval: bool | None = None  # whether prepare() returns eval data; None: known once prepared
    streaming: bool = False  # whether prepare() returns a stream (no length: the run needs max_steps)


F = TypeVar("F", QuantFacts, AdapterFacts, DataFacts)


def facts(spec: Any, kind: type[F]) -> F:
    """The facts ``kind`` declares, read off ``spec`` (absent ones at their defaults): the one place where
    phi3tune looks at a spec beyond its protocol."""
    return kind(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(kind) if hasattr(spec, f.name)})


_MEMBERS: dict[type, tuple[str, ...]] = {
    QuantizationSpec: ("compute_dtype", "quantization_config"),
    AdapterConfigSpec: ("target_modules", "peft_config"),
    DataPipelineSpec: ("max_seq_length", "packing", "prepare"),
}


def import_path(obj: Any) -> str:
    """``module:QualName`` of a class or function, the form config files use."""
    return f"{obj.__module__}:{obj.__qualname__}"


def load_object(path: Any, field: str) -> Any:
    """Import ``module.sub:Name`` (or ``module.sub.Name``); one ConfigError naming ``field`` for every way it fails."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f'{field}: give an import path such as "mypkg.specs:MySpec", got {path!r}')
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f'{field}={path!r} is not an import path; write "module:Name", e.g. "mypkg.specs:MySpec"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}={path!r}: cannot import module {module_name!r} ({exc}); install the package "
                          "that defines it or put its directory on PYTHONPATH") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise ConfigError(f"{field}={path!r}: module {module_name!r} has no attribute {attr!r}; "
                              f"it defines {public}")
        obj = getattr(obj, part)
    return obj


def spec_fields(spec: Any) -> dict[str, Any]:
    """A spec's fields as plain data: pydantic models, dataclasses, or an object's public attributes."""
    if hasattr(spec, "model_dump"):
        return dict(spec.model_dump())
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.asdict(spec)
    return {k: v for k, v in vars(spec).items() if not k.startswith("_")}


def spec_to_config(spec: Any, builtin: type) -> dict[str, Any]:
    """The built-in spec's fields as they are; a plugin's fields plus ``class`` (its import path)."""
    fields = spec_fields(spec)
    if type(spec) is builtin:
        return fields
    return {CLASS_KEY: import_path(type(spec)), **fields}


def check_spec(spec: Any, protocol: type, field: str) -> Any:
    """``spec`` if it implements ``protocol``; else a ConfigError that names the missing methods/attributes."""
    if isinstance(spec, protocol):
        return spec
    members = [m for m in _MEMBERS.get(protocol, ()) if not hasattr(spec, m)]
    raise ConfigError(f"{field}: {type(spec).__name__} is not a {protocol.__name__} (missing {sorted(members)}); "
                      f"subclass the built-in spec or implement {protocol.__name__} (docs/extending.md)")


def spec_from_config(section: str, values: Any, builtin: type, protocol: type) -> Any:
    """Build a spec from its config section: the built-in class, or the class named by ``class``."""
    values = dict(values or {})
    cls = builtin
    if CLASS_KEY in values:
        cls = load_object(values.pop(CLASS_KEY), f"{section}.{CLASS_KEY}")
        if not isinstance(cls, type):
            raise ConfigError(f"{section}.{CLASS_KEY}: {cls!r} is not a class; name a spec class")
    try:
        spec = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{section}: {cls.__name__} does not take these fields ({exc})") from exc
    return check_spec(spec, protocol, f"{section}.{CLASS_KEY}")
