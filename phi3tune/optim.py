"""Optimizers and learning-rate schedules by name: any torch.optim or bitsandbytes.optim class, an import path,
and any transformers schedule that steps without a metric.

Names and keyword arguments are checked when the TrainSpec is built (before any weights load), against the
optimizer's and the schedule's own signatures, so a typo fails at once with the list of what would work.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("phi3tune")
# The classic recipe's names: bitsandbytes' paged AdamW (paging only exists on CUDA: the CPU gets the unpaged twin).
LEGACY = {"adamw_torch": ("torch", "AdamW", "AdamW"),
          "paged_adamw_32bit": ("bnb", "PagedAdamW32bit", "AdamW32bit"),
          "paged_adamw_8bit": ("bnb", "PagedAdamW8bit", "AdamW8bit")}
# state tensors per parameter, by optimizer family (the class name without Paged / 8bit / 32bit, lower case)
_STATES = {"adam": 2, "adamw": 2, "nadam": 2, "radam": 2, "adamax": 2, "lamb": 2, "adadelta": 2, "rprop": 2,
           "asgd": 2, "sparseadam": 2, "ademamix": 3, "lion": 1, "sgd": 1, "lars": 1, "pytorchlars": 1, "rmsprop": 1,
           "adagrad": 1, "adafactor": 1, "muon": 1}
# schedules that need a metric at every step: our loop steps the schedule once per optimizer step, with no metric
_NEEDS_METRIC = {"reduce_lr_on_plateau", "greedy"}
_SET_BY_LOOP = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}


def _optimizers(module: Any) -> dict[str, type]:
    return {n: c for n in dir(module) if isinstance(c := getattr(module, n), type)
            and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}


def _bnb_optimizers() -> dict[str, type]:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        return {}
    return _optimizers(bnb_optim)


def optimizer_class(name: str, device_type: str = "cuda") -> type:
    """The optimizer class ``name`` means: a legacy name, a torch.optim class, a bitsandbytes.optim class (exact
    name first, then case-insensitive; torch before bitsandbytes), or ``module:Class``."""
    if name in LEGACY:
        where, paged, unpaged = LEGACY[name]
        if where == "torch":
            return torch.optim.AdamW
        return _bnb_optimizers()[paged if device_type == "cuda" else unpaged]
    if ":" in name:
        from .plugins import load_object

        cls = load_object(name, "training.optimizer")
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"training.optimizer={name!r} is not a torch.optim.Optimizer subclass")
        return cls
    torch_opts, bnb_opts = _optimizers(torch.optim), _bnb_optimizers()
    for table in (torch_opts, bnb_opts):
        if name in table:
            return table[name]
    for table in (torch_opts, bnb_opts):
        for key, cls in table.items():
            if key.lower() == name.lower():
                return cls
    raise ValueError(
        f"training.optimizer={name!r} is no optimizer; use {sorted(LEGACY)}, a torch.optim class "
        f"({sorted(torch_opts)}), a bitsandbytes.optim class (e.g. {sorted(bnb_opts)[:12]}…) or an import path "
        '"module:Class"')


@dataclass(frozen=True)
class OptimizerFacts:
    """What the plan and the memory estimate need to know of an optimizer."""

    cls: type
    paged: bool  # bitsandbytes pages its state to host memory under device memory pressure
    state_bytes: int  # optimizer state per trainable parameter (8-bit states: 1 byte each, else fp32)


def optimizer_facts(name: str, device_type: str = "cuda") -> OptimizerFacts:
    """The class ``name`` means on ``device_type``, whether it is paged, and its state bytes per parameter: the
    one place these are known (plan.py and memory.py read them). Unknown families count as AdamW (2 states)."""
    cls = optimizer_class(name, device_type)
    key = cls.__name__.lower()
    # bitsandbytes pages only on CUDA (elsewhere a Paged class falls back to unpaged state, with a warning)
    paged = cls.__module__.startswith("bitsandbytes") and key.startswith("paged") and device_type == "cuda"
    key = key.removeprefix("paged")
    state_dtype_bytes = 1 if key.endswith("8bit") else 4
    family = key.removesuffix("8bit").removesuffix("32bit")
    return OptimizerFacts(cls, paged, _STATES.get(family, 2) * state_dtype_bytes)


def takes_weight_decay(cls: type) -> bool:
    params = inspect.signature(cls).parameters
    return "weight_decay" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_optimizer(name: str, kwargs: dict[str, Any], weight_decay: float = 0.0) -> None:
    """Fail at once on an unknown optimizer, one whose step needs a closure (our loop gives none), a keyword its
    constructor does not take, or a weight_decay it has no notion of."""
    cls = optimizer_class(name)
    closure = inspect.signature(getattr(cls, "step")).parameters.get("closure")  # noqa: B009 - cls is a type
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"training.optimizer={name!r}: {cls.__name__}.step needs a closure (it re-evaluates the "
                         "loss), which phi3tune's loop does not give; use an optimizer such as adamw_torch")
    if weight_decay and not takes_weight_decay(cls):
        raise ValueError(f"training.weight_decay={weight_decay}: {cls.__name__} (training.optimizer) has no weight "
                         "decay; set weight_decay=0 or choose an optimizer that takes it (e.g. adamw_torch)")
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    taken = set(params) - {"self", "params", "lr", "weight_decay"}
    unknown = sorted(set(kwargs) - taken)
    if unknown:
        raise ValueError(f"training.optimizer_kwargs: {cls.__name__} takes no {unknown}; it takes {sorted(taken)} "
                         "(lr and weight_decay come from training.learning_rate / weight_decay)")


def _schedule_function(name: str) -> Any:
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    usable = sorted(t.value for t in SchedulerType if t.value not in _NEEDS_METRIC)
    if name in _NEEDS_METRIC:
        raise ValueError(f"training.lr_scheduler={name!r} needs an evaluation metric at every step, which this loop "
                         f"does not give; use one of {usable}")
    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except ValueError:
        raise ValueError(f"training.lr_scheduler={name!r} is no transformers schedule; use one of {usable}") from None


def check_scheduler(name: str, kwargs: dict[str, Any]) -> None:
    """Fail at once on an unknown schedule, an unknown keyword, or a missing required one."""
    params = inspect.signature(_schedule_function(name)).parameters
    taken = set(params) - _SET_BY_LOOP
    unknown = sorted(set(kwargs) - taken)
    if unknown:
        raise ValueError(f"training.lr_scheduler_kwargs: {name!r} takes no {unknown}; it takes {sorted(taken)} "
                         "(warmup and the step count come from training.warmup_ratio / max_steps)")
    missing = sorted(n for n, p in params.items() if n not in _SET_BY_LOOP and p.default is p.empty
                     and n not in kwargs)
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and not {"min_lr", "min_lr_rate"} & set(kwargs):
        missing.append("min_lr or min_lr_rate")
    if missing:
        raise ValueError(f"training.lr_scheduler={name!r} needs lr_scheduler_kwargs {missing}, e.g. "
                         + ("{'num_decay_steps': 20}" if name == "warmup_stable_decay" else "{'min_lr_rate': 0.1}"))


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device, kwargs: dict[str, Any] | None = None, model: Any = None,
                    loraplus_lr_ratio: float | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``params``; with ``loraplus_lr_ratio``, PEFT's LoRA+ groups (lora_B at ratio x lr)."""
    cls = optimizer_class(name, device.type)
    kwargs = dict(kwargs or {})
    if loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                         loraplus_weight_decay=weight_decay, **kwargs)
    if takes_weight_decay(cls):
        kwargs["weight_decay"] = weight_decay
    return cls(params, lr=lr, **kwargs)  # weight_decay is 0 for one that takes none (check_optimizer)


def build_scheduler(name: str, optimizer: Any, warmup_steps: int, total_steps: int,
                    kwargs: dict[str, Any] | None = None) -> Any:
    """transformers' schedule ``name`` with the user's extra keywords (e.g. min_lr_rate, num_decay_steps)."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, warmup_steps, total_steps, scheduler_specific_kwargs=dict(kwargs or {}))


def follow_new_total(scheduler: Any, optimizer: Any, saved_total: int | None, total_steps: int, next_step: int) -> None:
    """A resume with another step count (max_steps / num_epochs changed): the schedule is the one for the new
    total from ``next_step`` on (not the old schedule's last value), and the log says how the LR moves."""
    if not saved_total or saved_total == total_steps:
        return
    import warnings

    old = scheduler.get_last_lr()
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # a plugin's schedule: say it only
        log.warning("resume: the run is now %d steps, the checkpoint's was %d; the learning-rate schedule is "
                    "recomputed for the new total", total_steps, saved_total)
        return
    with warnings.catch_warnings():  # get_lr() outside step(): the schedule's value at this step, wanted here
        warnings.simplefilter("ignore")
        new = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, new):
        group["lr"] = lr
    scheduler._last_lr = list(new)
    log.warning("resume: the run is now %d steps (training.max_steps / num_epochs), the checkpoint's was %d; "
                "the learning-rate schedule (warmup_ratio, lr_scheduler) is recomputed for %d steps, so the "
                "learning rate at step %d goes from %.3g (old schedule) to %.3g", total_steps, saved_total,
                total_steps, next_step, old[0], new[0])
