"""Document-masked attention, two kernels side by side on one GPU: FlexAttention with a document block mask (what
the speed plan runs: transformers builds the mask from ``position_ids``) and torch's variable-length flash attention
(``torch.nn.attention.varlen``: each example its own sequence, by cumulative lengths). Forward + backward, bf16,
Phi-3-mini's 32 heads of 96, micro-batches shaped like the quickstart's: documents of alpaca-like lengths laid end to
end, then one pad document up to the fixed length. Prints one JSON line per shape: ms per layer call (median of 20),
and the largest difference between the two kernels' outputs and input gradients.

    python examples/benchmarks/attention_kernels.py [--lengths 4864 8192] [--doc-max 512]
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time

import torch


def documents(total: int, doc_max: int, seed: int) -> list[int]:
    """Example lengths (60..doc_max, skewed short like alpaca's) filling ~90% of ``total``, then pads as documents
    of at most ``doc_max`` tokens (the plan keeps pad positions below max_seq_length)."""
    rng, out = random.Random(seed), []
    while sum(out) < 0.9 * total:
        n = min(doc_max, int(60 + rng.expovariate(1 / 160)))
        if sum(out) + n > total:
            break
        out.append(n)
    rest = total - sum(out)
    while rest > 0:
        out.append(min(rest, doc_max))
        rest -= out[-1]
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4864, 8192])
    ap.add_argument("--doc-max", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=96)
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import flex_attention
    from torch.nn.attention.varlen import varlen_attn

    flex = torch.compile(flex_attention)
    params = inspect.signature(varlen_attn).parameters  # torch 2.10 takes is_causal, later ones a window
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    print(json.dumps({"torch": torch.__version__, "varlen_attn": list(params)}), flush=True)
    for total in args.lengths:
        print(json.dumps(measure(total, args.doc_max, args.heads, args.head_dim, flex, varlen_attn, causal,
                                 torch.device("cuda"))),
              flush=True)


def measure(total: int, doc_max: int, h: int, d: int, flex, varlen_attn, causal: dict,
            dev: torch.device) -> dict:
    """One micro-batch shape: both kernels' fwd+bwd time, the block mask's, and their largest differences."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = documents(total, doc_max, seed=total)
    doc_id = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs)).to(dev)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=dev)

    def mask_mod(b, hh, q, k):
        return (doc_id[q] == doc_id[k]) & (k <= q)

    def block_mask():
        return create_block_mask(mask_mod, None, None, total, total, device=dev, _compile=True)

    mask_start = time.perf_counter()
    block = block_mask()
    sync(dev)
    first_mask_ms = (time.perf_counter() - mask_start) * 1e3
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    grad = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, generator=g)

    def run_flex():
        qq, kk, vv = (t.detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        out = flex(qq, kk, vv, block_mask=block, scale=d ** -0.5)
        out.backward(grad.transpose(0, 1)[None])
        return out[0].transpose(0, 1), qq.grad[0].transpose(0, 1)

    def run_varlen():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = varlen_attn(qq, kk, vv, cu, cu, doc_max, doc_max, **causal)  # its default scale: d ** -0.5
        out.backward(grad)
        return out, qq.grad

    (fo, fg), (vo, vg) = run_flex(), run_varlen()
    return {"tokens": total, "documents": len(docs), "real_docs_max": max(docs),
            "flex_fwd_bwd_ms": round(timed(run_flex, dev), 3), "varlen_fwd_bwd_ms": round(timed(run_varlen, dev), 3),
            "flex_block_mask_ms": round(timed(block_mask, dev), 3), "first_block_mask_ms": round(first_mask_ms, 1),
            "max_out_diff": float((fo.float() - vo.float()).abs().max()),
            "max_dq_diff": float((fg.float() - vg.float()).abs().max()),
            "out_scale": float(fo.float().abs().max())}


if __name__ == "__main__":
    main()
