"""Files recorded from a real ComfyUI 0.3.64 server, shipped with the emulator.

- `object_info.json`: the node list (478 nodes) the emulator validates prompts against.
- `frontend-load/*.body`: replies the official frontend fetched on page load, served verbatim.
- `workflows/*.json`: API-format workflows verified on the real server; tests and benchmarks load them here.
"""

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
WORKFLOWS_DIR = DATA_DIR / "workflows"
RECORDED_BODIES_DIR = DATA_DIR / "frontend-load"


def workflow_names() -> list[str]:
    return sorted(path.stem for path in WORKFLOWS_DIR.glob("*.json"))


def load_workflow(name: str) -> dict:
    """A fresh copy of a recorded workflow, e.g. `load_workflow("basic_invert")`."""
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())


def recorded_body(name: str) -> bytes:
    """A reply body as the real server sent it, e.g. `recorded_body("api_features")`."""
    return (RECORDED_BODIES_DIR / f"{name}.body").read_bytes()


def load_object_info() -> dict:
    return json.loads((DATA_DIR / "object_info.json").read_text())
