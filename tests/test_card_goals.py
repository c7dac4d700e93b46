"""examples/benchmarks/card_goals.py: issue #20's goals read off cards.sh's JSON lines, each against Unsloth in the
same call. Synthetic calls, each goal met and just missed (the negative control)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


def _goals():
    spec = importlib.util.spec_from_file_location("card_goals", BENCH / "card_goals.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ours(label: str, speed: float, alloc: float = 10.0, device: float = 11.0, predicted: float = 11.5) -> dict:
    return {"label": label, "real_tokens_per_s": speed, "peak_alloc_gib": alloc, "peak_device_gib": device,
            "predicted_peak_gib": predicted}


def _met(goals: list[dict], name: str) -> bool:
    (found,) = [g["met"] for g in goals if g["goal"] == name]
    return found


def test_labels_parse_into_kind_card_and_variant():
    cg = _goals()
    assert cg.kind_card_variant("p@8+mem#2") == ("p", "8", "mem")
    assert cg.kind_card_variant("q@8+mem+seq4096") == ("q", "8", "mem+seq4096")
    assert cg.kind_card_variant("u@full") == ("u", "full", "")
    assert cg.kind_card_variant("twins") == ("", "", "")


def test_ratios_are_to_the_calls_fastest_unsloth_run_and_fail_just_below_the_goal():
    """12 GiB at 1.31x the faster of two Unsloth runs is met, 16 GiB at 1.29x is not (it would be 1.43x against
    the slower run: the goal takes the faster); the H200 packed at 1.8x exactly is met."""
    cg = _goals()
    rows = [{"label": "u@12", "real_tokens_per_s": 10_000.0}, {"label": "u@full", "real_tokens_per_s": 9_000.0},
            _ours("q@12", 13_100.0), _ours("q@16", 12_900.0), _ours("p@full", 18_000.0)]
    goals = cg.call_goals(rows)
    assert _met(goals, "q@12 >= 1.3x Unsloth's fast path")
    assert not _met(goals, "q@16 >= 1.3x Unsloth's fast path")
    assert _met(goals, "p@full >= 1.8x Unsloth's fast path")
    assert not any("p@12" in g["goal"] for g in goals)  # no run, no goal: left out, not failed


def test_the_memory_plan_must_be_fast_and_small_and_predictions_close():
    """8 GiB: 1.6x Unsloth's offloaded run at 3.19 / 4.39 GiB is met; the same speed at 3.4 GiB allocated is not.
    A predicted peak 11% over the device's fails; seq 4096 at 4.1 GiB fails."""
    cg = _goals()
    base = [{"label": "ug@8", "real_tokens_per_s": 10_000.0}]
    good = cg.call_goals([*base, _ours("p@8+mem", 16_000.0, 3.19, 4.39, 4.69)])
    big = cg.call_goals([*base, _ours("p@8+mem", 16_000.0, 3.4, 4.39, 4.69)])
    name = "p@8 memory plan >= 1.5x Unsloth offloaded, <= 3.3 / 5.0 GiB"
    assert _met(good, name) and not _met(big, name)
    assert _met(good, "p@8+mem: predicted peak within 10%")
    off = cg.call_goals([_ours("p@24", 20_000.0, 15.0, 16.0, 17.8), _ours("q@8+mem+seq4096", 4_000.0, 4.1)])
    assert not _met(off, "p@24: predicted peak within 10%")
    knob = cg.call_goals([_ours("p@24+amb8", 20_000.0, 15.0, 16.0, 17.8)])  # a benchmark's knob: not a user's plan
    assert not any("predicted" in g["goal"] for g in knob)
    assert not _met(off, "memory at seq 4096 <= 4.0 GiB")


def test_tokens_per_s_must_not_fall_as_the_card_grows(tmp_path, capsys):
    """Within a call; across calls only with --one-machine. A fall (24 GiB under 16) fails and makes the script
    exit 1; the goals no file could check are listed."""
    cg = _goals()
    rising = [_ours("q@12", 20_000.0), _ours("q@16", 21_000.0), _ours("q@24", 22_000.0)]
    falling = [_ours("q@12", 20_000.0), _ours("q@16", 21_000.0), _ours("q@24", 20_500.0)]
    assert _met(cg.growth_goals(rising), "q: tokens/s never fall as the card grows")
    assert not _met(cg.growth_goals(falling), "q: tokens/s never fall as the card grows")
    # one plan on 80 GiB and the H200 (its card's free memory aside): two runs of it varying, not a fall
    one = "plan: speed (auto) — 8,192-token micro-batches; predicted peak 46.5 GiB of {} GiB free"
    same = [{**_ours("p@80", 28_250.0), "plan": one.format(80)}, {**_ours("p@full", 28_219.0), "plan": one.format(139)}]
    assert _met(cg.growth_goals(same), "p: tokens/s never fall as the card grows")
    other = [same[0], {**same[1], "plan": one.format(139).replace("8,192", "4,096")}]
    assert not _met(cg.growth_goals(other), "p: tokens/s never fall as the card grows")
    calls = []
    for i, rows in enumerate(([rising[0]], [rising[2]], [_ours("q@full", 21_000.0)])):
        calls.append(tmp_path / f"call{i}.jsonl")
        calls[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cg.main([str(p) for p in calls[:2]]) == 0  # one card a call: nothing to compare, nothing failed
    assert "q: tokens/s never fall" in capsys.readouterr().out.split("not checked by these files:")[1]
    assert cg.main(["--one-machine", *map(str, calls)]) == 1  # 24 GiB 22,000 > the H200's 21,000
    assert "NOT MET  q: tokens/s never fall as the card grows" in capsys.readouterr().out


def test_the_memory_plan_goal_is_listed_when_no_call_holds_ours_and_unsloths_8_gib_runs(tmp_path, capsys):
    """p@8+mem and ug@8 in different calls check nothing (a ratio is within a call): the goal is named as unchecked.
    In one call it is checked, and no longer listed."""
    cg = _goals()
    apart = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    apart[0].write_text(json.dumps(_ours("p@8+mem", 16_000.0, 3.19, 4.39, 4.69)) + "\n")
    apart[1].write_text(json.dumps({"label": "ug@8", "real_tokens_per_s": 10_000.0}) + "\n")
    cg.main([str(p) for p in apart])
    assert "8 GiB memory plan" in capsys.readouterr().out.split("not checked by these files:")[1]
    together = tmp_path / "c.jsonl"
    together.write_text(apart[0].read_text() + apart[1].read_text())
    cg.main([str(together)])
    out = capsys.readouterr().out
    assert "met      p@8 memory plan" in out and "8 GiB memory plan" not in out.split("not checked")[-1]
