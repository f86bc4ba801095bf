"""A class of 300 waiting students, each with the queue socket open through nginx, all idle for
70 s, then one change: every socket is still connected and shows its new place.

Why 70 s: past nginx's default proxy_read_timeout (60 s, which would cut an idle proxied
socket; the configuration raises it for /ws/), past three of uvicorn's 20 s ping intervals,
and fourteen times redis-py's default 5 s read timeout (which, unset, crashes the channel
layer's reader of an idle subscription). Each of those has closed idle sockets in real
deployments; any one of them regressing fails this test.
"""

import asyncio
import json
import secrets
import time

import httpx
import pytest
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings

from comfyproxy.services import control, instances
from comfyproxy.services import queue as queue_service

SOCKETS = 300
IDLE_SECONDS = 70
FIRST_FAKE_PORT = 20000
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}

pytestmark = pytest.mark.django_db(transaction=True)


def waiting_class(gateway, make_student, teacher) -> list[tuple[str, str]]:
    """300 students with one waiting task each behind a paused queue: (task id, session) in order."""
    control.pause_queue(actor=teacher)
    waiting = []
    for number in range(SOCKETS):
        student = make_student(f"waiting{number:03d}")
        # Instances nobody connects to: the queue is paused, so no task is sent anywhere.
        instances.register_instance(user=student, port=FIRST_FAKE_PORT + number, host="127.0.0.1")
        task = queue_service.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})
        waiting.append((str(task.pk), gateway.login(student)))
    return waiting


async def open_socket(gateway, session: str):
    return await websockets.connect(
        gateway.site_origin.replace("http", "ws", 1) + "/ws/comfy_proxy/queue/",
        origin=gateway.site_origin,
        additional_headers={"Cookie": f"{django_settings.SESSION_COOKIE_NAME}={session}"},
        max_queue=None,
        open_timeout=30,
    )


async def own_state_becomes(connection, task_id: str, status: str, position: int) -> float:
    """Read frames until this socket shows its task so; returns when (time.monotonic())."""
    while True:
        frame = json.loads(await connection.recv())
        tasks = {task["task_id"]: (task["status"], task["position"]) for task in frame["tasks"]}
        if tasks.get(task_id) == (status, position):
            return time.monotonic()


@pytest.mark.slow
async def test_300_idle_queue_sockets_survive_70_seconds_and_all_get_the_next_change(
    nginx_gateway, make_student, teacher, dispatcher_process, settings, fault_report
):
    settings.COMFY_PORT_RANGE = (FIRST_FAKE_PORT, FIRST_FAKE_PORT + SOCKETS)
    waiting = await sync_to_async(waiting_class)(nginx_gateway, make_student, teacher)
    await sync_to_async(dispatcher_process)()

    connections = await asyncio.gather(*(open_socket(nginx_gateway, session) for _task, session in waiting))
    async with asyncio.timeout(60):
        await asyncio.gather(
            *(
                own_state_becomes(connection, task_id, "queued", place)
                for place, (connection, (task_id, _session)) in enumerate(
                    zip(connections, waiting, strict=True), 1
                )
            )
        )

    # The behaviour under test is what this much silence does to the sockets.
    await asyncio.sleep(IDLE_SECONDS)

    head_task, head_session = waiting[0]
    csrf = secrets.token_hex(16)
    async with httpx.AsyncClient(base_url=nginx_gateway.site_origin, timeout=30) as head_browser:
        head_browser.cookies.set(settings.SESSION_COOKIE_NAME, head_session)
        head_browser.cookies.set(settings.CSRF_COOKIE_NAME, csrf)
        changed_at = time.monotonic()
        response = await head_browser.post(
            f"/api/v1/comfy_proxy/cancel/{head_task}",
            headers={"Origin": nginx_gateway.site_origin, "X-CSRFToken": csrf},
        )
    assert response.status_code == 200, response.text

    expected = [("cancelled", 0)] + [("queued", place) for place in range(1, SOCKETS)]
    async with asyncio.timeout(30):
        updated_at = await asyncio.gather(
            *(
                own_state_becomes(connection, task_id, status, position)
                for connection, (task_id, _session), (status, position) in zip(
                    connections, waiting, expected, strict=True
                )
            )
        )
    await asyncio.gather(*(connection.close() for connection in connections))

    delays = sorted(moment - changed_at for moment in updated_at)
    fault_report.update(
        sockets=SOCKETS,
        idle_seconds=IDLE_SECONDS,
        updated=len(updated_at),
        update_p50_ms=round(delays[len(delays) // 2] * 1000),
        update_max_ms=round(delays[-1] * 1000),
    )
