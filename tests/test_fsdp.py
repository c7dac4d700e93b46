"""FSDP2 on two CPU processes (gloo): bitsandbytes optimizers on shards, half the bytes per rank, and a job killed
with SIGKILL after a checkpoint that resumes to the adapter of the unbroken run.

One launch trains several optimizers in turn (imports and process start are most of a tiny run's time).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_after, rows_of_text, run_script, torchrun
from safetensors.torch import load_file

from phi3tune import ConfigError, FineTuner
from phi3tune.checkpoints import read_manifest

SCRIPT = """
import json, os, signal, sys
import torch
from torch.distributed.tensor import DTensor
from phi3tune import FineTuner, QuantSpec
model, out, batch, rows, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.load(open(sys.argv[4])), sys.argv[5]
# min_8bit_size=64: the tiny model's LoRA tensors (512-1,024 values) get 8-bit state (bitsandbytes' default: 4,096)
KWARGS = {"paged_adamw_32bit": {}, "adamw_torch": {}, "paged_adamw_8bit": {"min_8bit_size": 64}}

def kill_job(event):  # step 3 begins after checkpoint-2 is complete on every rank: kill -9 torchrun and both ranks
    if event["step"] == 3:
        os.killpg(0, signal.SIGKILL)

for opt in sys.argv[6].split(","):
    ft = (FineTuner(model).quantize(QuantSpec(compute_dtype="float32", quant_storage="float32"))
          .adapter(r=8, alpha=16, dropout=0.0).data(source=rows, max_seq_length=128)
          .training(output_dir=f"{out}/{opt}", batch_size=batch, grad_accum=2, max_steps=4, logging_steps=1,
                    save_strategy="steps", save_steps=2, progress_bar=False, learning_rate=2e-3, optimizer=opt,
                    optimizer_kwargs=KWARGS[opt], device="cpu", distributed="auto" if mode == "one" else "fsdp"))
    result = ft.run(resume=mode == "resume", callbacks=[kill_job] if mode == "kill" else None)
    params = list(result.model.parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local if t.numel()}
    rank = int(os.environ.get("RANK", 0))
    from torch.distributed.fsdp import FSDPModule
    layers = result.model.get_base_model().model.layers
    json.dump({"param_bytes": sum(storages.values()), "all_dtensor": all(isinstance(p, DTensor) for p in params),
               "layer_units": sum(isinstance(m, FSDPModule) for m in layers), "layers": len(layers)},
              open(f"{out}/{opt}.rank{rank}.json", "w"))
"""
OPTS = ["paged_adamw_32bit", "adamw_torch", "paged_adamw_8bit"]


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


def _history(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _state_bytes(state: object) -> int:
    """Bytes of the moments in an optimizer state dict (bitsandbytes nests them one level deeper), without the
    step counters and bitsandbytes' 8-bit code books (qmap: 256 values, the same on every rank)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() if state.dim() > 0 else 0
    if not isinstance(state, dict):
        return 0
    return sum(_state_bytes(v) for k, v in state.items() if not str(k).startswith("qmap"))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The same 4 steps of 2 accumulated micro-batches (a checkpoint every 2) with 2 FSDP ranks x 2 sequences and
    in one process x 4, for each optimizer of OPTS."""
    tmp = tmp_path_factory.mktemp("fsdp")
    script, rows = tmp / "train.py", tmp / "rows.json"
    script.write_text(SCRIPT)
    rows.write_text(json.dumps(rows_of_text(24, seed=7)))

    def launch(prefix: list[str], out: str, batch: int, mode: str, opts: list[str] = OPTS, ok: bool = True):
        return run_script([*prefix, str(script), str(tiny_model), str(tmp / out), str(batch), str(rows), mode,
                           ",".join(opts)], tmp, ok=ok)

    launch(torchrun(2), "fsdp", 2, "fsdp")
    launch([sys.executable], "one", 4, "one")
    return tmp, launch


@pytest.mark.parametrize("opt", OPTS)
def test_fsdp_with_each_optimizer_equals_one_process(runs, opt):
    """bitsandbytes' optimizers step each rank's local shards (DTensors would fail: "got mixed torch.Tensor and
    DTensor"); the adapter equals the one-process run's. 8-bit state is quantized in blocks of 256 values of
    each rank's flattened shard: where a shard is a whole number of blocks (here, and every Phi-3 LoRA tensor at
    even ranks) those are the unsharded run's blocks, so the same tolerance holds."""
    tmp, _ = runs
    fsdp, one = _adapter(tmp / "fsdp" / opt / "final_checkpoint"), _adapter(tmp / "one" / opt / "final_checkpoint")
    assert fsdp.keys() == one.keys()
    for k in one:
        assert fsdp[k].shape == one[k].shape  # whole, not rank 0's shard
        torch.testing.assert_close(fsdp[k], one[k], rtol=1e-4, atol=1e-6)
    assert all(one[k].abs().sum() > 0 for k in one if "lora_B" in k)  # every adapter trained
    assert json.loads((tmp / "fsdp" / f"{opt}.rank0.json").read_text())["all_dtensor"]  # really sharded
    h_fsdp, h_one = _history(tmp / "fsdp" / opt), _history(tmp / "one" / opt)
    assert [h["step"] for h in h_fsdp] == [1, 2, 3, 4]
    for a, b in zip(h_fsdp, h_one):  # the known silent failure of sharded 4-bit: loss 0 / NaN gradients
        assert a["loss"] > 1 and a["grad_norm"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["trained_tokens"] == b["trained_tokens"]


def test_the_tolerance_tells_optimizers_apart(runs):
    """Negative control: 8-bit and 32-bit AdamW runs differ by more than the tolerance the tests above use."""
    tmp, _ = runs
    a = _adapter(tmp / "fsdp" / "paged_adamw_8bit" / "final_checkpoint")
    b = _adapter(tmp / "one" / "paged_adamw_32bit" / "final_checkpoint")
    with pytest.raises(AssertionError):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_each_rank_holds_half_the_parameters_and_optimizer_state(runs):
    """Sharded for real: the 4-bit base, the other weights and the adapter (parameter storage per rank), and the
    optimizer moments (each rank's checkpoint shard), are about half of one process's."""
    tmp, _ = runs
    for opt in ("paged_adamw_32bit", "paged_adamw_8bit"):
        one = json.loads((tmp / "one" / f"{opt}.rank0.json").read_text())["param_bytes"]
        one_opt = _state_bytes(torch.load(tmp / "one" / opt / "checkpoint-4" / "training_state.pt",
                                          weights_only=True)["optimizer"]["state"])
        assert one_opt > 0
        for rank in (0, 1):
            mine = json.loads((tmp / "fsdp" / f"{opt}.rank{rank}.json").read_text())["param_bytes"]
            assert 0.45 < mine / one < 0.55, (opt, rank, mine, one)
            shard = torch.load(tmp / "fsdp" / opt / "checkpoint-4" / f"shard.rank{rank}.pt", weights_only=True)
            assert 0.45 < _state_bytes(shard["optimizer"]["state"]) / one_opt < 0.55, (opt, rank)


def test_every_decoder_layer_is_its_own_fsdp_unit(runs):
    """Each layer is gathered for its own forward and backward only. With the model one unit (what PEFT's FSDP1
    wrap policy gave under accelerate's FSDP2) the whole base is gathered at once: sharded at rest, whole in use."""
    tmp, _ = runs
    for rank in (0, 1):
        got = json.loads((tmp / "fsdp" / f"paged_adamw_32bit.rank{rank}.json").read_text())
        assert got["layers"] >= 2 and got["layer_units"] == got["layers"]
    one = json.loads((tmp / "one" / "paged_adamw_32bit.rank0.json").read_text())
    assert one["layer_units"] == 0


def test_a_killed_fsdp_job_resumes_to_the_unbroken_adapter(runs):
    """kill -9 of torchrun and both ranks while step 3 runs (checkpoint-2 complete), then resume: the adapter and
    every logged loss equal the unbroken run's, bit for bit. The default optimizer (bitsandbytes, stepping local
    shards) is really killed; torch's AdamW (DTensor moments) resumes from the unbroken run's checkpoint-2 with
    what a kill leaves beside it (later checkpoints gone, a torn temp dir)."""
    tmp, launch = runs
    killed = launch(torchrun(2), "killed", 2, "kill", ["paged_adamw_32bit"], ok=False)
    assert killed.returncode != 0
    out = tmp / "killed" / "paged_adamw_32bit"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert {p.name for p in (out / "checkpoint-2").iterdir()} >= {"shard.rank0.pt", "shard.rank1.pt",
                                                                  "adapter_model.safetensors"}
    assert "checkpoint-2" in read_manifest(out)["files"]  # the rank files live in a directory phi3tune records
    kill_after(tmp / "fsdp" / "adamw_torch", tmp / "killed" / "adamw_torch", 2)
    launch(torchrun(2), "killed", 2, "resume", ["paged_adamw_32bit", "adamw_torch"])
    for opt in ("paged_adamw_32bit", "adamw_torch"):
        full, resumed = tmp / "fsdp" / opt, tmp / "killed" / opt
        a, b = _adapter(full / "final_checkpoint"), _adapter(resumed / "final_checkpoint")
        assert all(torch.equal(a[k], b[k]) for k in a), opt
        at_ckpt = _adapter(full / "checkpoint-2")  # the resumed run trained on from there
        assert not all(torch.equal(a[k], at_ckpt[k]) for k in a)
        assert [h["loss"] for h in _history(resumed)] == [h["loss"] for h in _history(full)]


def test_fsdp_refuses_optimizers_that_need_whole_tensors(tiny_model, tmp_path):
    """LAMB / LARS scale updates by a norm over the whole parameter: refused before weights load, naming the
    optimizers that work."""
    ft = (FineTuner(tiny_model).data(source=[{"text": "a"}])
          .training(output_dir=str(tmp_path / "o"), distributed="fsdp", optimizer="LAMB8bit", device="cpu"))
    with pytest.raises(ConfigError, match=r"paged_adamw_32bit.*Lion"):
        ft.run()
    assert not (tmp_path / "o").exists()


MEDIUM = Path(__file__).resolve().parent.parent / "examples" / "benchmarks" / "configs" / "phi3-medium-4k-instruct"


def _medium(distributed: str) -> FineTuner:
    from phi3tune import QuantSpec

    return (FineTuner(str(MEDIUM)).quantize(QuantSpec(quant_storage="bfloat16")).adapter(r=16, alpha=16)
            .data(source=[{"text": "a"}], max_seq_length=1024)
            .training(distributed=distributed, precision="bf16", optimize_for="memory", micro_batch_tokens=1024))


def test_phi3_medium_does_not_fit_one_8gib_card_but_fits_two_under_fsdp():
    """Phi-3-medium's published shape (14B): its 4-bit weights alone exceed an 8 GiB card (7.5 GiB free), which is
    refused before weights load; FSDP over two such cards (8.0 GiB free each, as examples/benchmarks/h200.sh
    emulates them) plans each a share that fits, NCCL's buffers on each GPU counted."""
    from phi3tune.bench import plan_for
    from phi3tune.memory import COMMUNICATION, GIB, fixed_bytes
    from phi3tune.pipeline import check_fits
    from phi3tune.plan import FIT_FRACTION

    one = plan_for(_medium("auto"), "cuda", free_gib=7.5, processes=1)
    assert fixed_bytes(one.memory) > 7.5 * GIB
    with pytest.raises(ConfigError, match=r'needs 9\.\d GiB .*distributed="fsdp"'):
        check_fits(one)
    two = plan_for(_medium("fsdp"), "cuda", free_gib=8.0, processes=2)
    check_fits(two)
    assert two.sharded and two.shard_from_cpu  # no GPU may hold the whole base, not even while loading
    assert one.compile and two.compile  # 4-bit layers stay traceable under FSDP (the graph-break test below)
    assert two.predicted_peak_gib * GIB <= FIT_FRACTION * 8.0 * GIB
    assert two.memory["communication"] == COMMUNICATION and "communication" not in one.memory
    assert two.memory["quantized_weights"] < 0.6 * one.memory["quantized_weights"]
    assert two.memory["activations"] >= one.memory["activations"]  # each rank's own micro-batch
    ddp = plan_for(_medium("ddp"), "cuda", free_gib=7.5, processes=2)  # DDP replicates: nothing divided
    assert ddp.memory == {**one.memory, "communication": COMMUNICATION} and not ddp.sharded


def _gathered_like_fsdp2(layer: torch.nn.Module) -> None:
    """What FSDP2 does before a layer's forward: swap in a plain Parameter holding the gathered 4-bit data (no
    bitsandbytes quant_state on it)."""
    layer._parameters["weight"] = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)


@pytest.mark.parametrize("hooked", [True, False])
def test_a_gathered_4bit_weight_compiles_without_graph_breaks(tiny_model, hooked):
    """Compiled layers under FSDP: with the quant-state hook a 4-bit linear whose weight FSDP2 swapped for a plain
    Parameter traces as one graph and computes what the layer computed before the swap; without it (the negative
    control) bitsandbytes re-wraps the weight in a new Params4bit every call: a graph break."""
    from torch._dynamo.utils import counters

    from phi3tune.distributed import keep_quant_state_on_gathered_weights
    from phi3tune.model import load_weights
    from phi3tune.specs import QuantSpec

    base = load_weights(str(tiny_model), QuantSpec(compute_dtype="float32", quant_storage="float32"),
                        torch.float32, torch.device("cpu"))
    layer = base.model.layers[0].mlp.down_proj
    x = torch.randn(2, 8, layer.in_features)
    want = layer(x)
    if hooked:
        keep_quant_state_on_gathered_weights(layer)
    _gathered_like_fsdp2(layer)
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(layer, backend="eager", dynamic=False)(x)
    breaks = sum(counters["graph_break"].values())
    if hooked:
        assert breaks == 0, dict(counters["graph_break"])
        assert torch.equal(got, want)
    else:
        assert breaks > 0


COMPILED = """
import functools, json, os, sys
from torch._dynamo.utils import counters
from phi3tune import FineTuner, QuantSpec, compiled_layers
# graph breaks are dynamo's to find: the split graphs run as traced, no code generated (conftest: traced_layers)
compiled_layers.backend = functools.partial(compiled_layers.backend, generate=False)
model, out, rows = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
losses = {}
for compiled in (False, True):  # memory plan: every layer checkpointed, where a traced side effect breaks the graph
    counters.clear()
    res = (FineTuner(model).quantize(QuantSpec(compute_dtype="float32", quant_storage="float32"))
           .adapter(r=8, alpha=16, dropout=0.0).data(source=rows, max_seq_length=64)
           .training(output_dir=f"{out}/{compiled}", batch_size=2, grad_accum=1, max_steps=2, save_strategy="no",
                     progress_bar=False, optimize_for="memory", micro_batch_tokens=128, compile=compiled,
                     logging_steps=1, device="cpu", distributed="fsdp").run())
    losses[str(compiled)] = [h["loss"] for h in res.history if "loss" in h]
    breaks = sum(counters["graph_break"].values())
json.dump({"losses": losses, "graph_breaks": breaks}, open(f"{out}.rank{os.environ['RANK']}.json", "w"))
"""


def test_compiled_checkpointed_layers_under_fsdp_trace_whole_and_train_as_eager(tiny_model, tmp_path):
    """FSDP + the memory plan + compiled layers on 2 gloo ranks: no graph break anywhere (bitsandbytes would
    re-wrap each gathered 4-bit weight, and handing it the quant state while tracing a checkpointed layer is a
    side effect dynamo refuses: each broke the graph before) and the losses of eager layers."""
    script, rows = tmp_path / "compiled.py", tmp_path / "rows.json"
    script.write_text(COMPILED)
    rows.write_text(json.dumps(rows_of_text(8, seed=5)))
    run_script([*torchrun(2), str(script), str(tiny_model), str(tmp_path / "o"), str(rows)], tmp_path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"o.rank{rank}.json").read_text())
        assert got["graph_breaks"] == 0
        assert len(got["losses"]["True"]) == 2
        assert got["losses"]["True"] == pytest.approx(got["losses"]["False"], rel=1e-4)
