"""varlen attention (examples laid end to end, each its own causal sequence) is the document mask's math: the
bounds it is given, its attention against SDPA per example, and whole runs against the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, run_counting_graphs, tiny_tuner

from phi3tune.varlen_attention import NAME, attention, document_bounds, reference


def test_bounds_start_an_example_wherever_positions_restart_and_at_every_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert document_bounds(pos).tolist() == [0, 3, 5, 9]
    assert document_bounds(pos).dtype == torch.int32
    # two rows: the second row's start is an example's start although its position follows the first row's last
    rows = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    assert document_bounds(rows).tolist() == [0, 4, 6, 8]
    # an example that does not start at 0 (a packed row's pads continue its last example) is still one example
    assert document_bounds(torch.tensor([[0, 1, 0, 1, 2, 3]])).tolist() == [0, 2, 6]
    # TokenLoss reads them off the batch's positions when a caller gives none; without positions, each row is one
    from phi3tune.loss import TokenLoss

    loss = TokenLoss(torch.nn.Module(), longest_example=8)
    got = loss._bounds(torch.zeros(2, 5, dtype=torch.long), None, None)
    assert got["cu_seq_lens_q"].tolist() == [0, 5, 10] and got["max_length_q"] == 8
    assert loss._bounds(torch.zeros(1, 9, dtype=torch.long), pos, None)["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert TokenLoss(torch.nn.Module())._bounds(torch.zeros(1, 9, dtype=torch.long), pos, None) == {}


def _per_example(q, k, v, bounds, window=None):
    outs = []
    for a, b in zip(bounds.tolist(), bounds.tolist()[1:]):
        n = b - a
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if window is not None:
            mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
        outs.append(F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                                   attn_mask=mask).transpose(0, 1))
    return torch.cat(outs)


def test_reference_is_sdpa_on_each_example_alone():
    torch.manual_seed(0)
    q, k, v = (torch.randn(11, 2, 8) for _ in range(3))
    bounds = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    got = reference(q, k, v, bounds, 8 ** -0.5)
    torch.testing.assert_close(got, _per_example(q, k, v, bounds))
    torch.testing.assert_close(reference(q, k, v, bounds, 8 ** -0.5, window=2), _per_example(q, k, v, bounds, 2))
    # negative control: one causal sequence over all 11 tokens lets examples see each other
    whole = torch.tensor([0, 11], dtype=torch.int32)
    assert not torch.allclose(reference(q, k, v, whole, 8 ** -0.5)[4:], got[4:])


def test_attention_takes_transformers_layout_and_repeats_grouped_heads():
    """(batch, heads, length, dim) in, (batch, length, heads, dim) out; 4 query heads over 2 key/value heads."""
    torch.manual_seed(1)
    q = torch.randn(1, 4, 9, 8)
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    bounds = torch.tensor([0, 3, 9], dtype=torch.int32)
    out, weights = attention(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds, max_length_q=6)
    assert weights is None and out.shape == (1, 9, 4, 8)
    flat = [t[0].transpose(0, 1) for t in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))]
    torch.testing.assert_close(out[0], _per_example(*flat, bounds))


def test_under_autocast_it_attends_in_the_autocast_dtype_as_sdpa_does(monkeypatch):
    """The classic layout's fp32 norms hand it fp32 q / k / v; under bf16 autocast it attends in bf16, as SDPA
    does there, so on CUDA the flash kernel takes them (in fp32 they took the dense reference: 33.8 GiB at peak on
    the H200 for the balanced plan's packed rows, session 16). Negative control: without autocast fp32 stays."""
    import phi3tune.varlen_attention as va

    seen: list[torch.dtype] = []
    real = va.reference
    monkeypatch.setattr(va, "reference", lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw))
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    bounds = torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds, max_length_q=5)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    half = [t[0].transpose(0, 1).to(torch.bfloat16) for t in (q, k, v)]
    torch.testing.assert_close(out[0], _per_example(*half, bounds))
    out32, _ = attention(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds, max_length_q=5)
    assert seen[-1] == torch.float32 and out32.dtype == torch.float32
    torch.testing.assert_close(out32[0], _per_example(*(t[0].transpose(0, 1) for t in (q, k, v)), bounds))


def test_without_bounds_it_is_transformers_sdpa():
    """A call that is not TokenLoss's (generation) gets plain causal attention, as with SDPA."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, _ = attention(torch.nn.Module(), q, k, v, None)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("compile_", [False, True])
def test_a_run_with_varlen_attention_matches_the_plain_path(tiny_model, tmp_path, monkeypatch, compile_):
    """The speed plan's padding-free micro-batches with varlen attention (on the CPU its dense-mask reference;
    the flash kernel itself is compared on the GPU, examples/benchmarks/attention_kernels.py): the same steps as
    the plain path. Compiled, one graph serves every number of examples a micro-batch holds: the warm-up shows
    the layers one and two examples, training three (checked), and nothing compiles after the first step. Every
    micro-batch, the warm-up's too, brings its bounds: none is read off the position ids."""
    from phi3tune import varlen_attention

    examples: list[int] = []
    bounds = varlen_attention.document_bounds
    monkeypatch.setattr(varlen_attention, "document_bounds",
                        lambda pos: examples.append(len(bounds(pos)) - 1) or bounds(pos))

    from phi3tune.loss import TokenLoss

    unbounded: list[bool] = []  # a forward that had to read the bounds off position_ids (a device sync)
    own = TokenLoss._bounds
    monkeypatch.setattr(TokenLoss, "_bounds", lambda self, ids, pos, cu: unbounded.append(
        self.longest_example is not None and cu is None) or own(self, ids, pos, cu))

    rows = rows_of_text(24, seed=5)
    ref = tiny_tuner(tiny_model, tmp_path / "a", rows, batch_size=4, grad_accum=2, max_steps=3).run()
    tuner = tiny_tuner(tiny_model, tmp_path / "b", rows, batch_size=4, grad_accum=2, optimize_for="speed",
                       compile=compile_, micro_batch_tokens=128, max_steps=3)
    tuner.attn_implementation = NAME
    got, graphs = run_counting_graphs(tuner)
    assert got.plan is not None and got.plan.attn_implementation == NAME
    for step in range(3):
        assert got.history[step]["loss"] == pytest.approx(ref.history[step]["loss"], rel=1e-5)
        assert got.history[step]["grad_norm"] == pytest.approx(ref.history[step]["grad_norm"], rel=1e-4)
    a, b = adapter_tensors(ref), adapter_tensors(got)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert max(examples) >= 3, examples
    assert len(unbounded) > 6 and not any(unbounded)  # the warm-up's micro-batches carry their bounds too
    if compile_:
        assert graphs[0] == graphs[-1], graphs  # nothing compiled after the first step



def test_a_phi3_model_gives_the_same_hidden_states_as_with_sdpa_document_masks():
    """transformers' own document and sliding-window masks (SDPA, examples found from position_ids) against varlen
    attention with the bounds, on a random Phi-3 whose window (4) is shorter than its examples (7 and 5 tokens)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi3tune.varlen_attention import register

    torch.manual_seed(3)
    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
                     pad_token_id=0)
    model = Phi3ForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (1, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        model.set_attn_implementation(register())
        bounds = document_bounds(pos)
        got = model.model(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                          max_length_q=7, max_length_k=7).last_hidden_state
        model.config.sliding_window = None  # negative control: the window matters here
        unwindowed = model.model(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=bounds,
                                 cu_seq_lens_k=bounds, max_length_q=7, max_length_k=7).last_hidden_state
    torch.testing.assert_close(got, want)
    assert not torch.allclose(unwindowed, want, atol=1e-4)


def test_cuda_plans_take_varlen_attention_where_its_kernel_runs(monkeypatch):
    from phi3tune import varlen_attention
    from phi3tune.plan import default_attention

    cuda = torch.device("cuda")
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: dtype == torch.bfloat16)
    assert default_attention(cuda, True, torch.bfloat16) == NAME
    assert default_attention(cuda, True, torch.float32) == "flex_attention"  # the flash kernel is 16-bit only
    assert default_attention(cuda, False, torch.bfloat16) is None  # padded rows: SDPA
    assert default_attention(torch.device("cpu"), True, torch.bfloat16) is None


@needs_shared
def test_symbolic_lengths_where_they_pay_and_fit(monkeypatch):
    """Phi-3-mini, the flash kernel taken as present. Unpacked rows get one symbolic-length graph (multiples of
    128) at the default budget, and at the upper one (since session 34) where its measured extra memory still fits
    (12 and 16 GiB: with the low budget's extra 12 GiB would not, the negative control); at the middle and upper
    budgets the symbolic graphs are planned to keep what the low budget's do (measured), less than fixed lengths
    would (the other control), and at the middle one nothing more since each compiles its symbolic graph first.
    Packed rows keep their 4 fixed lengths but at the middle budget; FlexAttention always."""
    from phi3tune import FineTuner, varlen_attention
    from phi3tune.bench import plan_for
    from phi3tune.memory import (
        LOW_ACTIVATION_BUDGET,
        MIDDLE_ACTIVATION_BUDGET,
        SYMBOLIC_HIDDENS,
        UPPER_ACTIVATION_BUDGET,
        ModelShape,
        modelled_budget,
        symbolic_lengths_bytes,
    )
    from phi3tune.plan import FIT_FRACTION
    from phi3tune.shapes import symbolic_lengths_pay
    from phi3tune.step_cost import expected_cost

    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: True)
    ft = FineTuner(str(PHI3_DIR))
    big = plan_for(ft, "cuda", free_gib=139)
    assert big.attn_implementation == NAME and big.dynamic_lengths and big.activation_budget == 1.0
    assert set(big.token_buckets) == set(range(128, big.token_buckets[-1] + 1, 128))
    assert big.memory["symbolic_lengths"] == 0  # the default budget keeps the same with either
    assert "varlen flash attention" in big.describe() and "a multiple of 128" in big.describe()
    sixteen, twelve = plan_for(ft, "cuda", free_gib=16), plan_for(ft, "cuda", free_gib=12)
    assert sixteen.activation_budget == UPPER_ACTIVATION_BUDGET and sixteen.dynamic_lengths
    # as the GPU plans them (the data's longest step, varlen attention): a bigger card is never expected slower
    cards = {g: plan_for(ft, "cuda", free_gib=g, step_tokens=4842) for g in (8, 12, 16, 20, 24, 32, 40, 139)}
    costs = [expected_cost(p, 32) for p in cards.values()]
    assert costs == sorted(costs, reverse=True) and all(
        p.predicted_peak_gib <= FIT_FRACTION * g or (p.combo_kernels and p.predicted_peak_gib <= g - 0.75)
        for g, p in cards.items())  # combo kernels' measured extra may use a little more (plan_search)
    assert cards[24].dequantized_base and cards[24].activation_budget == UPPER_ACTIVATION_BUDGET \
        and cards[24].dynamic_lengths
    # at the middle budget a symbolic graph compiled first keeps no more than fixed-length ones (session 24); at the
    # upper one its measured half a hidden vector a token and layer more
    middle16 = plan_for(FineTuner(str(PHI3_DIR)).data(packing=True), "cuda", free_gib=16)
    assert middle16.activation_budget == MIDDLE_ACTIVATION_BUDGET and middle16.memory["symbolic_lengths"] == 0
    assert sixteen.memory["symbolic_lengths"] > 0 and sixteen.predicted_peak_gib <= FIT_FRACTION * 16
    # 12 GiB takes the upper budget with symbolic lengths too, at 4,096 tokens
    assert (twelve.activation_budget, twelve.dynamic_lengths, twelve.micro_batch_tokens) == (
        UPPER_ACTIVATION_BUDGET, True, 4096)
    plain = twelve.predicted_peak_gib - twelve.memory.get("combo_kernels", 0) / (1 << 30)  # before combo kernels
    assert plain <= FIT_FRACTION * 12
    # negative control: with the low budget's symbolic extra (measured: session 12) it would not fit
    shape = ModelShape(hidden=3072, intermediate=8192, layers=32, vocab=32064, linears=(), other_params=0)
    extra = symbolic_lengths_bytes(shape, twelve.micro_batch_tokens, 2, LOW_ACTIVATION_BUDGET)
    assert SYMBOLIC_HIDDENS["low"] == 1.6 and plain + extra / (1 << 30) > FIT_FRACTION * 12
    middle = plan_for(FineTuner(str(PHI3_DIR)).training(micro_batch_tokens=4864), "cuda", free_gib=22)
    assert middle.activation_budget == UPPER_ACTIVATION_BUDGET and middle.dynamic_lengths
    assert (modelled_budget(0.5, True), modelled_budget(0.5, False), modelled_budget(1.0, True)) == (0.3, 0.5, 1.0)
    assert modelled_budget(UPPER_ACTIVATION_BUDGET, True) == 0.3
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=0")
    fixed = plan_for(FineTuner(str(PHI3_DIR)).training(micro_batch_tokens=4864), "cuda", free_gib=22)
    assert fixed.activation_budget == 0.5 and not fixed.dynamic_lengths
    held = middle.memory.get("dequantized_weights", 0) / (1 << 30)  # the base dequantized beside it, where it fits
    assert fixed.predicted_peak_gib > middle.predicted_peak_gib - held + 3
    monkeypatch.delenv("PHI3TUNE_COMPILE")
    packed = plan_for(FineTuner(str(PHI3_DIR)).data(packing=True), "cuda", free_gib=139)
    assert not packed.dynamic_lengths and len(packed.token_buckets) == 4
    # packed rows take them only at the middle budget, for the memory: 16 GiB holds 4,096 tokens there (measured
    # faster than 2,048 at the default budget); at the low budget they would keep more, at the default no less
    packed16 = plan_for(FineTuner(str(PHI3_DIR)).data(packing=True), "cuda", free_gib=16)
    assert (packed16.activation_budget, packed16.dynamic_lengths, packed16.micro_batch_tokens) == (0.5, True, 4096)
    assert [symbolic_lengths_pay(NAME, True, b) for b in (1.0, 0.5, 0.3)] == [False, True, False]
    assert [symbolic_lengths_pay(NAME, False, b) for b in (1.0, 0.5, 0.3)] == [True, True, True]
    packed_cards = [plan_for(FineTuner(str(PHI3_DIR)).data(packing=True), "cuda", free_gib=g)
                    for g in (8, 12, 16, 20, 24, 40, 139)]  # packed rows too: a bigger card never expected slower
    packed_costs = [expected_cost(p, 32, packed=True) for p in packed_cards]
    assert packed_costs == sorted(packed_costs, reverse=True) and packed_costs[0] > packed_costs[-1]
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: False)
    flex = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=139)
    assert flex.attn_implementation == "flex_attention" and not flex.dynamic_lengths


@needs_shared
def test_unpacked_rows_take_the_upper_budget_where_it_checkpoints_no_layer(monkeypatch):
    """The upper activation budget (memory.UPPER_ACTIVATION_BUDGET; session 34, the 16 GiB quickstart: 21,794
    tokens/s against the middle budget's 21,213 for 0.43 GiB more allocated). The 16 GiB quickstart's whole step
    (varlen attention, symbolic lengths) takes it, predicted the middle plan's peak plus its measured extra and
    costed below it. Negative controls: without the upper budget the search takes the middle one (the plan before);
    12 GiB, where it would need checkpointed layers (not measured), keeps the middle budget's plan; packed rows and
    FlexAttention's fixed lengths (neither measured) never take it."""
    from phi3tune import FineTuner, plan_search, varlen_attention
    from phi3tune.bench import plan_for
    from phi3tune.memory import MIDDLE_ACTIVATION_BUDGET, SYMBOLIC_HIDDENS, UPPER_ACTIVATION_BUDGET
    from phi3tune.plan import FIT_FRACTION
    from phi3tune.step_cost import expected_cost

    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: True)
    steps = [3100] * 56 + [2000, 2500, 3500, 3900, 4158, 4499, 4686]  # the quickstart's first epoch, roughly
    ft = FineTuner(str(PHI3_DIR))
    upper = plan_for(ft, "cuda", free_gib=16, steps=steps)
    assert (upper.activation_budget, upper.checkpointing, upper.dynamic_lengths) == (UPPER_ACTIVATION_BUDGET, False,
                                                                                     True)
    assert "activations recomputed to a 0.6 budget" in upper.describe()
    assert upper.compile_settings()["activation_budget"] == UPPER_ACTIVATION_BUDGET  # what the layers compile with
    tokens = upper.peak_micro_batch_tokens
    extra = SYMBOLIC_HIDDENS["upper"] * 3072 * 2 * tokens * 32  # hidden vectors of bf16, a token and layer
    assert upper.memory["symbolic_lengths"] == pytest.approx(extra, rel=1e-3)
    assert upper.predicted_peak_gib <= FIT_FRACTION * 16
    monkeypatch.setattr(plan_search, "_budgets", lambda run: (1.0, MIDDLE_ACTIVATION_BUDGET, 0.3))
    middle = plan_for(ft, "cuda", free_gib=16, steps=steps)
    assert (middle.activation_budget, middle.checkpointing) == (MIDDLE_ACTIVATION_BUDGET, False)
    assert upper.predicted_peak_gib - middle.predicted_peak_gib == pytest.approx(extra / (1 << 30), rel=0.02)
    assert expected_cost(upper, 32, False, steps) < expected_cost(middle, 32, False, steps)
    monkeypatch.undo()
    monkeypatch.delenv("PHI3TUNE_COMPILE", raising=False)
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: True)
    twelve = plan_for(ft, "cuda", free_gib=12, steps=steps)
    assert twelve.activation_budget == MIDDLE_ACTIVATION_BUDGET and twelve.checkpoint_layers > 0
    packed = plan_for(FineTuner(str(PHI3_DIR)).data(packing=True), "cuda", free_gib=16)
    assert packed.activation_budget == MIDDLE_ACTIVATION_BUDGET
    monkeypatch.setattr(varlen_attention, "available", lambda device, dtype: False)
    flex = plan_for(ft, "cuda", free_gib=16, steps=steps)
    assert flex.attn_implementation == "flex_attention" and flex.activation_budget != UPPER_ACTIVATION_BUDGET
