"""Runs one prompt the way ComfyUI's PromptExecutor does, with the same events in the same order.

Per prompt (client_id set): execution_start, execution_cached, then per node progress_state(running),
executing, [executed], progress_state(finished), and execution_success / execution_error /
execution_interrupted. Without a client_id only progress_state and execution_interrupted go out, to
everyone. The worker (instance.py) then writes history, broadcasts status and sends `executing null`.
"""

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from .catalog import NodeCatalog
from .exceptions import full_type_name, traceback_lines
from .files import InstanceFiles
from .nodes import NodeBehavior, NodeContext, NodeResult, behavior_for
from .prompt_queue import QueueItem

SendEvent = Callable[[str, dict, object], None]


class InterruptProcessing(Exception):
    """Raised as a node starts after an interrupt request (ComfyUI's InterruptProcessingException)."""


class DependencyCycleError(Exception):
    """No pending node can run. Validation rejects cycles first, so only a defect could get here."""


@dataclass(frozen=True)
class CacheEntry:
    outputs: tuple
    # {"meta": ..., "output": ...} when the node showed something (output nodes), else None.
    ui: dict | None


@dataclass(frozen=True)
class ExecutionOutcome:
    success: bool
    messages: list
    history_result: dict


def is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
    )


def _node_inputs(node) -> dict:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _format_value(value):
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


class OutputCache:
    """Node outputs keyed by the node's signature: its class, its widget values and everything upstream.

    Like ComfyUI's default cache, entries live as long as the next prompt still has a node with the
    same signature, so an identical resubmission is served entirely from the cache.
    """

    def __init__(self):
        self._entries: dict[str, CacheEntry] = {}
        self._keys: dict[str, str] = {}

    def set_prompt(self, prompt: dict, is_changed: Callable[[str], object]) -> None:
        self._keys = _signatures(prompt, is_changed)
        wanted = set(self._keys.values())
        self._entries = {key: entry for key, entry in self._entries.items() if key in wanted}

    def get(self, node_id) -> CacheEntry | None:
        key = self._keys.get(node_id)
        return None if key is None else self._entries.get(key)

    def set(self, node_id: str, entry: CacheEntry) -> None:
        self._entries[self._keys[node_id]] = entry

    def clear(self) -> None:
        self._entries.clear()


def _signatures(prompt: dict, is_changed: Callable[[str], object]) -> dict[str, str]:
    signatures: dict[str, str] = {}

    def sign(node_id, visiting: set) -> str:
        if node_id in signatures:
            return signatures[node_id]
        if node_id not in prompt or node_id in visiting:
            return f"missing:{node_id!r}"  # a dangling or cyclic link in a node that never runs
        visiting.add(node_id)
        node = prompt[node_id]
        parts = [node.get("class_type"), repr(is_changed(node_id))]
        inputs = _node_inputs(node)
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value):
                parts.append([name, sign(value[0], visiting), value[1]])
            else:
                parts.append([name, json.dumps(value, sort_keys=True, default=str)])
        visiting.discard(node_id)
        signature = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
        signatures[node_id] = signature
        return signature

    for node_id in prompt:
        sign(node_id, set())
    return signatures


class ProgressRegistry:
    """Per-prompt node states, published whole as `progress_state` on every change."""

    def __init__(self, prompt_id: str, publish: Callable[[dict], None]):
        self.prompt_id = prompt_id
        self._publish = publish
        self._nodes: dict[str, dict] = {}

    def start(self, node_id: str) -> None:
        self._nodes[node_id] = {"state": "running", "value": 0.0, "max": 1.0}
        self._send()

    def finish(self, node_id: str) -> None:
        # A node finished from the cache was never started: its entry is created with integer 0..1.
        entry = self._nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})
        entry["state"] = "finished"
        entry["value"] = entry["max"]
        self._send()

    def _send(self) -> None:
        nodes = {
            node_id: {
                "value": entry["value"],
                "max": entry["max"],
                "state": entry["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, entry in self._nodes.items()
            if entry["state"] != "pending"
        }
        self._publish({"prompt_id": self.prompt_id, "nodes": nodes})


class ExecutionList:
    """ComfyUI's scheduler: nodes wait for their uncached inputs; of the ready ones, output nodes go first."""

    def __init__(self, prompt: dict, catalog: NodeCatalog, cache: OutputCache):
        self._prompt = prompt
        self._catalog = catalog
        self._cache = cache
        self.pending: dict[str, None] = {}
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, None]] = {}

    def add_node(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = None
            self._block_count[current] = 0
            self._blocking[current] = {}
            for value in _node_inputs(self._prompt[current]).values():
                if is_link(value):
                    if self._cache.get(value[0]) is None:
                        stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            if self._cache.get(source) is None:
                self.add_node(source)
                if target not in self._blocking[source]:
                    self._blocking[source][target] = None
                    self._block_count[target] += 1

    def next_node(self) -> str | None:
        """The node to run next, or None when nothing is ready (a dependency cycle)."""
        ready = [node_id for node_id in self.pending if self._block_count[node_id] == 0]
        if not ready:
            return None
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(blocked) for blocked in self._blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(
                self._is_output(after)
                for blocked in self._blocking[node_id]
                for after in self._blocking[blocked]
            ):
                return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for target in self._blocking.pop(node_id):
            self._block_count[target] -= 1

    def _is_output(self, node_id: str) -> bool:
        return self._catalog.classes[self._prompt[node_id]["class_type"]].output_node


class PromptExecutor:
    """Executes prompts one at a time for one instance; keeps the output cache between prompts."""

    def __init__(
        self, catalog: NodeCatalog, files: InstanceFiles, send: SendEvent, job_seconds: float | None
    ):
        self.catalog = catalog
        self.files = files
        self.send = send
        self.job_seconds = job_seconds
        self.cache = OutputCache()
        # ComfyUI keeps node objects per (node id, class) between prompts; PreviewImage's prefix lives there.
        self.node_state: dict[tuple[str, str], dict] = {}
        # Like ComfyUI's server.client_id: the owner of the prompt running now (kept after it ends).
        self.client_id = None
        # The node now executing, told to the owner when its socket reconnects.
        self.last_node_id: str | None = None
        self.interrupt_requested = False

    def reset(self) -> None:
        """Forget cached outputs and node objects (POST /free with free_memory)."""
        self.cache.clear()
        self.node_state.clear()

    async def execute(self, item: QueueItem) -> ExecutionOutcome:
        # An interrupt sent while idle must not stop this prompt, as in ComfyUI.
        self.interrupt_requested = False
        extra_data = item.extra_data if isinstance(item.extra_data, dict) else {}
        self.client_id = extra_data.get("client_id")
        # Node objects live on only for nodes the new prompt still has, with the same class.
        self.node_state = {
            key: state
            for key, state in self.node_state.items()
            if key[0] in item.prompt and item.prompt[key[0]]["class_type"] == key[1]
        }
        return await _PromptRun(self, item, extra_data.get("extra_pnginfo")).execute()


class _PromptRun:
    """The state of one prompt's execution: its status messages, executed nodes and shown outputs."""

    def __init__(self, executor: PromptExecutor, item: QueueItem, extra_pnginfo):
        self.executor = executor
        self.prompt_id = item.prompt_id
        self.prompt = item.prompt
        self.outputs_to_execute = item.outputs_to_execute
        self.extra_pnginfo = extra_pnginfo
        self.messages: list = []
        self.executed: list[str] = []
        self.ui_outputs: dict[str, dict] = {}
        self.progress = ProgressRegistry(self.prompt_id, self._publish_progress)
        # With --job-seconds the workflow's time is split evenly over the nodes that actually run.
        self.seconds_per_node: float | None = None

    @property
    def client_id(self):
        return self.executor.client_id

    def _publish_progress(self, data: dict) -> None:
        self.executor.send("progress_state", data, self.client_id)

    def _add_message(self, event: str, data: dict, broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.messages.append([event, data])
        if self.client_id is not None or broadcast:
            self.executor.send(event, data, self.client_id)

    async def execute(self) -> ExecutionOutcome:
        executor = self.executor
        self._add_message("execution_start", {"prompt_id": self.prompt_id}, broadcast=False)
        executor.cache.set_prompt(self.prompt, self._is_changed)
        cached_nodes = [node_id for node_id in self.prompt if executor.cache.get(node_id) is not None]
        self._add_message(
            "execution_cached", {"nodes": cached_nodes, "prompt_id": self.prompt_id}, broadcast=False
        )

        execution_list = ExecutionList(self.prompt, executor.catalog, executor.cache)
        for node_id in self.outputs_to_execute:
            execution_list.add_node(node_id)
        to_run = [node_id for node_id in execution_list.pending if executor.cache.get(node_id) is None]
        if executor.job_seconds is not None and to_run:
            self.seconds_per_node = executor.job_seconds / len(to_run)

        success = True
        while execution_list.pending:
            node_id = execution_list.next_node()
            if node_id is None:
                failed = next(iter(execution_list.pending))
                self._report_error(failed, DependencyCycleError("Dependency cycle detected"), {})
                success = False
                break
            if not await self._run_node(node_id):
                success = False
                break
            execution_list.complete(node_id)
        else:
            self._add_message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)

        executor.last_node_id = None
        history_result = {
            "outputs": {node_id: ui["output"] for node_id, ui in self.ui_outputs.items()},
            "meta": {node_id: ui["meta"] for node_id, ui in self.ui_outputs.items()},
        }
        return ExecutionOutcome(success=success, messages=self.messages, history_result=history_result)

    def _is_changed(self, node_id: str) -> object:
        node = self.prompt[node_id]
        behavior = behavior_for(self.executor.catalog.classes[node["class_type"]])
        if behavior.is_changed is None:
            return None
        return behavior.is_changed(self.executor.files, _node_inputs(node))

    async def _run_node(self, node_id: str) -> bool:
        """Run (or take from the cache) one node; False when it failed or was interrupted."""
        executor = self.executor
        cached = executor.cache.get(node_id)
        if cached is not None:
            if self.client_id is not None:
                output = cached.ui["output"] if cached.ui else None
                self._send_executed(node_id, output)
            if cached.ui is not None:
                self.ui_outputs[node_id] = cached.ui
            self.progress.finish(node_id)
            return True

        node = self.prompt[node_id]
        node_class = executor.catalog.classes[node["class_type"]]
        behavior = behavior_for(node_class)
        self.progress.start(node_id)
        arguments, hidden = self._input_data(node_id, node, node_class)
        if self.client_id is not None:
            executor.last_node_id = node_id
            executor.send(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id},
                self.client_id,
            )
        try:
            if executor.interrupt_requested:
                raise InterruptProcessing()
            result = await self._compute(node_id, node_class.name, behavior, arguments)
        except InterruptProcessing:
            self._report_interrupted(node_id)
            return False
        except Exception as exception:
            self._report_error(node_id, exception, {**arguments, **hidden})
            return False

        ui = None
        if result.ui:
            ui = {
                "meta": {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                },
                "output": result.ui,
            }
            self.ui_outputs[node_id] = ui
            if self.client_id is not None:
                self._send_executed(node_id, result.ui)
        executor.cache.set(node_id, CacheEntry(outputs=result.outputs, ui=ui))
        self.progress.finish(node_id)
        self.executed.append(node_id)
        return True

    async def _compute(
        self, node_id: str, class_type: str, behavior: NodeBehavior, arguments: dict
    ) -> NodeResult:
        context = NodeContext(
            node_id=node_id,
            prompt=self.prompt,
            extra_pnginfo=self.extra_pnginfo,
            files=self.executor.files,
            state=self.executor.node_state.setdefault((node_id, class_type), {}),
        )
        # Behaviours write files (a big PNG takes a while): off the event loop that serves every port.
        result = await asyncio.to_thread(behavior.run, context, **arguments)
        seconds = self.seconds_per_node
        if seconds is None:
            seconds = behavior.seconds(arguments, result)
        if seconds > 0:
            await asyncio.sleep(seconds)
        return result

    def _input_data(self, node_id: str, node: dict, node_class) -> tuple[dict, dict]:
        """(arguments for the node function, hidden inputs), as ComfyUI's get_input_data gathers them."""
        declared = {
            **node_class.input_types.get("required", {}),
            **node_class.input_types.get("optional", {}),
        }
        arguments = {}
        for name, value in _node_inputs(node).items():
            if isinstance(value, list):
                source = self.executor.cache.get(value[0]) if is_link(value) else None
                arguments[name] = source.outputs[value[1]] if source is not None else None
            elif name in declared:
                arguments[name] = value
        hidden = {}
        for name, kind in node_class.input_types.get("hidden", {}).items():
            if kind == "PROMPT":
                hidden[name] = self.prompt
            elif kind == "EXTRA_PNGINFO" and self.extra_pnginfo is not None:
                hidden[name] = self.extra_pnginfo
            elif kind == "UNIQUE_ID":
                hidden[name] = node_id
        return arguments, hidden

    def _send_executed(self, node_id: str, output) -> None:
        self.executor.send(
            "executed",
            {"node": node_id, "display_node": node_id, "output": output, "prompt_id": self.prompt_id},
            self.client_id,
        )

    def _report_interrupted(self, node_id: str) -> None:
        self._add_message(
            "execution_interrupted",
            {
                "prompt_id": self.prompt_id,
                "node_id": node_id,
                "node_type": self.prompt[node_id]["class_type"],
                "executed": list(self.executed),
            },
            broadcast=True,
        )

    def _report_error(self, node_id: str, exception: Exception, inputs: dict) -> None:
        self._add_message(
            "execution_error",
            {
                "prompt_id": self.prompt_id,
                "node_id": node_id,
                "node_type": self.prompt[node_id]["class_type"],
                "executed": list(self.executed),
                "exception_message": f"{exception}\n",
                "exception_type": full_type_name(exception),
                "traceback": traceback_lines(exception),
                "current_inputs": {name: [_format_value(value)] for name, value in inputs.items()},
                "current_outputs": list(self.prompt),
            },
            broadcast=False,
        )
