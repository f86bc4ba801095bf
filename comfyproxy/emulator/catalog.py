"""The node classes the emulated server knows, read once from the recorded `/object_info`."""

import json
from dataclasses import dataclass

from .data import load_object_info


@dataclass(frozen=True)
class NodeClass:
    """What ComfyUI's validator and scheduler read from a node class."""

    name: str
    # {"required": {name: spec}, "optional": {...}, "hidden": {...}}; spec is [type] or [type, options].
    input_types: dict
    return_types: tuple
    output_node: bool

    def input_spec(self, input_name: str) -> tuple[object, str | None, dict | None]:
        """(type, category, options) of an input, as ComfyUI's `get_input_info`; all None if unknown."""
        for category in ("required", "optional"):
            spec = self.input_types.get(category, {}).get(input_name)
            if spec is not None:
                return spec[0], category, (spec[1] if len(spec) > 1 else {})
        return None, None, None


class NodeCatalog:
    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.classes = {
            name: NodeClass(
                name=name,
                input_types=info.get("input", {}),
                return_types=tuple(info.get("output", ())),
                output_node=bool(info.get("output_node")),
            )
            for name, info in object_info.items()
        }
        # GET /object_info is half a megabyte: serialize it once, not per request.
        self.object_info_body = json.dumps(object_info).encode()

    @classmethod
    def load(cls) -> "NodeCatalog":
        return cls(load_object_info())

    def get(self, class_type) -> NodeClass | None:
        return self.classes.get(class_type)
