"""Checkpointed layers' inputs in host memory (offload.py): released on the device after forward, brought back for
backward, the step unchanged bit for bit; the plan asks for it where it should."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, tiny_tuner

from phi3tune import FineTuner
from phi3tune.loss import TokenLoss
from phi3tune.offload import Offloader
from phi3tune.tiny import write_tiny_phi3


def _checkpointed_model(path: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step(model: Any, offloader: Offloader | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Any], int]:
    """Forward + backward of one packed row of two documents. Returns the loss, the gradients, weak references to
    each decoder layer's output as they stood after forward, and how many saved tensors went to the host."""
    model.zero_grad(set_to_none=True)
    loss_fn = TokenLoss(model)
    loss_fn.offloader = offloader
    outputs: list[Any] = []
    handles = [layer.register_forward_hook(
        lambda _m, _i, out: outputs.append(weakref.ref(out[0] if isinstance(out, tuple) else out)))
        for layer in model.model.layers]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 48), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    loss = loss_fn(ids, ids.clone(), pos)
    for h in handles:
        h.remove()
    gc.collect()
    alive = [ref() is not None for ref in outputs]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, alive, offloader.packed if offloader else 0


def test_offloaded_inputs_leave_the_device_and_the_step_is_unchanged(tmp_path):
    """With every layer checkpointed, each layer's output (the next one's input) is held only as the offloader's
    copy after forward, and the loss and every gradient equal plain checkpointing's bit for bit. Negative control:
    plain checkpointing keeps those outputs alive until backward."""
    model = _checkpointed_model(write_tiny_phi3(tmp_path / "m", layers=4))
    loss, grads, alive, _ = _step(model, None)
    off_loss, off_grads, off_alive, packed = _step(model, Offloader())
    assert alive[:-1] == [True] * 3  # plain checkpointing holds every layer's input on the device
    assert off_alive[:-1] == [False] * 3  # offloaded: released (the last output goes on to the final norm)
    assert packed >= 4  # at least each layer's input
    assert torch.equal(loss, off_loss)
    assert grads.keys() == off_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], off_grads[n]) for n in grads)


def test_offloader_hooks_apply_only_inside_and_are_released(tmp_path):
    """Outside ``hooks()`` nothing is packed; after it the offloader holds no entry of that forward (the autograd
    graph alone does, so host copies go when backward has used them)."""
    off = Offloader()
    x = torch.randn(8, 8, requires_grad=True)
    (x * x).sum().backward()
    assert off.packed == 0
    with off.hooks():
        y = (x * x).sum()
    assert off.packed == 2 and off._last is None
    y.backward()
    assert torch.equal(x.grad, 2 * x.detach() + 2 * x.detach())  # the first backward's grad, then this one's


@needs_shared
def test_plan_offloads_for_the_memory_plan_on_cuda(monkeypatch):
    """The memory plan on CUDA offloads and predicts less (all but two checkpointed inputs off the device); the
    CPU, FSDP and the speed plans do not; PHI3TUNE_OFFLOAD=1 asks for it only where every layer is checkpointed."""
    from phi3tune.bench import plan_for

    monkeypatch.delenv("PHI3TUNE_OFFLOAD", raising=False)
    mem = FineTuner(str(PHI3_DIR)).training(optimize_for="memory").data(packing=True, max_seq_length=4096)
    on = plan_for(mem, "cuda", free_gib=8)
    assert on.offload_checkpoints and "their inputs in host memory" in on.describe()
    assert not plan_for(mem, "cpu").offload_checkpoints
    monkeypatch.setenv("PHI3TUNE_OFFLOAD", "0")
    off = plan_for(mem, "cuda", free_gib=8)
    assert not off.offload_checkpoints
    saved = (on.checkpoint_layers - 2) * 4096 * 3072 * 2 / 2**30  # bf16 inputs of 30 layers at 4,096 tokens
    assert abs((off.predicted_peak_gib - on.predicted_peak_gib) - saved) < 0.01
    monkeypatch.delenv("PHI3TUNE_OFFLOAD")
    eight = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=8)  # the speed plan checkpoints some layers
    assert eight.checkpoint_layers > 0 and not eight.offload_checkpoints
    monkeypatch.setenv("PHI3TUNE_OFFLOAD", "1")  # asked for: only ever with every layer checkpointed
    plans = [plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=g) for g in (8, 12, 24, 139)]
    assert all(p.checkpoint_layers == 32 for p in plans if p.offload_checkpoints)
    assert plans[0].offload_checkpoints and plans[0].predicted_peak_gib < eight.predicted_peak_gib
    monkeypatch.delenv("PHI3TUNE_OFFLOAD")
    assert not plan_for(mem.training(distributed="fsdp"), "cuda", free_gib=8, processes=2).offload_checkpoints


def test_public_run_with_offload_trains_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    """Through FineTuner.run: the memory plan (every layer checkpointed) with offloading asked for trains the adapter
    and losses of the run without it, bit for bit, and says so in its plan. (Eager layers, for the suite's time:
    compiled ones on the CPU gave the same equality and no extra graph, measured once; on the H200 the compiled
    memory plan trains with it, docs/performance.md session 7.)"""
    rows = rows_of_text(8, seed=4)
    runs, moved = {}, {"0": 0, "1": 0}
    real_pack = Offloader._pack

    def counting(self: Offloader, t: torch.Tensor) -> Any:
        moved[flag] += 1
        return real_pack(self, t)

    monkeypatch.setattr(Offloader, "_pack", counting)
    for flag in ("0", "1"):
        monkeypatch.setenv("PHI3TUNE_OFFLOAD", flag)
        runs[flag] = tiny_tuner(tiny_model, tmp_path / flag, rows, optimize_for="memory", grad_accum=2,
                                max_steps=3).run()
    assert runs["1"].plan.offload_checkpoints and not runs["0"].plan.offload_checkpoints
    assert moved["0"] == 0 and moved["1"] >= 3 * 2  # at least both layers' inputs in each of the 3 steps
    assert runs["1"].losses == runs["0"].losses and len(runs["0"].losses) == 3
    a, b = adapter_tensors(runs["0"]), adapter_tensors(runs["1"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
