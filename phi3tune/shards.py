"""FSDP: bitsandbytes optimizers stepping each rank's local shards, and each rank's part of a checkpoint.

bitsandbytes' update kernels take plain tensors ("got mixed torch.Tensor and DTensor" on FSDP2's DTensor
parameters). Its optimizers are elementwise, apart from the 8-bit state's blockwise scale (256-element blocks of
the flattened shard) and the trust ratio of ``max_unorm`` (LAMB, LARS: a norm over the whole tensor). So a rank
can step its own shard: the optimizer is re-pointed at plain views that alias each DTensor parameter's local
storage, and before every step each view's ``.grad`` is pointed at the local part of the DTensor gradient. The
update lands in the sharded parameter itself (no copy); FSDP all-gathers it in the next forward. torch.optim
optimizers run on the DTensors themselves (torch supports them), which keeps e.g. Adafactor's row/column
statistics over the whole tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

SHARD_NAME = "shard.rank{rank}.pt"  # checkpoint-N under FSDP: one rank's adapter shard and optimizer state


def _is_bnb(optimizer: Any) -> bool:
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    return isinstance(optimizer, Optimizer8bit)


def check_optimizer_shardable(name: str, kwargs: dict[str, Any], device_type: str) -> None:
    """Refuse, before weights load, a bitsandbytes optimizer whose update needs a norm over the whole tensor
    (``max_unorm`` > 0: LAMB, LARS), which a rank holding half of it cannot compute."""
    from .optim import optimizer_class

    cls = optimizer_class(name, device_type)
    try:
        probe = cls([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, **kwargs)
    except Exception:  # the constructor's own refusal is reported when the run builds it
        return
    if not _is_bnb(probe) or float(getattr(probe.args, "max_unorm", 0.0)) <= 0.0:
        return
    raise ConfigError(
        f'training.optimizer={name!r} with training.distributed="fsdp": its update is scaled by a norm over each '
        "whole parameter (max_unorm > 0: LAMB / LARS), and under FSDP each rank holds only a shard. Use an "
        'elementwise optimizer: "paged_adamw_32bit" (the default), "paged_adamw_8bit", "adamw_torch", or any '
        "bitsandbytes Adam / AdamW / AdEMAMix / Lion / RMSprop / Adagrad (8- or 32-bit, paged or not), or "
        'distributed="ddp"')


class LocalShardSteps:
    """Re-points a bitsandbytes optimizer over DTensor parameters at their local shards (module docstring).

    Built once, after ``accelerator.prepare``; its step pre-hook gives every view its shard's gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.tensor import DTensor

        self.pairs: list[tuple[Any, torch.Tensor]] = []  # (DTensor parameter, plain view of its local shard)
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if isinstance(p, DTensor):
                    view = p.to_local().detach()
                    _check_alias(view, p)
                    group["params"][i] = view
                    self.pairs.append((p, view))
        optimizer.register_step_pre_hook(self._point_grads)

    def _point_grads(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for p, view in self.pairs:
            local = p.to_local()
            if view.data_ptr() != local.data_ptr():  # FSDP re-padded its storage (load_state_dict(assign=True))
                view.data = local.detach()
            # an empty shard (a tensor with fewer rows than ranks) has nothing to step: bitsandbytes skips it
            view.grad = None if p.grad is None or not view.numel() else p.grad.to_local().detach()


def _check_alias(view: torch.Tensor, p: Any) -> None:
    if view.numel() and view.untyped_storage().data_ptr() != p.to_local().untyped_storage().data_ptr():
        raise RuntimeError("an FSDP shard view does not alias its parameter's storage; updates would be lost")


def step_local_shards(optimizer: Any) -> LocalShardSteps | None:
    """For a bitsandbytes optimizer (unwrapped from accelerate's) over DTensors: step local shards. Else None."""
    raw = getattr(optimizer, "optimizer", optimizer)
    return LocalShardSteps(raw) if _is_bnb(raw) else None


# ---------------------------------------------------------------------------------------------- checkpoints
def _local(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by this rank's local tensor (what torch.save can write per rank)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_local(v) for v in obj]
    return obj


def save_shard(directory: Path, rank: int, world: int, params: list[tuple[str, Any]], optimizer: Any) -> None:
    """This rank's trainable shards and optimizer state, into ``directory`` (a checkpoint being written)."""
    state = {"world_size": world, "params": {n: _local(p.detach()) for n, p in params},
             "optimizer": _local(optimizer.state_dict())}
    torch.save(state, directory / SHARD_NAME.format(rank=rank))


def load_shard(directory: Path, rank: int, world: int, params: list[tuple[str, Any]], optimizer: Any) -> None:
    """Restore this rank's shards and optimizer state written by ``save_shard`` with as many processes."""
    from torch.distributed.tensor import DTensor

    path = directory / SHARD_NAME.format(rank=rank)
    if not path.is_file():
        saved = len(list(directory.glob(SHARD_NAME.format(rank="*"))))
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {path.name}: it was written by "
                              f"{saved or 'no FSDP'} process(es); resume it with distributed=\"fsdp\" on as many "
                              "processes as wrote it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["world_size"] != world:
        raise CheckpointError(f"checkpoint {str(directory)!r} was written by {state['world_size']} FSDP processes; "
                              f"resume it with {state['world_size']}, not {world}")
    with torch.no_grad():
        for name, p in params:
            (p.to_local() if isinstance(p, DTensor) else p).copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    _rewrap_state(getattr(optimizer, "optimizer", optimizer))


def _rewrap_state(optimizer: torch.optim.Optimizer) -> None:
    """torch.optim over DTensors: the loaded moments are local tensors again; make them DTensors like their
    parameter (placements, global shape), as the optimizer created them."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.to_local().shape \
                        and v.dim() > 0:
                    state[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())
