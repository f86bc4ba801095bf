"""One emulated ComfyUI server: its queue, worker, history, sockets, settings and files (no HTTP here)."""

import asyncio
import datetime
import json
import logging
import time
import uuid
from collections import deque

from .catalog import NodeCatalog
from .data import recorded_body
from .executor import ExecutionOutcome, PromptExecutor
from .files import InstanceFiles
from .nodes import custom_validations
from .prompt_queue import PromptQueue, QueueItem
from .sockets import SocketHub
from .stats import EmulatorStats
from .validation import PromptValidator

# ComfyUI keeps this many log lines for /internal/logs.
_LOG_LINES_KEPT = 300


class ComfyInstance:
    def __init__(
        self,
        port: int,
        catalog: NodeCatalog,
        files: InstanceFiles,
        stats: EmulatorStats,
        job_seconds: float | None,
    ):
        self.port = port
        self.catalog = catalog
        self.files = files
        self.stats = stats
        self.hub = SocketHub()
        self.queue = PromptQueue(on_change=self.broadcast_status)
        self.executor = PromptExecutor(catalog, files, self.hub.send, job_seconds)
        self.validator = PromptValidator(catalog, custom_validations(files))
        # The server-side counter that numbers prompts submitted without an explicit `number`.
        self.number = 0
        self.settings: dict = json.loads(recorded_body("api_settings"))
        self.logs: deque[dict] = deque(maxlen=_LOG_LINES_KEPT)
        self._logger = logging.getLogger(__name__)
        self._free_memory_requested = False
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self.files.prepare()
        self.hub.start()
        self._worker = asyncio.create_task(self._work())

    def stop(self) -> None:
        """Stop at once, like a killed process: the running prompt is abandoned and gets no history."""
        if self._worker is not None:
            self._worker.cancel()
        self.hub.stop()
        self.stats.finished(self.port)

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.logs.append({"t": datetime.datetime.now().isoformat(), "m": message + "\n"})
        self._logger.log(level, "[%s] %s", self.port, message)

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}

    def broadcast_status(self) -> None:
        self.hub.send("status", {"status": self.queue_info()})

    def submit(self, body) -> tuple[int, dict]:
        """POST /prompt with a parsed JSON body → (HTTP status, reply).

        Written like ComfyUI's handler, so bodies it chokes on raise the same Python errors (answered 500),
        and the counter moves for every JSON body that gets past `"number" in body`.
        """
        if "number" in body:
            number = float(body["number"])
        else:
            number = self.number
            # `in`, not .get(), as in ComfyUI: a JSON list body gets past here (and fails as no_prompt).
            if "front" in body and body["front"]:  # noqa: RUF019
                number = -number
            self.number += 1

        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": error, "node_errors": {}}

        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        result = self.validator.validate(prompt, body.get("partial_execution_targets"))
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            self.log(f"invalid prompt: {result.error}", logging.WARNING)
            return 400, {"error": result.error, "node_errors": result.node_errors}

        self.stats.submitted(prompt_id)
        if not self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, result.outputs)):
            raise TypeError("'<' not supported between instances of 'dict' and 'dict'")
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}

    def interrupt(self, prompt_id=None) -> None:
        """Stop the running prompt at its next node; with a prompt_id, only if that one is running."""
        if prompt_id:
            if any(item.prompt_id == prompt_id for item in self.queue.running.values()):
                self.log(f"Interrupting prompt {prompt_id}")
                self.executor.interrupt_requested = True
            else:
                self.log(f"Prompt {prompt_id} is not currently running, skipping interrupt")
        else:
            self.log("Global interrupt (no prompt_id specified)")
            self.executor.interrupt_requested = True

    def free(self, free_memory: bool) -> None:
        """POST /free: the worker drops its caches after the current prompt (models: there are none)."""
        if free_memory:
            self._free_memory_requested = True
        if not self.queue.running:
            self._free_memory_if_requested()

    def _free_memory_if_requested(self) -> None:
        if self._free_memory_requested:
            self._free_memory_requested = False
            self.executor.reset()

    async def _work(self) -> None:
        while True:
            item, task_id = await self.queue.get()
            started = time.perf_counter()
            self.stats.started(self.port, item.prompt_id)
            try:
                outcome = await self._execute(item)
                status = {
                    "status_str": "success" if outcome.success else "error",
                    "completed": outcome.success,
                    "messages": outcome.messages,
                }
                self.queue.task_done(task_id, outcome.history_result, status)
            finally:
                self.stats.finished(self.port)
            # The terminal event: by now the history entry exists.
            if self.executor.client_id is not None:
                self.hub.send(
                    "executing", {"node": None, "prompt_id": item.prompt_id}, self.executor.client_id
                )
            self.log(f"Prompt executed in {time.perf_counter() - started:.2f} seconds")
            self._free_memory_if_requested()

    async def _execute(self, item: QueueItem) -> ExecutionOutcome:
        try:
            return await self.executor.execute(item)
        except Exception:
            # A defect of the emulator must not wedge the queue: the prompt fails, the worker goes on.
            self._logger.exception("[%s] emulator failure while executing %s", self.port, item.prompt_id)
            return ExecutionOutcome(success=False, messages=[], history_result={"outputs": {}, "meta": {}})
