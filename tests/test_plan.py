"""The RunPlan: one place decides how a run executes; padding-free micro-batches have a few fixed shapes."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, tiny_tuner

from phi3tune import FineTuner
from phi3tune.batching import Collator, MicroBatcher
from phi3tune.bench import plan_for
from phi3tune.data import IGNORE
from phi3tune.plan import token_buckets


def _rows(n: int, seed: int, longest: int = 120) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, longest)
        ids = [rng.randint(3, 90) for _ in range(k)]
        labels = [t if rng.random() < 0.7 else IGNORE for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _trained(batches) -> list[int]:
    """The (shifted) targets the loss sees, as a multiset."""
    return sorted(t for b in batches for t in b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE].tolist())


def test_bucket_lengths_are_few_and_cover_the_longest_example():
    assert token_buckets(4096, 512) == (1024, 2048, 3072, 4096)
    assert token_buckets(2048, 4096) == (1024, 2048, 3072, 4096)  # an example never has to be split
    assert all(b % 8 == 0 for b in token_buckets(100, 37)) and token_buckets(100, 37)[-1] >= 100


def test_padding_free_shapes_are_bounded_and_pads_never_trained(tiny_model, tmp_path):
    """Many steps of unpacked examples of every length: every micro-batch has one of the plan's few lengths,
    and the layout trains exactly the tokens of the classic padded batches (pads carry no label)."""
    ft = tiny_tuner(tiny_model, tmp_path, rows_of_text(4), optimize_for="speed", micro_batch_tokens=256,
                    batch_size=4, grad_accum=3).data(max_seq_length=120)
    plan = plan_for(ft, "cpu")
    flat, padded = Collator(0, padding_free=True), Collator(0)
    shapes = set()
    for step in range(60):
        rows = _rows(12, seed=step)
        loader_batches = [rows[i:i + 4] for i in range(0, 12, 4)]
        micro = MicroBatcher.of(plan, pad_id=0)([flat(b) for b in loader_batches])
        shapes |= {tuple(b["input_ids"].shape) for b in micro}
        assert _trained(micro) == _trained([padded(b) for b in loader_batches])
        assert sum(int(b["num_real_tokens"]) for b in micro) == sum(len(r["input_ids"]) for r in rows)
        for b in micro:
            real = int(b["num_real_tokens"])
            assert (b["labels"][0, real:] == IGNORE).all()  # the pads
            assert (b["position_ids"][0, real:] < plan.position_cap).all()
    assert {s[1] for s in shapes} <= set(plan.token_buckets) and len(shapes) <= 4


def test_negative_control_without_buckets_every_step_has_a_new_shape(tiny_model, tmp_path):
    from phi3tune.batching import resplit_flat

    flat = Collator(0, padding_free=True)
    lengths = {resplit_flat([flat(_rows(12, seed=s)[i:i + 4]) for i in range(0, 12, 4)], 256)[0]["input_ids"].shape[1]
               for s in range(60)}
    assert len(lengths) > 20


def test_auto_picks_the_fastest_plan_that_fits(tiny_model):
    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4))
    assert plan_for(ft, "cpu").mode == "balanced"  # nothing to gain from compile/Flex on the CPU
    assert plan_for(ft, "cuda", free_gib=80).mode == "speed"
    speed = plan_for(ft.training(optimize_for="speed"), "cuda")
    assert speed.compile and speed.attn_implementation == "flex_attention" and speed.precision == "bf16"
    assert not speed.checkpointing and speed.checkpoint_layers == 0
    tight = speed.predicted_peak_gib * 0.8 / 0.9  # too little for speed
    low = plan_for(ft.training(optimize_for="auto"), "cuda", free_gib=tight)
    assert low.checkpointing and low.predicted_peak_gib < speed.predicted_peak_gib
    # nothing fits at all: the smallest plan there is, with a warning
    assert plan_for(ft.training(optimize_for="auto"), "cuda", free_gib=0.01).mode == "memory"


@needs_shared
def test_phi3_mini_plan_on_cards_of_every_size():
    """The real Phi-3-mini config: a whole step (8,192 tokens) per micro-batch on a big card, 4,096 on a 40 GiB one
    (8,192 would need checkpointing there), both with the base dequantized once; smaller cards keep large micro-batches
    and checkpoint only as many layers as they must; each plan fits in 90% of the card; a bigger card never gets a
    plan expected to be slower; the line says what was chosen."""
    from phi3tune.step_cost import expected_cost

    ft = FineTuner(str(PHI3_DIR))
    cards = (8, 12, 16, 24, 40, 80, 139)
    plans = {g: plan_for(ft, "cuda", free_gib=g) for g in cards}
    assert all(p.predicted_peak_gib <= 0.9 * g or (p.combo_kernels and p.predicted_peak_gib <= g - 0.75)
               for g, p in plans.items())  # combo kernels' measured extra may use a little more of the card
    costs = [expected_cost(plans[g], 32) for g in cards]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    big, twelve, eight = plans[139], plans[12], plans[8]
    assert (big.mode, big.micro_batch_tokens, big.checkpointing, big.activation_budget) == ("speed", 8192, False, 1.0)
    assert (plans[40].micro_batch_tokens, plans[40].checkpointing) == (4096, False)
    # where the card has room left, the 4-bit base is dequantized once (dequantized.py); below 40 GiB it has none
    assert big.dequantized_base and plans[40].dequantized_base
    assert not any(plans[g].dequantized_base for g in (8, 12, 16, 24))
    # 12 GiB: not the 1,024-token micro-batches that ran 5x slower per token, but activations recomputed by the
    # compiler (+12%) rather than whole layers checkpointed (up to +42%); 8 GiB needs checkpointing too, and keeps
    # micro-batches of at least 4,096 tokens
    assert twelve.micro_batch_tokens == 4096 and twelve.activation_budget < 1 and not twelve.checkpointing
    assert eight.micro_batch_tokens >= 4096 and eight.checkpoint_layers > 0
    assert 40 < big.predicted_peak_gib < 50 and 25 < plans[40].predicted_peak_gib < 33
    line = big.describe()
    assert line.startswith("plan: speed (auto) — padding-free") and "FlexAttention" in line and "of 139.0 GiB" in line
    assert f"activation checkpointing of {eight.checkpoint_layers} layers" in eight.describe()
    assert "activations recomputed to a 0.3 budget" in twelve.describe()


@needs_shared
def test_a_whole_step_sized_to_the_data_fits_where_one_sized_to_the_limits_does_not():
    """The quickstart's steps hold at most ~4,900 of the 8,192 tokens 16 rows of 512 could: a whole-step
    micro-batch sized to the data's longest step predicts ~1/3 less, so a 40 GiB card takes it too (negative
    control: without the data's step it keeps 4,096). Steps that 4,096 tokens hold whole need no such candidate;
    the user's micro_batch_tokens is kept."""
    ft = FineTuner(str(PHI3_DIR))
    full, fitted = plan_for(ft, "cuda", free_gib=139), plan_for(ft, "cuda", free_gib=139, step_tokens=4842)
    assert full.micro_batch_tokens == full.token_buckets[-1] == 8192
    assert fitted.micro_batch_tokens == fitted.token_buckets[-1] == 4864  # rounded up to a granule (128)
    assert fitted.predicted_peak_gib < 0.7 * full.predicted_peak_gib
    assert (plan_for(ft, "cuda", free_gib=40).micro_batch_tokens, plan_for(ft, "cuda", free_gib=40).checkpointing
            ) == (4096, False)
    forty = plan_for(ft, "cuda", free_gib=40, step_tokens=4842)
    assert (forty.micro_batch_tokens, forty.checkpointing) == (4864, False) and forty.predicted_peak_gib <= 36
    assert plan_for(ft, "cuda", free_gib=139, step_tokens=3000).micro_batch_tokens == 4096
    user = plan_for(ft.training(micro_batch_tokens=2048), "cuda", free_gib=139, step_tokens=4842)
    assert user.micro_batch_tokens == 2048


@needs_shared
def test_a_run_sizes_its_whole_step_to_the_prepared_rows(caplog):
    """Once the rows are prepared, ``auto`` chooses again with the data's longest step (16 rows of 300-330 tokens,
    5,050 in the first epoch's order: 5,120 once rounded up to a granule) and says so; the memory plan, packed rows
    (position_ids) and rows that could fill the 8,192 are left as planned."""
    from datasets import Dataset

    from phi3tune import pipeline
    from phi3tune.model import preflight_model, resolve_target_modules

    ft = FineTuner(str(PHI3_DIR))
    run = ft.freeze()
    info = preflight_model(run.model, False, need_weights=False)
    targets = resolve_target_modules(run.adapter, info.linear_layers)
    lengths = [300, 310, 320, 330] * 8
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths]})

    def refit(plan, data, spec=run):
        return pipeline.whole_steps_of_the_data(spec, info, targets, torch.device("cuda"), plan, data, 1)

    plan = plan_for(ft, "cuda", free_gib=139)
    with caplog.at_level(logging.INFO, logger="phi3tune"):
        assert plan.micro_batch_tokens == 8192 and refit(plan, rows).micro_batch_tokens == 5120
    from phi3tune.batching import step_lengths

    largest = max(step_lengths(rows, 16, 0) or ())
    assert 16 * 300 <= largest <= 16 * 330 and -(-largest // 128) * 128 == 5120
    assert f"a step holds at most {largest:,} tokens (first epoch), of the 8,192 it could" in caplog.text
    packed = rows.add_column("position_ids", [list(range(n)) for n in lengths])
    assert refit(plan, packed) is plan
    memory = plan_for(ft.training(optimize_for="memory"), "cuda", free_gib=139)
    assert refit(memory, rows, ft.training(optimize_for="memory").freeze()) is memory
    long_rows = Dataset.from_dict({"input_ids": [[1] * 512] * 32, "labels": [[1] * 512] * 32})
    assert refit(plan, long_rows) is plan


def test_checkpointing_some_layers_gives_the_same_step(tiny_model, tmp_path, monkeypatch):
    """A plan that checkpoints only the first layer: that layer runs twice per micro-batch (recomputed in backward),
    the other once, and the step's loss, gradient norm and adapter equal the run without checkpointing."""
    import dataclasses

    from phi3tune import finetuner, pipeline

    rows = rows_of_text(8, seed=5)
    ref = tiny_tuner(tiny_model, tmp_path / "ref", rows, optimize_for="speed", grad_accum=2).run()
    calls: dict[int, int] = {0: 0, 1: 0}
    real_resolve, real_build = pipeline.resolve_plan, pipeline.build_model

    def partial(*a, **k):
        return dataclasses.replace(real_resolve(*a, **k), checkpointing=True, checkpoint_layers=1)

    def build(ft, run):
        model = real_build(ft, run)
        for i, layer in enumerate(model.get_base_model().model.layers):
            # inside the layer (its own hooks stay outside its checkpoint), where the recompute starts (it stops
            # early, as soon as the saved tensors backward needs are back)
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        return model

    monkeypatch.setattr(pipeline, "resolve_plan", partial)
    monkeypatch.setattr(finetuner, "build_model", build)
    got = tiny_tuner(tiny_model, tmp_path / "ckpt", rows, optimize_for="speed", grad_accum=2).run()
    assert got.plan is not None and got.plan.checkpoint_layers == 1
    assert calls[0] == 2 * calls[1] > 0  # the negative control: checkpointing is really on, and only for layer 0
    assert got.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-6)
    assert got.history[0]["grad_norm"] == pytest.approx(ref.history[0]["grad_norm"], rel=1e-5)
    a, b = adapter_tensors(ref), adapter_tensors(got)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_the_run_writes_and_returns_its_plan(tiny_model, tmp_path):
    res = tiny_tuner(tiny_model, tmp_path / "r", rows_of_text(8), optimize_for="speed").run()
    saved = json.loads((tmp_path / "r" / "phi3tune_plan.json").read_text())
    assert res.plan is not None and saved["mode"] == res.plan.mode == "speed"
    assert saved["summary"] == res.plan.describe() and saved["token_buckets"] == list(res.plan.token_buckets)


def test_pads_do_not_change_the_loss(tiny_model, tmp_path):
    """The same step with micro-batches padded to (at most) 4 lengths and with a budget that makes each one a different
    (unpadded-equivalent) length: equal loss and gradient norm."""
    rows = rows_of_text(12, seed=3)
    a = tiny_tuner(tiny_model, tmp_path / "a", rows, batch_size=4, grad_accum=3).run()
    b = tiny_tuner(tiny_model, tmp_path / "b", rows, batch_size=4, grad_accum=3, optimize_for="speed",
                   micro_batch_tokens=40).run()
    assert b.plan is not None and 1 <= len(b.plan.token_buckets) <= 4  # fitted to the data: at most 4
    assert b.history[0]["loss"] == pytest.approx(a.history[0]["loss"], rel=1e-5)
    assert b.history[0]["grad_norm"] == pytest.approx(a.history[0]["grad_norm"], rel=1e-4)
    assert torch.isfinite(torch.tensor(b.history[0]["loss"]))


def test_optimizer_facts_give_class_paging_and_state_bytes():
    from phi3tune.optim import optimizer_facts

    paged8 = optimizer_facts("PagedAdamW8bit")
    assert (paged8.cls.__name__, paged8.paged, paged8.state_bytes) == ("PagedAdamW8bit", True, 2)
    assert (optimizer_facts("paged_adamw_32bit").paged, optimizer_facts("paged_adamw_32bit").state_bytes) == (True, 8)
    cpu = optimizer_facts("paged_adamw_32bit", "cpu")  # paging exists on CUDA only: the unpaged twin
    assert (cpu.cls.__name__, cpu.paged, cpu.state_bytes) == ("AdamW32bit", False, 8)
    named = optimizer_facts("PagedAdamW32bit", "cpu")  # a Paged class on the CPU: bitsandbytes does not page there
    assert (named.cls.__name__, named.paged) == ("PagedAdamW32bit", False)
    assert optimizer_facts("Lion8bit").state_bytes == 1 and not optimizer_facts("Lion8bit").paged
    assert (optimizer_facts("adamw_torch").paged, optimizer_facts("SGD").state_bytes) == (False, 4)


def test_paged_8bit_optimizer_is_planned_paged_with_2_bytes_of_state(tiny_model):
    """PagedAdamW8bit by its class name: the plan says paged and counts ~2 bytes of state per adapter parameter
    (was: not paged, 8 bytes). Negative control: the 32-bit twin counts 8."""
    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4), optimizer="PagedAdamW8bit")
    plan = plan_for(ft, "cuda", free_gib=80)
    lora = plan.memory["lora_params"]
    assert plan.paged_optimizer and "paged AdamW8bit" in plan.describe()
    assert plan.memory["adapter_and_optimizer"] == lora * (4 + 4 + 2)
    wide = plan_for(ft.training(optimizer="PagedAdamW32bit"), "cuda", free_gib=80)
    assert wide.paged_optimizer and wide.memory["adapter_and_optimizer"] == lora * (4 + 4 + 8)
    assert not plan_for(ft.training(optimizer="AdamW8bit"), "cuda", free_gib=80).paged_optimizer


def test_compiled_layers_get_room_for_every_graph_and_the_limit_comes_back(tiny_model):
    """All decoder layers share one dynamo cache: a graph per fixed length, for train and eval, twice where only some
    layers are checkpointed. A run raises the recompile limit to that many while it trains, and only then; the
    compile settings' inductor options (e.g. a benchmark's cpp_wrapper) hold for that time too."""
    import dataclasses

    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    from phi3tune.compiled_layers import graph_room as _graph_room

    plan = plan_for(tiny_tuner(tiny_model, "unused", rows_of_text(4), optimize_for="speed"), "cuda")
    before, wrapper = dynamo.recompile_limit, inductor.cpp_wrapper
    # inductor options hold for the whole run: a layer's backward compiles lazily, outside the backend's own patch
    with _graph_room(dataclasses.replace(plan, compile=True), {"cpp_wrapper": not wrapper}):
        assert dynamo.recompile_limit >= 4 * len(plan.token_buckets) > before
        assert inductor.cpp_wrapper is (not wrapper)
    assert dynamo.recompile_limit == before and inductor.cpp_wrapper is wrapper
    with _graph_room(dataclasses.replace(plan, compile=False), {"cpp_wrapper": not wrapper}):  # nothing compiled
        assert dynamo.recompile_limit == before and inductor.cpp_wrapper is wrapper


def test_the_warm_up_builds_the_graphs_that_training_uses(tiny_model, tmp_path, traced_layers, caplog):
    """Compiled layers: every graph is built before the first step, so no step waits for the compiler. The warm-up
    micro-batches hold two documents, as real ones do (pads are a document of their own); with one document the
    attention mask took another path (SDPA with no mask) and training built graphs of its own (this test then
    fails: a graph built at step 4). The log says so before the wait (a cold compile takes ~40 s on a GPU)."""
    from torch._dynamo.utils import counters

    graphs: list[int] = []
    ft = tiny_tuner(tiny_model, tmp_path / "run", rows_of_text(24, seed=2), optimize_for="speed", compile=True,
                    micro_batch_tokens=128, batch_size=4, max_steps=6)
    ft.data(max_seq_length=128)  # fixed lengths up to the longest position: pads alone would be one document
    with caplog.at_level(logging.INFO, logger="phi3tune"):
        ft.run(callbacks=[lambda e: graphs.append(counters["stats"]["unique_graphs"])])
    assert len(graphs) == 6 and graphs[-1] == graphs[0]
    said = caplog.text
    assert -1 < said.find("compiling layers for micro-batches of") < said.find("compiled layers for micro-batches of")


def test_one_example_filling_a_length_exactly_is_padded_to_the_next_or_built_by_the_warm_up():
    """A fixed length no longer than max_seq_length can be filled exactly by one (truncated) example: one
    document, no pad, so an attention mask without a document boundary, which under FlexAttention is another mask
    function and so another graph (measured on a 16 GiB card: one compiled during training, a 16.2 s step among
    0.25 s ones; FlexAttention has no backward on the CPU, so no run here can show it). Such a micro-batch goes to
    the next length; at the longest, the warm-up builds the one-document graph. Two documents stay as they are."""
    from phi3tune.batching import pad_to_bucket
    from phi3tune.compiled_layers import warm_up_positions

    def micro(*docs: int):
        pos = torch.cat([torch.arange(n) for n in docs])[None]
        return {"input_ids": torch.ones_like(pos), "labels": torch.ones_like(pos), "position_ids": pos,
                "num_real_tokens": torch.tensor(pos.shape[1])}

    buckets, cap = (512, 1024, 1536, 2048), 512
    assert pad_to_bucket(micro(512), buckets, 0, cap)["input_ids"].shape[1] == 1024  # one document: next length
    two = pad_to_bucket(micro(200, 312), buckets, 0, cap)
    assert two["input_ids"].shape[1] == 512  # already two documents: as it was
    short = pad_to_bucket(micro(500), buckets, 0, cap)
    assert short["input_ids"].shape[1] == 512 and int((short["position_ids"][0] == 0).sum()) == 2
    assert pad_to_bucket(micro(64), (32, 64), 0, 64)["input_ids"].shape[1] == 64  # the longest: no next one
    docs = [(n, int((pos == 0).sum())) for n, pos in warm_up_positions((32, 64), 64)]
    assert docs == [(32, 2), (64, 2), (64, 1)]  # so the warm-up builds that graph
    four_k = warm_up_positions((1024, 2048, 3072, 4096), cap)  # the H200 plan: no extra graph
    assert [int((pos == 0).sum()) for _, pos in four_k] == [2, 4, 6, 8]
    assert all(int(pos.max()) < cap and pos.numel() == n for n, pos in four_k)


def test_cuda_plans_ask_for_expandable_segments_and_a_run_gives_the_allocator_back(tiny_model, monkeypatch):
    """On CUDA the plan maps allocator memory as it grows (fixed-length micro-batches otherwise left GiBs of
    fragments: a 16 GiB card filled up and its paged optimizer state was paged out, 2x slower steps); a user's own
    PYTORCH_CUDA_ALLOC_CONF is left to decide; the setting is put back when the run's block ends, error or not."""
    import torch

    from phi3tune._isolation import allocator_for

    ft = FineTuner(str(tiny_model)).training(optimize_for="speed")
    assert plan_for(ft, "cuda", free_gib=80).expandable_segments
    assert not plan_for(ft, "cpu").expandable_segments
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert not plan_for(ft, "cuda", free_gib=80).expandable_segments
    calls: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)  # older torch's name
    with pytest.raises(RuntimeError), allocator_for(True):
        assert calls == ["expandable_segments:True"]
        raise RuntimeError("a failing run")
    assert calls == ["expandable_segments:True", "expandable_segments:False"]
    with allocator_for(False):
        pass
    assert len(calls) == 2


def test_benchmark_compile_knobs_change_only_what_they_name(tiny_model, monkeypatch):
    """PHI3TUNE_COMPILE (benchmarks: examples/benchmarks/cards.sh): ``lengths=N`` gives N fixed lengths up to the
    same longest one (so the same predicted peak), ``dynamic_lengths=1`` every multiple of a granule; an unknown
    key is an error that lists the known ones, not a silent default."""
    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4)).training(optimize_for="speed")
    base = plan_for(ft, "cuda", free_gib=80)
    monkeypatch.setenv("PHI3TUNE_COMPILE", "lengths=8")
    eight = plan_for(ft, "cuda", free_gib=80)
    assert len(base.token_buckets) == 4 and len(eight.token_buckets) == 8 and not eight.dynamic_lengths
    assert eight.token_buckets[-1] == base.token_buckets[-1] and eight.predicted_peak_gib == base.predicted_peak_gib
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    dyn = plan_for(ft, "cuda", free_gib=80)
    g = dyn.token_buckets[0]
    assert dyn.dynamic_lengths and dyn.token_buckets == tuple(range(g, dyn.token_buckets[-1] + 1, g))
    assert "a multiple of" in dyn.describe() and "a multiple of" not in base.describe()
    monkeypatch.setenv("PHI3TUNE_COMPILE", "lenghts=8")
    with pytest.raises(ValueError, match=r"lenghts.*dynamic_lengths, lengths"):
        plan_for(ft, "cuda", free_gib=80)


@needs_shared
def test_with_masks_recomputed_the_plan_predicts_less_and_says_so(monkeypatch):
    """PHI3TUNE_COMPILE=masks=recompute (benchmarks): a compiled plan on CUDA carries ``recompute_masks``, which sets
    the partitioner's rules (knobs.RECOMPUTE_MASKS) and nothing else, and predicts the activations its layers keep
    less the masks' bytes exactly (the model before session 40 took 17% of each layer off, 1.4x those bytes: the
    negative control it failed); no plan asks for it by itself (plan.RunPlan.recompute_masks says why); the CPU's
    eager layers never get it; a wrong value is an error."""
    from phi3tune.knobs import RECOMPUTE_MASKS, compile_settings

    ft = FineTuner(str(PHI3_DIR)).training(micro_batch_tokens=4096)
    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    saved = plan_for(ft, "cuda", free_gib=139)
    assert not saved.recompute_masks and not plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=16).recompute_masks
    assert compile_settings(saved.activation_budget, saved.recompute_masks)["partitioner"] == {}
    monkeypatch.setenv("PHI3TUNE_COMPILE", "masks=recompute")
    recomputed = plan_for(ft, "cuda", free_gib=139)
    assert recomputed.recompute_masks and "dropout masks recomputed" in recomputed.describe()
    assert compile_settings(recomputed.activation_budget, recomputed.recompute_masks)["partitioner"] == RECOMPUTE_MASKS
    assert (recomputed.micro_batch_tokens, recomputed.checkpointing) == (saved.micro_batch_tokens, False)
    # exactly the masks' bytes less (session 40, H200: 4.25 GiB off the allocator's peak at 8,192 tokens, as these
    # bytes say): a bool per element of each LoRA'd linear's input, in every layer, for every token
    cfg = json.loads((PHI3_DIR / "config.json").read_text())
    per_layer = 3 * cfg["hidden_size"] + cfg["intermediate_size"]  # qkv_proj, o_proj, gate_up_proj, down_proj
    masks = saved.peak_micro_batch_tokens * cfg["num_hidden_layers"] * per_layer
    assert saved.memory["activations"] - recomputed.memory["activations"] == pytest.approx(masks, abs=2)
    assert not plan_for(ft, "cpu").recompute_masks
    monkeypatch.setenv("PHI3TUNE_COMPILE", "masks=dropped")
    with pytest.raises(ValueError, match="masks='dropped' is not save or recompute"):
        plan_for(ft, "cuda", free_gib=24)


@needs_shared
def test_the_memory_plan_takes_the_low_activation_budget_only_with_torch_checkpoints(monkeypatch):
    """``optimize_for="memory"`` on CUDA checkpoints every layer inside its compiled graphs, whose recomputing graphs
    keep only their inputs: the plan's own graphs then serve eval alone, at the default budget. With torch's
    checkpoint around the compiled layers (PHI3TUNE_RECOMPUTE_IN_GRAPH=0) the recomputed layer keeps its
    activations to the compiler's low budget (session 9: 3.90 GiB allocated at max_seq_length 4,096 against 4.02).
    On the CPU (eager layers) there is no such budget; the speed plans keep the default where they fit."""
    from phi3tune.memory import LOW_ACTIVATION_BUDGET
    from phi3tune.plan import MODES

    def memory() -> FineTuner:
        return FineTuner(str(PHI3_DIR)).training(optimize_for="memory", batch_size=1).data(max_seq_length=4096,
                                                                                          packing=True)

    assert MODES["memory"]["activation_budget"] == LOW_ACTIVATION_BUDGET
    cuda, cpu = plan_for(memory(), "cuda", free_gib=139), plan_for(memory(), "cpu")
    assert cuda.recompute_in_graph and cuda.activation_budget == 1.0 and cpu.activation_budget == 1.0
    monkeypatch.setenv("PHI3TUNE_RECOMPUTE_IN_GRAPH", "0")
    torch_ckpt = plan_for(memory(), "cuda", free_gib=139)
    assert not torch_ckpt.recompute_in_graph and torch_ckpt.activation_budget == LOW_ACTIVATION_BUDGET
    assert "activations recomputed to a 0.3 budget" in torch_ckpt.describe()
    monkeypatch.delenv("PHI3TUNE_RECOMPUTE_IN_GRAPH")
    assert plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=139).activation_budget == 1.0


@needs_shared
def test_the_memory_plan_keeps_fixed_lengths_only_under_torch_checkpoints(monkeypatch):
    """The memory plan under torch's checkpoint (PHI3TUNE_RECOMPUTE_IN_GRAPH=0) compiles its layers for fixed lengths,
    even unpacked under varlen attention where the speed plans take one symbolic length: there symbolic lengths
    held 0.27 GiB more at the allocator's peak for no speed (H200, seq 4096: 4.20 against 3.93 GiB, session 24,
    the low budget). Its layers checkpointed in their graphs (the default) take the symbolic length as the speed
    plans do (session 27: no more at the device, a quarter of the padding). Negative control: the knob gets them
    under torch's checkpoint too, and the plan then counts their extra."""
    from phi3tune import varlen_attention

    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: True)

    def seq4096() -> FineTuner:
        return FineTuner(str(PHI3_DIR)).training(optimize_for="memory", batch_size=1).data(max_seq_length=4096)

    in_graph = plan_for(seq4096(), "cuda", free_gib=139)
    speed = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=139)
    assert in_graph.attn_implementation == speed.attn_implementation == varlen_attention.NAME
    assert in_graph.recompute_in_graph and in_graph.dynamic_lengths and speed.dynamic_lengths
    monkeypatch.setenv("PHI3TUNE_RECOMPUTE_IN_GRAPH", "0")
    memory = plan_for(seq4096(), "cuda", free_gib=139)
    assert not memory.recompute_in_graph and not memory.dynamic_lengths and "symbolic_lengths" not in memory.memory
    assert len(memory.token_buckets) == 4 and "a multiple of 128" not in memory.describe()
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    asked = plan_for(seq4096(), "cuda", free_gib=139)
    assert asked.dynamic_lengths and asked.memory["symbolic_lengths"] > 0


def test_the_low_budget_shrinks_the_layers_that_keep_activations_not_the_recomputed_one():
    """The memory model: under the low budget a layer that keeps its activations keeps ~0.4 of them (and no
    dropped inputs); the one checkpointed layer recomputed at a time keeps what the default keeps (measured:
    0.12 GiB less at 4,096 tokens, where scaling it too predicted 0.36 and put the prediction 14% under the device
    peak)."""
    from phi3tune.memory import _LOW_BUDGET, _NO_DROPOUT, ModelShape, estimate_parts

    shape = ModelShape(hidden=3072, intermediate=8192, layers=32, vocab=32064, linears=(), other_params=0)

    def acts(budget: float, k: int, offload: bool = False) -> int:
        return estimate_parts(shape, bits=4, double_quant=False, targets=set(), r=64, dropout=0.1,
                              optimizer_state_bytes=8, act_bytes=2, upcast_frozen=False, tokens=4096,
                              checkpointing=k > 0, compiled=True, ce_chunk=512, cuda=True, checkpoint_layers=k,
                              activation_budget=budget, offload=offload)["activations"]

    assert acts(0.3, 0) / acts(1.0, 0) == pytest.approx(_LOW_BUDGET * _NO_DROPOUT, rel=1e-6)
    assert acts(0.3, 32, offload=True) == acts(1.0, 32, offload=True)
    assert acts(0.3, 32) == acts(1.0, 32)
    assert acts(0.3, 16) < acts(1.0, 16)  # 16 layers keep their activations, to the low budget


@needs_shared
def test_the_middle_activation_budget_sits_between_the_default_and_the_low_one():
    """The speed plans' third activation budget (memory.MIDDLE_ACTIVATION_BUDGET): its layers keep 0.6 of the
    default's activations (H200: 8.7 GiB less at 4,864 tokens), for +11% a step where the low budget keeps ~1/3 for
    +18%; so a card whose whole step fits only under it takes it (22 GiB: no layer checkpointed), a card with room
    keeps the default (the negative control) and a smaller one the low budget."""
    from phi3tune.memory import (
        _MIDDLE_BUDGET,
        LOW_ACTIVATION_BUDGET,
        MIDDLE_ACTIVATION_BUDGET,
        ModelShape,
        estimate_parts,
    )
    from phi3tune.step_cost import expected_cost

    shape = ModelShape(hidden=3072, intermediate=8192, layers=32, vocab=32064, linears=(), other_params=0)

    def acts(budget: float) -> int:
        return estimate_parts(shape, bits=4, double_quant=False, targets=set(), r=64, dropout=0.1,
                              optimizer_state_bytes=8, act_bytes=2, upcast_frozen=False, tokens=4096,
                              checkpointing=False, compiled=True, ce_chunk=512, cuda=True,
                              activation_budget=budget)["activations"]

    assert acts(LOW_ACTIVATION_BUDGET) < acts(MIDDLE_ACTIVATION_BUDGET) < acts(1.0)
    assert acts(MIDDLE_ACTIVATION_BUDGET) == pytest.approx(_MIDDLE_BUDGET * acts(1.0), rel=1e-3)
    ft = FineTuner(str(PHI3_DIR))
    plans = {g: plan_for(ft, "cuda", free_gib=g, step_tokens=4842) for g in (16, 22, 40)}
    middle = plans[22]
    assert (middle.activation_budget, middle.checkpointing, middle.micro_batch_tokens) == (0.5, False, 4864)
    assert "activations recomputed to a 0.5 budget" in middle.describe()
    assert plans[40].activation_budget == 1.0 and plans[16].activation_budget == LOW_ACTIVATION_BUDGET
    costs = [expected_cost(plans[g], 32) for g in (16, 22, 40)]
    assert costs == sorted(costs, reverse=True)


@needs_shared
def test_packed_rows_take_full_2048_token_micro_batches_where_4096_would_need_recomputing(monkeypatch):
    """Packed rows fill every micro-batch, so a micro-batch costs the fitted ~19 ms + ~36.7 µs a token. On a 16 GiB
    card, four of 2,048 at the default budget beat two of 4,096 at the low one: the model's ratio is the one
    measured (session 11, one machine: 0.376 s against 0.398 a step). But a pass never costs less than the host's
    time to queue it (~88 ms): on 24 GiB, 2,048 beside the dequantized base would be that short, so it takes 4,096
    (session 22: that 2,048 plan ran 18% slower than 16 GiB's 4,096 one on a slower host); with no host time (the
    negative control) it is the 2,048 plan again. Unpacked rows (a part-filled micro-batch: measured slower) keep a
    whole step per micro-batch, and a 12 GiB card, where 2,048's default activations do not fit, keeps 4,096 at the
    low budget. (FlexAttention's plans: under varlen attention the middle budget's symbolic lengths hold 4,096 on
    12-22 GiB, tests/test_varlen_attention.py.)"""
    from phi3tune import step_cost
    from phi3tune.memory import LOW_ACTIVATION_BUDGET
    from phi3tune.step_cost import expected_cost

    packed = FineTuner(str(PHI3_DIR)).data(packing=True)
    p12, p16, p24 = (plan_for(packed, "cuda", free_gib=g) for g in (12, 16, 24))
    assert (p16.micro_batch_tokens, p16.activation_budget, p16.checkpointing, p16.dequantized_base) == (
        2048, 1.0, False, False)
    assert p24.micro_batch_tokens == 4096 and expected_cost(p24, 32, True) < expected_cost(p16, 32, True)
    assert (p12.micro_batch_tokens, p12.activation_budget) == (4096, LOW_ACTIVATION_BUDGET)
    assert expected_cost(p16, 32, True) / expected_cost(p12, 32, True) == pytest.approx(0.376 / 0.398, rel=0.02)
    monkeypatch.setattr(step_cost, "_HOST_PASS_MS", 0.0)
    fast_host = plan_for(packed, "cuda", free_gib=24)
    assert (fast_host.micro_batch_tokens, fast_host.activation_budget, fast_host.dequantized_base) == (2048, 1.0, True)
    monkeypatch.undo()
    for g in (16, 24):  # on 24 GiB the fit would give unpacked rows 2,048 beside the dequantized base too
        assert plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=g, step_tokens=4842).micro_batch_tokens >= 4096


@needs_shared
def test_a_pass_below_the_default_budget_costs_the_host_more(monkeypatch):
    """Layers compiled to a lower activation budget recompute cheap ops in backward, so the host queues more kernels a
    pass: 159 ms, measured (session 24: packed 8 GiB in 2,048-token micro-batches at the middle budget ran 12,654
    tokens/s against 19,752 for 4,096-token ones at the default budget with 30 layers recomputed). So packed rows on
    8 GiB keep the 4,096-token plan. Negative control: at the default budget's floor (88 ms) for every budget, the
    model would send them to 2,048 at the middle budget, as it did for that call."""
    from phi3tune import step_cost, varlen_attention
    from phi3tune.step_cost import expected_cost

    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: True)
    packed = FineTuner(str(PHI3_DIR)).data(packing=True)
    eight = plan_for(packed, "cuda", free_gib=8)
    assert (eight.micro_batch_tokens, eight.activation_budget, eight.recompute_in_graph) == (4096, 1.0, True)
    monkeypatch.setattr(step_cost, "_HOST_PASS_MS_RECOMPUTING", step_cost._HOST_PASS_MS)
    fooled = plan_for(packed, "cuda", free_gib=8)
    assert (fooled.micro_batch_tokens, fooled.activation_budget) == (2048, 0.5)
    monkeypatch.undo()
    # measured: 0.6485 s against 0.4109 s a step; the model now ranks them that way, by more than half the gap
    assert expected_cost(fooled, 32, True) / expected_cost(eight, 32, True) > 1 + 0.5 * (0.6485 / 0.4109 - 1)


@needs_shared
def test_a_named_plan_that_would_not_fit_is_warned_about_before_any_weight_loads(caplog):
    """Phi-3-mini with optimize_for="balanced" (padded, eager, ~18.0 GiB predicted) on a 12 GiB card: the run warns,
    naming the field and what fits; on an 80 GiB card it does not, nor does ``auto`` on the 12 GiB card (it takes
    only plans that fit)."""
    from phi3tune.pipeline import check_fits

    def warned(optimize_for: str, free_gib: float) -> bool:
        plan = plan_for(FineTuner(str(PHI3_DIR)).training(optimize_for=optimize_for), "cuda", free_gib=free_gib)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="phi3tune"):
            check_fits(plan)
        return "may run out of memory" in caplog.text

    assert warned("balanced", 12)
    assert "training.optimize_for='balanced' predicts a peak of" in caplog.text and 'optimize_for="auto"' in caplog.text
    assert not warned("balanced", 80) and not warned("auto", 12)


@needs_shared
def test_combo_kernels_where_measured_and_where_their_extra_fits(monkeypatch):
    """Inductor's combo kernels (fewer launches: session 18) go on a CUDA speed plan that checkpoints no layer or
    checkpoints by micro-batch length (checkpoint_lengths.py), only where its predicted peak plus their measured
    extra still fits 90% of the card, or the combo room (``COMBO_FIT_FRACTION`` of it, leaving
    ``COMBO_MARGIN_GIB``: session 20's 12 GiB card), and that extra is in the prediction; plans that checkpoint the
    same layers on every pass and CPU plans keep the plain kernels; the memory plan takes them where every layer
    recomputes in its graph (its own extra); the benchmark knob forces either way."""
    from phi3tune.knobs import compile_settings
    from phi3tune.plan import COMBO_KERNELS_HIDDENS
    from phi3tune.plan_search import COMBO_FIT_FRACTION, COMBO_MARGIN_GIB

    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    ft = FineTuner(str(PHI3_DIR))
    plans = {g: plan_for(ft, "cuda", free_gib=g, step_tokens=4842) for g in (8, 11, 12, 16, 20, 24, 40, 139)}
    for g, p in plans.items():
        room = min(COMBO_FIT_FRACTION * g, g - COMBO_MARGIN_GIB)
        assert p.predicted_peak_gib <= (room if p.combo_kernels else 0.9 * g)
        assert ("combo_kernels" in p.memory) == p.combo_kernels == ("combo kernels" in p.describe())
        if p.combo_kernels and p.mode == "speed":  # the extra, per token of the largest micro-batch, is predicted
            assert not p.checkpointing or p.checkpoint_lengths
            assert p.memory["combo_kernels"] == COMBO_KERNELS_HIDDENS * 3072 * 2 * p.peak_micro_batch_tokens
    big = plans[139]
    assert big.combo_kernels and big.memory["combo_kernels"] > 0.4 * 2**30  # ~0.6 GiB at 4,864 tokens
    assert plans[8].combo_kernels and plans[8].checkpoint_lengths  # checkpointed by length
    monkeypatch.setenv("PHI3TUNE_CKPT_BY_LENGTH", "0")  # every pass checkpoints the same: not measured with them
    same = plan_for(ft, "cuda", free_gib=8, step_tokens=4842)
    assert same.checkpointing and not same.checkpoint_lengths and not same.combo_kernels
    monkeypatch.delenv("PHI3TUNE_CKPT_BY_LENGTH")
    # 12 GiB: the extra is past 90% of the card but within the combo room
    assert plans[12].combo_kernels and plans[12].predicted_peak_gib > 0.9 * 12
    monkeypatch.setenv("PHI3TUNE_COMPILE", "combo_kernels=0")  # the room rule's negative control: without them
    plain = plan_for(ft, "cuda", free_gib=12, step_tokens=4842)
    assert not plain.combo_kernels and plain.predicted_peak_gib <= 0.9 * 12
    monkeypatch.setenv("PHI3TUNE_COMPILE", "combo_kernels=1")
    assert plan_for(ft, "cuda", free_gib=8, step_tokens=4842).combo_kernels  # forced, even where not measured
    monkeypatch.setenv("PHI3TUNE_COMPILE", "combo_kernels=0")
    assert not plan_for(ft, "cuda", free_gib=139).combo_kernels
    monkeypatch.delenv("PHI3TUNE_COMPILE")
    # the memory plan (every layer recomputed in its graph, inputs in host memory: session 31) takes them with its
    # own measured extra where they fit; not where it recomputes under torch's checkpoint, nor on a 5 GiB card
    from phi3tune.plan import COMBO_RECOMPUTED_HIDDENS

    lean = plan_for(ft.training(optimize_for="memory"), "cuda", free_gib=8)
    assert lean.combo_kernels and lean.recompute_in_graph and lean.offload_checkpoints
    assert lean.memory["combo_kernels"] == COMBO_RECOMPUTED_HIDDENS * 3072 * 2 * 4096
    assert not plan_for(ft.training(optimize_for="memory"), "cuda", free_gib=5).combo_kernels
    monkeypatch.setenv("PHI3TUNE_RECOMPUTE_IN_GRAPH", "0")
    assert not plan_for(ft.training(optimize_for="memory"), "cuda", free_gib=24).combo_kernels
    monkeypatch.delenv("PHI3TUNE_RECOMPUTE_IN_GRAPH")
    assert not plan_for(ft, "cpu").combo_kernels
    assert compile_settings(combo_kernels=True)["options"] == {"combo_kernels": True}
    assert "combo_kernels" not in compile_settings()["options"]


def test_numbers_read_a_step_late_on_cuda_plans(monkeypatch):
    """CUDA plans read each step's loss and gradient norm a step late (late_read.py; session 19's 16 GiB ABBA);
    the CPU reads at once (its steps run as they are queued: nothing to gain), and so do fp16 (its loss scaler
    reads each step's overflow) and FSDP (its optimizer waits per shard); the benchmark knob forces either way."""
    from phi3tune.knobs import read_late_wanted

    monkeypatch.delenv("PHI3TUNE_READ_LATE", raising=False)
    ft = FineTuner(str(PHI3_DIR))
    card = plan_for(ft, "cuda", free_gib=16)
    assert card.read_late and "read a step late" in card.describe()
    assert not plan_for(ft, "cpu").read_late
    assert read_late_wanted(True, "bf16", sharded=False) and read_late_wanted(True, "fp32", sharded=False)
    assert not read_late_wanted(True, "fp16", sharded=False) and not read_late_wanted(True, "bf16", sharded=True)
    monkeypatch.setenv("PHI3TUNE_READ_LATE", "0")
    assert not plan_for(ft, "cuda", free_gib=16).read_late
    monkeypatch.setenv("PHI3TUNE_READ_LATE", "1")
    assert plan_for(ft, "cpu").read_late


def test_benchmark_knobs_refuse_what_they_do_not_know(monkeypatch):
    """PHI3TUNE_OFFLOAD_LAYERS takes a count and PHI3TUNE_COMPILE its known keys; anything else fails with a message
    naming the knob and what it takes (negative controls: a count and a known key pass)."""
    from phi3tune.knobs import compile_env, offload_layers_wanted

    monkeypatch.setenv("PHI3TUNE_OFFLOAD_LAYERS", "some")
    with pytest.raises(ValueError, match="PHI3TUNE_OFFLOAD_LAYERS='some': give a number of layers"):
        offload_layers_wanted()
    monkeypatch.setenv("PHI3TUNE_OFFLOAD_LAYERS", "3")
    assert offload_layers_wanted() == 3
    monkeypatch.setenv("PHI3TUNE_COMPILE", "combo_kernels=1,bogus=2")
    with pytest.raises(ValueError, match="'bogus' is not one of mode, cpp_wrapper"):
        compile_env()
    monkeypatch.setenv("PHI3TUNE_COMPILE", "combo_kernels=1")
    assert compile_env() == {"combo_kernels": "1"}
