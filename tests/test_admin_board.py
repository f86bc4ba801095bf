"""The live board follows the teacher stream: a task queued, started and finished shows up in the
frames a teacher's socket receives (tests/e2e/test_admin_board_live.py watches the page itself)."""

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import broadcast, control, queue
from teaching.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_password_hashing")]

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}
PORT = 8189


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


@pytest.fixture
def student_with_instance(student, register_instance):
    register_instance(student, PORT)
    return student


def submit(student) -> Task:
    return queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})


def start(task: Task) -> None:
    """What the dispatcher records once ComfyUI accepted the task."""
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=now, submitted_at=now)


def finish(task: Task) -> None:
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())


async def teacher_socket(teacher) -> tuple[WebsocketCommunicator, dict]:
    cookie = await sync_to_async(session_cookie)(teacher)
    communicator = WebsocketCommunicator(
        application,
        "/ws/comfy_proxy/queue/",
        headers=[
            (b"origin", settings.SITE_ORIGIN.encode()),
            (b"host", b"127.0.0.1:8080"),
            (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()),
        ],
    )
    accepted, _ = await communicator.connect()
    assert accepted
    return communicator, await communicator.receive_json_from(timeout=5)


async def next_board(communicator) -> dict:
    await broadcast.broadcast_queue_snapshot()
    return await communicator.receive_json_from(timeout=5)


def task_ids(tasks: list[dict]) -> list[str]:
    return [task["task_id"] for task in tasks]


async def test_the_board_follows_a_task_from_queued_to_finished(teacher, student_with_instance):
    communicator, frame = await teacher_socket(teacher)
    assert frame["board"]["waiting"] == frame["board"]["running"] == []

    task = await sync_to_async(submit)(student_with_instance)
    frame = await next_board(communicator)
    (waiting,) = frame["board"]["waiting"]
    assert (waiting["task_id"], waiting["username"], waiting["position"]) == (str(task.id), "alice", 1)
    assert frame["queue"]["queue_length"] == 1

    await sync_to_async(start)(task)
    frame = await next_board(communicator)
    assert frame["board"]["waiting"] == []
    (running,) = frame["board"]["running"]
    assert (running["task_id"], running["port"]) == (str(task.id), PORT)
    assert running["started_at"] is not None
    assert frame["queue"]["available_slots"] == frame["queue"]["max_concurrent"] - 1

    await sync_to_async(finish)(task)
    frame = await next_board(communicator)
    assert frame["board"]["running"] == []
    assert [(t["task_id"], t["status"]) for t in frame["board"]["finished"]] == [(str(task.id), "completed")]
    await communicator.disconnect()


async def test_what_teachers_do_shows_on_every_board(
    teacher, student_with_instance, other_student, register_instance
):
    await sync_to_async(register_instance)(other_student, PORT + 1)
    first = await sync_to_async(submit)(student_with_instance)
    second = await sync_to_async(submit)(other_student)
    communicator, frame = await teacher_socket(teacher)
    assert task_ids(frame["board"]["waiting"]) == [str(first.id), str(second.id)]

    await sync_to_async(control.move_to_front)(actor=teacher, tasks=[second])
    assert task_ids((await next_board(communicator))["board"]["waiting"]) == [str(second.id), str(first.id)]

    await sync_to_async(control.pause_queue)(actor=teacher)
    assert (await next_board(communicator))["queue"]["paused"] is True

    await sync_to_async(control.cancel_tasks)(actor=teacher, tasks=[first])
    frame = await next_board(communicator)
    assert task_ids(frame["board"]["waiting"]) == [str(second.id)]
    assert frame["board"]["finished"][0]["reason"] == "cancelled_by_teacher"
    await communicator.disconnect()
