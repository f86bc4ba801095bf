"""An emulator of ComfyUI 0.3.64's HTTP + WebSocket server, standing in for the school's GPU servers.

One process serves many ports, with one independent ComfyUI instance per port. It behaves like the
recordings of the real server: same routes (each also under /api), same replies and content types,
same validation errors, same WebSocket events in the same order, same queue, interrupt, cache and
history semantics, and the official frontend at `/`. It imports nothing from the Django project.

Start it with `python -m comfyproxy.emulator --ports 8189-8198` (or `manage.py comfy_emulator`).
It prints `ComfyUI emulator listening on http://HOST:PORT` per port, then `ComfyUI emulator ready: ...`.

Modules: config (options), data (recorded files), catalog (object_info), validation, nodes (what nodes
compute and how long they take), executor (one prompt), prompt_queue, sockets, instance (one ComfyUI),
server (its HTTP routes), stats, supervisor (ports, faults, process).

Test instrumentation, on every port (never under /api, never subject to faults):
- `GET /emulator/stats` → `{"max_running_seen", "running", "submissions": {prompt_id: n},
  "executions": {prompt_id: n}, "ports": {port: {"mode", "held_requests", "running", "pending",
  "history"}}}`, over all ports. A prompt is running from the start of its execution until its history
  entry is written; `held_requests` counts requests held by `hang`.
- `POST /emulator/reset` clears the counters.
- `GET /emulator/faults` → `{port: mode}`; `POST /emulator/faults {"port": P, "mode": M}` sets a mode
  and answers once it is in effect:
  - `normal`: behaves like ComfyUI.
  - `fail`: every HTTP request on P (WebSocket handshakes too) answers 500.
  - `hang`: requests on P are accepted and never answered, until the mode changes.
  - `refuse`: P stops listening (connection refused); a request on a connection kept alive from
    before is dropped unanswered. The instance keeps its state and its open WebSockets; `normal`
    listens again.
  - `die`: the instance crashes like a killed process: running prompt abandoned without history, queue
    lost, every connection dropped, port closed. Any other mode brings up a fresh, empty instance
    (after --startup-seconds), with the files it wrote still on disk.
"""

from .config import EmulatorConfig, FaultMode, parse_port_spec
from .data import load_workflow, workflow_names
from .supervisor import run

__all__ = ["EmulatorConfig", "FaultMode", "load_workflow", "parse_port_spec", "run", "workflow_names"]
