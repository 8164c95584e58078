"""Deterministic names tying ONNX nodes and initializers to PyTorch module names.

The TorchScript exporter names each node after the module scope that emitted it ("/lm/model/layers.0/mlp/
down_proj/MatMul" for the wrapper attribute `lm`), so a module name and its nodes convert both ways.
Anything else a node is named after (Q/DQ we insert) follows the same scheme.
"""

from __future__ import annotations

SCOPE = "lm"


def scope_of(module: str) -> str:
    # A ModuleList is not a scope of its own: its items appear as "layers.0", so an index stays dotted.
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return f"/{SCOPE}/" + "/".join(parts)


def matmul_node_name(module: str) -> str:
    return f"{scope_of(module)}/MatMul"


def module_of_node(node_name: str) -> str:
    """'/lm/model/layers.0/mlp/down_proj/MatMul' -> 'model.layers.0.mlp.down_proj' ('' outside any module)."""
    prefix = f"/{SCOPE}/"
    if not node_name.startswith(prefix):
        return ""
    return node_name[len(prefix):].rpartition("/")[0].replace("/", ".")
