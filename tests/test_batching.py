"""The step stream over fake data, no model: epochs, the resume skip, a short last step, FSDP-equal counts."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from phi3tune.batching import (
    Collator,
    EpochSampler,
    MicroBatcher,
    Position,
    count_steps,
    equal_count,
    optimizer_steps,
)
from phi3tune.data import IGNORE

PAD = 0


class _Loader:
    """What the loop hands optimizer_steps (accelerate's prepared loader): iterable, sized, with set_epoch."""

    def __init__(self, rows: list[dict[str, list[int]]], batch_size: int, padding_free: bool, seed: int = 7) -> None:
        self.sampler = EpochSampler(len(rows), seed)
        self.loader = DataLoader(rows, batch_size=batch_size, sampler=self.sampler,
                                 collate_fn=Collator(PAD, padding_free=padding_free))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _skip(loader, n):
    return itertools.islice(iter(loader), n, None)


def _rows(n: int) -> list[dict[str, list[int]]]:
    """Example i is ``i + 1`` repeated (2 + i % 5) times: its tokens say which example it is."""
    return [{"input_ids": [i + 1] * (2 + i % 5), "labels": [i + 1] * (2 + i % 5)} for i in range(n)]


def _examples(micro) -> list[int]:
    """The examples in a step's micro-batches, in order (each starts where its position restarts at 0)."""
    out = []
    for b in micro:
        for ids, pos in zip(b["input_ids"], b["position_ids"]):
            out += [int(t) for t, p in zip(ids, pos) if p == 0 and t != PAD]
    return out


def _padded(**kw) -> MicroBatcher:
    return MicroBatcher("padded", None, (), 64, PAD, **kw)


def _stream(loader, start, total, grad_accum, batcher):
    return list(optimizer_steps(loader, start, total, grad_accum, batcher, _skip))


def test_epochs_short_last_step_and_epoch_boundaries():
    loader = _Loader(_rows(5), batch_size=1, padding_free=False)  # 5 loader batches: steps of 2, 2, 1
    per_epoch, total = count_steps(len(loader), grad_accum=2, max_steps=None, num_epochs=2)
    assert (per_epoch, total) == (3, 6)
    stream = _stream(loader, Position(), total, 2, _padded())
    steps = [(p, m) for p, m in stream if m is not None]
    assert [p.step for p, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert [len(m) for _, m in steps] == [2, 2, 1, 2, 2, 1]  # each epoch's last step is short
    assert [(p.epoch, p.loader_batches) for p, _ in steps] == [(0, 2), (0, 4), (0, 5), (1, 2), (1, 4), (1, 5)]
    # one boundary, between the epochs (before the second epoch's loader starts), none after the last step
    assert [(i, p) for i, (p, m) in enumerate(stream) if m is None] == [(3, Position(3, 1, 0))]
    epochs = [[x for _, m in steps[:3] for x in _examples(m)], [x for _, m in steps[3:] for x in _examples(m)]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [1, 2, 3, 4, 5]  # every example once an epoch
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch


def test_max_steps_ends_mid_epoch_and_trained_idx_is_set():
    stream = _stream(_Loader(_rows(8), 2, False), Position(), 3, 3, _padded())  # 4 loader batches: steps of 3, 1
    assert [(p, m is None) for p, m in stream] == [(Position(1, 0, 3), False), (Position(2, 0, 4), False),
                                                  (Position(2, 1, 0), True), (Position(3, 1, 3), False)]
    stream = _stream(_Loader(_rows(8), 2, False), Position(), 1, 3, _padded())
    assert len(stream) == 1 and stream[0][0] == Position(1, 0, 3)  # stops at max_steps, not at the epoch's end
    for b in stream[0][1]:
        assert torch.equal(b["trained_idx"], (b["labels"][:, 1:].reshape(-1) != IGNORE).nonzero().flatten())


@pytest.mark.parametrize("padding_free", [False, True])
def test_resume_from_any_position_continues_the_unbroken_stream(padding_free):
    """From every position the unbroken run passed, the rest of the stream is the same micro-batches: the skip
    counts loader batches, before re-cutting. Negative control: a resume that forgot the skip differs."""
    rows = _rows(7)
    batcher = MicroBatcher("padding_free", 8, (8, 16), 64, PAD) if padding_free else _padded()
    unbroken = _stream(_Loader(rows, 2, padding_free), Position(), 9, 2, batcher)
    for i, (pos, _) in enumerate(unbroken):
        resumed = _stream(_Loader(rows, 2, padding_free), pos, 9, 2, batcher)
        assert [p for p, _ in resumed] == [p for p, _ in unbroken[i + 1:]]
        for (_, a), (_, b) in zip(resumed, unbroken[i + 1:]):
            assert (a is None) == (b is None)
            assert a is None or all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    mid = next(p for p, m in unbroken if m is not None and p.loader_batches == 2)
    forgot = _stream(_Loader(rows, 2, padding_free), Position(mid.step, mid.epoch, 0), 9, 2, batcher)
    assert _examples(forgot[0][1]) != _examples(next(m for p, m in unbroken if p.step == mid.step + 1))


def test_the_callers_position_is_never_changed():
    start = Position(0, 0, 0)
    stream = _stream(_Loader(_rows(4), 1, False), start, 3, 1, _padded())
    assert start == Position() and stream[-1][0] == Position(3, 0, 3)
    with pytest.raises(AttributeError):
        start.step = 5  # type: ignore[misc]


def test_fsdp_equal_counts_add_micro_batches_that_train_nothing():
    """Every step has as many micro-batches as the largest rank's count; the copies carry no trained position and
    no real token, so the step's trained tokens are exactly those of its own examples."""
    rows = _rows(9)
    own = MicroBatcher("padding_free", 6, (8,), 64, PAD)
    even = MicroBatcher("padding_free", 6, (8,), 64, PAD, largest_count=lambda n: n + 2)
    for (p, a), (q, b) in zip(_stream(_Loader(rows, 3, True), Position(), 4, 2, own),
                              _stream(_Loader(rows, 3, True), Position(), 4, 2, even), strict=True):
        assert p == q
        if a is None:
            continue
        assert len(b) == len(a) + 2
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
        assert all(x["trained_idx"].numel() == 0 and int(x["num_real_tokens"]) == 0 for x in b[len(a):])
        assert sum(x["trained_idx"].numel() for x in b) == sum(x["trained_idx"].numel() for x in a) > 0
    assert equal_count(a, len(a)) is not a and len(equal_count(a, len(a))) == len(a)  # the largest rank adds none


def test_cuda_micro_batches_are_pinned_for_their_non_blocking_copy(monkeypatch):
    """A CUDA plan's micro-batches (made here, not by the loader, which pins its own) are in pinned memory, every
    tensor the loop copies: a non-blocking copy from pageable memory would wait for the device. The same values;
    the host-only token count stays as it is. Negative control: a CPU plan's batcher pins nothing. (No CUDA here:
    ``pin_memory`` is replaced by a marked copy.)"""
    pinned: set[int] = set()

    def fake_pin(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        pinned.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    rows = _rows(12)

    def steps(pin: bool) -> list[list[dict[str, torch.Tensor]]]:
        batcher = MicroBatcher("padding_free", 8, (8, 16), 64, PAD, bounds=True, pin=pin)
        return [m for _, m in _stream(_Loader(rows, 3, True), Position(), 3, 2, batcher) if m is not None]

    plain, pinned_steps = steps(False), steps(True)
    assert not any(id(v) in pinned for m in plain for b in m for v in b.values())
    assert len(plain) == len(pinned_steps) == 3
    for a, b in zip(itertools.chain(*plain), itertools.chain(*pinned_steps), strict=True):
        assert a.keys() == b.keys() and {"input_ids", "labels", "position_ids", "trained_idx", "cu_seqlens"} <= set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all((id(v) in pinned) == (k != "num_real_tokens") for k, v in b.items())


def test_a_cuda_plan_pins_its_micro_batches_and_a_cpu_plan_does_not(tiny_model, monkeypatch):
    from helpers import rows_of_text, tiny_tuner

    from phi3tune.bench import plan_for

    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4))
    monkeypatch.delenv("PHI3TUNE_PIN_BATCHES", raising=False)
    cuda = plan_for(ft, "cuda", free_gib=80)
    assert MicroBatcher.of(cuda, PAD).pin
    assert not MicroBatcher.of(plan_for(ft, "cpu"), PAD).pin
    monkeypatch.setenv("PHI3TUNE_PIN_BATCHES", "0")  # the benchmarks' way back
    assert not MicroBatcher.of(cuda, PAD).pin


# ----------------------------------------------------------------------------- fixed lengths fitted to the data
def _padded_total(lengths: list[int], buckets: tuple[int, ...]) -> int:
    return sum(next((b for b in buckets if b >= n), n) for n in lengths)


def test_the_simulated_micro_batch_lengths_are_the_ones_resplit_makes():
    """``micro_batch_lengths`` (lengths only, for fitting) follows ``resplit_flat``'s cut on real collated rows."""
    from phi3tune.batching import Collator, EpochSampler, micro_batch_lengths, resplit_flat

    gen = torch.Generator().manual_seed(4)
    lengths = [int(n) for n in torch.randint(3, 90, (37,), generator=gen)]
    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in lengths]
    order, per_step, budget = list(EpochSampler(len(rows), 1)), 6, 160
    collate = Collator(0, padding_free=True)
    made = [int(m["input_ids"].shape[1]) for first in range(0, len(order), per_step)
            for m in resplit_flat([collate([rows[i] for i in order[first:first + per_step]])], budget)]
    assert micro_batch_lengths(lengths, order, per_step, budget) == made


def test_fitted_lengths_pad_least_and_keep_the_longest():
    """The dynamic programme finds the set of lengths an exhaustive search finds (least padding, the longest one
    kept); evenly spaced lengths (the plan's before data is seen) pad more on a skewed distribution."""
    from phi3tune.batching import fitted_buckets
    from phi3tune.plan import token_buckets

    gen = torch.Generator().manual_seed(7)
    for trial in range(25):
        top, count = 512, 1 + trial % 4
        lengths = [int(n) for n in torch.randint(1, top + 40, (int(torch.randint(1, 40, (1,), generator=gen)),),
                                                 generator=gen)]
        got = fitted_buckets(lengths, top, count)
        assert got[-1] == top and len(got) <= count and list(got) == sorted(set(got))
        quantum = max(8, min(128, top // (4 * count)) // 8 * 8)
        cands = range(quantum, top, quantum)
        best = min(_padded_total(lengths, (*c, top)) for k in range(count) for c in itertools.combinations(cands, k))
        assert _padded_total(lengths, got) == best
    skewed = [3000 + 13 * i for i in range(60)] + [700, 900]  # the quickstart's steps: most above 2,048 tokens
    even = token_buckets(4096, 512)
    assert _padded_total(skewed, fitted_buckets(skewed, 4096, len(even))) < _padded_total(skewed, even)
    for count in (4, 5, 6, 8, 12):  # PHI3TUNE_COMPILE=lengths=N: any count keeps lengths of whole 8-token units
        assert all(b % 8 == 0 for b in fitted_buckets(skewed, 4096, count))


def test_only_unpacked_rows_under_a_padding_free_plan_get_fitted_lengths(tiny_model, monkeypatch):
    """The longest length (the one memory is predicted for) stays; packed rows, padded plans and plans with
    symbolic-length graphs (every multiple of a granule) keep theirs."""
    from datasets import Dataset

    from phi3tune import FineTuner
    from phi3tune.batching import fit_lengths_to_data
    from phi3tune.bench import plan_for

    speed = plan_for(FineTuner(str(tiny_model)).training(optimize_for="speed"), "cuda", free_gib=80)
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    compiled = plan_for(FineTuner(str(tiny_model)).training(optimize_for="speed"), "cuda", free_gib=80)
    assert compiled.dynamic_lengths and not speed.dynamic_lengths and len(speed.token_buckets) == 4
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in [300, 310, 320, 330] * 8],
                              "labels": [[1] * n for n in [300, 310, 320, 330] * 8]})
    fitted = fit_lengths_to_data(speed, rows, per_step=1, seed=0)
    assert fitted.token_buckets != speed.token_buckets and fitted.token_buckets[-1] == speed.token_buckets[-1]
    assert set(fitted.token_buckets) <= set(range(8, speed.token_buckets[-1] + 1, 8))
    packed = rows.add_column("position_ids", rows["input_ids"])
    assert fit_lengths_to_data(speed, packed, per_step=1, seed=0) is speed
    balanced = plan_for(FineTuner(str(tiny_model)), "cpu")
    assert fit_lengths_to_data(balanced, rows, per_step=1, seed=0) is balanced
    assert fit_lengths_to_data(compiled, rows, per_step=1, seed=0) is compiled
