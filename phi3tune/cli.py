"""The ``phi3tune`` command line (also ``python -m phi3tune``): train, generate, merge, export, push, demo.

Every subcommand is one entry in ``SUBCOMMANDS``: a function that adds its arguments to an argparse
parser and a function that runs it and returns an exit status. Adding one is a few lines::

    def _bench_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=20)

    @subcommand("bench", "time training steps", _bench_args)
    def _bench(args: argparse.Namespace) -> int:
        ...
        return 0

Every subcommand gets ``--help`` and ``-q/--quiet``; phi3tune errors become one line on stderr and exit
status 1, usage errors exit status 2, an interrupted run exits 130.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .files import read_config as read_config
from .logs import console, quiet_libraries

log = logging.getLogger("phi3tune")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
Configure = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Configure
    run: Handler
    description: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, configure: Configure) -> Callable[[Handler], Handler]:
    """Register ``fn(args) -> exit status`` as ``phi3tune NAME``; its docstring is the --help description."""

    def register(fn: Handler) -> Handler:
        SUBCOMMANDS[name] = Subcommand(name, help, configure, fn, inspect.cleandoc(fn.__doc__ or help))
        return fn

    return register


# ---------------------------------------------------------------------------------------------- train
def parse_assignment(text: str) -> tuple[str, Any]:
    """``training.max_steps=5`` -> ("training.max_steps", 5); the value is read as YAML (5, 1e-4, null, [a, b])."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE with a dotted key, e.g. training.max_steps=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    return key, value


def apply_overrides(config: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a to_config() dict, in place; a null section (``quant: null``) becomes a mapping."""
    from .errors import ConfigError

    for key, value in overrides:
        *sections, leaf = key.split(".")
        node = config
        for i, part in enumerate(sections):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                where = ".".join(sections[: i + 1])
                raise ConfigError(f"--set {key}: {where} is a value ({node[part]!r}), not a section with keys")
            node = node[part]
        node[leaf] = value
    return config


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML or JSON file written by FineTuner.save_config "
                   "(a FineTuner.to_config() document)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   type=parse_assignment, help="override one config value (repeatable); the value is read as YAML: "
                   "--set training.max_steps=5 --set adapter.r=8 --set quant=null")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in output_dir, or from CHECKPOINT")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's artifacts in output_dir (other files are kept)")


@subcommand("train", "fine-tune from a config file", _train_args)
def _train(args: argparse.Namespace) -> int:
    """Fine-tune with QLoRA as a config file describes: `phi3tune train run.yaml --set training.max_steps=50`.
    The config is a FineTuner.to_config() document (FineTuner.save_config writes one; every run saves its own
    as output_dir/phi3tune_config.yaml)."""
    from .finetuner import FineTuner

    config = apply_overrides(read_config(args.config), args.overrides)
    result = FineTuner.from_config(config).run(resume=args.resume, overwrite=args.overwrite)
    m = result.metrics
    print(f"adapter: {result.adapter_dir}")
    losses = f"train loss {m['train_loss']:.4f}" if m.get("train_loss") is not None else "no train loss"
    if m.get("eval_loss") is not None:
        losses += f", eval loss {m['eval_loss']:.4f}"
    print(f"{losses}; {m.get('steps')} steps in {m.get('runtime_s', 0):.1f} s")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    if (result.output_dir / "loss.png").is_file():
        print(f"loss curve: {result.output_dir / 'loss.png'}")
    print(f"try it: phi3tune generate {result.adapter_dir} \"your prompt\"")
    return 0


# ---------------------------------------------------------------------------------------------- generate
QUANT_CHOICES = ("trained", "none", "4bit", "8bit")


def quant_choice(name: str) -> Any:
    """--quant value -> load_finetuned's quant argument."""
    from .inference import SAME_AS_TRAINING
    from .specs import QuantSpec

    return {"trained": SAME_AS_TRAINING, "none": None, "4bit": QuantSpec(bits=4), "8bit": QuantSpec(bits=8)}[name]


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="an adapter directory, e.g. results/final_checkpoint")
    p.add_argument("prompts", metavar="PROMPT", nargs="*",
                   help="user message(s); none: one prompt per line from stdin")
    p.add_argument("--system", metavar="TEXT", help="a system message before each prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    p.add_argument("--temperature", type=float, metavar="T", help="sample with this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    p.add_argument("--top-k", type=int, metavar="K", help="top-k sampling")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--base-model", metavar="MODEL", help="base model (default: from adapter_config.json)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="trained",
                   help="how to load the base: as in training (default), unquantized, 4-bit or 8-bit")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


@subcommand("generate", "answer prompts with a fine-tuned adapter", _generate_args)
def _generate(args: argparse.Namespace) -> int:
    """Load base model + adapter and print the reply to each PROMPT (chat template applied, new text only,
    stops at <|end|> / eos). Greedy unless --temperature/--top-p/--top-k is given."""
    import torch

    from .errors import ConfigError
    from .inference import as_messages, load_finetuned

    prompts = list(args.prompts)
    if not prompts:
        if sys.stdin.isatty():
            raise ConfigError("generate: give a PROMPT argument, or pipe prompts in, one per line")
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                  ("top_k", args.top_k)) if v is not None}
    torch.manual_seed(args.seed)
    ft = load_finetuned(args.adapter, quant=quant_choice(args.quant), base_model=args.base_model,
                        device=args.device)
    for i, prompt in enumerate(prompts):
        answer = ft.generate(as_messages(prompt, args.system), max_new_tokens=args.max_new_tokens, **sampling)
        if len(prompts) > 1:
            print(f"{'' if i == 0 else chr(10)}>>> {prompt}")
        print(answer, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- merge
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="an adapter directory, e.g. results/final_checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the standalone model (new or empty)")
    p.add_argument("--dtype", default="bfloat16", metavar="DTYPE",
                   help="bfloat16 (default), float16 or float32; never a quantized type")
    p.add_argument("--base-model", metavar="MODEL", help="full-precision base (default: from adapter_config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")


@subcommand("merge", "merge an adapter into its base: a standalone model directory", _merge_args)
def _merge(args: argparse.Namespace) -> int:
    """Load the base unquantized in --dtype, merge the LoRA adapter into it and save a model directory
    (safetensors, config, generation config, tokenizer) that AutoModelForCausalLM.from_pretrained loads."""
    from .inference import merge_adapter

    out = merge_adapter(args.adapter, args.out_dir, dtype=args.dtype, base_model=args.base_model,
                        overwrite=args.overwrite)
    print(f"merged model: {out}")
    return 0


# ---------------------------------------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    from .export import LAYOUTS
    from .gguf_export import GGUF_DTYPES

    p.add_argument("adapter", metavar="ADAPTER_DIR", help="an adapter directory, e.g. results/final_checkpoint "
                   "(--format gguf: also a merged model directory)")
    p.add_argument("out_dir", metavar="OUT", help="where to write: a new or empty directory (--layout split) "
                   "or a .gguf file (--format gguf)")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="split: separate q_proj/k_proj/v_proj and gate_proj/up_proj (Llama-style engines)")
    p.add_argument("--format", dest="out_format", choices=("adapter", "gguf"), default="adapter",
                   help="adapter (default): a rewritten adapter (needs --layout); gguf: one merged GGUF file "
                   "for llama.cpp, Ollama and LM Studio")
    p.add_argument("--dtype", default="q8_0", metavar="DTYPE",
                   help=f"--format gguf: the weights' type, one of {', '.join(GGUF_DTYPES)} (default q8_0)")
    p.add_argument("--base-model", metavar="MODEL", help="the fused base to read the shapes from "
                   "(default: from adapter_config.json); --format gguf: the full-precision base to merge into")
    p.add_argument("--served-base", metavar="NAME", help="the split-layout base the engine serves, written into "
                   "the exported adapter_config.json (default: the original base)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


@subcommand("export", "rewrite an adapter for other engines: split q/k/v layout, or one GGUF file", _export_args)
def _export(args: argparse.Namespace) -> int:
    """--layout split: write an equivalent LoRA adapter for engines that expect separate q/k/v and gate/up
    projections: LoRA A of each fused layer is shared by its parts, LoRA B is cut by the fused layer's output
    rows. Exact: a split-layout copy of the base with the exported adapter gives the same logits.
    --format gguf: merge the adapter into its unquantized base and write one GGUF file (--dtype q8_0, f16, bf16,
    f32) with the tokenizer and chat template, for llama.cpp, Ollama (`FROM ./model.gguf`) and LM Studio."""
    if args.out_format == "gguf" and args.layout:
        print("phi3tune export: error: give --layout split (a rewritten adapter) or --format gguf (one GGUF file), "
              "not both", file=sys.stderr)
        return 2
    if args.out_format == "gguf":
        from .gguf_export import export_gguf

        out = export_gguf(args.adapter, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                          base_model=args.base_model)
        print(f"GGUF ({args.dtype}): {out}")
        print(f"run it: ollama create my-model -f Modelfile (a file with the line FROM {out}), or "
              f"llama-cli -m {out}")
        return 0
    if args.layout is None:  # a usage error, as argparse reports one
        print("phi3tune export: error: give --layout split (a rewritten adapter) or --format gguf (one GGUF file)",
              file=sys.stderr)
        return 2
    from .export import export_adapter

    out = export_adapter(args.adapter, args.out_dir, layout=args.layout, base_model=args.base_model,
                         served_base=args.served_base, overwrite=args.overwrite)
    print(f"exported adapter ({args.layout} layout): {out}")
    return 0


# ---------------------------------------------------------------------------------------------- push
def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR", help="an adapter directory or a merged model directory")
    p.add_argument("repo_id", metavar="REPO_ID", help="hub model id, e.g. you/phi3-uppercase")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--message", metavar="TEXT", help="commit message")


@subcommand("push", "upload an adapter or merged model to the Hugging Face Hub", _push_args)
def _push(args: argparse.Namespace) -> int:
    """Create the hub repo if needed and upload DIR in one commit (log in first: `hf auth login` or HF_TOKEN).
    Offline (HF_HUB_OFFLINE=1) it fails at once."""
    from .hub import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=not args.public, commit_message=args.message)
    print(f"uploaded: {url}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="phi3tune-demo", metavar="DIR", help="default ./phi3tune-demo")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo's files in DIR")
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer steps and prompts), for tests")
    p.add_argument("--model", metavar="MODEL", help="a real base model (hub id or directory) instead of the tiny one")
    p.add_argument("--data", metavar="FILE", help="your data (chat formats, with answers) instead of the built-in "
                   "task; some rows are held out and scored by exact match")
    p.add_argument("--format", dest="data_format", default="auto",
                   choices=("auto", "messages", "prompt_completion", "alpaca", "guanaco"), help="format of --data")
    p.add_argument("--steps", type=int, metavar="N", help="fine-tuning steps (default: 80 tiny, 60 with --model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


@subcommand("demo", "offline demo: a tiny Phi-3 learns a task with 4-bit QLoRA", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """Build a tiny Phi-3 base model (trained for a few seconds), show its answers on held-out prompts,
    fine-tune it with 4-bit QLoRA through the public FineTuner builder, and show the answers again, with
    exact-match accuracy and loss before and after. Writes the adapter, metrics.jsonl and loss.png to DIR.
    Offline; under a minute on a 2-core CPU."""
    from .demo import run_demo

    run_demo(args.output_dir, overwrite=args.overwrite, quick=args.quick, model=args.model, data=args.data,
             data_format=args.data_format, steps=args.steps, device=args.device)
    return 0


# ---------------------------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="a FineTuner.to_config() YAML/JSON file")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--estimate", action="store_true", help="only predict peak memory; load no weights")
    p.add_argument("--label", help="a name for this run in the JSON line")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   type=parse_assignment, help="override a config value, e.g. training.optimize_for=speed")
    p.add_argument("--out", help="also append the JSON line to this file")


@subcommand("bench", "time training steps: tokens/s, step time, peak memory, MFU", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    """Run a config for --warmup + --steps optimizer steps and print one JSON line: real (non-pad) tokens/s,
    median step time, peak device memory (read from the device), MFU and padding fraction. --estimate only
    predicts peak memory from the config, before anything loads. See docs/performance.md.
    `python -m phi3tune.bench` is the same command (for torchrun)."""
    import json

    from .bench import benchmark, estimate_memory
    from .finetuner import FineTuner

    ft = FineTuner.from_config(apply_overrides(read_config(args.config), args.overrides))
    if args.estimate:
        report: dict[str, Any] = {"label": args.label, "estimate": estimate_memory(ft)}
    else:
        report = benchmark(ft, args.steps, args.warmup, args.label)
        # the run's own plan: planning again now would see the memory this run still holds
        report["estimate_gib"] = report["predicted_peak_gib"]
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3tune", description="QLoRA fine-tuning for Microsoft Phi-3. "
                                     "Start with `phi3tune demo`; `phi3tune COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"phi3tune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in SUBCOMMANDS.values():
        sp = subs.add_parser(cmd.name, help=cmd.help, description=cmd.description, parents=[common],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.configure(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``phi3tune`` console script; returns the exit status."""
    from pydantic import ValidationError

    from .errors import Phi3TuneError, TrainingInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:  # phi3tune's log lines to stderr while the command runs (logs.py); the libraries' progress bars off
        with console(logging.WARNING if args.quiet else logging.INFO, force=True), quiet_libraries():
            return SUBCOMMANDS[args.command].run(args)
    except TrainingInterrupted as exc:
        print(f"phi3tune {args.command}: {exc}", file=sys.stderr)
        return 130
    except (Phi3TuneError, ValidationError) as exc:
        print(f"phi3tune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"phi3tune {args.command}: interrupted", file=sys.stderr)
        return 130
