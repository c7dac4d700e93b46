"""Hashed LoRA dropout (phi3tune/lora_dropout.py): nn.Dropout's statistics, and masks that a compiled layer can
recompute in backward, so the partitioner's activation budget keeps gradients right (with nn.Dropout it does not:
the negative control) and the layer saves less for backward."""

from __future__ import annotations

import pytest
import torch

from phi3tune import compiled_layers as cl
from phi3tune import lora_dropout as ld
from phi3tune.memory import LOW_ACTIVATION_BUDGET, MIDDLE_ACTIVATION_BUDGET, UPPER_ACTIVATION_BUDGET
from phi3tune.model import attach_adapter, load_weights
from phi3tune.specs import AdapterSpec, QuantSpec


def _drop(p: float, key: int, salt: int) -> ld.RecomputableDropout:
    module = ld.RecomputableDropout(p, torch.tensor(key, dtype=torch.int64), salt)
    return module.train()


def test_each_element_is_dropped_with_probability_p_independently_and_the_rest_scaled():
    x = torch.ones(400, 1000)
    out = _drop(0.1, key=7, salt=1)(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.003  # 400k draws: 0.1 +- 5 standard errors
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.9))
    # rows, columns and neighbours are not correlated: the drop rate of elements whose left neighbour was dropped
    dropped = ~kept
    assert abs(dropped[:, 1:][dropped[:, :-1]].float().mean().item() - 0.1) < 0.01
    # another key (micro-batch) or salt (module) gives another mask, overlapping as independent draws do (p^2)
    for other in (_drop(0.1, key=8, salt=1)(x) == 0, _drop(0.1, key=7, salt=2)(x) == 0):
        assert abs((dropped & other).float().mean().item() - 0.01) < 0.002
    again = _drop(0.1, key=7, salt=1)(x)
    assert torch.equal(out, again)  # a function of (key, salt, index): the same mask when recomputed
    assert torch.equal(_drop(0.1, key=7, salt=1).eval()(x), x)  # evaluation: no dropout


def test_the_hash_is_computed_exactly_in_int64_and_keys_do_not_collide():
    big = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    py = [ld.mix32(int(v)) for v in big]  # Python ints: no overflow, the reference
    assert ld.mix32(big).tolist() == py and all(0 <= v < 2**32 for v in py)
    keys = {ld.micro_batch_key(seed, rank, step, micro)
            for seed in (0, 42) for rank in range(4) for step in range(200) for micro in range(4)}
    assert len(keys) == 2 * 4 * 200 * 4


def test_the_int32_hash_draws_the_int64_masks_bit_for_bit(monkeypatch):
    """The masks are hashed in int32 (a GPU has no 64-bit integer multiply): the same bits as the int64 hash for
    every key, salt and index, eager and compiled by inductor, so no mask changes. Negative control: a logical
    shift left as torch's arithmetic one gives other bits for the values with the sign bit set."""
    edge = torch.tensor([0, 1, 65535, 65536, 2**31 - 1, -1, -(2**31)], dtype=torch.int32)
    ref = [ld.mix32(int(v) & 0xFFFFFFFF) for v in edge]  # Python ints: the reference
    assert [int(v) & 0xFFFFFFFF for v in ld.mix32_int32(edge)] == ref
    naive = edge ^ (edge >> 16)  # an arithmetic shift drags the sign bit in
    assert [int(v) & 0xFFFFFFFF for v in naive] != [int(v) ^ (int(v) & 0xFFFFFFFF) >> 16 for v in edge]
    x = torch.ones(37, 1001)

    def masks() -> list[torch.Tensor]:
        return [ld.keep_mask(x, p, torch.tensor(key, dtype=torch.int64), torch.tensor(salt, dtype=torch.int64))
                for p in (0.1, 0.5) for key in (0, 7, 2**31, 12345) for salt in (1, ld.mix32(5), 2**32 - 2)]

    monkeypatch.setenv("PHI3TUNE_DROPOUT_HASH", "int64")  # the hash before session 22
    wide = masks()
    monkeypatch.delenv("PHI3TUNE_DROPOUT_HASH")
    narrow = masks()
    assert all(torch.equal(a, b) for a, b in zip(narrow, wide, strict=True))
    assert len({m.numpy().tobytes() for m in narrow}) == len(narrow)  # each (key ^ salt) and p its own mask
    torch._dynamo.reset()
    compiled = torch.compile(ld.keep_mask, backend="inductor")
    key, salt = torch.tensor(2**32 - 1, dtype=torch.int64), torch.tensor(ld.mix32(5), dtype=torch.int64)
    assert torch.equal(compiled(x, 0.1, key, salt), ld.keep_mask(x, 0.1, key, salt))


def _lora_layer(model_dir, dropout_module: str):
    torch.manual_seed(0)
    base = load_weights(str(model_dir), QuantSpec(compute_dtype="float32"), torch.float32, torch.device("cpu"))
    model = attach_adapter(base, AdapterSpec(r=4, dropout=0.3), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    for p in model.parameters():  # LoRA B starts at zero: give it values so the adapter's path counts
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    if dropout_module == "hashed":
        key = ld.make_recomputable(model, torch.device("cpu"))
        assert key is not None and ld.find_key(model) is key
        key.fill_(ld.micro_batch_key(0, 0, 3, 1))
    return model.get_base_model().model


def _step(inner, layer, n: int = 32):
    x = torch.randn(1, n, inner.config.hidden_size,
                    generator=torch.Generator().manual_seed(1), requires_grad=True)
    pos = torch.arange(n)[None]
    emb = inner.rotary_emb(x, pos)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(5)  # nn.Dropout's masks (and, with fallback_random, the compiled graph's)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=emb, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in inner.layers[0].parameters() if p.requires_grad]
    return [g.float().clone() for g in grads], sum(saved)


@pytest.mark.parametrize("dropout_module", ["hashed", "torch"])
def test_under_the_activation_budget_a_compiled_layer_gets_the_eager_gradients(tiny_model, dropout_module):
    """The partitioner's activation budget (the low one, the speed plans' middle and upper ones) recomputes ops in
    backward instead of saving them. Hashed masks come out the same when recomputed: the compiled layer's gradients are
    the eager layer's, and it saves less than with its default budget (the upper budget no more). With nn.Dropout (the
    negative control: torch draws the mask again in backward) the gradients are wrong. The split is inductor's, its
    graphs run as traced (no code generated: the partitioner decides what is recomputed)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    inner = _lora_layer(tiny_model, dropout_module)
    eager, _ = _step(inner, inner.layers[0])

    def compiled(budget: float):
        torch._dynamo.reset()
        fresh = _lora_layer(tiny_model, dropout_module)
        layer = torch.compile(fresh.layers[0], backend=cl.backend({"activation_budget": budget}, generate=False),
                              dynamic=False)
        _step(fresh, layer)  # compile
        for p in fresh.parameters():
            p.grad = None
        return _step(fresh, layer)

    with inductor.patch(fallback_random=True):
        full, saved_full = compiled(1.0)
        low, saved_low = compiled(LOW_ACTIVATION_BUDGET)
        # the speed plans' middle budget, with the hashed masks only (nn.Dropout's is wrong under any budget)
        middle, saved_middle = compiled(MIDDLE_ACTIVATION_BUDGET) if dropout_module == "hashed" else (None, 0)
        upper, saved_upper = compiled(UPPER_ACTIVATION_BUDGET) if dropout_module == "hashed" else (None, 0)

    def worst(grads):
        return max(float((g - e).norm() / e.norm()) for g, e in zip(grads, eager, strict=True))

    assert worst(full) < 1e-4  # the default budget: right either way
    if dropout_module == "hashed":
        assert worst(low) < 1e-4 and saved_low < 0.8 * saved_full
        assert worst(middle) < 1e-4 and saved_middle < saved_full
        assert worst(upper) < 1e-4 and saved_middle <= saved_upper <= saved_full
    else:
        assert worst(low) > 0.1


def test_a_compiled_run_keys_each_micro_batch_and_resumes_to_the_same_adapter(tiny_model, tmp_path, monkeypatch,
                                                                              traced_layers):
    """Through the public API: compiled layers get the hashed dropout, the loop keys every micro-batch by
    (seed, rank, step, micro-batch), and a run killed after checkpoint 2 resumes to the unbroken run's result (the
    masks are a function of the step, not of an RNG stream)."""
    from helpers import assert_same_run, kill_after, resume_tuner

    keyed: list[tuple[int, int, int, int]] = []
    real = ld.micro_batch_key

    def spy(seed: int, rank: int, step: int, micro: int) -> int:
        keyed.append((seed, rank, step, micro))
        return real(seed, rank, step, micro)

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(ld, "micro_batch_key", spy)
    kw = dict(optimize_for="speed", compile=True, micro_batch_tokens=48, batch_size=3, max_steps=4)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    ref = resume_tuner(tiny_model, tmp_path / "ref", **kw).run(
        callbacks=[lambda e: graphs.append(counters["stats"]["unique_graphs"])])
    assert graphs[0] == graphs[-1], graphs  # a new key is an input, not a reason to compile again
    steps = sorted({k[2] for k in keyed})
    assert len(steps) == 4 and all(k[:2] == (42, 0) for k in keyed)
    assert len(keyed) > 4 and len(set(keyed)) == len(keyed)  # several micro-batches a step, each its own key
    out = kill_after(ref.output_dir, tmp_path / "run", 2)
    keyed.clear()
    resumed = resume_tuner(tiny_model, out, **kw).run(resume=True)
    assert_same_run(resumed, ref)
    assert {k[2] for k in keyed} == set(steps[2:])
    # the model a run returns has PEFT's own dropout back: no key that nothing sets any more
    drops = [d for m in resumed.model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(type(m) is torch.nn.Dropout and m.p == 0.1 for m in drops)


def test_a_checkpointed_compiled_layer_recomputes_the_same_masks(tiny_model, tmp_path, monkeypatch, traced_layers):
    """A plan that checkpoints the first layer of compiled layers with LoRA dropout on: its forward runs again in
    backward and hashes the same masks (the key is still the micro-batch's), so loss, gradient norm and adapter
    equal the run that keeps every activation."""
    import dataclasses

    from helpers import adapter_tensors, rows_of_text, tiny_tuner

    from phi3tune import pipeline

    def run(out, checkpoint: bool):
        import torch._dynamo

        torch._dynamo.reset()  # each run compiles its own graphs: none left by an earlier test of this process
        real = pipeline.resolve_plan

        def plan(*a, **k):
            p = real(*a, **k)
            return dataclasses.replace(p, checkpointing=True, checkpoint_layers=1) if checkpoint else p

        monkeypatch.setattr(pipeline, "resolve_plan", plan)
        return tiny_tuner(tiny_model, tmp_path / out, rows_of_text(8, seed=5), optimize_for="speed", compile=True,
                          grad_accum=2, max_steps=2).adapter(dropout=0.3).run()

    ref, got = run("ref", False), run("ckpt", True)
    assert got.plan is not None and got.plan.checkpoint_layers == 1
    assert [h["loss"] for h in got.history] == [h["loss"] for h in ref.history]
    assert [h["grad_norm"] for h in got.history] == [h["grad_norm"] for h in ref.history]
    a, b = adapter_tensors(ref), adapter_tensors(got)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _mask_bytes_saved(model_dir, budget: float) -> int:
    """The bool bytes a compiled tiny decoder layer with hashed LoRA dropout saves for backward (partitioned as the
    plans partition it, no code generated)."""
    import torch._dynamo

    from phi3tune.knobs import compile_settings

    torch._dynamo.reset()
    inner = _lora_layer(model_dir, "hashed")
    layer = torch.compile(inner.layers[0], backend=cl.backend(compile_settings(budget), generate=False),
                          dynamic=False)
    x = torch.randn(1, 64, inner.config.hidden_size, requires_grad=True)
    pos = torch.arange(64)[None]
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() if t.dtype == torch.bool else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
    (out[0] if isinstance(out, tuple) else out).float().square().sum().backward()
    return sum(saved)


def test_the_int32_hash_leaves_the_masks_saved_as_the_int64_one_did(tiny_model, monkeypatch):
    """The partitioner keeps a mask saved (not hashed again in backward) because its comparison is a "reduction":
    8 bytes in, 1 out (knobs.RECOMPUTE_MASKS). The int32 hash compares in int64, so a compiled layer saves the
    masks it saved with the int64 hash, at the default and the middle budget. Negative control: compared in int32
    (4 bytes in), the layer saves fewer of them."""
    before = {}
    monkeypatch.setenv("PHI3TUNE_DROPOUT_HASH", "int64")
    for budget in (1.0, MIDDLE_ACTIVATION_BUDGET):
        before[budget] = _mask_bytes_saved(tiny_model, budget)
    monkeypatch.delenv("PHI3TUNE_DROPOUT_HASH")
    for budget in (1.0, MIDDLE_ACTIVATION_BUDGET):
        assert abs(_mask_bytes_saved(tiny_model, budget) - before[budget]) <= 8 and before[budget] > 1000
    real = ld.keep_mask

    def compared_in_int32(x, p, key, salt):
        index32 = torch.arange(x.numel(), dtype=torch.int32).view(x.shape)
        mixed_key = ld.mix32(key ^ salt)
        key32 = torch.where(mixed_key >= 1 << 31, mixed_key - (1 << 32), mixed_key).to(torch.int32)
        mixed = ld.mix32_int32(key32 ^ ld.mix32_int32(index32))
        return (mixed ^ -(1 << 31)) >= ld._signed32(round(p * 2**32) ^ (1 << 31))

    x = torch.ones(8, 100)
    k, s = torch.tensor(7), torch.tensor(ld.mix32(3))
    assert torch.equal(compared_in_int32(x, 0.1, k, s), real(x, 0.1, k, s))  # the same mask, another graph
    monkeypatch.setattr(ld, "keep_mask", compared_in_int32)
    assert _mask_bytes_saved(tiny_model, 1.0) < before[1.0] / 2
