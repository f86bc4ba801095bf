"""Web requests run on threads kept between requests, each keeping its database connection."""

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.conf import settings
from django.core.signals import request_started
from django.db.backends.signals import connection_created

from teaching.asgi import django_asgi_app
from teaching.request_threads import RequestThreads


def on_thread() -> int:
    return threading.get_ident()


async def test_a_kept_thread_serves_one_request_after_another():
    threads = RequestThreads(size=2)
    seen = [await request(threads) for _request in range(3)]
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
    assert threads.idle_count == 2


class BlockedView:
    """A view that holds its request's thread until released."""

    def __init__(self):
        self.release = threading.Event()
        self.started = asyncio.Event()
        self.finished = threading.Event()
        self._loop = asyncio.get_running_loop()

    def __call__(self) -> int:
        self._loop.call_soon_threadsafe(self.started.set)
        self.release.wait(timeout=30)
        self.finished.set()
        return threading.get_ident()


async def request(threads: RequestThreads, view=on_thread):
    async with threads.context():
        return await sync_to_async(view)()


async def test_requests_beyond_the_set_wait_their_turn_in_order_on_its_threads():
    threads = RequestThreads(size=1, slow_seconds=30)
    blocked = BlockedView()
    first = asyncio.create_task(request(threads, blocked))
    await blocked.started.wait()

    served = []

    async def queued(number: int):
        served.append((number, await request(threads)))

    waiting = []
    for number in range(3):
        waiting.append(asyncio.create_task(queued(number)))
        await asyncio.sleep(0)  # each is waiting before the next arrives
    assert not any(task.done() for task in waiting)

    blocked.release.set()
    kept_thread = await first
    await asyncio.gather(*waiting)
    assert served == [(0, kept_thread), (1, kept_thread), (2, kept_thread)]
    assert threads.idle_count == 1


async def test_a_slow_request_gives_its_place_to_a_new_thread():
    threads = RequestThreads(size=1, slow_seconds=0.05)
    slow = BlockedView()
    slow_request = asyncio.create_task(request(threads, slow))
    await slow.started.wait()

    # Answered while the slow request still holds the set's only thread.
    quick_thread = await request(threads)
    assert not slow_request.done()

    slow.release.set()
    slow_thread = await slow_request
    assert quick_thread != slow_thread
    # The slow request's thread ended with it; its place is the new thread's.
    assert threads.idle_count == 1
    assert await request(threads) == quick_thread


async def test_a_request_cancelled_while_waiting_takes_no_thread():
    threads = RequestThreads(size=1, slow_seconds=30)
    blocked = BlockedView()
    first = asyncio.create_task(request(threads, blocked))
    await blocked.started.wait()
    gave_up = asyncio.create_task(request(threads))
    await asyncio.sleep(0)
    gave_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gave_up

    blocked.release.set()
    kept_thread = await first
    assert threads.idle_count == 1
    assert await request(threads) == kept_thread


async def test_a_thread_still_running_a_cancelled_request_is_not_lent_again():
    threads = RequestThreads(size=1, slow_seconds=30)
    first_thread = await request(threads)
    abandoned = BlockedView()
    cancelled = asyncio.create_task(request(threads, abandoned))
    await abandoned.started.wait()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    # The next request does not queue behind the abandoned view.
    next_thread = await request(threads)
    assert next_thread != first_thread
    assert not abandoned.finished.is_set()
    assert threads.idle_count == 1

    abandoned.release.set()
    assert await asyncio.to_thread(abandoned.finished.wait, 30)


@pytest.mark.django_db(transaction=True)
async def test_requests_through_the_asgi_handler_reuse_one_thread_and_its_connection(student, client_for):
    assert settings.DATABASES["default"]["ENGINE"] == "teaching.sqlite"
    session_cookie = (await sync_to_async(client_for)(student)).cookies[settings.SESSION_COOKIE_NAME].value
    request_threads, connections_opened = [], []

    def record_request(**_kwargs):
        request_threads.append(threading.get_ident())

    def record_connection(connection, **_kwargs):
        connections_opened.append(threading.get_ident())

    request_started.connect(record_request)
    connection_created.connect(record_connection)
    try:
        for _request in range(3):
            communicator = HttpCommunicator(
                django_asgi_app,
                "GET",
                "/api/v1/comfy_proxy/queue/status",
                headers=[
                    (b"host", b"127.0.0.1"),
                    (b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_cookie}".encode()),
                ],
            )
            response = await communicator.get_response()
            assert response["status"] == 200, response["body"]
    finally:
        request_started.disconnect(record_request)
        connection_created.disconnect(record_connection)

    assert len(request_threads) == 3
    assert len(set(request_threads)) == 1
    # The session, the user and the queue were read three times over one connection.
    assert connections_opened == request_threads[:1]
