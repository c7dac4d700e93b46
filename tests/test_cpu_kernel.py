"""A 4-bit model's numbers must not depend on the CPU or on whether it was ever evaluated.

bitsandbytes, on CPUs with AVX512-BF16, repacks a Linear4bit weight on its first eval-mode forward without grad
and then uses another kernel for every call, training included. phi3tune pins the training kernel on every model
it loads (``pin_4bit_cpu_kernel``), so evaluation, generation or a probe never changes what is trained or saved.
"""

from __future__ import annotations

import pytest
import torch


def _load(model_dir, pin: bool):
    from transformers import AutoModelForCausalLM

    from phi3tune.model import bnb_config, pin_4bit_cpu_kernel
    from phi3tune.specs import QuantSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=bnb_config(QuantSpec(), torch.float32))
    return pin_4bit_cpu_kernel(model) if pin else model


def _train_mode_logits(model, ids):
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _eval_once(model, ids) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


def test_an_eval_forward_does_not_change_a_pinned_model(tiny_model):
    ids = torch.randint(3, 60, (2, 17), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_model, pin=True)
    before = _train_mode_logits(model, ids)
    _eval_once(model, ids)
    after = _train_mode_logits(model, ids)
    assert torch.equal(before, after)


def test_loaders_pin_the_kernel(tiny_model):
    from phi3tune.model import load_base_model, preflight_model
    from phi3tune.specs import QuantSpec

    model = load_base_model(preflight_model(tiny_model), QuantSpec(), torch.float32, torch.device("cpu"))
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)


def test_negative_control_unpinned_model_changes_after_eval(tiny_model):
    """On this CPU, plain bitsandbytes really switches kernels: the pin above is what keeps the numbers."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    ids = torch.randint(3, 60, (2, 17), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_model, pin=False)
    before = _train_mode_logits(model, ids)
    _eval_once(model, ids)
    after = _train_mode_logits(model, ids)
    assert not torch.equal(before, after)
