"""``phi3tune generate``, ``merge``, ``export`` and ``push``: the subcommands that use a trained adapter."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..files import read_config as read_config
from ._registry import subcommand

log = logging.getLogger("phi3tune")


# ---------------------------------------------------------------------------------------------- generate
QUANT_CHOICES = ("trained", "none", "4bit", "8bit")


def quant_choice(name: str) -> Any:
    """--quant value -> load_finetuned's quant argument."""
    from ..inference import SAME_AS_TRAINING
    from ..specs import QuantSpec

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

    from ..errors import ConfigError
    from ..inference import as_messages, load_finetuned

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
    from ..inference import merge_adapter

    out = merge_adapter(args.adapter, args.out_dir, dtype=args.dtype, base_model=args.base_model,
                        overwrite=args.overwrite)
    print(f"merged model: {out}")
    return 0


# ---------------------------------------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    from ..export import LAYOUTS
    from ..gguf_export import GGUF_DTYPES

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
        from ..gguf_export import export_gguf

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
    from ..export import export_adapter

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
    from ..hub import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=not args.public, commit_message=args.message)
    print(f"uploaded: {url}")
    return 0


