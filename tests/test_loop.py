"""The loop's math: token-weighted loss across micro-batches, eos trained under pad = eos, loss falls."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import GUANACO_JSONL, adapter_tensors, needs_shared, rows_of_text, tiny_tuner

from phi3tune import DataSpec, FineTuner, prepare_dataset
from phi3tune.batching import Collator
from phi3tune.data import IGNORE
from phi3tune.model import load_tokenizer

# Four examples of very different lengths: a mean of per-micro-batch means would weigh them wrongly.
UNEVEN = [{"text": "### Human: hi ### Assistant: " + "x" * n} for n in (1, 5, 40, 2)]


def _reference_loss(model_dir, rows) -> float:
    """transformers' own loss on the whole batch at once (adapter B=0 at step 1, so base == base+LoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tok = load_tokenizer(str(model_dir))
    ds = prepare_dataset(DataSpec(source=rows, max_seq_length=64), tok)
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32)
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)


@pytest.fixture(scope="module")
def split_runs(tiny_model, tmp_path_factory):
    runs = {}
    for bs, ga in [(4, 1), (1, 4), (2, 2)]:
        out = tmp_path_factory.mktemp(f"split{bs}x{ga}")
        runs[(bs, ga)] = tiny_tuner(tiny_model, out, UNEVEN, batch_size=bs, grad_accum=ga).run()
    return runs


def test_first_step_loss_is_token_weighted_mean(split_runs, tiny_model):
    ref = _reference_loss(tiny_model, UNEVEN)
    assert split_runs[(4, 1)].history[0]["loss"] == pytest.approx(ref, rel=1e-5)


def test_loss_and_grad_norm_invariant_to_micro_batch_split(split_runs):
    base = split_runs[(4, 1)].history[0]
    for key in [(1, 4), (2, 2)]:
        h = split_runs[key].history[0]
        assert h["loss"] == pytest.approx(base["loss"], rel=1e-5), key
        assert h["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4), key
        assert h["trained_tokens"] == base["trained_tokens"]


def test_adapter_after_one_step_invariant_to_split(split_runs):
    ref = adapter_tensors(split_runs[(4, 1)])
    for key in [(1, 4), (2, 2)]:
        got = adapter_tensors(split_runs[key])
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


def test_naive_mean_of_means_would_differ(tiny_model):
    """Negative control: on this data, averaging per-example means is measurably different."""
    per_example = [_reference_loss(tiny_model, [row]) for row in UNEVEN]
    assert abs(sum(per_example) / 4 - _reference_loss(tiny_model, UNEVEN)) > 1e-3


def test_eos_is_trained_although_pad_is_eos(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    assert tok.pad_token_id == tok.eos_token_id
    ds = prepare_dataset(DataSpec(source=UNEVEN, max_seq_length=128), tok)
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    for i in range(len(ds)):
        n = len(ds[i]["input_ids"])
        assert batch["input_ids"][i, n - 1] == tok.eos_token_id
        assert batch["labels"][i, n - 1] == tok.eos_token_id  # the real eos is a training target
        assert (batch["labels"][i, n:] == IGNORE).all()  # pads (same id!) are not
    assert int(batch["num_real_tokens"]) == sum(len(r["input_ids"]) for r in ds)


def test_truncated_example_gets_no_eos(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ds = prepare_dataset(DataSpec(source=[{"text": "y" * 100}], max_seq_length=16), tok)
    assert len(ds[0]["input_ids"]) == 16 and tok.eos_token_id not in ds[0]["input_ids"]


def test_history_metrics_file_and_schedule(tiny_model, tmp_path):
    rows = UNEVEN * 4
    res = tiny_tuner(tiny_model, tmp_path / "o", rows, batch_size=2, grad_accum=2, max_steps=4,
                     logging_steps=2, lr_scheduler="linear", warmup_ratio=0.5).run()
    assert [h["step"] for h in res.history] == [2, 4]
    for h in res.history:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= h.keys()
        assert h["tokens_per_s"] > 0 and h["grad_norm"] > 0
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert lines == res.history
    # linear schedule with 2 warmup steps out of 4: lr at step 2 is the peak, decays after
    assert res.history[0]["lr"] == pytest.approx(1e-3 * 1 / 2)
    assert res.history[1]["lr"] == pytest.approx(1e-3 * 1 / 2)


def test_grad_norm_is_logged_before_clipping(tiny_model, tmp_path):
    clipped = tiny_tuner(tiny_model, tmp_path / "a", UNEVEN, max_grad_norm=1e-6).run()
    free = tiny_tuner(tiny_model, tmp_path / "b", UNEVEN, max_grad_norm=None).run()
    assert clipped.history[0]["grad_norm"] == pytest.approx(free.history[0]["grad_norm"], rel=1e-5)
    assert clipped.history[0]["grad_norm"] > 1e-3
    a, b = adapter_tensors(clipped), adapter_tensors(free)
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # clipping changed the update


@needs_shared
def test_loss_falls_on_alpaca1k_guanaco(tiny_model_phi3_tok, tmp_path):
    # A tiny random model's frozen output head is too weak for LoRA alone to steer (logits stay near uniform),
    # so the head is trained too (modules_to_save): the point is that the loop learns from real data.
    res = (FineTuner(tiny_model_phi3_tok).adapter(r=16, alpha=32, dropout=0.05, modules_to_save=["lm_head"])
           .data(source=str(GUANACO_JSONL), max_seq_length=128)
           .training(output_dir=str(tmp_path / "g"), batch_size=4, grad_accum=1, max_steps=30, logging_steps=5,
                     learning_rate=5e-3, save_strategy="no", progress_bar=False).run())
    losses = res.losses
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.5, losses
    assert losses[-1] < min(losses[:2]), losses


@pytest.mark.parametrize("late", ["0", "1"])
def test_next_step_is_laid_out_while_the_device_runs_this_one(tiny_model, tmp_path, monkeypatch, late):
    """Each step's batches for the step after it are laid out before the step waits for the device (so the
    host's layout overlaps the device's work), and training sees the same steps as reading them one by one.
    Read late (late_read.py), a step's numbers reach the callbacks only once the next step is queued."""
    import phi3tune.late_read
    from phi3tune.batching import MicroBatcher, StepsAhead

    monkeypatch.setenv("PHI3TUNE_READ_LATE", late)
    ends: list[object] = []  # what step_done_event gave each step (on CUDA an event; here a marker)
    monkeypatch.setattr(phi3tune.late_read, "step_done_event", lambda device: ends.append(object()) or ends[-1])
    done: list[int] = []
    events: list[dict] = []
    seen_at: list[int] = []  # per layout: steps finished when it was made
    plain = MicroBatcher.__call__

    def recording(self, batches):
        seen_at.append(len(done))
        return plain(self, batches)

    monkeypatch.setattr(MicroBatcher, "__call__", recording)
    rows = rows_of_text(24, seed=3)
    tiny_tuner(tiny_model, tmp_path / "a", rows, max_steps=4).run(
        callbacks=[lambda e: done.append(e["step"]), events.append])
    assert [e["done_event"] for e in events] == ends and len(ends) == 4  # each step's own end, read at once or late
    # step k+1 is laid out inside step k: none done at steps 1 and 2's layouts (read one by one: [0, 1, 2, 3]);
    # read late, step k's numbers come after step k+1 is queued and step k+2 laid out
    assert seen_at == ([0, 0, 0, 1] if late == "1" else [0, 0, 1, 2])
    assert done == [1, 2, 3, 4]
    items = [(i, [i]) for i in range(3)]
    ahead = StepsAhead(iter(items))
    ahead.fetch()
    ahead.fetch()  # a second fetch before the item is taken reads nothing more
    assert list(ahead) == items
    ahead.fetch()  # past the end: harmless
    assert list(ahead) == []


def test_numbers_read_a_step_late_train_exactly_the_same_run(tiny_model, tmp_path, monkeypatch):
    """Reading each step's loss and gradient norm one step late (the optimizer steps first; bitsandbytes' flat
    update queued without its waits) trains the same run: the same numbers, log lines, checkpoints and adapter,
    bit for bit, with accumulation, dropout, an eval and checkpoints due in between (which read at once)."""
    runs = {}
    for late in ("0", "1"):
        monkeypatch.setenv("PHI3TUNE_READ_LATE", late)
        events: list[dict] = []
        res = (tiny_tuner(tiny_model, tmp_path / late, rows_of_text(40, seed=5), batch_size=2, grad_accum=2,
                          max_steps=7, logging_steps=2, eval_steps=5, save_strategy="steps", save_steps=3,
                          optimizer="paged_adamw_32bit", warmup_ratio=0.2)
               .adapter(dropout=0.1).data(eval_fraction=0.2).run(callbacks=[events.append]))
        assert ("a step late" in res.plan.describe()) == (late == "1")
        runs[late] = res, events
    (now, now_events), (late, late_events) = runs["0"], runs["1"]
    keep = ("step", "loss", "grad_norm", "lr", "real_tokens", "trained_tokens")
    assert [{k: e[k] for k in keep} for e in late_events] == [{k: e[k] for k in keep} for e in now_events]
    assert len({e["loss"] for e in now_events}) == 7  # seven different steps, not one repeated
    strip = [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in now.history]
    assert [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in late.history] == strip
    assert any("eval_loss" in h for h in strip)
    a, b = adapter_tensors(now), adapter_tensors(late)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in (3, 6):
        saved = [(tmp_path / run / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes()
                 for run in ("0", "1")]
        assert saved[0] == saved[1]
