"""Several processes: the FSDP plugin, the collective timeout, and errors that say why a collective failed.

The loop calls into this module with one line per concern, so the distributed policy lives in one place.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch

from .errors import TrainingError

log = logging.getLogger("phi3tune")
F = TypeVar("F", bound=Callable[..., Any])

# words in torch / gloo / NCCL errors of a collective that timed out or whose peer went away
_TIMEOUT = ("timed out", "timeout")
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "ncclremoteerror",
              "nccl communicator was aborted", "socket closed")


def process_group_kwargs(timeout_s: float) -> dict[str, Any]:
    """``init_process_group`` keywords for ``PartialState``: a collective that waits longer than this raises."""
    return {"timeout": timedelta(seconds=timeout_s)}


def ddp_kwargs(settings: dict[str, Any]) -> list[Any]:
    """accelerate's DDP keywords for the plan's bucket settings (RunPlan.ddp; none: torch's defaults). The loop
    syncs once per optimizer step (no_sync on all but the last micro-batch), where DDP's buckets all-reduce as
    the backward pass fills them: bucket size and gradients-as-bucket-views set how much of that overlaps."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(**settings)] if settings else []


def is_sharded(module: Any) -> bool:
    """Whether ``module`` (as accelerate prepared it) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(module, "_orig_mod", module), FSDPModule)


def fsdp_plugin(model: Any) -> Any:
    """FSDP2 (``fully_shard``) with every decoder layer its own unit: gathered for its forward and backward, freed
    after, so a GPU holds its shards plus the layer running and the one prefetched. accelerate adds the embedding
    and the final norm + output head as units; the rest (LoRA inside each layer) shards with its layer.

    The layer classes are named to accelerate (the base model's ``_no_split_modules``): accelerate's FSDP2 path
    understands only a transformer- or size-based policy, and ignored PEFT's FSDP1 policy (an ``_or_policy`` of
    LoRA leaves and layers), which left the whole model ONE unit gathered whole for every forward (measured: one
    FSDP module; on 2x H200 more memory per GPU than one GPU, and Phi-3-medium out of memory while sharding).

    FSDP2, not FSDP1: accelerate re-points an optimizer built before wrapping at the sharded parameters only for
    FSDP2 (``Accelerator._prepare_fsdp2``); under FSDP1 with ``use_orig_params=False`` the optimizer keeps the
    orphaned original LoRA tensors and trains nothing. FSDP2 also runs on the CPU with gloo; FSDP1 refuses. No
    ``sync_module_states``: every rank loads the same checkpoint and seeds the adapter the same way.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = sorted(set(getattr(base, "_no_split_modules", None) or []))
    if not layers:  # not a transformers model that names its layers: wrap by size instead
        return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="size_based_wrap",
                                              reshard_after_forward=True, cpu_ram_efficient_loading=False)
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=layers, reshard_after_forward=True,
                                          cpu_ram_efficient_loading=False)


def keep_quant_state_on_gathered_weights(model: Any) -> None:
    """Under FSDP2 a 4-bit layer's weight, gathered for its forward, is a plain Parameter that has lost the
    bitsandbytes ``quant_state``; bitsandbytes then wraps it in a new ``Params4bit`` on every forward, which
    compiled layers cannot trace (a graph break in every 4-bit linear, and a recompile each step until dynamo's
    limit). A pre-forward hook on each 4-bit layer hands the gathered weight the layer's own quant state
    instead, so that bitsandbytes finds it and wraps nothing. FSDP2 gathers into the same Parameter every time, so
    after the first forward the hook only reads."""
    for module in model.modules():
        if getattr(module, "quant_state", None) is not None and hasattr(module, "weight"):
            module.register_forward_pre_hook(_hand_quant_state)


def hand_quant_state_eagerly(loss_module: Any, ids: torch.Tensor) -> None:
    """One eager no-grad forward of ``ids`` before compiled layers build their graphs, so the hook above sets the
    gathered weights' quant state outside any trace: inside a checkpointed layer, setting it while tracing is a
    side effect dynamo refuses (a graph break)."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        loss_module(ids, ids, positions)


def _hand_quant_state(module: Any, args: Any) -> None:
    if getattr(module.weight, "quant_state", None) is None:
        module.weight.quant_state = module.quant_state


def use_fsdp_on_cpu(acc: Any, plugin: Any) -> None:
    """accelerate turns FSDP on for accelerators only: on the CPU it ignores the plugin and silently runs DDP.
    torch's FSDP2 runs on the CPU with gloo, so we switch it on: the CPU test exercises accelerate's FSDP2 path."""
    from accelerate.utils import DistributedType

    if plugin is None or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    from accelerate.state import PartialState

    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def host_group(acc: Any, timeout_s: float) -> Any:
    """A process group for the loop's small integer collectives (a step's token counts, its micro-batch count):
    gloo, on CPU tensors. Through NCCL the result is a GPU tensor, and reading it makes the host wait until the
    GPU has finished all queued work (the previous step's optimizer update) before it can queue the next forward:
    once per step, a wait one process never pays. gloo also finds a dead peer at the next step's counts (0.01 s
    after a rank was killed, 2x H200: docs/distributed.md). The default group when it is already gloo; None with
    one process. A collective: every rank calls it, once."""
    if acc.num_processes == 1:
        return None
    dist = torch.distributed
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def release_host_group(group: Any) -> None:
    """Destroy a gloo group ``host_group`` made (not the default group; a local call, no collective)."""
    dist = torch.distributed
    if group is not None and group is not dist.group.WORLD and dist.is_initialized():
        dist.destroy_process_group(group)


def sum_on_host(t: torch.Tensor, group: Any) -> torch.Tensor:
    """``t`` (a CPU tensor) summed over the ranks of ``group`` (``host_group``); ``t`` itself with one process."""
    if group is not None:
        torch.distributed.all_reduce(t, group=group)
    return t


def largest_count(module: Any, group: Any) -> Callable[[int], int]:
    """Under FSDP every forward and backward is a collective (all-gather, reduce-scatter), so every rank must run
    the same number of micro-batches per step; padding-free plans re-cut each rank's examples by tokens, so counts
    can differ. The function returned gives the largest count over the ranks of ``group`` (a ``host_group``; a
    collective: call it on every rank), which ``batching.equal_count`` fills up to. With one process or DDP
    (one all-reduce per step whatever the count) it is each rank's own count."""
    if group is None or not is_sharded(module):
        return _own_count

    def largest(n: int) -> int:
        t = torch.tensor([n])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
        return int(t)

    return largest


def _own_count(n: int) -> int:
    return n


def full_adapter_state(acc: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """Under FSDP the trainable (LoRA) parameters are sharded DTensors: gather them whole on every rank (a
    collective: call it on all ranks), so the main process can save them. None when not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in acc.unwrap_model(model).named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name.removeprefix("model.")] = t.detach().cpu()  # names under TokenLoss -> under the PEFT model
    return out


def explain(exc: BaseException, timeout_s: float | None) -> str | None:
    """The message for a failed collective, or None when ``exc`` is not one."""
    text = str(exc).lower()
    dist_error = type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
    timed_out = any(w in text for w in _TIMEOUT)
    gone = any(w in text for w in _PEER_GONE)
    if not (timed_out or gone or dist_error):
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
    what = ("waited longer than training.collective_timeout_s" + (f"={timeout_s:g} s" if timeout_s else "")
            if timed_out else "lost its peer") if (timed_out or gone) else "failed"
    return (f"rank {rank}: a collective (all-reduce / all-gather / barrier between the processes) {what}. "
            "Likely causes: another rank died or hangs (look for the first error in every rank's log), ranks ran "
            "different collectives (different data or number of steps per rank, a rank-dependent branch), or the "
            "network (NCCL/gloo interface, firewall, MASTER_ADDR/PORT between machines). If a rank legitimately "
            "needs longer between collectives (a slow checkpoint write, compiling), raise "
            f"training.collective_timeout_s. Original error: {type(exc).__name__}: {str(exc)[:500]}")


def collective_errors(fn: F) -> F:
    """Turn a timed-out or broken collective inside ``fn`` (a Trainer method) into a TrainingError that says why."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except RuntimeError as e:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise
            msg = explain(e, getattr(getattr(self, "spec", None), "collective_timeout_s", None))
            if msg is None:
                raise
            raise TrainingError(msg) from e

    return cast(F, wrapper)
