"""The frozen 4-bit base dequantized once for the run (phi3tune/dequantized.py): the same numbers in every matmul,
so the same losses, gradients and adapter bit for bit, eager and compiled; the plan takes it only where it fits;
the run returns its 4-bit layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import PHI3_DIR, adapter_tensors, lora_on_4bit, needs_shared, rows_of_text, tiny_tuner

from phi3tune import FineTuner
from phi3tune import compiled_layers as cl
from phi3tune.dequantized import DequantizedLinear, dequantize_base, restore_4bit
from phi3tune.memory import GIB


def _nudged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: every dequantized weight's largest value 1/64 larger than bitsandbytes' (a difference
    that a comparison with a tolerance of 1e-2 would let through)."""
    real = DequantizedLinear.__init__

    def init(self: DequantizedLinear, original: Any, dtype: torch.dtype) -> None:
        real(self, original, dtype)
        flat = self.weight.data.view(-1)
        flat[flat.abs().argmax()] *= 1 + 2**-6

    monkeypatch.setattr(DequantizedLinear, "__init__", init)


def _trained_alike_and_4bit_again(runs: dict[str, Any], plain: str, dequantized: str) -> None:
    """The dequantized run trained the 4-bit run's 3 losses and adapter bit for bit, the nudged one did not, and the
    model the dequantized run returns holds its 8 4-bit layers again."""
    from bitsandbytes.nn import Linear4bit

    assert runs[dequantized].losses == runs[plain].losses and len(runs[plain].losses) == 3
    a, b = adapter_tensors(runs[plain]), adapter_tensors(runs[dequantized])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs["nudged"].losses != runs[plain].losses
    base = runs[dequantized].model.get_base_model()
    assert not any(isinstance(m, DequantizedLinear) for m in base.modules())
    assert sum(isinstance(m, Linear4bit) for m in base.modules()) == 8


def test_public_run_with_the_base_dequantized_trains_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    """Through FineTuner.run: the base dequantized once (asked for with PHI3TUNE_DEQUANTIZE=1, since the CPU plan
    does not take it) trains the losses and adapter of the 4-bit run bit for bit; its matmuls really read the
    dequantized weights, and the model it returns has its 4-bit layers back. Negative control: one weight value
    per layer 1/64 off changes the losses."""

    rows = rows_of_text(8, seed=4)
    calls = {"n": 0}
    real_forward = DequantizedLinear.forward

    def counting(self: DequantizedLinear, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return real_forward(self, x)

    monkeypatch.setattr(DequantizedLinear, "forward", counting)
    runs = {}
    for flag in ("0", "1", "nudged"):
        monkeypatch.setenv("PHI3TUNE_DEQUANTIZE", "0" if flag == "0" else "1")
        if flag == "nudged":
            _nudged(monkeypatch)
        runs[flag] = tiny_tuner(tiny_model, tmp_path / flag, rows, grad_accum=2, max_steps=3).run()
        if flag == "0":
            assert calls["n"] == 0
    assert runs["1"].plan.dequantized_base and not runs["0"].plan.dequantized_base
    assert "4-bit base dequantized once" in runs["1"].plan.describe()
    assert calls["n"] >= 2 * 3 * 2 * 8  # two runs x 3 steps x 2 micro-batches x 8 linear layers (2 decoder layers)
    _trained_alike_and_4bit_again(runs, "0", "1")


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # the GPU plans' compute dtype
def test_a_compiled_layer_on_the_dequantized_base_computes_what_the_4bit_one_does(tiny_model, dtype, monkeypatch):
    """A PEFT LoRA decoder layer compiled with our backend (the GPU plans' path): on the dequantized base its
    output and every gradient equal the 4-bit layer's bit for bit, in the compute dtype the plans use. Negative
    control: one value per weight 1/64 off is seen."""
    import torch._dynamo

    def layer_of(dequantized: bool) -> Any:
        model = lora_on_4bit(tiny_model, dtype)
        if dequantized:
            assert dequantize_base(model, dtype) == sum(
                m.weight.numel() for m in model.modules() if isinstance(m, DequantizedLinear)) * dtype.itemsize
        return model.get_base_model().model

    def run(inner: Any) -> tuple[torch.Tensor, ...]:
        torch._dynamo.reset()
        layer = torch.compile(inner.layers[0], backend=cl.backend(), dynamic=False)
        x = torch.randn(1, 16, inner.config.hidden_size, generator=torch.Generator().manual_seed(1),
                        dtype=dtype, requires_grad=True)
        pos = torch.arange(16)[None]
        out = layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().sum().backward()
        grads = [p.grad for p in inner.layers[0].parameters() if p.requires_grad]
        return (out.detach(), x.grad, *grads)

    four_bit = run(layer_of(False))
    once = run(layer_of(True))
    assert len(once) == len(four_bit) > 2
    assert all(torch.equal(a, b) for a, b in zip(once, four_bit, strict=True))
    _nudged(monkeypatch)
    nudged = run(layer_of(True))
    assert not torch.equal(nudged[0], four_bit[0])


def test_restore_puts_back_the_very_4bit_layers(tiny_model):
    """``restore_4bit`` undoes ``dequantize_base``: the same module objects, none left over, and the dequantized
    weights are not parameters of the model while the 4-bit ones are held aside."""
    from bitsandbytes.nn import Linear4bit

    model = lora_on_4bit(tiny_model, torch.float32)
    before = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    n_params = sum(1 for _ in model.parameters())
    dequantize_base(model, torch.float32)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert sum(1 for _ in model.parameters()) == n_params  # a Params4bit swapped for a dequantized weight, each
    assert restore_4bit(model) == len(before) == 8
    after = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


@needs_shared
def test_the_plan_dequantizes_the_base_only_where_it_fits(monkeypatch):
    """Phi-3-mini on CUDA: the whole H200 and a 40 GiB card take the dequantized base (its 2 bytes a weight in the
    predicted peak, which still fits); 16 GiB, the memory plan, FSDP and an autocast dtype other than the
    compute dtype do not; PHI3TUNE_DEQUANTIZE=0 turns it off, =1 on (also on the CPU)."""
    from phi3tune.bench import plan_for

    monkeypatch.delenv("PHI3TUNE_DEQUANTIZE", raising=False)
    ft = FineTuner(str(PHI3_DIR))

    def fresh() -> FineTuner:  # a FineTuner's setters change it in place
        return FineTuner(str(PHI3_DIR))
    weights = sum(i * o for i in (3072,) for o in (9216, 3072, 16384)) * 32 + 8192 * 3072 * 32  # the 4 linears
    h200, forty = plan_for(ft, "cuda", free_gib=139), plan_for(ft, "cuda", free_gib=39)
    for plan in (h200, forty):
        assert plan.dequantized_base and plan.memory["dequantized_weights"] == 2 * weights
        assert plan.predicted_peak_gib <= 0.9 * (139 if plan is h200 else 39)
    assert not plan_for(ft, "cuda", free_gib=15).dequantized_base
    assert not plan_for(fresh().training(optimize_for="memory"), "cuda", free_gib=139).dequantized_base
    assert not plan_for(fresh().training(distributed="fsdp"), "cuda", free_gib=139, processes=2).dequantized_base
    assert not plan_for(fresh().quantize(compute_dtype="bfloat16").training(precision="fp16"), "cuda",
                        free_gib=139).dequantized_base  # bf16 matmuls under fp16 autocast
    assert not plan_for(ft, "cpu").dequantized_base
    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE", "0")
    off = plan_for(ft, "cuda", free_gib=139)
    assert not off.dequantized_base
    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE", "1")
    assert plan_for(ft, "cpu").dequantized_base
    on = plan_for(ft, "cuda", free_gib=139)
    assert on.micro_batch_tokens == off.micro_batch_tokens
    assert abs(on.predicted_peak_gib - off.predicted_peak_gib - 2 * weights / GIB) < 0.01


def test_the_first_layers_alone_dequantized_train_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    """PHI3TUNE_DEQUANTIZE_LAYERS=1 on the 2-layer model: only the first decoder layer's 4 linear layers read
    dequantized weights (counted), the second stays 4-bit, and the losses and adapter are the 4-bit run's bit for
    bit; the plan holds half the dequantized bytes and says so, and the run returns its 4-bit layers. Negative
    control: the nudged values change the losses."""
    from bitsandbytes.nn import Linear4bit

    rows = rows_of_text(8, seed=4)
    seen: set[int] = set()
    real_forward = DequantizedLinear.forward

    def counting(self: DequantizedLinear, x: torch.Tensor) -> torch.Tensor:
        seen.add(id(self))
        return real_forward(self, x)

    monkeypatch.setattr(DequantizedLinear, "forward", counting)
    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE", "0")
    runs = {}
    for flag in ("none", "first", "nudged"):
        if flag != "none":
            monkeypatch.setenv("PHI3TUNE_DEQUANTIZE_LAYERS", "1")
        if flag == "nudged":
            _nudged(monkeypatch)
        runs[flag] = tiny_tuner(tiny_model, tmp_path / flag, rows, grad_accum=2, max_steps=3).run()
        if flag == "first":
            assert len(seen) == 4  # qkv, o, gate_up, down of layer 0
    first = runs["first"].plan
    assert first.dequantized_layers == 1 and not first.dequantized_base and not runs["none"].plan.dequantized_layers
    whole = sum(m.in_features * m.out_features for m in runs["none"].model.modules() if isinstance(m, Linear4bit))
    whole *= first.dtype.itemsize  # the plan's compute dtype (fp32 on the CPU)
    assert first.memory["dequantized_weights"] * 2 == whole and "dequantized_weights" not in runs["none"].plan.memory
    assert "dequantized once in the first 1 layers" in first.describe()
    _trained_alike_and_4bit_again(runs, "none", "first")


def test_compiled_layers_of_both_kinds_are_built_in_the_warm_up(tiny_model, tmp_path, traced_layers, monkeypatch):
    """Compiled layers with only the first dequantized: the two kinds of layer are two families of graphs, all
    built before the first step (no step waits for the compiler), and the losses are the 4-bit run's. Negative
    control: without it the warm-up builds fewer graphs."""
    from torch._dynamo.utils import counters

    def run(tag: str) -> tuple[list[float], list[int], int]:
        import torch._dynamo

        torch._dynamo.reset()
        counters.clear()
        graphs: list[int] = []
        ft = tiny_tuner(tiny_model, tmp_path / tag, rows_of_text(24, seed=2), optimize_for="speed", compile=True,
                        micro_batch_tokens=128, batch_size=4, max_steps=4)
        ft.data(max_seq_length=128)
        result = ft.run(callbacks=[lambda e: graphs.append(counters["stats"]["unique_graphs"])])
        assert result.plan.dequantized_layers == (1 if tag == "first" else 0)
        return result.losses, graphs, graphs[0]

    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE", "0")
    plain_losses, plain_graphs, plain_built = run("plain")
    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE_LAYERS", "1")
    losses, graphs, built = run("first")
    assert graphs[-1] == graphs[0] and plain_graphs[-1] == plain_graphs[0]  # none built during training
    assert built > plain_built
    assert losses == pytest.approx(plain_losses, rel=1e-6)


@needs_shared
def test_packed_rows_dequantize_the_first_layers_where_the_whole_base_does_not_fit(monkeypatch):
    """Phi-3-mini on a 16 GiB card, where the whole base does not fit: packed rows dequantize the most first layers
    that still fit (measured faster there, session 33), unpacked rows none (measured slower); a card that holds
    the whole base dequantizes it all; PHI3TUNE_DEQUANTIZE=0 none (the negative control);
    PHI3TUNE_DEQUANTIZE_LAYERS=12 holds 12/32 of the dequantized weights, costed half their share of the saving."""
    from dataclasses import replace

    from phi3tune.bench import plan_for
    from phi3tune.memory import GIB
    from phi3tune.plan import FIT_FRACTION
    from phi3tune.step_cost import _FIRST_LAYERS_SHARE, expected_cost

    monkeypatch.delenv("PHI3TUNE_DEQUANTIZE", raising=False)
    monkeypatch.delenv("PHI3TUNE_DEQUANTIZE_LAYERS", raising=False)
    packed = FineTuner(str(PHI3_DIR), attn_implementation="phi3tune_varlen").data(packing=True)  # as on the GPU
    plain = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=16)
    assert not plain.dequantized_base and not plain.dequantized_layers
    whole = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=139)
    assert whole.dequantized_base and not whole.dequantized_layers
    first = plan_for(packed, "cuda", free_gib=16)
    per_layer = whole.memory["dequantized_weights"] // 32
    assert 4 <= first.dequantized_layers < 32 and not first.dequantized_base
    assert first.memory["dequantized_weights"] == first.dequantized_layers * per_layer
    assert first.predicted_peak_gib * GIB <= FIT_FRACTION * 16 * GIB  # it fits ...
    assert first.predicted_peak_gib * GIB + per_layer > FIT_FRACTION * 16 * GIB  # ... and one more layer would not
    assert plan_for(packed, "cuda", free_gib=139).dequantized_base
    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE", "0")
    assert not plan_for(packed, "cuda", free_gib=16).dequantized_layers
    monkeypatch.delenv("PHI3TUNE_DEQUANTIZE")
    monkeypatch.setenv("PHI3TUNE_DEQUANTIZE_LAYERS", "12")
    some = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=16)
    assert some.dequantized_layers == 12 and not some.dequantized_base
    assert some.memory["dequantized_weights"] == 12 * per_layer
    full_cost, none_cost = expected_cost(replace(some, dequantized_layers=0, dequantized_base=True), 32), \
        expected_cost(replace(some, dequantized_layers=0), 32)
    assert expected_cost(some, 32) == pytest.approx(none_cost - (none_cost - full_cost) * _FIRST_LAYERS_SHARE * 12 / 32)
