"""The queue socket on a real uvicorn with the real Redis layer, held idle like a waiting class.

redis-py 8 reads with a 5 s timeout by default: a consumer that waits longer than that for
a message crashes and its WebSocket closes. Students wait in the queue far longer, so the
sockets here sit idle past it before the queue changes.
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from comfyproxy.services import broadcast, queue
from tests.processes import free_port, stop_process, wait_for_port

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}
STUDENTS = 10
SOCKETS_PER_STUDENT = 20
# Longer than redis-py 8's default socket read timeout (5 s).
IDLE_SECONDS = 6


@pytest.fixture
def web_server(transactional_db, tmp_path):
    """uvicorn serving teaching.asgi on a free port, sharing the test database and Redis."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}",
        "SITE_ORIGIN": "http://127.0.0.1:8080",
    }
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "teaching.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30, process=process)
        yield f"ws://127.0.0.1:{port}"
    finally:
        stop_process(process)
        log.close()


@pytest.fixture
def waiting_class(register_instance, queue_settings):
    """Students each with one waiting task behind a cap of 1, and each one's session cookie."""
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    students = []
    for number in range(STUDENTS):
        student = get_user_model().objects.create_user(username=f"waiting{number}")
        register_instance(student, 8189 + number)
        task = queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW}, port=8189 + number)
        client = Client()
        client.force_login(student)
        students.append((student, task, client.cookies[settings.SESSION_COOKIE_NAME].value))
    return students


async def open_socket(base_url: str, session: str):
    return await websockets.connect(
        f"{base_url}/ws/comfy_proxy/queue/",
        origin=settings.SITE_ORIGIN,
        additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"},
        max_queue=None,
    )


async def own_tasks(connection) -> list[tuple[str, int]]:
    frame = json.loads(await asyncio.wait_for(connection.recv(), timeout=15))
    return [(task["status"], task["position"]) for task in frame["tasks"]]


async def test_idle_sockets_still_receive_the_next_change(web_server, waiting_class):
    connections = await asyncio.gather(
        *(
            open_socket(web_server, session)
            for _student, _task, session in waiting_class
            for _copy in range(SOCKETS_PER_STUDENT)
        )
    )
    initial = await asyncio.gather(*(own_tasks(connection) for connection in connections))
    assert initial == [
        [("queued", number + 1)] for number in range(STUDENTS) for _copy in range(SOCKETS_PER_STUDENT)
    ]

    # The behaviour under test is what happens after this much silence.
    await asyncio.sleep(IDLE_SECONDS)

    head_student, head_task, _session = waiting_class[0]
    await sync_to_async(queue.cancel_task)(actor=head_student, task=head_task)
    await broadcast.broadcast_queue_snapshot()

    updated = await asyncio.gather(*(own_tasks(connection) for connection in connections))
    assert updated == [[("cancelled", 0)]] * SOCKETS_PER_STUDENT + [
        [("queued", number)] for number in range(1, STUDENTS) for _copy in range(SOCKETS_PER_STUDENT)
    ]
    await asyncio.gather(*(connection.close() for connection in connections))
