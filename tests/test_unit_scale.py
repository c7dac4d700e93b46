"""The LoRA scale applied on the adapter's input (lora_dropout.make_recomputable) and the compiler pass that then
drops PEFT's ``* 1`` (phi3tune/unit_scale.py): the same numbers as PEFT's scale on the output, bit for bit where
the scale is a power of two, and a compiled layer's backward without the scaled copies of the output gradients."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from phi3tune import compiled_layers as cl
from phi3tune import lora_dropout as ld
from phi3tune.model import attach_adapter, load_weights
from phi3tune.specs import AdapterSpec, QuantSpec
from phi3tune.unit_scale import drop_multiplications_by_one

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _ones(graph: torch.fx.Graph) -> int:
    """How many ``x * 1`` (a Python 1) the graph holds."""
    return sum(1 for n in graph.nodes if n.op == "call_function" and "mul" in str(n.target)
               and any(type(a) in (int, float) and a == 1 for a in n.args))


def test_the_pass_drops_multiplications_by_one_and_nothing_else():
    """In a traced forward and backward the pass removes each ``* 1`` (forward, and its gradient's in backward)
    and the graph computes the same tensors. Kept: ``* 2``, a ``* 1`` that changes the dtype (int to float), and
    a graph input returned through ``* 1`` (the negative controls: each is still there after the pass)."""
    def f(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, n: torch.Tensor):
        out = (x @ a @ b) * 1.0 + x * 2.0
        grads = torch.autograd.grad(out, (a, b), g)
        return (*grads, n * 1.0, x * 1)

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    a = torch.randn(6, 3, generator=gen, requires_grad=True)
    b = torch.randn(3, 6, generator=gen, requires_grad=True)
    n = torch.arange(5)
    gm = make_fx(f)(x, a, b, g, n)
    before = _ones(gm.graph)
    expected = gm(x, a, b, g, n)
    removed = drop_multiplications_by_one(gm.graph)
    gm.recompile()
    assert removed == 2 and before == 4  # the forward's * 1 and its gradient's; the int one and x * 1 stay
    assert _ones(gm.graph) == 2
    assert sum(1 for node in gm.graph.nodes if node.args and 2.0 in node.args) == 1
    got = gm(x, a, b, g, n)
    assert all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(got, expected, strict=True))


def _lora(model_dir, **adapter):
    """A tiny fp32 LoRA model (r=4, dropout 0.3 unless ``adapter`` says otherwise) on every linear, seeded."""
    torch.manual_seed(0)
    base = load_weights(str(model_dir), QuantSpec(compute_dtype="float32"), torch.float32, torch.device("cpu"))
    return attach_adapter(base, AdapterSpec(**{"r": 4, "dropout": 0.3, **adapter}), TARGETS)


def _lora_layers(model) -> list[torch.nn.Module]:
    """PEFT's LoRA layers of ``model``."""
    return [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]


def _model(model_dir, alpha: float, folded: bool, dropout: float = 0.3):
    """Layer 0 of a tiny LoRA model (r=4, adapter weights drawn), its dropout hashed; ``folded``: the scale on the
    input (make_recomputable's; without dropout on lora_A's output), else PEFT's own on the output with the same
    masks (without dropout: PEFT's layers as they are)."""
    model = _lora(model_dir, alpha=alpha, dropout=dropout)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    if not dropout and not folded:
        return model
    key = ld.make_recomputable(model, torch.device("cpu"))
    assert (key is not None) == (dropout > 0)
    if key is not None:
        key.fill_(ld.micro_batch_key(0, 0, 3, 1))
    layers = _lora_layers(model)
    assert layers and len(layers) % len(TARGETS) == 0 and all(m.scaling["default"] == 1.0 for m in layers)
    if not folded:
        for m in layers:
            m.scaling["default"], m.lora_dropout["default"].scale = m.lora_dropout["default"].scale, 1.0
    return model


def _run(model, layer=None):
    inner = model.get_base_model().model
    layer = inner.layers[0] if layer is None else layer
    x = torch.randn(1, 32, inner.config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pos = torch.arange(32)[None]
    out = layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in inner.layers[0].parameters() if p.requires_grad)]


@pytest.mark.parametrize("dropout", [0.3, 0.0])
@pytest.mark.parametrize("alpha", [16.0, 12.0])
def test_the_scale_on_the_input_gives_peft_numbers(tiny_model, alpha, dropout):
    """alpha / r = 4, a power of two: output, input gradient and every adapter gradient equal PEFT's scale on the
    output bit for bit (training; with dropout the scale rides on its mask, without it on lora_A's output).
    alpha / r = 3 (the negative control): the same to fp32 rounding, not bit for bit, so the two computations do
    differ and the test would see a wrong one. Evaluation and make_plain: PEFT's outputs (a hook left on lora_A
    would scale twice), its own dropout module and ``scaling`` back to alpha / r exactly."""
    folded = _run(_model(tiny_model, alpha, True, dropout))
    peft = _run(_model(tiny_model, alpha, False, dropout))
    assert len(folded) == len(peft) == 2 + 8
    if alpha == 16.0:
        assert all(torch.equal(a, b) for a, b in zip(folded, peft, strict=True))
    else:
        assert not all(torch.equal(a, b) for a, b in zip(folded, peft, strict=True))
        assert max(float((a - b).norm() / b.norm()) for a, b in zip(folded, peft, strict=True)) < 1e-5
    model = _model(tiny_model, alpha, True, dropout).eval()
    inner = model.get_base_model().model
    x = torch.randn(1, 32, inner.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(32)[None]
    with torch.no_grad():
        ours = inner.layers[0](x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
        ld.make_plain(model)
        plain = inner.layers[0](x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
    lora = _lora_layers(model)
    plain_dropout = torch.nn.Dropout if dropout else torch.nn.Identity
    assert all(m.scaling["default"] == alpha / 4 and type(m.lora_dropout["default"]) is plain_dropout
               for m in lora)
    ours, plain = (o[0] if isinstance(o, tuple) else o for o in (ours, plain))
    assert torch.allclose(ours, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.3, 0.0])
def test_a_compiled_layer_backward_writes_no_scaled_gradient_copy(tiny_model, monkeypatch, dropout):
    """inductor on a compiled LoRA layer (code generated, fp32), with dropout or without (the scale then on
    lora_A's output, by a hook the compiler traces): with the pass, its backward graph holds no ``* 1``; without it
    (the negative control) one per LoRA'd linear, each a copy of that linear's output gradient. Both compute the
    eager layer's numbers (the pass only drops multiplications by one)."""
    import torch._dynamo
    import torch._inductor.compile_fx as compile_fx

    from phi3tune import unit_scale

    backwards: list[torch.fx.GraphModule] = []
    partition = compile_fx.min_cut_rematerialization_partition

    def spy(*args, **kwargs):  # the joint graph's split, after inductor's joint passes (ours among them)
        forward, backward = partition(*args, **kwargs)
        backwards.append(backward)
        return forward, backward

    monkeypatch.setattr(compile_fx, "min_cut_rematerialization_partition", spy)
    eager = _run(_model(tiny_model, 16.0, True, dropout))

    def compiled() -> tuple[list[torch.Tensor], int]:
        torch._dynamo.reset()
        model = _model(tiny_model, 16.0, True, dropout)
        layer = torch.compile(model.get_base_model().model.layers[0], backend=cl.backend({}), dynamic=False)
        grads = _run(model, layer)
        return grads, _ones(backwards[-1].graph)

    with_pass, ones = compiled()
    monkeypatch.setattr(unit_scale, "drop_multiplications_by_one", lambda graph: 0)
    without, ones_without = compiled()
    assert ones == 0 and ones_without == len(TARGETS)
    for got in (with_pass, without):
        assert max(float((a - b).norm() / b.norm()) for a, b in zip(got, eager, strict=True)) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(with_pass, without, strict=True))


@pytest.mark.parametrize("dropout", [0.3, 0.0])
def test_dora_layers_keep_their_own_scale(tiny_model, dropout):
    """DoRA's forward reads ``scaling`` for its weight norm, not only for the product: its layers get the hashed
    dropout (without dropout: PEFT's Identity, no hook) but keep their scale, through make_plain too (before session
    40 it set an unfolded layer's scale to 1); plain LoRA's move it: the contrast."""
    model = _lora(tiny_model, alpha=16, use_dora=True, dropout=dropout)
    assert (ld.make_recomputable(model, torch.device("cpu")) is not None) == (dropout > 0)
    lora = _lora_layers(model)
    kept = ld.RecomputableDropout if dropout else torch.nn.Identity
    assert lora and all(m.scaling["default"] == 4.0 and type(m.lora_dropout["default"]) is kept for m in lora)
    assert all(m.lora_dropout["default"].scale == 1.0 for m in lora if dropout)
    ld.make_plain(model)
    assert all(m.scaling["default"] == 4.0 for m in lora)
    folded = _lora_layers(_model(tiny_model, 16.0, True, dropout))
    assert all(m.lora_dropout["default"].scale == 4.0 and m.scaling["default"] == 1.0 for m in folded)


def test_the_benchmarks_knob_leaves_the_scale_on_the_output(tiny_model, monkeypatch):
    """PHI3TUNE_COMPILE=lora_scale=output (cards.sh's ``outscale``, to time the two): the hashed dropout, PEFT's
    scale where it was; a misspelt value is refused, naming what would do."""
    monkeypatch.setenv("PHI3TUNE_COMPILE", "lora_scale=output")
    model = _lora(tiny_model, alpha=16)
    assert ld.make_recomputable(model, torch.device("cpu")) is not None
    lora = _lora_layers(model)
    assert lora and all(m.scaling["default"] == 4.0 and m.lora_dropout["default"].scale == 1.0 for m in lora)
    ld.make_plain(model)
    assert all(m.scaling["default"] == 4.0 and type(m.lora_dropout["default"]) is torch.nn.Dropout for m in lora)
    monkeypatch.setenv("PHI3TUNE_COMPILE", "lora_scale=outputs")
    with pytest.raises(ValueError, match="input or output"):
        ld.make_recomputable(model, torch.device("cpu"))


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_a_compiled_run_trains_the_same_with_the_scale_on_input_or_output(tiny_model, tmp_path, monkeypatch,
                                                                          traced_layers, dropout):
    """Through ``FineTuner.run``: a compiled run with the scale on the input (the default; without dropout on
    lora_A's output) trains the losses, gradient norms and adapter of one with PEFT's scale on the output
    (``lora_scale=output``), bit for bit; the model it returns has PEFT's scale and dropout module back, in eval
    mode (before session 39 its dropouts trained)."""
    from helpers import adapter_tensors, rows_of_text, tiny_tuner

    from phi3tune import pipeline

    scales: list[set[float]] = []  # each run's LoRA scales while it trains: the knob did change something

    def spy(model, device):
        key = ld.make_recomputable(model, device)
        scales.append({m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)})
        return key

    monkeypatch.setattr(pipeline, "make_recomputable", spy)

    def run(name: str):
        torch._dynamo.reset()
        tuner = tiny_tuner(tiny_model, tmp_path / name, rows_of_text(12, seed=2), optimize_for="speed", compile=True,
                           micro_batch_tokens=64, max_steps=3).adapter(r=8, alpha=16, dropout=dropout)
        return tuner.run()

    on_input = run("input")
    monkeypatch.setenv("PHI3TUNE_COMPILE", "lora_scale=output")
    on_output = run("output")
    assert scales == [{1.0}, {2.0}]
    assert on_input.losses == on_output.losses and len(on_input.losses) == 3
    assert [h.get("grad_norm") for h in on_input.history] == [h.get("grad_norm") for h in on_output.history]
    ours, theirs = adapter_tensors(on_input), adapter_tensors(on_output)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    plain = torch.nn.Dropout if dropout else torch.nn.Identity
    for result in (on_input, on_output):
        lora = _lora_layers(result.model)
        assert lora and all(m.scaling["default"] == 2.0 and not m.lora_dropout["default"].training
                            and type(m.lora_dropout["default"]) is plain for m in lora)
