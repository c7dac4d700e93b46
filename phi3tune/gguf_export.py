"""Export a fine-tuned Phi-3 as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

An adapter is first merged into its **unquantized** base with ``merge_adapter`` (float32 for f32/f16 output,
bfloat16 for bf16/q8_0; never into the 4-bit weights), into a hidden directory beside the output that is removed
afterwards; a merged model directory is read as it is. The ``gguf`` package writes the file: llama.cpp's "phi3"
architecture keys, its tensor names (fused ``attn_qkv`` and ``ffn_up`` as Phi-3 stores them), LongRoPE factor
tensors where the config scales RoPE, and the tokenizer with its chat template (gguf_vocab.py). Tensors stream
from the safetensors files one at a time into a temporary file that is renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelSourceError, OutputDirError

log = logging.getLogger("phi3tune")

GGUF_DTYPES = ("q8_0", "f16", "bf16", "f32")
_MERGE_DTYPE = {"f32": "float32", "f16": "float32", "bf16": "bfloat16", "q8_0": "bfloat16"}
_INSTALL = "pip install 'phi3tune[gguf]' (the gguf package)"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ConfigError(f"export_gguf needs the gguf package: {_INSTALL}") from exc
    return gguf


# ---------------------------------------------------------------------------------------------- checks
def _check_out(out: Path, overwrite: bool) -> None:
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(f"export_gguf: {str(out)!r} is under {str(parent)!r}, which is a file; "
                                 "choose an output path inside a directory")
    if out.is_dir():
        raise OutputDirError(f"export_gguf: {str(out)!r} is a directory; give a file name, "
                             f"e.g. {str(out / 'model.gguf')!r}")
    if out.exists() and not overwrite:
        raise OutputDirError(f"export_gguf: {str(out)!r} exists; choose a new file name or pass overwrite=True "
                             "(phi3tune export --overwrite) to replace it")


def _source_kind(path: Path) -> str:
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "merged"
    raise ModelSourceError(f"export_gguf: {str(path)!r} is neither an adapter directory (adapter_config.json, e.g. "
                           "results/final_checkpoint) nor a merged model directory (config.json + *.safetensors, "
                           "written by phi3tune merge)")


def _read_config(source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"export_gguf: could not read the config of {source!r} ({str(exc)[:200]}); pass "
                               "base_model= with a local directory holding its config.json") from exc
    if getattr(config, "model_type", None) != "phi3":
        raise ConfigError(f"export_gguf: {source!r} is a {getattr(config, 'model_type', '?')!r} model; GGUF export "
                          "writes the Phi-3 architecture (model_type 'phi3': Phi-3, Phi-3.5, Phi-4-mini)")
    if getattr(config, "quantization_config", None):
        raise ConfigError(f"export_gguf: {source!r} is a quantized checkpoint; export from the full-precision "
                          "model (merge the adapter into the unquantized base)")
    return config


def _tokenizer_dir(path: Path, kind: str, base: str | None) -> Path | None:
    """Where the tokenizer that will be exported lives, when it is on disk before merging."""
    if kind == "merged" or (path / "tokenizer.json").is_file():
        return path
    return Path(base) if base and (Path(base) / "tokenizer.json").is_file() else None


# ---------------------------------------------------------------------------------------------- metadata
def rope_dims(config: Any) -> int:
    """Rotary dimensions per head: Phi-4-mini rotates 0.75 of each head (``partial_rotary_factor``)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(factor * head_dim)


def longrope(config: Any) -> tuple[list[float], list[float], float] | None:
    """(long factors, short factors, attention factor) when the config scales RoPE with LongRoPE, else None."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if not rope.get("long_factor"):
        return None
    kind = str(rope.get("rope_type") or rope.get("type") or "").lower()
    if kind not in ("longrope", "su"):
        raise ConfigError(f"export_gguf: RoPE scaling {kind!r} with long/short factors is not supported; "
                          "GGUF export writes Phi-3's LongRoPE")
    long, short = [float(x) for x in rope["long_factor"]], [float(x) for x in rope["short_factor"]]
    if len(long) != len(short) or 2 * len(long) != rope_dims(config):
        raise ConfigError(f"export_gguf: rope_scaling has {len(long)} long and {len(short)} short factors; "
                          f"the model rotates {rope_dims(config)} dimensions per head, so both need "
                          f"{rope_dims(config) // 2}")
    orig = _original_context(config)
    scale = config.max_position_embeddings / orig
    attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    return long, short, float(attn)


def _original_context(config: Any) -> int:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return int(rope.get("original_max_position_embeddings")
               or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)


def _add_hparams(writer: Any, config: Any, file_type: int, name: str) -> None:
    """The "phi3" keys llama.cpp reads, under the names its converter writes them."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(_original_context(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: none (how llama.cpp marks it)
    writer.add_file_type(file_type)
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)
    scaled = longrope(config)
    if scaled:
        writer.add_rope_scaling_attn_factors(scaled[2])


# ---------------------------------------------------------------------------------------------- tensors
def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update(dict.fromkeys(sf.keys(), f))
    return out


def _plan(model_dir: Path, config: Any, dtype: str) -> list[tuple[str, str | None, tuple[int, ...], Any]]:
    """[(gguf name, HF name or None for a generated tensor, shape, ggml type)] in file order."""
    from safetensors import safe_open

    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    wanted = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, config.num_hidden_layers)
    files = _weight_files(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan: list[tuple[str, str | None, tuple[int, ...], Any]] = []
    for hf_name, f in files.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads token_embd for the output when there is no output tensor
        base, _, suffix = hf_name.rpartition(".")
        new = names.get_name(base)
        if new is None:
            raise ConfigError(f"export_gguf: {str(f)!r} holds {hf_name!r}, which has no llama.cpp Phi-3 tensor name; "
                              "export a plain Phi3ForCausalLM")
        with safe_open(str(f), framework="pt") as sf:
            shape = tuple(sf.get_slice(hf_name).get_shape())
        new = f"{new}.{suffix}"
        kind = q.F32 if len(shape) <= 1 or new.endswith("_norm.weight") else wanted
        if kind == q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
            kind = q.F16  # rows that are not whole 32-value blocks: llama.cpp's converter falls back the same way
        plan.append((new, hf_name, shape, kind))
    scaled = longrope(config)
    if scaled:
        for tensor, values in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, scaled[0]),
                               (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, scaled[1])):
            plan.append((f"{gguf.TENSOR_NAMES[tensor]}.weight", None, (len(values),), q.F32))
    return plan


def _converted(data: Any, kind: Any) -> Any:
    """A float32 numpy array in the file's type (quantized and bf16 types as their raw bytes)."""
    import numpy as np

    q = _gguf().GGMLQuantizationType
    if kind == q.F32:
        return data.astype(np.float32)
    if kind == q.F16:
        return data.astype(np.float16)
    return _gguf().quants.quantize(data.astype(np.float32), kind)


def _tensors(model_dir: Path, plan: list[Any], config: Any) -> Iterator[Any]:
    import numpy as np
    from safetensors import safe_open

    files = _weight_files(model_dir)
    scaled = longrope(config)
    generated = {"rope_factors_long.weight": scaled[0], "rope_factors_short.weight": scaled[1]} if scaled else {}
    for new, hf_name, _shape, kind in plan:
        if hf_name is None:
            yield _converted(np.asarray(generated[new], dtype=np.float32), kind)
            continue
        with safe_open(str(files[hf_name]), framework="pt") as sf:
            yield _converted(sf.get_tensor(hf_name).float().numpy(), kind)


def _nbytes(shape: tuple[int, ...], kind: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape as add_tensor_info takes it, numpy dtype, byte count) of a tensor of ``kind``."""
    import numpy as np

    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if kind in (q.F32, q.F16):
        dt = np.dtype(np.float32 if kind == q.F32 else np.float16)
        return shape, dt, int(np.prod(shape)) * dt.itemsize
    raw = tuple(gguf.quants.quant_shape_to_byte_shape(shape, kind))
    return raw, np.dtype(np.uint8), int(np.prod(raw))


def write_gguf(model_dir: Path, tmp_file: Path, dtype: str, vocab: Any, tokenizer: Any, config: Any,
               name: str) -> int:
    """Write a merged model directory as GGUF to ``tmp_file`` (``name``: general.name); returns the tensor count."""
    from .gguf_vocab import add_vocab

    gguf = _gguf()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    plan = _plan(model_dir, config, dtype)
    writer = gguf.GGUFWriter(str(tmp_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    try:
        _add_hparams(writer, config, int(file_type), name)
        add_vocab(writer, vocab, tokenizer)
        for new, _hf, shape, kind in plan:
            info_shape, np_dtype, nbytes = _nbytes(shape, kind)
            writer.add_tensor_info(new, info_shape, np_dtype, nbytes, raw_dtype=None if np_dtype.kind == "f" else kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensors(model_dir, plan, config):
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return len(plan)


# ---------------------------------------------------------------------------------------------- public
def export_gguf(adapter_or_merged_dir: str | os.PathLike[str], out_file: str | os.PathLike[str],
                dtype: str = "q8_0", overwrite: bool = False, base_model: str | None = None,
                trust_remote_code: bool = False) -> Path:
    """Write a fine-tuned Phi-3 (an adapter, or a model directory from ``merge_adapter``) as one GGUF file.

    ``dtype``: q8_0 (default; 8-bit blocks, about half of f16's size), f16, bf16 or f32. Norms and RoPE factors
    stay f32, as llama.cpp's own converter keeps them. Run the file with ``ollama create NAME -f Modelfile``
    (``FROM ./model.gguf``), ``llama-cli -m model.gguf`` or LM Studio: the chat template is in the file.
    ``out_file`` must not exist unless ``overwrite=True``; it appears only when complete.
    """
    from .gguf_vocab import read_vocab
    from .inference import _base_of, merge_adapter, read_adapter_meta
    from .model import load_tokenizer

    if dtype not in GGUF_DTYPES:
        hint = " For 4-bit GGUF (Q4_K_M, …) export f16 and run llama.cpp's llama-quantize on it." \
            if any(s in str(dtype).lower() for s in ("4", "q", "k", "int")) else ""
        raise ConfigError(f"export_gguf: dtype={dtype!r}; use one of {list(GGUF_DTYPES)}.{hint}")
    _gguf()  # the package is there before anything else happens
    path = Path(adapter_or_merged_dir).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"export_gguf: {str(path)!r} is not a directory; give an adapter directory or a "
                               "merged model directory")
    out = Path(out_file).expanduser().absolute()
    _check_out(out, overwrite)
    kind = _source_kind(path)
    base = _base_of(path, read_adapter_meta(path), base_model) if kind == "adapter" else None
    config = _read_config(str(path) if kind == "merged" else str(base), trust_remote_code)
    tok_dir = _tokenizer_dir(path, kind, base)
    vocab = read_vocab(tok_dir, config.vocab_size) if tok_dir else None  # bad tokenizers fail before merging
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_dir = path
        if kind == "adapter":
            log.info("merging %s into its unquantized base %s (%s)", path, base, _MERGE_DTYPE[dtype])
            model_dir = merge_adapter(path, work / "merged", dtype=_MERGE_DTYPE[dtype], base_model=base_model,
                                      trust_remote_code=trust_remote_code)
            vocab = vocab or read_vocab(model_dir, config.vocab_size)
        assert vocab is not None
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
        log.info("writing %s (%s)", out, dtype)
        count = write_gguf(model_dir, work / "model.gguf", dtype, vocab, tokenizer, config, out.stem)
        os.replace(work / "model.gguf", out)
        log.info("wrote %d tensors to %s (%.1f MB)", count, out, out.stat().st_size / 1e6)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
