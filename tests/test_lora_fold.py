"""LoRA's B product folded into the base matmul (phi3tune/lora_fold.py): the same outputs and gradients as PEFT's
forward up to summation order, eager and in a compiled layer, on the 4-bit and the dequantized base; the same
parameter names while folded; PEFT's modules back after unfolding; through FineTuner.run the same losses."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import adapter_tensors, lora_on_4bit, rows_of_text, tiny_tuner

from phi3tune import compiled_layers as cl
from phi3tune.dequantized import dequantize_base
from phi3tune.lora_fold import FoldedBase, fold_lora, unfold_lora


def _layer_run(inner: Any, compiled: bool) -> tuple[torch.Tensor, ...]:
    """The first decoder layer's output, input gradient and every trained gradient, for one fixed input."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = torch.compile(inner.layers[0], backend=cl.backend(generate=False), dynamic=False) if compiled \
        else inner.layers[0]
    x = torch.randn(2, 12, inner.config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pos = torch.arange(12)[None].expand(2, -1)
    out = layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    grads = [p.grad for p in inner.layers[0].parameters() if p.requires_grad]
    return (out.detach(), x.grad, *grads)


@pytest.mark.parametrize("dequantized,compiled", [(False, False), (True, False), (False, True)])
def test_folded_lora_computes_what_peft_does(tiny_model, dequantized, compiled):
    """fp32 on the CPU, LoRA weights drawn (B not zero), dropout on: the folded layer's output, input gradient
    and every LoRA gradient equal PEFT's to fp32 summation order (1e-5 relative), on the 4-bit base (eager and
    compiled by our backend's partitioner) and on the dequantized one. Negative control: the fold without its
    variant (PEFT then adds the LoRA product a second time) differs far beyond that tolerance."""
    def inner_of(fold: bool, variant: bool = True) -> Any:
        model = lora_on_4bit(tiny_model, torch.float32, dropout=0.1)
        if dequantized:
            dequantize_base(model, torch.float32)
        if fold:
            assert fold_lora(model) == 8  # 4 linears x 2 decoder layers
        if not variant:
            for module in model.modules():
                getattr(module, "lora_variant", {}).clear()
        return model.get_base_model().model

    def close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], tol: float) -> bool:
        return len(a) == len(b) > 2 and all(torch.allclose(x, y, rtol=tol, atol=tol * y.abs().max().item())
                                            for x, y in zip(a, b, strict=True))

    peft = _layer_run(inner_of(False), compiled)
    folded = _layer_run(inner_of(True), compiled)
    assert close(folded, peft, 1e-5)
    assert not all(torch.equal(x, y) for x, y in zip(folded, peft, strict=True))  # a different summation, really run
    assert not close(_layer_run(inner_of(True, variant=False), compiled), peft, 1e-2)


def test_folding_keeps_every_name_and_unfolding_puts_back_the_base_layers(tiny_model):
    """While folded the model's parameters have the same names and tensors and PEFT's adapter state dict is the
    same; merging is refused; unfolding puts back the very base layer objects and PEFT's plain forward, and a
    second fold of a folded model folds nothing."""
    from peft.utils import get_peft_model_state_dict

    model = lora_on_4bit(tiny_model, torch.float32)
    bases = {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer")}
    names = dict(model.named_parameters())
    adapter = get_peft_model_state_dict(model)
    assert fold_lora(model) == 8 and fold_lora(model) == 0
    assert dict(model.named_parameters()) == names
    folded_adapter = get_peft_model_state_dict(model)
    assert folded_adapter.keys() == adapter.keys() and len(adapter) == 16
    assert all(folded_adapter[k] is adapter[k] or torch.equal(folded_adapter[k], adapter[k]) for k in adapter)
    assert sum(isinstance(m, FoldedBase) for m in model.modules()) == 8
    with pytest.raises(RuntimeError, match="unfold_lora"):
        model.merge_adapter()
    assert unfold_lora(model) == 8
    assert all(m.base_layer is bases[n] for n, m in model.named_modules() if hasattr(m, "base_layer"))
    assert not any(getattr(m, "lora_variant", {}) for m in model.modules())


def test_public_run_with_lora_folded_trains_the_same_losses(tiny_model, tmp_path, monkeypatch):
    """Through FineTuner.run (PHI3TUNE_LORA_FOLD=1, any plan): the folded run's 3 losses and adapter equal the
    plain run's to 1e-5, the folded forward really ran, and the returned model holds PEFT's modules again."""
    rows = rows_of_text(8, seed=4)
    calls = {"n": 0}
    real_forward = FoldedBase.forward

    def counting(self: FoldedBase, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return real_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(FoldedBase, "forward", counting)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("PHI3TUNE_LORA_FOLD", flag)
        runs[flag] = tiny_tuner(tiny_model, tmp_path / flag, rows, grad_accum=2, max_steps=3).run()
    assert calls["n"] >= 3 * 2 * 8  # 3 steps x 2 micro-batches x 8 linear layers
    assert len(runs["1"].losses) == len(runs["0"].losses) == 3
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(runs["1"].losses, runs["0"].losses, strict=True))
    a, b = adapter_tensors(runs["0"]), adapter_tensors(runs["1"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert not any(isinstance(m, FoldedBase) for m in runs["1"].model.modules())


@pytest.mark.parametrize("forward_order", [False, True])
def test_compiled_fold_saves_no_concatenated_weight(tiny_model, monkeypatch, forward_order):
    """A compiled folded layer on the dequantized base saves activations only: no [N, K + r] concatenated weight
    for backward (on the GPU every layer's was saved, +6.75 GiB on Phi-3-mini, s36c1). Negative control
    (``forward_order``): backward concatenating [W | B] as forward does, the joint graph's CSE merges the two and
    the partitioner saves each such weight."""
    import torch._dynamo

    from phi3tune import lora_fold

    if forward_order:
        def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
            h, weight, b = ctx.saved_tensors
            wb = torch.cat([lora_fold._dense(weight, ctx.quant_state, dy.dtype), b.to(dy.dtype)], dim=1)
            both, r = dy @ wb, h.shape[1]
            return both[:, :-r], both[:, -r:].to(h.dtype), None, (dy.t() @ h.to(dy.dtype)).to(ctx.b_dtype), None

        monkeypatch.setattr(lora_fold._FoldedMatmul, "backward", staticmethod(backward))
    model = lora_on_4bit(tiny_model, torch.float32, dropout=0.1)
    dequantize_base(model, torch.float32)
    fold_lora(model)
    inner = model.get_base_model().model
    folded = [m for m in inner.layers[0].modules() if isinstance(m, FoldedBase)]
    concatenated = {(m.weight.shape[0], m.weight.shape[1] + m.owner.lora_B[m.adapter].weight.shape[1])
                    for m in folded}
    torch._dynamo.reset()
    layer = torch.compile(inner.layers[0], backend=cl.backend(generate=False), dynamic=False)
    x = torch.randn(2, 12, inner.config.hidden_size, requires_grad=True)
    pos = torch.arange(12)[None].expand(2, -1)
    layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)  # compiled outside the hooks
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert len(folded) == 4 and shapes and x.grad is not None
    assert bool(concatenated & set(shapes)) == forward_order
