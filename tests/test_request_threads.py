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
    seen = []
    for _request in range(3):
        async with threads.context():
            seen.append(await sync_to_async(on_thread)())
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
    assert threads.idle_count == 2


async def test_with_every_kept_thread_busy_a_request_runs_on_a_thread_of_its_own():
    threads = RequestThreads(size=1)
    release = threading.Event()
    slow_started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_view() -> int:
        loop.call_soon_threadsafe(slow_started.set)
        release.wait(timeout=30)
        return threading.get_ident()

    async def slow_request() -> int:
        async with threads.context():
            return await sync_to_async(slow_view)()

    slow = asyncio.create_task(slow_request())
    await slow_started.wait()
    assert threads.idle_count == 0

    # The quick request is answered while the slow one still holds the only kept thread.
    async with threads.context():
        quick_thread = await sync_to_async(on_thread)()
    assert not slow.done()

    release.set()
    slow_thread = await slow
    assert quick_thread != slow_thread
    assert threads.idle_count == 1


async def test_a_thread_still_running_a_cancelled_request_is_not_lent_again():
    threads = RequestThreads(size=1)
    release = threading.Event()
    view_started = asyncio.Event()
    view_finished = threading.Event()
    loop = asyncio.get_running_loop()

    def view() -> None:
        loop.call_soon_threadsafe(view_started.set)
        release.wait(timeout=30)
        view_finished.set()

    async def request() -> int:
        async with threads.context():
            await sync_to_async(view)()

    async with threads.context():
        first_thread = await sync_to_async(on_thread)()

    cancelled = asyncio.create_task(request())
    await view_started.wait()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    # The next request does not queue behind the abandoned view.
    async with threads.context():
        next_thread = await sync_to_async(on_thread)()
    assert next_thread != first_thread
    assert not view_finished.is_set()
    assert threads.idle_count == 1

    release.set()
    assert await asyncio.to_thread(view_finished.wait, 30)


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
