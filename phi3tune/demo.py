"""``phi3tune demo``: watch a model learn a new skill with 4-bit QLoRA, offline, on a CPU, in about a minute.

1. **Base model.** A tiny Phi-3 (Phi3ForCausalLM, fused qkv/gate_up layers, Phi-3's special tokens and chat
   template, one token per character) is built and trained *in full* for a few seconds, with plain torch, on a
   generic instruction: repeat a five-letter string ("Repeat: kTzQa" -> "kTzQa", also "Copy:", "Echo:", …).
   That makes it a real base model: it follows the chat template, copies, and stops at ``<|end|>``.
   (A freshly random model cannot be taught anything through LoRA alone: its frozen output head gives
   near-uniform logits.)
2. **Before.** Held-out prompts of the new task, ``Uppercase: apple``, go to the 4-bit base. It does what it
   knows, repeating the word, so exact-match accuracy is 0 %.
3. **QLoRA.** ``FineTuner(...).quantize(4-bit NF4).adapter(LoRA).data(prompt_completion).training(...).run()``
   on random lowercase strings -> their upper case.
4. **After.** The saved adapter is loaded with ``load_finetuned`` and asked the same held-out prompts: real
   English words it never saw in training. Exact match and held-out loss are measured before and after.

Everything (model, tokenizer, data) is built here; nothing is downloaded. ``--model`` / ``--data`` run the
same steps on a real model and data set.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ._isolation import leaves_process_as_found
from .demo_task import (
    HELDOUT_WORDS,
    TASK,
    _write_jsonl,
    build_base_model,
    exact_match,
    heldout_loss,
    heldout_rows,
    task_rows,
)
from .errors import DataFormatError, OutputDirError
from .logs import quiet_libraries
from .specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec

log = logging.getLogger("phi3tune")

BASE_DIR, TRAIN_FILE, HELDOUT_FILE, REPORT_FILE = "base_model", "train.jsonl", "heldout.jsonl", "demo_report.json"
DEMO_FILES = (BASE_DIR, TRAIN_FILE, HELDOUT_FILE, REPORT_FILE)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run; ``quick`` is the test-suite's shorter version of the same thing."""

    pretrain_steps: int = 300
    train_examples: int = 400
    train_steps: int = 80
    heldout: int = len(HELDOUT_WORDS)
    shown: int = 8

    @classmethod
    def make(cls, quick: bool) -> DemoPlan:
        return cls(pretrain_steps=180, train_steps=40, heldout=12, shown=4) if quick else cls()


@dataclass
class Scored:
    prompt: str
    expected: str
    before: str = ""
    after: str = ""


@dataclass
class DemoReport:
    """What the demo measured; also written to ``output_dir/demo_report.json``."""

    output_dir: str
    adapter_dir: str
    model: str
    accuracy_before: float
    accuracy_after: float
    heldout_loss_before: float
    heldout_loss_after: float
    first_train_loss: float
    last_train_loss: float
    seconds: dict[str, float] = field(default_factory=dict)
    examples: list[Scored] = field(default_factory=list)

    @property
    def loss_fall(self) -> float:
        """Fraction by which the training loss fell from the first logged value to the last."""
        return 1 - self.last_train_loss / max(self.first_train_loss, 1e-12)


def split_prompt(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], str]:
    """A data row -> (the conversation up to its last answer, that answer)."""
    from .data.formats import to_messages

    messages = to_messages(row, fmt, "text", None)
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(f"demo: a held-out row must end with an answer to compare against: {str(row)[:100]!r}")
    return messages[:-1], messages[-1]["content"]


# ---------------------------------------------------------------------------------------------- output
def _table(rows: list[Scored], which: str, n: int, say: Callable[[str], None]) -> None:
    width = max(len(r.prompt) for r in rows[:n]) if rows else 10
    say(f"    {'prompt':<{width}}  {'expected':<10}  model answer")
    for r in rows[:n]:
        got = getattr(r, which)
        mark = "right" if got.strip() == r.expected.strip() else "wrong"
        say(f"    {r.prompt:<{width}}  {r.expected:<10}  {got!r:<14} {mark}")


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a directory holding anything unless --overwrite; then remove only the demo's own files."""
    from . import checkpoints as ckpt

    if out.exists() and not out.is_dir():
        raise OutputDirError(f"demo: {str(out)!r} is a file; pass --output-dir with a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"demo: {str(out)!r} already exists and is not empty (a previous demo?). Pass --overwrite to replace "
                "the demo's files in it, or --output-dir to use another directory")
        ckpt.clear_run(out)
        for name in DEMO_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- the demo
@dataclass
class Task:
    """Training rows, held-out rows (scored by exact match on their last answer) and their data format."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    format: str
    description: str

    def scored(self) -> list[Scored]:
        out = []
        for row in self.heldout:
            conversation, expected = split_prompt(row, self.format)
            shown = conversation[-1]["content"] if len(conversation) == 1 else json.dumps(conversation)
            out.append(Scored(shown, expected))
        return out

    def conversations(self) -> list[list[dict[str, str]]]:
        return [split_prompt(r, self.format)[0] for r in self.heldout]


def builtin_task(plan: DemoPlan, seed: int) -> Task:
    train, held = task_rows(plan.train_examples, seed), heldout_rows(plan.heldout)
    return Task(train, held, "prompt_completion",
                f"{TASK}: <word> -> <WORD>; trained on {len(train)} random strings, held out: real words")


def user_task(data: str, fmt: str, heldout: int, seed: int) -> Task:
    """Rows of the user's file, shuffled; up to ``heldout`` (at most a tenth) are held out."""
    from .data import load_source
    from .data.formats import check_columns, detect_format

    raw = load_source(data, "train", "demo --data")
    fmt = detect_format(list(raw.column_names), "text") if fmt == "auto" else fmt
    check_columns(fmt, list(raw.column_names), "text")
    if fmt == "text":
        raise DataFormatError("demo --data needs rows with a prompt and an answer to compare against (formats "
                              "messages, prompt_completion, alpaca; --format guanaco for '### Human/### Assistant' "
                              "text); plain text has none")
    rows = [dict(r) for r in raw]
    if len(rows) < 4:
        raise DataFormatError(f"demo --data: {data!r} has {len(rows)} rows; give at least 4 (some are held out)")
    random.Random(seed).shuffle(rows)
    n_held = max(1, min(heldout, len(rows) // 10))
    return Task(rows[n_held:], rows[:n_held], fmt,
                f"{data} ({fmt}): {len(rows) - n_held} training rows, {n_held} held out")


def _specs(tiny: bool, out: Path, steps: int | None, plan: DemoPlan, device: str,
           seed: int) -> tuple[AdapterSpec, TrainSpec]:
    """LoRA and loop settings: tuned for the tiny base, or the classic recipe's for a real model."""
    if tiny:
        return (AdapterSpec(r=16, alpha=32, dropout=0.0),
                TrainSpec(output_dir=str(out), batch_size=16, grad_accum=1, learning_rate=3e-3,
                          max_steps=steps or plan.train_steps, warmup_ratio=0.05, optimizer="adamw_torch",
                          logging_steps=5, eval_steps=10, save_strategy="no", device=device, seed=seed))  # type: ignore[arg-type]
    return (AdapterSpec(r=16, alpha=32, dropout=0.05),
            TrainSpec(output_dir=str(out), batch_size=4, grad_accum=4, learning_rate=2e-4, max_steps=steps or 60,
                      warmup_ratio=0.05, logging_steps=5, eval_steps=20, save_strategy="no", device=device,  # type: ignore[arg-type]
                      seed=seed))


def _score(scored: list[Scored], which: str, answer: Callable[[list[dict[str, str]]], str],
           conversations: list[list[dict[str, str]]]) -> float:
    for s, conv in zip(scored, conversations):
        setattr(s, which, answer(conv))
    return exact_match([getattr(s, which) for s in scored], [s.expected for s in scored])


def _report_lines(report: DemoReport, adapter_name: str, task_is_builtin: bool) -> list[str]:
    out = Path(report.output_dir)
    plot = ("    loss.png            train and eval loss against step" if (out / "loss.png").is_file() else
            "    (no loss.png: matplotlib is not installed; pip install 'phi3tune[plot]')")
    prompt = f"{TASK}: hello" if task_is_builtin else "<your prompt>"
    return [
        "",
        f"train loss {report.first_train_loss:.3f} -> {report.last_train_loss:.3f} (fell {report.loss_fall:.1%}); "
        f"held-out exact match {report.accuracy_before:.0%} -> {report.accuracy_after:.0%}; "
        f"{report.seconds['total']:.0f} s",
        f"wrote {out}/",
        f"    {adapter_name}/   the LoRA adapter (PEFT format + tokenizer)",
        "    metrics.jsonl       train loss, lr, grad norm, tokens/s; held-out (eval) loss",
        plot,
        f"    {REPORT_FILE}    accuracy and loss before/after, every held-out answer",
        f"try it:  phi3tune generate {out / adapter_name} \"{prompt}\"",
        f"run it in Ollama / llama.cpp / LM Studio:  phi3tune export {out / adapter_name} {out / 'model.gguf'} "
        "--format gguf",
        f"    then `ollama create my-model -f Modelfile` (a Modelfile with the line FROM {out / 'model.gguf'}), "
        f"or `llama-cli -m {out / 'model.gguf'}`",
    ]


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started


def _base_model(out: Path, model: str | None, plan: DemoPlan, seed: int, say: Callable[[str], None]) -> str:
    """[1/4] the tiny Phi-3 built and pretrained here, or the user's model (a clear error for a wrong one)."""
    from .model import preflight_model

    if model is None:
        say(f"[1/4] building the base model: a tiny Phi-3 (2 layers, hidden 128, char tokenizer), trained in "
            f"full for {plan.pretrain_steps} steps to repeat what it is told")
        return str(build_base_model(out / BASE_DIR, plan.pretrain_steps, seed))
    base_path = preflight_model(model).source
    say(f"[1/4] base model: {base_path}")
    return base_path


def _say_scores(scored: list[Scored], which: str, acc: float, loss: float, shown: int,
                say: Callable[[str], None]) -> None:
    _table(scored, which, shown, say)
    say(f"    exact match {acc:.0%} ({round(acc * len(scored))}/{len(scored)}), held-out loss {loss:.3f}")


def _before(base_path: str, quant: QuantSpec, task: Task, scored: list[Scored], max_new: int, device: str,
            shown: int, say: Callable[[str], None]) -> tuple[float, float]:
    """[2/4] the same 4-bit base the adapter will be trained on: exact match and held-out loss."""
    import torch

    from .inference import generate_text
    from .model import load_tokenizer, load_weights
    from .precision import auto_dtype, resolve_device

    say(f"[2/4] before fine-tuning: the 4-bit base on {len(scored)} held-out prompts ({task.description})")
    dev = resolve_device(device)
    base = load_weights(base_path, quant, auto_dtype(dev), dev)  # auto_dtype: what compute_dtype="auto" picks
    tokenizer = load_tokenizer(base_path)
    acc = _score(scored, "before", partial(generate_text, base, tokenizer, max_new_tokens=max_new),
                 task.conversations())
    loss = heldout_loss(base, tokenizer, task.heldout, task.format)
    del base  # free its memory before training loads the base again
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _say_scores(scored, "before", acc, loss, shown, say)
    return acc, loss


def _fine_tune(base_path: str, quant: QuantSpec, task: Task, out: Path, tiny: bool, user_data: bool,
               steps: int | None, plan: DemoPlan, device: str, seed: int, say: Callable[[str], None]) -> Any:
    """[3/4] QLoRA through the public builder, evaluated on the held-out rows."""
    from . import FineTuner

    train_file = _write_jsonl(out / TRAIN_FILE, task.train)
    held_file = _write_jsonl(out / HELDOUT_FILE, task.heldout)
    adapter, training = _specs(tiny, out, steps, plan, device, seed)
    say(f"[3/4] fine-tuning with 4-bit QLoRA: NF4 base, LoRA r={adapter.r} on every linear layer, "
        f"{training.max_steps} steps of {training.sequences_per_step} examples")
    return (FineTuner(base_path).quantize(quant).adapter(adapter)
            .data(DataSpec(source=str(train_file), format=task.format,  # type: ignore[arg-type]
                           max_seq_length=512 if user_data else 64,  # the built-in task's rows are 30 tokens
                           eval_source=str(held_file)))
            .training(training).run(overwrite=True))


def _after(result: Any, task: Task, scored: list[Scored], max_new: int, device: str, shown: int,
           say: Callable[[str], None]) -> tuple[float, float]:
    """[4/4] the saved adapter, loaded the way a user would, on the same prompts."""
    from . import load_finetuned

    tuned = load_finetuned(result.adapter_dir, device=device)
    acc = _score(scored, "after", lambda c: tuned.generate(c, max_new_tokens=max_new), task.conversations())
    loss = float(result.metrics.get("eval_loss", float("nan")))
    say(f"[4/4] after fine-tuning: the adapter loaded with load_finetuned, the same {len(scored)} prompts")
    _say_scores(scored, "after", acc, loss, shown, say)
    return acc, loss


@leaves_process_as_found  # it seeds the global RNGs to build its base model
def run_demo(output_dir: str | Path = "phi3tune-demo", *, overwrite: bool = False, quick: bool = False,
             model: str | None = None, data: str | None = None, data_format: str = "auto",
             steps: int | None = None, device: str = "auto", seed: int = 0,
             say: Callable[[str], None] = print) -> DemoReport:
    """Run the demo (see the module docstring) and return what it measured.

    ``output_dir`` must be new or empty unless ``overwrite=True``, which replaces only the demo's own files.
    """
    from .model import load_tokenizer

    t_start = time.perf_counter()
    plan = DemoPlan.make(quick)
    out = Path(output_dir).expanduser().resolve()
    _prepare_output_dir(out, overwrite)
    timings: dict[str, float] = {}
    say(f"phi3tune demo -> {out}")
    quant = QuantSpec(bits=4, quant_type="nf4", compute_dtype="auto")
    with quiet_libraries():
        with _timed(timings, "base_model"):
            base_path = _base_model(out, model, plan, seed, say)
        task = builtin_task(plan, seed) if data is None else user_task(data, data_format, plan.heldout, seed)
        scored = task.scored()
        tokenizer = load_tokenizer(base_path)
        max_new = min(256, max(len(tokenizer(s.expected)["input_ids"]) for s in scored) + 8)
        with _timed(timings, "before"):
            acc_before, loss_before = _before(base_path, quant, task, scored, max_new, device, plan.shown, say)
        with _timed(timings, "fine_tune"):
            result = _fine_tune(base_path, quant, task, out, model is None, data is not None, steps, plan, device,
                                seed, say)
        with _timed(timings, "after"):
            acc_after, loss_after = _after(result, task, scored, max_new, device, plan.shown, say)
    timings["total"] = time.perf_counter() - t_start
    losses = result.losses
    report = DemoReport(str(out), str(result.adapter_dir), base_path, acc_before, acc_after, loss_before, loss_after,
                        losses[0], losses[-1], {k: round(v, 1) for k, v in timings.items()}, scored)
    (out / REPORT_FILE).write_text(json.dumps({**asdict(report), "loss_fall": report.loss_fall}, indent=1))
    for line in _report_lines(report, Path(result.adapter_dir).name, data is None):
        say(line)
    return report
