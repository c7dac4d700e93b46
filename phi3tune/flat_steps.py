"""One bitsandbytes update per parameter group: the group's trainable parameters live in one flat buffer.

bitsandbytes' ``Optimizer8bit.step`` updates one parameter at a time and waits for the device after each
(``torch.cuda.synchronize``, bitsandbytes 0.50): the README quickstart's 256 LoRA tensors cost 256 Python update
calls and 256 syncs per step, for under a millisecond of arithmetic. Here each group's parameters of one (device,
dtype) are copied into one flat Parameter; each model parameter's ``.data`` and ``.grad`` become views of its
segment, so autograd accumulates into the flat gradient in place and the optimizer steps the flat Parameter once.
The Parameter objects stay the same (autograd, DDP, PEFT see no change).

Only where the math is provably unchanged: bitsandbytes' own Adam-style (1- and 2-state) updates, which are
elementwise unless ``max_unorm`` > 0 (LAMB, LARS: a norm over the whole tensor). Their 8-bit state is quantized
in blocks of 256 elements of the flattened tensor: every segment starts at a multiple of 256 (padded with zeros,
which change no block's maximum), so each block holds one parameter's elements, as before. A parameter smaller
than ``min_8bit_size`` keeps its 32-bit state and its own update; so does any parameter with a per-parameter
config override. A parameter that gets no gradient in the first step would, in a flat buffer, be updated with a
zero gradient (weight decay, decaying moments) where bitsandbytes skips it: then, as when anything replaces a
parameter's gradient view, the optimizer goes back to stepping each parameter (state converted, nothing lost).
Checkpoints keep the per-parameter layout: ``state_dict`` / ``load_state_dict`` convert.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("phi3tune")
ALIGN = 256  # elements: bitsandbytes' 8-bit state blocks, and inductor's alignment of the layers' inputs
_STATES = ("state1", "state2")
_BLOCK_MAXIMA = ("absmax1", "absmax2")


@dataclass
class FlatSet:
    """One flat Parameter and its gradient buffer; ``members`` are (model parameter, offset in elements)."""

    flat: torch.nn.Parameter
    grad: torch.Tensor
    members: list[tuple[torch.nn.Parameter, int]] = field(default_factory=list)

    def views_lost(self) -> list[torch.nn.Parameter]:
        """Members whose ``.grad`` is no longer a view of their segment (something replaced it)."""
        base, size = self.grad.data_ptr(), self.grad.element_size()
        return [p for p, offset in self.members if p.grad is None or p.grad.data_ptr() != base + offset * size]


def _padded(n: int, align: int) -> int:
    return -(-n // align) * align


def flat_set(params: list[torch.nn.Parameter], align: int = ALIGN) -> FlatSet:
    """Copy ``params`` (one device and dtype) into one buffer, segments starting at multiples of ``align``
    elements, and make each parameter's ``.data`` and ``.grad`` views of its segment."""
    total = sum(_padded(p.numel(), align) for p in params)
    like = params[0]
    data = torch.zeros(total, dtype=like.dtype, device=like.device)
    grad = torch.zeros_like(data)
    out = FlatSet(torch.nn.Parameter(data), grad)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            data[offset:offset + n].copy_(p.reshape(-1))
            if p.grad is not None:
                grad[offset:offset + n].copy_(p.grad.reshape(-1))
            p.data = data[offset:offset + n].view(p.shape)
            p.grad = grad[offset:offset + n].view(p.shape)
            out.members.append((p, offset))
            offset += _padded(n, align)
    out.flat.grad = grad
    return out


def _elementwise_bnb(optimizer: Any) -> bool:
    """A bitsandbytes optimizer whose update of a flat buffer equals its updates of the parts."""
    try:
        import bitsandbytes.optim as bnb_optim
        from bitsandbytes.optim.optimizer import Optimizer1State, Optimizer2State, Optimizer8bit
    except ImportError:
        return False
    if not isinstance(optimizer, Optimizer8bit):
        return False
    cls, args = type(optimizer), getattr(optimizer, "args", None)
    own = any(cls.update_step is base.update_step and cls.init_state is base.init_state  # not AdEMAMix's
              for base in (Optimizer1State, Optimizer2State))
    mng = bnb_optim.GlobalOptimManager.get_instance()
    return (own and float(getattr(args, "max_unorm", 0.0)) == 0.0
            and float(getattr(args, "percentile_clipping", 100)) == 100  # older releases: a per-tensor clip
            and bool(getattr(args, "block_wise", True))  # older releases: one scale for the whole tensor
            and not mng.index2config and not optimizer.state)  # overrides by position: they would move


class FlatSteps:
    """Re-points a bitsandbytes optimizer so each param group steps one flat Parameter per (device, dtype)
    (module docstring). Built once, after ``accelerator.prepare``, before the first backward."""

    def __init__(self, optimizer: Any, align: int = ALIGN) -> None:
        from bitsandbytes.optim import GlobalOptimManager

        self.optimizer = optimizer
        self.layout = [list(g["params"]) for g in optimizer.param_groups]  # per parameter: what checkpoints hold
        mng = GlobalOptimManager.get_instance()  # a parameter with its own config keeps its own update (e.g.
        # PEFT's LoRA+ gives embeddings 32-bit state under an 8-bit optimizer)
        overridden = set(mng.pid2config) | {id(getattr(m, a)) for m, a, _ in mng.module_weight_config_triple}
        args = optimizer.args
        self.sets: list[list[FlatSet]] = []
        for group in optimizer.param_groups:
            by_kind: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = defaultdict(list)
            for p in group["params"]:
                small = args.optim_bits == 8 and p.numel() < args.min_8bit_size  # bitsandbytes: 32-bit state
                if p.requires_grad and not small and id(p) not in overridden and type(p.data) is torch.Tensor:
                    by_kind[(p.device, p.dtype)].append(p)
            sets = [flat_set(ps, align) for ps in by_kind.values() if len(ps) > 1]
            flattened = {id(p) for s in sets for p, _ in s.members}
            group["params"] = [s.flat for s in sets] + [p for p in group["params"] if id(p) not in flattened]
            self.sets.append(sets)
        self.reached: set[int] = set()
        self._hooks = [p.register_post_accumulate_grad_hook(self._reach) for p, _ in self._members()]
        self._checked_first = False
        optimizer.register_step_pre_hook(self._check_grads)

    @property
    def active(self) -> bool:
        return any(self.sets)

    def _flat_sets(self) -> list[FlatSet]:
        """Every group's flat sets, in group order."""
        return [s for sets in self.sets for s in sets]

    def _members(self) -> list[tuple[torch.nn.Parameter, int]]:
        return [m for s in self._flat_sets() for m in s.members]

    def _reach(self, p: torch.nn.Parameter) -> None:
        self.reached.add(id(p))

    def zero_grads(self) -> None:
        """After ``optimizer.zero_grad(set_to_none=True)``: zero each flat gradient in place (one kernel; None
        would cut the model parameters' gradient views off from it)."""
        for s in self._flat_sets():
            s.grad.zero_()
            s.flat.grad = s.grad
        self.reached.clear()

    @torch.no_grad()
    def step(self) -> None:
        """The optimizer's update, queued without waiting for the device: bitsandbytes' ``step`` waits after each
        tensor's update and again after a paged optimizer's (``sync_gpu``), which would stall a loop that reads its
        numbers late (late_read.py). The updates run on the device's stream in order, like every other kernel, and
        nothing on the host reads the state in between (a checkpoint's copy is ordered after them too). The first
        step, and any step after the flat layout was given up, is bitsandbytes' own: it builds the state, and
        torch's scheduler checks that ``optimizer.step()`` ran."""
        opt = self.optimizer
        if not self._checked_first:
            opt.step()
            return
        self._check_grads(opt, (), {})
        if not self.active:
            opt.step()
            return
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not opt.state[p]:
                    opt.init_state(group, p, gi, pi)
                opt.prefetch_state(p)
                opt.update_step(group, p, gi, pi)

    def _check_grads(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before each step: every gradient still a view of its flat buffer, and (first step) every member got
        a gradient; else step each parameter, as bitsandbytes does (module docstring)."""
        replaced = [p for s in self._flat_sets() for p in s.views_lost()]
        unreached = [] if self._checked_first else [p for p, _ in self._members() if id(p) not in self.reached]
        if not self._checked_first:
            self._checked_first = True
            for h in self._hooks:
                h.remove()
        if replaced or unreached:
            log.info("optimizer: %d parameter(s) got no gradient and %d had theirs replaced; stepping each "
                     "parameter on its own from now on", len(unreached), len(replaced))
            self.unflatten(no_grad=unreached)

    def unflatten(self, no_grad: list[torch.nn.Parameter] | None = None) -> None:
        """Go back to one update per parameter, the state cut per parameter; the parameters stay views of the
        flat buffers (which changes nothing for bitsandbytes); ``no_grad``: parameters that got no gradient."""
        self._drop_flat(self._per_parameter(device=None))
        for p in no_grad or []:
            p.grad = None

    def _drop_flat(self, state: dict[Any, Any]) -> None:
        self.sets = [[] for _ in self.layout]
        for group, params in zip(self.optimizer.param_groups, self.layout):
            group["params"] = params
        self.optimizer.state = defaultdict(dict, state)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _per_parameter(self, device: str | None) -> dict[Any, Any]:
        """The optimizer's state keyed by model parameter: each member's cut out of its flat state (copied to
        ``device``, None: where it is)."""
        state: dict[Any, Any] = {}
        flats = {id(s.flat) for s in self._flat_sets()}
        for s in self._flat_sets():
            if self.optimizer.state.get(s.flat):
                for p, offset in s.members:
                    state[p] = _segment_state(self.optimizer.state[s.flat], p, offset, device)
        state.update((k, v) for k, v in self.optimizer.state.items() if id(k) not in flats)
        return state

    @contextmanager
    def _per_parameter_layout(self, state: dict[Any, Any]) -> Iterator[None]:
        """For the block, the optimizer as bitsandbytes built it (a group's parameters one by one) holding
        ``state``; then the flat layout and state again."""
        opt = self.optimizer
        flat_params, flat_state = [g["params"] for g in opt.param_groups], opt.state
        for group, params in zip(opt.param_groups, self.layout):
            group["params"] = params
        opt.state = defaultdict(dict, state)
        try:
            yield
        finally:  # load_state_dict made new group dicts: give them the flat parameters
            for group, params in zip(opt.param_groups, flat_params):
                group["params"] = params
            opt.state = flat_state

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state_dict in the per-parameter layout: what it holds without the flat step. The
        flat members' states are copied to the CPU (where the checkpoint loads them): no second copy of the
        state on the device."""
        if not self.active:
            return dict(self.optimizer.state_dict())
        with self._per_parameter_layout(self._per_parameter(device="cpu")):
            return dict(self.optimizer.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a per-parameter state_dict (written with or without the flat step) into the flat state."""
        opt = self.optimizer
        if not self.active:
            opt.load_state_dict(state_dict)
            return
        with self._per_parameter_layout({}):
            opt.load_state_dict(state_dict)  # bitsandbytes checks the groups, casts and moves the state
            loaded = opt.state
        dtype = torch.uint8 if opt.args.optim_bits == 8 else torch.float32
        if not all(_joinable([loaded.get(p) for p, _ in s.members], dtype) for s in self._flat_sets()):
            log.info("optimizer: the checkpoint's states of the parameters differ in step count or type; stepping "
                     "each parameter on its own")
            self._drop_flat(loaded)
            return
        members = {id(p) for p, _ in self._members()}
        for p, v in loaded.items():
            if id(p) not in members:
                opt.state[p] = v
        for gi, group in enumerate(opt.param_groups):
            for pi, s in enumerate(self.sets[gi]):  # the flat Parameters come first in each group
                if loaded.get(s.members[0][0]):
                    opt.init_state(group, s.flat, gi, pi)
                    _join(opt.state[s.flat], [loaded[p] for p, _ in s.members], s.members)


def _segment_state(flat: dict[str, Any], p: torch.nn.Parameter, offset: int, device: str | None) -> dict[str, Any]:
    """One member's state cut out of the flat state, as bitsandbytes would hold it (its own storage)."""
    n, out = p.numel(), {}
    block = offset // ALIGN
    for k, v in flat.items():
        if k in _STATES:
            out[k] = v[offset:offset + n].to(device or v.device, copy=True).view(p.shape)
        elif k in _BLOCK_MAXIMA:
            out[k] = v[block:block + _padded(n, ALIGN) // ALIGN].to(device or v.device, copy=True)
        else:  # step, qmap1/2
            out[k] = v
    return out


def _joinable(parts: list[dict[str, Any] | None], dtype: torch.dtype) -> bool:
    """All members have no state, or all have one at the same step, of the flat state's type."""
    if not any(parts):
        return True
    return all(p and p["state1"].dtype == dtype for p in parts) and len({int(p["step"]) for p in parts if p}) == 1


def _join(flat: dict[str, Any], parts: list[dict[str, Any]], members: list[tuple[torch.nn.Parameter, int]]) -> None:
    """Copy each member's loaded state into its segment of the freshly initialised flat state."""
    flat["step"] = parts[0]["step"]
    for part, (p, offset) in zip(parts, members):
        n, block = p.numel(), offset // ALIGN
        for k in _STATES:
            if k in flat:
                flat[k][offset:offset + n].copy_(part[k].reshape(-1))
        for k in _BLOCK_MAXIMA:
            if k in flat:
                flat[k][block:block + part[k].numel()].copy_(part[k])


def step_flat(optimizer: Any, module: Any) -> FlatSteps | None:
    """For an elementwise bitsandbytes optimizer (unwrapped from accelerate's): the flat step. None where it
    does not apply, or under DDP with ``gradient_as_bucket_view`` (DDP then points each ``.grad`` at its own
    bucket, which would cut the gradient views off from the flat buffer)."""
    raw = getattr(optimizer, "optimizer", optimizer)
    if not _elementwise_bnb(raw) or getattr(module, "gradient_as_bucket_view", False):
        return None
    if os.environ.get("PHI3TUNE_FLAT_STEP", "1") == "0":  # benchmarks only: the per-tensor step, to compare
        return None
    flat = FlatSteps(raw)
    if not flat.active:
        return None
    log.info("optimizer: %d trainable tensors step as %d flat buffer(s), one update each",
             len(flat._members()), sum(map(len, flat.sets)))
    return flat
