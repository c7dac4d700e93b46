"""The bitsandbytes optimizer stepping each param group as one flat buffer (phi3tune/flat_steps.py): bitwise the
per-parameter optimizer's result, one update call per group, and checkpoints in the per-parameter layout."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_same_run, kill_after, resume_tuner, rows_of_text, tiny_tuner

from phi3tune import checkpoints as ckpt
from phi3tune import flat_steps

bnb_optim = pytest.importorskip("bitsandbytes.optim")


def _model() -> torch.nn.Sequential:
    """Odd sizes (no weight a multiple of 256 elements) so that 8-bit blocks would straddle unpadded segments."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 50), torch.nn.Tanh(), torch.nn.Linear(50, 42), torch.nn.Tanh(),
                               torch.nn.Linear(42, 30), torch.nn.Tanh(), torch.nn.Linear(30, 36))


def _groups(model: torch.nn.Module, loraplus: bool) -> list[dict[str, Any]]:
    params = list(model.parameters())
    if not loraplus:
        return [{"params": params}]
    return [{"params": params[:4]}, {"params": params[4:], "lr": 4e-2}]  # as LoRA+: lora_B at a higher lr


def _build(cls: type, flat: bool, loraplus: bool = False, align: int = flat_steps.ALIGN,
           unused: torch.nn.Parameter | None = None, configure: Any = None) -> tuple[torch.nn.Module, Any, Any]:
    """Model, bitsandbytes optimizer (8-bit state from 1,000 elements: the biases keep 32-bit state) and, with
    ``flat``, the flat step over it; ``unused``: a trainable parameter the forward never reaches; ``configure``:
    called with the model first."""
    model = _model()
    if configure is not None:
        configure(model)
    groups = _groups(model, loraplus)
    if unused is not None:
        groups[-1]["params"].append(unused)
    opt = cls(groups, lr=1e-2, weight_decay=0.1, min_8bit_size=1000)
    return model, opt, flat_steps.FlatSteps(opt, align) if flat else None


def _train(cls: type, flat: bool, loraplus: bool = False, align: int = flat_steps.ALIGN, steps: int = 3,
           unused: torch.nn.Parameter | None = None, drop_grads: bool = False,
           configure: Any = None, queued: bool = False) -> tuple[torch.nn.Module, Any]:
    """``steps`` optimizer steps of 2 accumulated micro-batches each, gradients clipped, as the loop does;
    ``drop_grads``: the model's gradients set to None after each step (e.g. by a user's callback); ``queued``:
    stepped by ``FlatSteps.step`` (no waits for the device), as a loop reading its numbers late does."""
    model, opt, helper = _build(cls, flat, loraplus, align, unused, configure)
    torch.manual_seed(1)
    for _ in range(steps):
        for _ in range(2):
            model(torch.randn(8, 24)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        helper.step() if queued and helper is not None else opt.step()
        opt.zero_grad(set_to_none=True)
        if helper is not None:
            helper.zero_grads()
        if drop_grads:
            model.zero_grad(set_to_none=True)
    return model, helper or opt


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        x, y = a["state"][i], b["state"][i]
        assert x.keys() == y.keys()
        wrapped = "__bnb_optimizer_quant_state__"
        assert x["step"] == y["step"]
        xq, yq = x.get(wrapped, x), y.get(wrapped, y)
        assert xq.keys() == yq.keys()
        for k in xq:
            assert torch.equal(xq[k].cpu(), yq[k].cpu()), (i, k)


@pytest.mark.parametrize("name,loraplus", [("AdamW32bit", False), ("AdamW8bit", False), ("AdamW8bit", True),
                                           ("Lion8bit", True)])
def test_flat_step_equals_per_parameter_step_bitwise(name, loraplus):
    cls = getattr(bnb_optim, name)
    flat_model, helper = _train(cls, flat=True, loraplus=loraplus)
    ref_model, ref_opt = _train(cls, flat=False, loraplus=loraplus)
    assert [len(sets) for sets in helper.sets] == [1] * (2 if loraplus else 1)  # every group: one flat set
    for a, b in zip(flat_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    got, ref = helper.state_dict(), ref_opt.state_dict()
    _assert_same_state(got, ref)
    if "8bit" in name:  # the biases (< min_8bit_size) kept their 32-bit state and their own update
        assert {v["__bnb_optimizer_quant_state__"]["state1"].dtype for v in got["state"].values()} == {
            torch.uint8, torch.float32}


@pytest.mark.parametrize("name,loraplus", [("PagedAdamW32bit", False), ("AdamW8bit", True), ("Lion8bit", True)])
def test_queued_flat_step_equals_bitsandbytes_step_without_its_waits(name, loraplus, monkeypatch):
    """``FlatSteps.step`` (the loop reading its numbers late) gives bitsandbytes' result bit for bit, and waits for
    the device only in the first step, which is bitsandbytes' own; ``optimizer.step()`` waits in every step."""
    import bitsandbytes.optim.optimizer as bnb_impl

    waits: list[int] = []
    monkeypatch.setattr(bnb_impl, "sync_gpu", lambda t: waits.append(1))
    cls = getattr(bnb_optim, name)
    queued_model, helper = _train(cls, flat=True, loraplus=loraplus, queued=True)
    queued_waits = len(waits)
    ref_model, ref_opt = _train(cls, flat=False, loraplus=loraplus)
    assert helper.active and queued_waits > 0
    assert len(waits) - queued_waits >= 3 * queued_waits  # per parameter, every step: the waits the queue drops
    for a, b in zip(queued_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(helper.state_dict(), ref_opt.state_dict())
    waits.clear()
    _train(cls, flat=True, loraplus=loraplus)  # the flat step through optimizer.step(): waits in each of 3 steps
    assert len(waits) == 3 * queued_waits


@pytest.mark.parametrize("case", ["unused parameter", "gradients replaced"])
def test_back_to_per_parameter_steps_where_the_flat_step_would_differ(case):
    """A parameter with no gradient is skipped by bitsandbytes (no weight decay, no moment decay); a gradient
    that is no longer a view of the flat buffer would not be stepped: both go back to per-parameter steps."""
    unused = (lambda: torch.nn.Parameter(torch.ones(1100))) if case == "unused parameter" else (lambda: None)
    flat_unused, ref_unused = unused(), unused()
    drop = case == "gradients replaced"
    flat_model, helper = _train(bnb_optim.AdamW8bit, flat=True, unused=flat_unused, drop_grads=drop)
    ref_model, ref_opt = _train(bnb_optim.AdamW8bit, flat=False, unused=ref_unused, drop_grads=drop)
    assert not helper.active
    for a, b in zip(flat_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(helper.state_dict(), ref_opt.state_dict())
    if flat_unused is not None:
        assert torch.equal(flat_unused, torch.ones(1100))


def test_a_checkpoint_whose_parameters_differ_in_steps_loads_per_parameter():
    """A per-parameter checkpoint where one parameter never stepped (no state) cannot be one flat state."""
    _, ref_opt = _train(bnb_optim.AdamW8bit, flat=False, unused=torch.nn.Parameter(torch.ones(1100)))
    _, _, helper = _build(bnb_optim.AdamW8bit, flat=True, unused=torch.nn.Parameter(torch.ones(1100)))
    helper.load_state_dict(ref_opt.state_dict())
    assert not helper.active
    _assert_same_state(helper.state_dict(), ref_opt.state_dict())


def test_only_elementwise_bitsandbytes_optimizers_and_gradients_it_can_keep(monkeypatch):
    """Not under DDP's gradient_as_bucket_view (DDP points each .grad at its bucket), not for LAMB (a norm over
    each whole tensor) nor torch.optim; with the same optimizer and module otherwise it applies."""
    from types import SimpleNamespace

    model, opt, _ = _build(bnb_optim.AdamW32bit, flat=False)
    assert flat_steps.step_flat(opt, SimpleNamespace(gradient_as_bucket_view=True)) is None
    assert flat_steps.step_flat(bnb_optim.LAMB32bit(model.parameters()), model) is None
    assert flat_steps.step_flat(torch.optim.AdamW(model.parameters()), model) is None
    assert flat_steps.step_flat(opt, model) is not None


def test_a_parameter_with_its_own_bitsandbytes_config_keeps_its_own_update(monkeypatch):
    """bitsandbytes' GlobalOptimManager overrides (PEFT's LoRA+ uses them for embeddings): 32-bit state for one
    weight under an 8-bit optimizer. In a flat 8-bit buffer it would get 8-bit state."""
    mng = bnb_optim.GlobalOptimManager.get_instance()
    monkeypatch.setattr(mng, "pid2config", {})
    monkeypatch.setattr(mng, "uses_config_override", False)
    configure = lambda model: mng.override_config(model[2].weight, "optim_bits", 32)  # noqa: E731
    flat_model, helper = _train(bnb_optim.AdamW8bit, flat=True, configure=configure)
    ref_model, ref_opt = _train(bnb_optim.AdamW8bit, flat=False, configure=configure)
    assert helper.active and len(helper.sets[0][0].members) == 3  # the three other weights
    for a, b in zip(flat_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(helper.state_dict(), ref_opt.state_dict())


def test_unpadded_segments_change_the_8bit_update():
    """Negative control: segments packed back to back share 8-bit blocks (and their scales) with a neighbour."""
    flat_model, _ = _train(bnb_optim.AdamW8bit, flat=True, align=1)
    ref_model, _ = _train(bnb_optim.AdamW8bit, flat=False)
    assert not all(torch.equal(a, b) for a, b in zip(flat_model.parameters(), ref_model.parameters()))


# ---------------------------------------------------------------------------------------------- in the loop
def _flat_off(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("PHI3TUNE_FLAT_STEP", "0")  # the benchmarks' switch (examples/benchmarks: noflat)


@pytest.fixture(scope="module")
def per_parameter(tiny_model, tmp_path_factory):
    """helpers.resume_tuner's run (default optimizer, accumulation, clipping, dropout) without the flat step."""
    with pytest.MonkeyPatch.context() as mp:
        _flat_off(mp)
        return resume_tuner(tiny_model, tmp_path_factory.mktemp("per-parameter") / "run").run()


def test_the_loop_steps_one_tensor_per_group(tiny_model, tmp_path, monkeypatch):
    from bitsandbytes.optim.optimizer import Optimizer2State

    stepped: list[int] = []
    update = Optimizer2State.update_step

    def counted(self, group, p, gindex, pindex):
        stepped.append(p.numel())
        return update(self, group, p, gindex, pindex)

    monkeypatch.setattr(Optimizer2State, "update_step", counted)
    run = dict(max_steps=2, optimizer="paged_adamw_32bit", grad_accum=2, batch_size=2)
    tiny_tuner(tiny_model, tmp_path / "flat", rows_of_text(8), **run).run()
    flat = list(stepped)
    stepped.clear()
    _flat_off(monkeypatch)
    tiny_tuner(tiny_model, tmp_path / "off", rows_of_text(8), **run).run()
    assert len(flat) == 2 and flat[0] == flat[1]  # one update of one flat buffer per step
    assert len(stepped) == 2 * 16  # without it: one per LoRA tensor (2 layers x 4 modules x A, B)
    assert flat[0] >= sum(stepped[:16]) and flat[0] % flat_steps.ALIGN == 0


def test_a_run_with_the_flat_step_equals_one_without(reference, per_parameter):
    """Loss of every step, eval losses and the final adapter: equal (conftest's reference has the flat step)."""
    assert_same_run(reference, per_parameter)


def test_checkpoints_keep_the_per_parameter_layout(reference, per_parameter):
    got = ckpt.load_checkpoint(reference.output_dir / "checkpoint-2")[1]["optimizer"]
    want = ckpt.load_checkpoint(per_parameter.output_dir / "checkpoint-2")[1]["optimizer"]
    assert len(got["state"]) == len(want["state"]) == 16
    _assert_same_state(got, want)


def test_resume_across_the_change(reference, per_parameter, tiny_model, tmp_path, monkeypatch):
    """A checkpoint written without the flat step resumes with it, and one written with it resumes without."""
    old = kill_after(per_parameter.output_dir, tmp_path / "old", 3)
    assert_same_run(resume_tuner(tiny_model, old).run(resume=True), reference)
    new = kill_after(reference.output_dir, tmp_path / "new", 5)
    _flat_off(monkeypatch)
    assert_same_run(resume_tuner(tiny_model, new).run(resume=True), per_parameter)
