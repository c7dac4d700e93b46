"""The profiling scripts' arithmetic (examples/benchmarks/kernel_kinds.py, peer_profile.py): what a kernel counts as,
a step's matmul FLOPs against a real PEFT model's weights, and which steps a peer's profile holds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_are_sorted_into_kinds_by_their_names():
    """Names as the H200's profiles print them (docs/bench/profile-*.txt) land in their kind; a peer's own Triton
    kernel, named by its function, is "other", and a copy running torch's elementwise machinery is memory traffic,
    not elementwise work."""
    kinds = _module("kernel_kinds")
    named = {
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "matmul",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<96>>": "attention",
        "triton_poi_fused___lshift_____rshift____to_copy__unsafe_view_add_arange": "compiled",
        "triton_red_fused_15": "compiled",
        "void kOptimizer32bit2State<float, 0>(float*, float*, float*, float*)": "optimizer",
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)": "dequantize",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "memory",
        "Memset (Device)": "memory",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "eager elementwise",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "eager elementwise",
        "_rms_layernorm_forward": "other",
    }
    assert {name: kinds.kind_of(name) for name in named} == named
    split = kinds.by_kind([("nvjet_a", 30.0), ("triton_poi_fused_1", 10.0), ("nvjet_b", 20.0)])
    assert split == {"matmul": (50.0, 2), "compiled": (10.0, 1)}
    assert list(split) == ["matmul", "compiled"]  # the largest first
    report = kinds.kinds_report([("nvjet_a", 2e6), ("triton_poi_fused_1", 2e6)], steps=2, matmul_flops=4e12)
    assert "matmul" in report and "2 TFLOP/s" in report and "1000.00 ms  50.0%" in report


def test_matmul_flops_count_every_weight_the_step_multiplies():
    """A tiny Phi-3 with PEFT's LoRA on its four fused linears: the count is 4 FLOPs a base weight (decoder linears
    and output head: forward and input gradient), 6 an adapter weight (forward, input and weight gradients), as
    the real modules' parameters give it. Negative control: a Phi-3 with grouped-query attention (fewer key /
    value heads, a smaller qkv_proj) counts fewer, as its weights are fewer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    kinds = _module("kernel_kinds")

    def counted(config: Phi3Config, rank: int) -> tuple[float, float]:
        torch.manual_seed(0)
        model = get_peft_model(Phi3ForCausalLM(config), LoraConfig(
            r=rank, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
        base = sum(m.base_layer.weight.numel() for n, m in model.named_modules() if hasattr(m, "base_layer"))
        base += model.get_output_embeddings().weight.numel()
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        return kinds.matmul_flops_per_token(config.to_dict(), rank), 4.0 * base + 6.0 * adapters

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 pad_token_id=0)
    ours, weights = counted(Phi3Config(**shape), rank=8)
    assert ours == weights
    grouped, grouped_weights = counted(Phi3Config(**shape, num_key_value_heads=2), rank=8)
    assert grouped == grouped_weights < ours


FAKE_RECIPE = """
import sys, torch
model = torch.nn.Linear(16, 16)
optimizer = torch.optim.AdamW(model.parameters())
for step in range(int(sys.argv[1])):
    with torch.profiler.record_function(f"step {step}"):  # a peer's own annotation around its step
        for _ in range(2):  # two micro-batches a step
            model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("steps", [2, 3])
def test_a_peers_profile_holds_whole_steps_after_the_warmup(tmp_path, monkeypatch, steps):
    """peer_profile.py runs a recipe in-process and profiles from the end of optimizer step START to the end of step
    START + STEPS: on the CPU (the rehearsal, host ops for kernels) the recipe's forward runs exactly twice a
    profiled step, however many steps, and the recipe's exit status is kept. A recipe with too few steps is told
    so, not reported on."""
    peer_profile = _module("peer_profile")
    recipe, out = tmp_path / "recipe.py", tmp_path / "profile.txt"
    recipe.write_text(FAKE_RECIPE)
    monkeypatch.setattr(sys, "argv", ["peer_profile.py", str(out), "3", str(steps), str(recipe), "8", "4"])
    with pytest.raises(SystemExit) as stop:
        peer_profile.main()
    assert stop.value.code == 4
    report = out.read_text()
    assert report.startswith(f"{steps} steps: wall ")
    linear = next(line for line in report.splitlines() if line.endswith(" aten::linear"))
    assert int(linear.split()[2]) == 2 * steps
    monkeypatch.setattr(sys, "argv", ["peer_profile.py", str(out), "3", str(steps), str(recipe), "4", "0"])
    with pytest.raises(SystemExit, match="fewer than 3"):
        peer_profile.main()


def test_busy_time_counts_overlapping_kernels_once():
    """Two streams' kernels at once are busy time once; a gap between kernels is not busy."""
    kinds = _module("kernel_kinds")
    assert kinds.busy_us([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0), (21.0, 22.0)]) == 17.0
    assert kinds.busy_us([]) == 0.0
