"""Compiled decoder layers with bitsandbytes' 4-bit matmuls inside the graph (phi3tune/compiled_layers.py): the
torch-ops twins compute bitsandbytes' values bit for bit, and a compiled layer no longer calls back into
bitsandbytes' Python ops (the host cost they removed), with the same outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_on_4bit

from phi3tune import compiled_layers as cl
from phi3tune.model import load_weights
from phi3tune.specs import QuantSpec


def _base(model, dtype: torch.dtype, double_quant: bool, quant_type: str = "nf4"):
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    return load_weights(str(model), QuantSpec(compute_dtype=name, double_quant=double_quant, quant_type=quant_type),
                        dtype, torch.device("cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lookup", ["table", "select", "kernel"])
def test_the_twins_dequantize_as_bitsandbytes_does_bit_for_bit(tiny_model, quant_type, double_quant, dtype, lookup):
    """Each way of finding a code's value (a table load, selects on its bits, dequant_kernel.py's op, here its CPU
    path) gives bitsandbytes' values."""
    import bitsandbytes.functional as bnbf

    base = _base(tiny_model, dtype, double_quant, quant_type)
    for name, module in base.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            continue
        qs = weight.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = cl.dequantize_blockwise(qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize,
                                             torch.float32) + qs.offset
        got = cl.dequantize_4bit(weight.data, absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype, lookup=lookup)
        assert torch.equal(got, bnbf.dequantize_4bit(weight.data, qs)), name
        x = torch.randn(3, qs.shape[1], dtype=dtype)
        ref = torch.ops.bitsandbytes.gemm_4bit.default(
            x, weight.data.view(-1, 1), qs.shape, qs.state2.absmax if qs.nested else qs.absmax, qs.blocksize,
            qs.quant_type, **({"absmax_8bit": qs.absmax, "absmax_code": qs.state2.code, "absmax_offset": qs.offset}
                              if qs.nested else {}))
        twin = cl.gemm_4bit(x, weight.data.view(-1, 1), qs.shape, qs.state2.absmax if qs.nested else qs.absmax,
                            qs.blocksize, qs.quant_type, **({"absmax_8bit": qs.absmax, "absmax_code": qs.state2.code,
                                                             "absmax_offset": qs.offset} if qs.nested else {}),
                            lookup=lookup)
        assert torch.equal(twin, ref), name


def test_every_code_selects_its_own_value_and_a_wrong_tree_would_show():
    """All 16 codes, both code tables: the selects give exactly the table's value, compiled too (the graph the
    layers run). Negative control: a tree that reads one bit wrong differs from the table."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)
    for values in cl.code_tables().values():
        want = torch.tensor(values, dtype=torch.float32)[codes.to(torch.int64)]
        assert torch.equal(cl._select(codes, values), want)
        assert torch.equal(torch.compile(cl._select, dynamic=False)(codes, values), want)
        assert not torch.equal(cl._select(codes ^ 1, values), want)


def test_a_short_last_block_is_scaled_by_its_own_absmax():
    """n % blocksize != 0 (a weight of 150 values in blocks of 64): the last 22 values take the third absmax."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(3, 50)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    got = cl.dequantize_4bit(packed, qs.absmax, qs.blocksize, "nf4", qs.shape, torch.float32)
    assert qs.absmax.numel() == 3 and torch.equal(got, bnbf.dequantize_4bit(packed, qs))


def _bnb_op_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("bitsandbytes::"))


@pytest.mark.parametrize("ours", [True, False])
def test_a_compiled_lora_layer_runs_no_bitsandbytes_op_and_computes_the_same(tiny_model, ours):
    """A PEFT LoRA decoder layer on 4-bit weights, compiled: with our backend forward and backward call no
    bitsandbytes op (each was a Python call on the host), and give the outputs and gradients of inductor's own
    compilation, which (the negative control) calls them."""
    import torch._dynamo

    def layer_of():
        return lora_on_4bit(tiny_model, torch.float32).get_base_model().model

    def run(inner, compiled):
        layer = inner.layers[0]
        x = torch.randn(1, 16, inner.config.hidden_size, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        pos = torch.arange(16)[None]
        emb = inner.rotary_emb(x, pos)

        def step():
            out = compiled(x, position_embeddings=emb, position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            out.square().sum().backward()
            return out

        step()  # compile outside the profiled call
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        calls = _bnb_op_calls(step)
        out = step()
        return calls, out.detach(), x.grad, [p.grad for p in layer.parameters() if p.requires_grad]

    torch._dynamo.reset()
    inner = layer_of()
    backend = cl.backend() if ours else "inductor"
    calls, out, gx, grads = run(inner, torch.compile(inner.layers[0], backend=backend, dynamic=False))
    if not ours:
        assert calls >= 4  # 4 linear layers' forward, and their backward
        return
    assert calls == 0
    torch._dynamo.reset()
    ref_inner = layer_of()
    _, ref_out, ref_gx, ref_grads = run(ref_inner, torch.compile(ref_inner.layers[0], backend="inductor",
                                                                 dynamic=False))
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def _stacked_unpack(packed, absmax, blocksize, quant_type, shape, dtype, tables=None, lookup="table"):
    """The negative control: the same values, unpacked with a stack (not recomputable by the partitioner)."""
    codes = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack((codes >> 4, codes & 15), dim=-1).reshape(-1).to(torch.int64)
    table = torch.tensor((tables or cl.code_tables())[quant_type], dtype=torch.float32, device=codes.device)
    return (table[idx].view(-1, blocksize) * absmax.view(-1, 1)).view(tuple(shape)).to(dtype)


@pytest.mark.parametrize("unpack", ["pointwise", "select", "kernel", "stacked"])
def test_a_compiled_layer_saves_for_backward_what_the_stock_compile_saves(tiny_model, monkeypatch, unpack):
    """Dequantizing inside the graph must not cost memory: the weight is recomputed from the packed bytes in
    backward, so a compiled layer saves exactly the tensors inductor's own compilation saves, with the values
    looked up in a table, selected by the codes' bits, or from dequant_kernel's op. With a stack in the unpacking
    (the negative control) the partitioner saves an unpacked copy of every weight instead."""
    import torch._dynamo

    from phi3tune.model import attach_adapter
    from phi3tune.specs import AdapterSpec

    if unpack == "stacked":
        monkeypatch.setattr(cl, "dequantize_4bit", _stacked_unpack)

    def saved_by(backend) -> list[tuple[tuple[int, ...], torch.dtype]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = attach_adapter(_base(tiny_model, torch.bfloat16, False), AdapterSpec(r=4, dropout=0.1),
                               ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        inner = model.get_base_model().model
        compiled = torch.compile(inner.layers[0], backend=backend, dynamic=False)
        x = torch.randn(1, 32, inner.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(32)[None]
        emb = inner.rotary_emb(x, pos)
        compiled(x, position_embeddings=emb, position_ids=pos)
        saved: list[tuple[tuple[int, ...], torch.dtype]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compiled(x, position_embeddings=emb, position_ids=pos)
        return sorted(saved, key=str)

    ours, stock = saved_by(cl.backend({"dequant": "table" if unpack == "stacked" else unpack})), saved_by("inductor")
    if unpack != "stacked":
        assert ours == stock
    else:
        assert ours != stock and any(dtype == torch.uint8 and len(shape) == 2 and shape[1] == 2
                                     for shape, dtype in ours)


def test_symbolic_length_layers_take_every_length_from_a_few_graphs_and_train_as_eager_layers_do(
        tiny_model, tmp_path, monkeypatch, traced_layers):
    """PHI3TUNE_COMPILE=dynamic_lengths=1 (what CUDA plans take under varlen attention: unpacked rows at every
    budget, packed rows at the middle one, shapes.symbolic_lengths_pay): micro-batches are padded to a multiple of a
    granule (16 lengths up to 128 tokens here, not 4 fixed ones), and the layers make their token dimension symbolic
    once they have met two lengths: the warm-up builds a few graphs, training builds none, over many lengths. The
    losses equal those of eager layers at the plan's 4 fixed lengths (the same tokens, the same math), for packed
    rows too. Negative control: static graphs at a granule's lengths (8 up to 64 tokens) compile one per length."""
    import torch._dynamo
    from helpers import rows_of_text, tiny_tuner
    from torch._dynamo.utils import counters

    from phi3tune import batching, pipeline

    widths: list[int] = []
    real_pad = batching.pad_to_bucket

    def spy(*a, **k):
        out = real_pad(*a, **k)
        widths.append(int(out["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(batching, "pad_to_bucket", spy)

    def run(out: str, budget: int = 128, steps: int = 3, compile: bool = True, packing: bool = False
            ) -> tuple[list[float], list[int], tuple[int, ...]]:
        torch._dynamo.reset()
        counters.clear()
        graphs: list[int] = []
        res = tiny_tuner(tiny_model, tmp_path / out, rows_of_text(48, seed=3), optimize_for="speed", compile=compile,
                         micro_batch_tokens=budget, batch_size=3, grad_accum=2, max_steps=steps
                         ).data(packing=packing).run(
            callbacks=[lambda e: graphs.append(counters["stats"]["unique_graphs"])])
        assert res.plan is not None
        return [h["loss"] for h in res.history if "loss" in h], graphs, res.plan.token_buckets

    eager, _, eager_lengths = run("eager", compile=False)
    assert len(eager_lengths) == 4
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    widths.clear()
    losses, graphs, lengths = run("dynamic")
    assert lengths == tuple(range(8, 129, 8))
    trained = set(widths)  # the steps' micro-batches (the warm-up lays out its own)
    assert len(trained) >= 4 and trained <= set(lengths)
    assert graphs[0] == graphs[-1] <= 4, graphs
    assert losses == pytest.approx(eager, rel=1e-5)
    packed, _, _ = run("dynamic_packed", packing=True)
    monkeypatch.delenv("PHI3TUNE_COMPILE")
    packed_eager, _, _ = run("eager_packed", compile=False, packing=True)
    assert packed == pytest.approx(packed_eager, rel=1e-5) and packed != pytest.approx(eager, rel=1e-3)
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")

    real_compile = pipeline.compile_layers
    monkeypatch.setattr(pipeline, "compile_layers",
                        lambda layers, settings, dynamic, **_: real_compile(layers, settings))
    _, static_graphs, static_lengths = run("static", budget=64, steps=1)  # 8 lengths: the warm-up compiles them
    assert static_graphs[0] >= len(static_lengths) == 8 > graphs[0]


def test_with_cuda_graphs_asked_for_every_micro_batch_starts_a_graph_step(tiny_model, tmp_path, monkeypatch,
                                                                         traced_layers):
    """PHI3TUNE_COMPILE=mode=reduce-overhead (a benchmark knob: compiled layers replayed as CUDA graphs): inductor's
    graph trees must be told where a micro-batch starts, or a layer's replay overwrites what the previous one saved
    for backward (the failure of 2026-11-30's first try). Every forward of the loss module marks one, in the warm-up
    and in training; the warm-up shows each length twice (a graph is recorded on its second call, so not in the
    timed steps); an eager plan marks none. (On the CPU inductor skips the graphs; the marks are what is tested.)"""
    from helpers import rows_of_text, tiny_tuner

    from phi3tune import loop
    from phi3tune import loss as loss_mod

    marks, forwards = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(forwards)))
    real_forward = loss_mod.TokenLoss.forward

    def counted(self, *a, **k):
        forwards.append(1)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(loss_mod.TokenLoss, "forward", counted)
    warm: list[int] = []  # forwards in the warm-up, and the warm-up's lengths
    real_warm_up, real_positions = loop.Trainer._compile_fixed_shapes, loop.warm_up_positions

    def counted_warm_up(self):
        before = len(forwards)
        real_warm_up(self)
        warm.append(len(forwards) - before)

    monkeypatch.setattr(loop.Trainer, "_compile_fixed_shapes", counted_warm_up)
    def positions(*a):
        out = real_positions(*a)
        warm.append(len(out))
        return out

    monkeypatch.setattr(loop, "warm_up_positions", positions)
    monkeypatch.setenv("PHI3TUNE_COMPILE", "mode=reduce-overhead")
    kw = dict(optimize_for="speed", micro_batch_tokens=64, batch_size=3, grad_accum=2, max_steps=2)
    tiny_tuner(tiny_model, tmp_path / "graphs", rows_of_text(12, seed=2), compile=True, **kw).run()
    assert len(forwards) > 4 and marks == list(range(1, len(forwards) + 1))  # one mark in each forward
    lengths, warm_forwards = warm
    assert warm_forwards == 2 * lengths  # every graph called twice before training: run, then recorded
    marks.clear()
    forwards.clear()
    tiny_tuner(tiny_model, tmp_path / "eager", rows_of_text(12, seed=2), compile=False, **kw).run()
    assert forwards and not marks


def _compiled_layer(tiny_model, dtype: torch.dtype, dropout: float, settings: dict, monkeypatch,
                    generate: bool = True) -> dict:
    """One compiled LoRA decoder layer (hashed dropout) under ``settings`` (compiled_layers.backend): what it saves
    for backward (saved-tensor hooks), how many matmuls its backward graph holds, its output and gradients.
    ``generate=False``: inductor's split, run as traced (the partitioner's choices without code generation)."""
    import torch._dynamo
    import torch._inductor.compile_fx as compile_fx

    from phi3tune.lora_dropout import make_recomputable

    backwards: list[torch.fx.GraphModule] = []
    partition = compile_fx.min_cut_rematerialization_partition

    def spy(*args, **kwargs):  # the joint graph's split, as inductor makes it: keep the backward
        forward, backward = partition(*args, **kwargs)
        backwards.append(backward)
        return forward, backward

    monkeypatch.setattr(compile_fx, "min_cut_rematerialization_partition", spy)
    torch._dynamo.reset()
    model = lora_on_4bit(tiny_model, dtype, dropout)
    make_recomputable(model, torch.device("cpu"))
    inner = model.get_base_model().model
    compiled = torch.compile(inner.layers[0], backend=cl.backend(settings, generate=generate), dynamic=False)
    x = torch.randn(1, 32, inner.config.hidden_size, dtype=dtype, requires_grad=True,
                    generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32)[None]
    emb = inner.rotary_emb(x, pos)
    compiled(x, position_embeddings=emb, position_ids=pos)  # compiled outside the hooks
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x, position_embeddings=emb, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    matmuls = sum(1 for n in backwards[-1].graph.nodes if n.op == "call_function" and "mm" in str(n.target))
    return {"saved": saved, "matmuls": matmuls,
            "grads": [out.detach(), x.grad, *(p.grad for p in inner.layers[0].parameters() if p.requires_grad)]}


def _bytes(saved: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    import math

    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in saved)


def _masks(saved: list[tuple[tuple[int, ...], torch.dtype]]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [s for s in saved if s[1] == torch.bool]


def test_with_masks_recomputed_a_compiled_layer_saves_no_dropout_mask_and_computes_the_same(tiny_model, monkeypatch):
    """RunPlan.recompute_masks (knobs.RECOMPUTE_MASKS): the partitioner recomputes the hashed LoRA dropout masks in
    backward, so a compiled layer saves none of its 4 bool masks (the default saves all 4: the negative control),
    and its output and gradients are the default's bit for bit (fp32; in bf16 the partitioner's other choices
    round some intermediates differently: ~0.3% of the output's norm on this layer)."""
    from phi3tune.knobs import RECOMPUTE_MASKS

    default = _compiled_layer(tiny_model, torch.float32, 0.1, {}, monkeypatch)
    recomputed = _compiled_layer(tiny_model, torch.float32, 0.1, {"partitioner": RECOMPUTE_MASKS}, monkeypatch)
    plain = _compiled_layer(tiny_model, torch.float32, 0.0, {}, monkeypatch)
    assert len(_masks(default["saved"])) == 4 and _masks(recomputed["saved"]) == []
    # all the masks' bytes, nothing instead
    assert _bytes(default["saved"]) - _bytes(recomputed["saved"]) >= _bytes(_masks(default["saved"]))
    assert _bytes(plain["saved"]) < _bytes(recomputed["saved"])
    assert len(recomputed["grads"]) == len(default["grads"]) > 2
    assert all(torch.equal(a, b) for a, b in zip(recomputed["grads"], default["grads"], strict=True))


def test_the_middle_activation_budget_recomputes_only_elementwise_work(tiny_model, monkeypatch):
    """The speed plans' middle budget (plan.MIDDLE_ACTIVATION_BUDGET), compiled as the plan compiles it (the masks
    saved): in bf16 a compiled layer saves no fp32 copy of a dropped LoRA input (on the CPU, outside CUDA autocast,
    PEFT casts each LoRA input to the fp32 adapter's dtype, and the default budget keeps those copies), at most 0.6 of
    the default's activation bytes, and its backward holds exactly the default's matmuls (the low budget recomputes
    some: the negative control). Its gradients are the eager layer's: tests/test_lora_dropout.py."""
    from phi3tune.knobs import compile_settings
    from phi3tune.memory import LOW_ACTIVATION_BUDGET, MIDDLE_ACTIVATION_BUDGET

    middle_settings = compile_settings(MIDDLE_ACTIVATION_BUDGET)

    def split(settings: dict) -> dict:  # the partitioner's choices: inductor's split, no code generated
        return _compiled_layer(tiny_model, torch.bfloat16, 0.1, settings, monkeypatch, generate=False)

    default, middle, low = split({}), split(middle_settings), split(compile_settings(LOW_ACTIVATION_BUDGET))
    hidden = default["grads"][1].shape[-1]
    acts = lambda saved: [s for s in saved if 32 in s[0]]  # noqa: E731  (an axis of 32 tokens; no weight has one)
    copies = lambda saved: [s for s in acts(saved) if s[1] == torch.float32 and s[0][-1] >= hidden]  # noqa: E731
    assert len(copies(default["saved"])) == 4 and copies(middle["saved"]) == []  # the default keeps 4
    assert _bytes(acts(middle["saved"])) <= 0.6 * _bytes(acts(default["saved"]))
    assert middle["matmuls"] == default["matmuls"] < low["matmuls"]
