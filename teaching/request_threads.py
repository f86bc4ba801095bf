"""Threads kept from one request to the next, each with its own database connection.

Django's ASGI handler gives every request a thread of its own (asgiref's
ThreadSensitiveContext) and starts another to join it afterwards; the thread's database
connection dies with it, so each request also opens one. Keeping the threads cut a web
worker's CPU per submission by about a fifth (bench/README.md, queue_bench), and a burst no
longer piles up threads fighting over the interpreter lock. Here a request borrows one of a fixed set
of threads, which keeps its connection (CONN_MAX_AGE) between requests, as a WSGI
server's threads do; requests beyond the set wait their turn, first come first served.

A request that has held its thread for SLOW_SECONDS (a student starting ComfyUI waits
tens of seconds for it to answer, a teacher starting a class longer) gives up its place
in the set: a new thread takes it, so slow requests never hold the quick ones back.
"""

import asyncio
import collections
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext

# Far beyond a submission (milliseconds), well below starting ComfyUI (seconds).
SLOW_SECONDS = 1.0


class RequestThread(ThreadPoolExecutor):
    """One worker thread that counts the calls not yet finished on it."""

    def __init__(self, name: str):
        super().__init__(max_workers=1, thread_name_prefix=name)
        self._unfinished = 0
        self._count_lock = threading.Lock()
        # Set while lent: when, and whether a new thread has taken its place in the set.
        self.lent_at = 0.0
        self.replaced = False

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
    """A set of `size` threads, each lent to one request at a time, on one event loop."""

    def __init__(self, size: int, name: str = "request", slow_seconds: float = SLOW_SECONDS):
        self.slow_seconds = slow_seconds
        self._name = name
        self._made = 0
        # Threads start when first used; the most recently used is lent first, so a
        # quiet server keeps using one warm thread and connection.
        self._idle = [self._new_thread() for _ in range(size)]
        self._lent: set[RequestThread] = set()
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @contextlib.asynccontextmanager
    async def context(self):
        """Run the block's thread-sensitive calls (Django's) on a borrowed thread."""
        thread = await self._borrow()
        try:
            async with ThreadSensitiveContext(executor=thread):
                yield
        finally:
            self._give_back(thread)

    async def _borrow(self) -> RequestThread:
        if self._idle and not self._waiting:
            return self._lend(self._idle.pop())
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            while True:
                self._replace_slow_threads()
                if waiter.done():
                    return waiter.result()
                oldest = min((thread.lent_at for thread in self._lent if not thread.replaced), default=None)
                timeout = None if oldest is None else max(oldest + self.slow_seconds - time.monotonic(), 0)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed a thread just as this request was cancelled: pass it on.
                self._give_back(waiter.result())
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)
            raise

    def _replace_slow_threads(self) -> None:
        now = time.monotonic()
        for thread in list(self._lent):
            if not thread.replaced and now - thread.lent_at >= self.slow_seconds:
                thread.replaced = True
                self._hand_on(self._new_thread())

    def _give_back(self, thread: RequestThread) -> None:
        self._lent.discard(thread)
        if thread.replaced or not thread.idle:
            # Its place went to another thread; or the request was cancelled (the client
            # went away) while its view still runs there: let that finish, then end.
            thread.shutdown(wait=False)
            if not thread.replaced:
                self._hand_on(self._new_thread())
            return
        self._hand_on(thread)

    def _hand_on(self, thread: RequestThread) -> None:
        """To the request that has waited longest, or back to the idle ones."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(self._lend(thread))
                return
        self._idle.append(thread)

    def _lend(self, thread: RequestThread) -> RequestThread:
        thread.lent_at = time.monotonic()
        self._lent.add(thread)
        return thread

    def _new_thread(self) -> RequestThread:
        self._made += 1
        return RequestThread(f"{self._name}-{self._made}")
