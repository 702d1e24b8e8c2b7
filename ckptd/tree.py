"""The tree of a snapshot as JSON in the manifest, and how to rebuild it from loaded tensors.

Nodes: plain JSON values (int, float, str, bool, None) stand for themselves; containers and
tensors are tagged objects, so a user's dict can never be mistaken for a node:
``{"$dict": {...}}``, ``{"$list": [...]}``, ``{"$tuple": [...]}``,
``{"$tensor": [component, name]}``,
``{"$float": "nan"}`` (or ``inf``, ``-inf``),, ``{"$module": component, "keys": [...]}`` (a state dict),
``{"$optimizer": component, "state": node, "param_groups": node}`` (state keyed by parameter
name, as ``state.<param fqn>.exp_avg`` in the component's shards).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import JsonValue

TensorLookup = Callable[[str, str], Any]


class TreeError(ValueError):
    """A manifest tree that does not describe a snapshot."""


def decode(node: JsonValue, tensor: TensorLookup) -> Any:
    """Rebuild the value a node describes; ``tensor(component, name)`` supplies tensors."""
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, dict):
        if "$dict" in node and isinstance(node["$dict"], dict):
            return {k: decode(v, tensor) for k, v in node["$dict"].items()}
        if "$list" in node and isinstance(node["$list"], list):
            return [decode(v, tensor) for v in node["$list"]]
        if "$tuple" in node and isinstance(node["$tuple"], list):
            return tuple(decode(v, tensor) for v in node["$tuple"])
        if "$tensor" in node and isinstance(node["$tensor"], list) and len(node["$tensor"]) == 2:
            component, name = node["$tensor"]
            return tensor(str(component), str(name))
        if "$module" in node and isinstance(node.get("keys"), list):
            component = str(node["$module"])
            return {str(k): tensor(component, str(k)) for k in node["keys"]}  # type: ignore[union-attr]
        if "$float" in node and node["$float"] in ("nan", "inf", "-inf"):
            return float(str(node["$float"]))
        if "$optimizer" in node:
            return {
                "state": decode(node.get("state"), tensor),
                "param_groups": decode(node.get("param_groups"), tensor),
            }
    raise TreeError(f"unknown tree node {str(node)[:200]}")


def top_level(tree: JsonValue) -> Mapping[str, JsonValue]:
    if isinstance(tree, dict) and isinstance(tree.get("$dict"), dict):
        return tree["$dict"]  # type: ignore[return-value]
    raise TreeError("manifest tree must be a {'$dict': ...} at the top level")
