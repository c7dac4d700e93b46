"""``phi3tune train``, ``init``, ``demo`` and ``bench``: the subcommands that train (or time training)."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from ..files import read_config as read_config
from ..specs import DEFAULT_DATASET, DEFAULT_MODEL
from ._registry import subcommand

log = logging.getLogger("phi3tune")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # and no/yes/on/off as bools: save_strategy=no means "no"
    return key, value


def apply_overrides(config: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a to_config() dict, in place; a null section (``quant: null``) becomes a mapping."""
    from ..errors import ConfigError

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
    p.add_argument("config", metavar="CONFIG", nargs="?", help="YAML or JSON file holding a FineTuner.to_config() "
                   "document (`phi3tune init` writes one); none: the defaults, the README quickstart")
    p.add_argument("--model", metavar="MODEL", help="base model, hub id or local directory "
                   f"(default: the config's, else {DEFAULT_MODEL})")
    p.add_argument("--data", metavar="DATA", help="training data: a .json/.jsonl/.csv/.parquet file, a directory or "
                   f"a hub dataset (default: the config's, else {DEFAULT_DATASET})")
    p.add_argument("--output-dir", metavar="DIR", help="where the run's files go (default: the config's, else "
                   "./results)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   type=parse_assignment, help="override one config value (repeatable); the value is read as YAML: "
                   "--set training.max_steps=5 --set adapter.r=8 --set quant=null")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in output_dir, or from CHECKPOINT")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's artifacts in output_dir (other files are kept)")


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config ``phi3tune train`` runs: CONFIG (or the defaults), then --model/--data/--output-dir, then --set."""
    config = read_config(args.config) if args.config else {}
    flags = [("model", args.model), ("data.source", args.data), ("training.output_dir", args.output_dir)]
    return apply_overrides(config, [(key, value) for key, value in flags if value is not None] + args.overrides)


@subcommand("train", "fine-tune: from flags, or a config file", _train_args)
def _train(args: argparse.Namespace) -> int:
    """Fine-tune with QLoRA. Without CONFIG every value is the default (the README quickstart):
    `phi3tune train --model microsoft/Phi-3-mini-4k-instruct --data train.jsonl --set training.max_steps=50`.
    CONFIG is a FineTuner.to_config() document (`phi3tune init` writes one with every field commented; every
    run saves its own as output_dir/phi3tune_config.yaml). --model, --data, --output-dir and --set override it."""
    from ..finetuner import FineTuner

    result = FineTuner.from_config(train_config(args)).run(resume=args.resume, overwrite=args.overwrite)
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


# ---------------------------------------------------------------------------------------------- init
def _init_args(p: argparse.ArgumentParser) -> None:
    from ..templates import names

    p.add_argument("path", metavar="PATH", nargs="?", default="phi3tune.yaml",
                   help="the config file to write (default phi3tune.yaml); - prints it")
    p.add_argument("--template", choices=names(), help="copy a shipped template instead (comments included)")
    p.add_argument("--model", metavar="MODEL", help="write this base model instead of the default")
    p.add_argument("--data", metavar="DATA", help="write this data source instead of the default")
    p.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")


@subcommand("init", "write a config file: every field with its default and a line of help", _init_args)
def _init(args: argparse.Namespace) -> int:
    """Write a FineTuner.to_config() document to PATH, every field commented with its help (from the specs),
    ready to edit and run with `phi3tune train PATH`. --template copies a shipped template instead
    (`qlora_phi3`: the classic Phi-3 QLoRA recipe). An existing PATH is kept unless --overwrite."""
    from ..errors import OVERWRITE, ConfigError, hint
    from ..templates import init_text

    text = init_text(args.template, args.model, args.data)
    if args.path == "-":
        print(text, end="")
        return 0
    out = Path(args.path)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{str(out)!r} exists and was left as it is", hint("; pass {overwrite} to replace it, "
                          "or give another PATH", overwrite=OVERWRITE))
    out.write_text(text)
    print(f"wrote {out}; edit it, then: phi3tune train {out}")
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
    from ..demo import run_demo

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

    from ..bench import benchmark, estimate_memory
    from ..finetuner import FineTuner

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


