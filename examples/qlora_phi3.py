"""The classic Phi-3 QLoRA walkthrough, on phi3tune.

The walkthrough people copy: load Phi-3-mini in 4-bit NF4, attach LoRA (r=64, alpha=16, dropout=0.1),
fine-tune on timdettmers/openassistant-guanaco (512 tokens, 4 x 4 sequences a step, paged AdamW, lr 2e-4,
100 steps), then chat with the result and merge it into a standalone model. Each step notes which of the
original's bugs phi3tune fixes (docs/troubleshooting.md).

    python examples/qlora_phi3.py                                    # GPU, model and data from the hub
    python examples/qlora_phi3.py --model /models/phi3-mini --data guanaco.jsonl
    python examples/qlora_phi3.py --tiny                             # offline CPU check of the whole path
    python examples/qlora_phi3.py --resume                           # continue after Ctrl-C (or --overwrite)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from phi3tune import (
    AdapterSpec,
    DataSpec,
    FineTuner,
    Phi3TuneError,
    QuantSpec,
    TrainSpec,
    load_finetuned,
    merge_adapter,
)


def tiny_setup(work: Path) -> tuple[str, str]:
    """An offline stand-in: a tiny random Phi-3 and 64 guanaco-style rows (the pipeline runs; nothing is learned)."""
    from phi3tune.tiny import write_tiny_phi3

    model = write_tiny_phi3(work / "tiny-phi3")
    rows = [{"text": f"### Human: Repeat {w}. ### Assistant: {w}."} for w in ("alpha", "beta", "gamma", "delta") * 16]
    data = work / "guanaco.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(model), str(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="microsoft/Phi-3-mini-4k-instruct")
    ap.add_argument("--data", default="timdettmers/openassistant-guanaco")
    ap.add_argument("--output-dir", default="./results")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="offline: a tiny random Phi-3 and 64 rows, 4 steps")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    args = ap.parse_args()
    model, data, steps, seq = args.model, args.data, args.max_steps, 512
    if args.tiny:
        model, data = tiny_setup(Path(tempfile.mkdtemp(prefix="qlora-phi3-")))
        steps, seq = 4, 64

    # 1. The 4-bit base. compute_dtype="auto" is bf16 where the GPU has it (the guide hard-codes it).
    quant = QuantSpec(bits=4, quant_type="nf4", compute_dtype="auto", double_quant=False)
    # 2. LoRA. The guide's target list names q_proj/k_proj/v_proj, which Phi-3 does not have (it fuses them
    #    into qkv_proj): "auto" targets every linear layer but the head.
    adapter = AdapterSpec(r=64, alpha=16, dropout=0.1, target_modules="auto")
    # 3. The data: the "text" column, every token trained, as in the guide. The guide's pad = eos collator
    #    masked every eos, so the model never learned to stop; phi3tune masks padding by position.
    #    (format="guanaco" would train only the assistant turns.)
    data_spec = DataSpec(source=data, text_field="text", max_seq_length=seq)
    # 4. The loop. The guide's fp16=True crashed with bf16 adapters; precision="auto" picks bf16 where
    #    supported, and adapters stay fp32 in any precision.
    training = TrainSpec(output_dir=args.output_dir, batch_size=4, grad_accum=4, optimizer="paged_adamw_32bit",
                         learning_rate=2e-4, lr_scheduler="cosine", max_steps=steps, logging_steps=min(10, steps),
                         save_strategy="no", precision="auto")
    result = FineTuner(model).quantize(quant).adapter(adapter).data(data_spec).training(training).run(
        resume=args.resume, overwrite=args.overwrite)
    print(f"adapter: {result.adapter_dir}; losses: {[round(x, 3) for x in result.losses]}")
    print(f"loss curve: {result.output_dir / 'loss.png'}")

    # 5. Chat with it: the chat template is applied, generation stops at <|end|>, only new text comes back.
    ft = load_finetuned(result.adapter_dir)        # base model and 4-bit settings read from the adapter
    print(ft.generate("What is a large language model?", max_new_tokens=64))

    # 6. Merge: into the base loaded unquantized in bf16, never into the 4-bit base (the guide's
    #    merge_and_unload on the 4-bit model rounds the update away).
    merged = merge_adapter(result.adapter_dir, Path(args.output_dir) / "merged", dtype="bfloat16",
                           overwrite=args.overwrite)
    print(f"merged model: {merged}  (AutoModelForCausalLM.from_pretrained loads it; phi3tune push uploads it)")


if __name__ == "__main__":
    try:
        main()
    except Phi3TuneError as exc:  # one line naming this script's flags (--overwrite), not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc.cli_message()}") from None
