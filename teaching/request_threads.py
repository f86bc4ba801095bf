"""Threads kept from one request to the next, each with its own database connection.

Django's ASGI handler gives every request a thread of its own (asgiref's
ThreadSensitiveContext) and starts another to join it afterwards; the thread's database
connection dies with it, so each request also opens one. During a class's burst of
submissions that was a fifth of a web worker's CPU. A request here borrows an idle thread
from a fixed set instead, and the thread keeps its connection (CONN_MAX_AGE) between
requests, as a WSGI server's threads do.

When every kept thread is busy (students starting ComfyUI wait tens of seconds for it
to answer), a request gets a thread of its own as before, so slow requests never hold
the quick ones back.
"""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext


class RequestThread(ThreadPoolExecutor):
    """One worker thread that counts the calls not yet finished on it."""

    def __init__(self, name: str):
        super().__init__(max_workers=1, thread_name_prefix=name)
        self._unfinished = 0
        self._count_lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs):
        with self._count_lock:
            self._unfinished += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future) -> None:
        with self._count_lock:
            self._unfinished -= 1

    @property
    def idle(self) -> bool:
        return self._unfinished == 0


class RequestThreads:
    """A fixed set of request threads, lent to one request at a time on one event loop."""

    def __init__(self, size: int, name: str = "request"):
        self.size = size
        self._name = name
        self._idle = [RequestThread(f"{name}-{index}") for index in range(size)]
        self._made = size

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @contextlib.asynccontextmanager
    async def context(self):
        """Run the block's thread-sensitive calls on a kept thread, or on a new one if none is idle."""
        if not self._idle:
            async with ThreadSensitiveContext():
                yield
            return
        thread = self._idle.pop()
        try:
            async with ThreadSensitiveContext(executor=thread):
                yield
        finally:
            self._give_back(thread)

    def _give_back(self, thread: RequestThread) -> None:
        if thread.idle:
            self._idle.append(thread)
            return
        # The request was cancelled (the client went away) while its view still runs on
        # the thread: let that finish there, and lend a fresh thread from now on.
        thread.shutdown(wait=False)
        self._made += 1
        self._idle.append(RequestThread(f"{self._name}-{self._made}"))
