"""ComfyUI's PromptQueue: pending prompts in a heap ordered by `number`, the running one, and the history."""

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import NamedTuple

MAXIMUM_HISTORY_SIZE = 10000
# Removed from extra_data when a prompt enters the history (they stay visible in /queue).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class QueueItem(NamedTuple):
    """The 5-tuple ComfyUI shows in /queue and in history entries."""

    number: int | float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs_to_execute: list[str]


class PromptQueue:
    def __init__(self, on_change: Callable[[], None]):
        """`on_change` runs when the number of remaining prompts may have changed (to broadcast status)."""
        # Entries are (number, prompt_id, arrival, item): ComfyUI's heap order, which falls back to the
        # prompt_id on equal numbers; arrival keeps the heap from comparing the items themselves.
        self._heap: list[tuple] = []
        self._arrivals = itertools.count()
        self._task_ids = itertools.count()
        self._not_empty = asyncio.Event()
        self._on_change = on_change
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict] = {}

    def put(self, item: QueueItem) -> bool:
        """Queue a prompt. False when ComfyUI's own heap push would have failed, see below."""
        # ComfyUI's heap holds the bare tuples: a second pending item with the same number and prompt_id
        # makes heappush compare the prompt dicts, which raises TypeError after the item is already in
        # the heap, so it runs but no status is broadcast.
        clash = any(entry[0] == item.number and entry[1] == item.prompt_id for entry in self._heap)
        heapq.heappush(self._heap, (item.number, item.prompt_id, next(self._arrivals), item))
        self._not_empty.set()
        if clash:
            return False
        self._on_change()
        return True

    async def get(self) -> tuple[QueueItem, int]:
        """Wait for the first pending prompt and mark it running; returns it with its task id."""
        while not self._heap:
            self._not_empty.clear()
            await self._not_empty.wait()
        item = heapq.heappop(self._heap)[3]
        task_id = next(self._task_ids)
        self.running[task_id] = item
        self._on_change()
        return item, task_id

    def task_done(self, task_id: int, history_result: dict, status: dict) -> None:
        item = self.running.pop(task_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        extra_data = item.extra_data
        if isinstance(extra_data, dict):
            extra_data = {
                key: value for key, value in extra_data.items() if key not in SENSITIVE_EXTRA_DATA_KEYS
            }
        # Reusing a prompt_id overwrites the old entry in place, as a dict assignment does in ComfyUI.
        self.history[item.prompt_id] = {
            "prompt": [item.number, item.prompt_id, item.prompt, extra_data, item.outputs_to_execute],
            "outputs": {},
            "status": status,
            **history_result,
        }
        self._on_change()

    def tasks_remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def queue_snapshot(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """(running, pending); pending in heap order, not sorted, as ComfyUI returns it."""
        return list(self.running.values()), [entry[3] for entry in self._heap]

    def wipe_queue(self) -> None:
        self._heap = []
        self._on_change()

    def delete_queue_item(self, prompt_id: str) -> bool:
        """Remove the first pending item with this id (a running prompt is not pending, so it stays)."""
        for index, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                self._on_change()
                return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict:
        if prompt_id is not None:
            return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        selected = {}
        for index, key in enumerate(self.history):
            if index >= offset:
                selected[key] = self.history[key]
                if max_items is not None and len(selected) >= max_items:
                    break
        return selected

    def wipe_history(self) -> None:
        self.history.clear()

    def delete_history_item(self, prompt_id) -> None:
        self.history.pop(prompt_id, None)
