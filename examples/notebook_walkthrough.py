# %% [markdown]
# # phi3tune, cell by cell
#
# A notebook in percent format: open it in VS Code or JupyterLab (with jupytext) and run the cells, or run
# it as a script: `python examples/notebook_walkthrough.py`. Offline, about a minute on a laptop CPU.
#
# We build a small base model, look at the data and at exactly which tokens are trained, fine-tune with
# 4-bit QLoRA, plot the loss, compare answers before and after, then merge the adapter into a standalone
# model and check that it computes the same thing.

# %%
import json
from pathlib import Path
from tempfile import mkdtemp

import torch

from phi3tune import DataSpec, FineTuner, QuantSpec, load_finetuned, merge_adapter, prepare_dataset
from phi3tune.demo import build_base_model, heldout_rows, task_rows
from phi3tune.inference import generate_text
from phi3tune.model import load_tokenizer

work = Path(mkdtemp(prefix="phi3tune-notebook-"))
print(work)

# %% [markdown]
# ## 1. A base model
# `phi3tune demo` builds the same one: a tiny Phi-3 (Phi-3's architecture, special tokens and chat template,
# one token per character) trained in full for a few seconds to repeat what it is told. With a GPU, use
# `base = "microsoft/Phi-3-mini-4k-instruct"` instead and skip this cell.

# %%
base = str(build_base_model(work / "base", steps=300))
tokenizer = load_tokenizer(base)

# %% [markdown]
# ## 2. The data
# The new skill: upper-casing. Training rows are random lowercase strings; the held-out prompts are real words.
# `prepare_dataset` shows exactly what the loop sees: with a chat format only the answer and its `<|end|>`
# are trained (labels of -100 are not).

# %%
(work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows(400)))
(work / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout_rows(12)))
data = DataSpec(source=str(work / "train.jsonl"), format="prompt_completion", max_seq_length=64,
                eval_source=str(work / "heldout.jsonl"))
row = prepare_dataset(data, tokenizer)[0]
print(repr(tokenizer.decode(row["input_ids"])))
print(repr(tokenizer.decode([t for t in row["labels"] if t != -100])))

# %% [markdown]
# ## 3. Before: the 4-bit base on held-out prompts

# %%
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
base_4bit = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.float32)
prompts = [r["prompt"] for r in heldout_rows(6)]
for p in prompts:
    print(f"{p!r:22} -> {generate_text(base_4bit, tokenizer, p, max_new_tokens=8)!r}")

# %% [markdown]
# ## 4. Fine-tune with 4-bit QLoRA

# %%
result = (FineTuner(base)
          .quantize(QuantSpec(bits=4, quant_type="nf4"))
          .adapter(r=16, alpha=32, dropout=0.0)
          .data(data)
          .training(output_dir=str(work / "run"), batch_size=16, grad_accum=1, max_steps=80,
                    learning_rate=3e-3, warmup_ratio=0.05, optimizer="adamw_torch", logging_steps=5,
                    eval_steps=10, save_strategy="no")
          .run())
print(result.metrics)

# %% [markdown]
# ## 5. The loss curve
# Every run also writes it to `output_dir/loss.png`; here it is drawn from `result.history`.

# %%
import matplotlib.pyplot as plt  # noqa: E402

train = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
evals = [(h["step"], h["eval_loss"]) for h in result.history if "eval_loss" in h]
plt.plot(*zip(*train), label="train")
plt.plot(*zip(*evals), "o-", label="held-out")
plt.xlabel("step")
plt.ylabel("loss")
plt.legend()
plt.show()

# %% [markdown]
# ## 6. After: the saved adapter, loaded as a user would

# %%
ft = load_finetuned(result.adapter_dir)      # base model and 4-bit settings come from the adapter directory
for p in prompts:
    print(f"{p!r:22} -> {ft.generate(p, max_new_tokens=8)!r}")

# %% [markdown]
# ## 7. Merge and check
# The adapter is merged into the base loaded **unquantized** (never into the 4-bit one). In float32 the merged
# model's logits equal base + adapter's.

# %%
merged_dir = merge_adapter(result.adapter_dir, work / "merged", dtype="float32")
merged = AutoModelForCausalLM.from_pretrained(merged_dir)          # plain transformers, no peft
reference = load_finetuned(result.adapter_dir, quant=None)         # adapter on the unquantized base
ids = tokenizer(["<|user|>\nUppercase: hello<|end|>\n<|assistant|>\n"], add_special_tokens=False,
                return_tensors="pt").input_ids
with torch.no_grad():
    diff = (merged(input_ids=ids).logits - reference.model(input_ids=ids).logits).abs().max()
print(f"max |merged - (base + adapter)| = {float(diff):.2e}")
print(generate_text(merged, tokenizer, "Uppercase: world", max_new_tokens=8))
