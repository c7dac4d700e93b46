"""The memory estimate against what the CPU arithmetic really holds."""

from __future__ import annotations

import functools

import bitsandbytes as bnb
import pytest
import torch
from helpers import rows_of_text, tiny_tuner

from phi3tune.batching import Collator
from phi3tune.bench import estimate_memory
from phi3tune.loss import TokenLoss
from phi3tune.model import attach_adapter, load_base_model, preflight_model, resolve_target_modules
from phi3tune.specs import AdapterSpec, QuantSpec


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _micro_batch_saves(model) -> int:
    """What the loss of one micro-batch of 2 x 128 tokens, all trained, saves for backward."""
    ids = torch.randint(0, 90, (2, 128))
    batch = Collator(0)([{"input_ids": r, "labels": r} for r in ids.tolist()])
    loss = TokenLoss(model, chunk=4096).train()
    return _saved_bytes(functools.partial(loss, batch["input_ids"], batch["labels"], batch["position_ids"]))


def test_estimate_matches_cpu_measurement(tiny_model):
    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4), batch_size=2, precision="fp32").data(max_seq_length=128)
    ft.adapter(dropout=0.1)
    est = estimate_memory(ft, device="cpu")
    info = preflight_model(tiny_model)
    base = load_base_model(info, QuantSpec(), torch.float32, torch.device("cpu"))
    quantized = sum(m.weight.untyped_storage().nbytes() + m.weight.quant_state.absmax.untyped_storage().nbytes()
                    for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    model = attach_adapter(base, AdapterSpec(r=8, dropout=0.1), resolve_target_modules(AdapterSpec(),
                                                                                        info.linear_layers))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est["lora_params"] == lora
    assert est["quantized_weights"] == pytest.approx(quantized, rel=0.05)
    measured = _micro_batch_saves(model)  # one micro-batch of batch_size x max_seq_length tokens
    predicted = est["activations"] + est["logits_chunk"]
    assert predicted == pytest.approx(measured, rel=0.35), (predicted, measured)


def test_classic_layout_estimate_matches_cpu_measurement_under_bf16(tiny_model):
    """The balanced plan under bf16 autocast keeps its frozen norms in fp32 (PEFT's prepare_model_for_kbit_training),
    so its residual stream, and what the layers save of it, are fp32: the estimate counts that (H200: 16.68 GiB at
    peak where the 16-bit fit said 14.26, session 16). Control: the same layers without the upcast keep less, and the
    16-bit fit alone falls short of the upcast layers by more than the tolerance."""
    from phi3tune.memory import estimate_parts

    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4), batch_size=2, precision="bf16",
                    optimize_for="balanced").data(max_seq_length=128)
    ft.adapter(dropout=0.1)
    est = estimate_memory(ft, device="cpu")
    info = preflight_model(tiny_model)
    measured = {}
    for upcast in (True, False):
        base = load_base_model(info, QuantSpec(), torch.bfloat16, torch.device("cpu"), upcast_frozen=upcast)
        model = attach_adapter(base, AdapterSpec(r=8, dropout=0.1),
                               resolve_target_modules(AdapterSpec(), info.linear_layers))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured[upcast] = _micro_batch_saves(model)
    predicted = est["activations"] + est["logits_chunk"]
    assert predicted == pytest.approx(measured[True], rel=0.15), (predicted, measured)
    assert measured[False] < measured[True]
    assert info.shape is not None
    fit_alone = estimate_parts(info.shape, bits=4, double_quant=False, targets={"qkv_proj"}, r=8, dropout=0.1,
                               optimizer_state_bytes=8, act_bytes=2, upcast_frozen=False, tokens=256,
                               checkpointing=False, compiled=False, ce_chunk=2048, cuda=False)
    assert fit_alone["activations"] + fit_alone["logits_chunk"] < measured[True] / 1.15


def test_device_memory_is_sampled_on_this_ranks_gpu_from_its_thread(monkeypatch):
    """The sampling thread names this process's GPU: a new thread's current device is GPU 0, and reading it
    there would put a CUDA context of every rank on GPU 0 (and report GPU 0's memory as this rank's)."""
    import threading

    from phi3tune.bench import _DeviceMemory

    asked: list[tuple[object, str]] = []

    def mem_get_info(device=None):
        asked.append((device, threading.current_thread().name))
        return (10, 20)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with _DeviceMemory(interval=0.001):
        while not any(name != threading.current_thread().name for _, name in asked):
            pass
    assert {device for device, _ in asked} == {1}


def _peer_peak_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "peer_peak.py"
    spec = importlib.util.spec_from_file_location("peer_peak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_peers_lines_get_the_device_peak_sampled_as_ours(tmp_path, monkeypatch):
    """examples/benchmarks/peer_peak.py runs a peer's recipe in-process and adds the device's peak, sampled as
    ``phi3tune.bench`` samples ours (used memory minus the level before the run), to the lines the recipe appended;
    an earlier line is left as it was, and the recipe's exit status is kept. Negative control: without CUDA it only
    runs the recipe, whose line then has no device peak."""
    import json
    import sys

    peer_peak = _peer_peak_module()
    lines = tmp_path / "peer.jsonl"
    lines.write_text('{"label": "earlier"}\n')
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import json, sys, time\ntime.sleep(0.05)\n"
                      "open(sys.argv[1], 'a').write(json.dumps({'label': sys.argv[2]}) + '\\n')\nsys.exit(3)\n")
    gib, total = 1 << 30, 80 << 30
    calls = []

    def mem_get_info(device=None):  # 1 GiB used before the run, 3.5 GiB while it runs
        calls.append(device)
        return (total - (gib if len(calls) == 1 else 7 * gib // 2), total)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(sys, "argv", ["peer_peak.py", str(lines), str(recipe), str(lines), "u@16"])
    with pytest.raises(SystemExit) as stop:
        peer_peak.main()
    assert stop.value.code == 3 and len(calls) > 2
    earlier, ours = (json.loads(row) for row in lines.read_text().splitlines())
    assert earlier == {"label": "earlier"} and ours == {"label": "u@16", "peak_device_gib": 2.5}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["peer_peak.py", str(lines), str(recipe), str(lines), "cpu"])
    with pytest.raises(SystemExit):
        peer_peak.main()
    assert json.loads(lines.read_text().splitlines()[-1]) == {"label": "cpu"}
