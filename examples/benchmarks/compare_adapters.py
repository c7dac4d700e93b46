"""Compare the final adapters (and checkpoint-N's, if both have it) of two runs: one JSON line with the largest
absolute difference, the largest adapter value, and whether they are bit-identical.

    python examples/benchmarks/compare_adapters.py RUN_A RUN_B
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def compare(a: Path, b: Path) -> dict[str, object]:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if ta.keys() != tb.keys():
        return {"error": f"different tensors: {sorted(ta.keys() ^ tb.keys())[:4]}"}
    diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    return {"max_abs_diff": diff, "max_abs_value": max(float(t.abs().max()) for t in ta.values()),
            "identical": all(torch.equal(ta[k], tb[k]) for k in ta)}


def main() -> None:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    out: dict[str, object] = {"label": "compare_adapters", "a": str(a), "b": str(b)}
    for name in ("final_checkpoint", *sorted(p.name for p in a.glob("checkpoint-*") if (b / p.name).is_dir())):
        out[name] = compare(a / name, b / name) if (a / name).is_dir() and (b / name).is_dir() else "missing"
    losses = [[json.loads(x).get("loss") for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    out["losses"] = losses
    print(json.dumps(out))


if __name__ == "__main__":
    main()
