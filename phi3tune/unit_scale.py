"""A compiler pass that drops multiplications by the number 1 from a compiled layer's joint graph.

PEFT's LoRA forward is ``lora_B(lora_A(dropout(x))) * scaling``. Our compiled plans fold the scale into the LoRA
input's dropout multiply (without dropout: onto ``lora_A``'s r-wide output; lora_dropout.make_recomputable) and
set ``scaling`` to 1, so what remains is ``* 1``:
in forward fused away, but in backward its gradient, ``grad * 1``, is still a full copy of each LoRA'd linear's
output gradient (tokens x 9,216 or 16,384 in Phi-3-mini), written out once per linear for the two LoRA matmuls
to read. inductor removes ``* 1`` only where the 1 is a tensor of ones (joint_graph.remove_no_ops), not a Python
number. This pass removes the number's case too, through inductor's own hook for custom joint-graph passes
(``joint_custom_pre_pass``), with a ``uuid`` so compiled layers stay in inductor's cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_MULS = (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar)


def _same_value(a: Any, b: Any) -> bool:
    """Two fake tensors of one shape, dtype and device: one may stand for the other."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device)


def _written(node: torch.fx.Node) -> bool:
    """Whether an in-place op writes ``node`` (then ``x * 1`` is a copy that must stay)."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if user.op == "call_function" and schema is not None:
            for arg, formal in zip(user.args, schema.arguments, strict=False):
                if arg is node and formal.alias_info is not None and formal.alias_info.is_write:
                    return True
    return False


def drop_multiplications_by_one(graph: torch.fx.Graph) -> int:
    """Replace each ``x * 1`` (the 1 a Python number) by ``x`` where the product is ``x``'s shape, dtype and
    device, nothing writes ``x`` in place, and ``x`` is not a graph input the product would hand to the output
    (the caller's aliasing bookkeeping is done by then). Returns how many it removed."""
    returned: list[torch.fx.Node] = []
    for out in graph.find_nodes(op="output"):
        torch.fx.node.map_arg(out.args, returned.append)
    removed = 0
    for node in [n for target in _MULS for n in graph.find_nodes(op="call_function", target=target)]:
        if len(node.args) != 2 or node.kwargs:
            continue
        numbers = [i for i, a in enumerate(node.args) if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if len(numbers) != 1 or node.args[numbers[0]] != 1:
            continue
        source = node.args[1 - numbers[0]]
        if (not isinstance(source, torch.fx.Node) or not _same_value(node.meta.get("val"), source.meta.get("val"))
                or _written(source) or (source.op == "placeholder" and node in returned)):
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        removed += 1
    return removed


class DropMultiplicationsByOne(CustomGraphPass):
    """:func:`drop_multiplications_by_one` as inductor's custom joint-graph pass (its cache key: this file)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        drop_multiplications_by_one(graph)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))
