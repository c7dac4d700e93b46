"""Fine-tune on chat data (the "messages" format) and talk to the result.

Rows are conversations: OpenAI-style [{role, content}] or ShareGPT-style [{from, value}], optionally with a
system message and several turns. The tokenizer's own chat template renders them, and exactly the assistant
replies (each with its <|end|>) are trained. This script writes a small chat data set, shows which tokens are
trained, fine-tunes with 4-bit QLoRA and asks a follow-up question in a multi-turn conversation.

    python examples/chat_data.py --model microsoft/Phi-3-mini-4k-instruct     # GPU
    python examples/chat_data.py --tiny                                       # offline CPU check of the path
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from phi3tune import DataSpec, FineTuner, Phi3TuneError, load_finetuned, prepare_dataset
from phi3tune.model import load_tokenizer

SYSTEM = "You are a terse unit converter. Answer with the number and unit only."
CONVERSIONS = [(1, "km", 1000, "m"), (2.5, "kg", 2500, "g"), (3, "h", 180, "min"), (4, "m", 400, "cm"),
               (5, "l", 5000, "ml"), (6, "min", 360, "s"), (7, "km", 7000, "m"), (8, "kg", 8000, "g")]


def chat_rows() -> list[dict]:
    rows: list[dict] = []
    for i, (a, u, b, v) in enumerate(CONVERSIONS * 4):
        first = [{"role": "user", "content": f"{a} {u} in {v}?"}, {"role": "assistant", "content": f"{b} {v}"}]
        if i % 3 == 0:  # multi-turn: a follow-up that depends on the first answer
            first += [{"role": "user", "content": "And twice that?"},
                      {"role": "assistant", "content": f"{2 * b} {v}"}]
        rows.append({"messages": first})
    return rows


def as_sharegpt(row: dict) -> dict:
    """The same conversation in ShareGPT style ({"conversations": [{from, value}]}), which phi3tune also reads
    (one style per file)."""
    return {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                              for m in row["messages"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="microsoft/Phi-3-mini-4k-instruct")
    ap.add_argument("--output-dir", default="./results-chat")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--tiny", action="store_true", help="offline: a tiny random Phi-3, 4 steps")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chat-data-"))
    model, steps = args.model, args.max_steps
    if args.tiny:
        from phi3tune.tiny import write_tiny_phi3

        model, steps = str(write_tiny_phi3(work / "tiny-phi3")), 4

    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    spec = DataSpec(source=str(data), format="messages", system_prompt=SYSTEM, eval_fraction=0.1,
                    max_seq_length=256)

    # What is trained: decode the labels (-100 = not trained) of the first example.
    tok = load_tokenizer(model)
    row = prepare_dataset(spec, tok)[0]
    print("rendered:", repr(tok.decode(row["input_ids"])))
    print("trained: ", repr(tok.decode([t for t in row["labels"] if t != -100])))
    print("ShareGPT style of the same row:", json.dumps(as_sharegpt(chat_rows()[0])))

    result = (FineTuner(model).quantize(bits=4).adapter(r=16, alpha=32, dropout=0.05).data(spec)
              .training(output_dir=args.output_dir, max_steps=steps, batch_size=4, grad_accum=2,
                        learning_rate=2e-4, logging_steps=min(10, steps), eval_steps=min(20, steps),
                        save_strategy="no")
              .run(resume=args.resume, overwrite=args.overwrite))
    print("train loss", result.metrics["train_loss"], "eval loss", result.metrics.get("eval_loss"))

    ft = load_finetuned(result.adapter_dir)
    conversation = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "9 km in m?"},
                    {"role": "assistant", "content": "9000 m"},
                    {"role": "user", "content": "And twice that?"}]
    print("answer:", ft.generate(conversation, max_new_tokens=16))
    print("sampled:", ft.generate("2 h in min?", max_new_tokens=16, temperature=0.7, top_p=0.9))


if __name__ == "__main__":
    try:
        main()
    except Phi3TuneError as exc:  # one line naming this script's flags (--overwrite), not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc.cli_message()}") from None
