"""The queue WebSocket through the project's ASGI stack (session auth, origin checks, Redis layer)."""

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing.websocket import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from comfyproxy.channel_layer import SharedDecodePubSubChannelLayer, start_eagerly
from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import broadcast, queue
from teaching.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}
QUEUE_PATH = "/ws/comfy_proxy/queue/"
BASE_PORT = 8189


def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode()


def socket(cookie: bytes | None = None, origin: str = settings.SITE_ORIGIN) -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1:8080")]
    if cookie is not None:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, QUEUE_PATH, headers=headers)


async def connected(cookie: bytes) -> tuple[WebsocketCommunicator, dict]:
    communicator = socket(cookie)
    accepted, _ = await communicator.connect()
    assert accepted
    return communicator, await communicator.receive_json_from()


@pytest.fixture
def cap_one(queue_settings):
    queue_settings.max_concurrent_override = 1
    queue_settings.save()


@pytest.fixture
def submit(register_instance):
    """Queue one workflow for a student (registering their instance on first use)."""
    ports = {}

    def submit_for(user) -> Task:
        if user.pk not in ports:
            ports[user.pk] = BASE_PORT + len(ports)
            register_instance(user, ports[user.pk])
        return queue.submit_task(actor=user, owner=user, body={"prompt": WORKFLOW}, port=ports[user.pk])

    return submit_for


def start_running(task: Task) -> None:
    """What the dispatcher records once ComfyUI accepted the task."""
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=now, submitted_at=now)


def by_id(tasks: list[dict]) -> dict[str, dict]:
    return {task["task_id"]: task for task in tasks}


async def test_anonymous_socket_is_refused():
    communicator = socket()
    accepted, _ = await communicator.connect()
    assert not accepted


def end_sessions_by_logout(user) -> None:
    from django.contrib.sessions.models import Session

    for session in Session.objects.all():
        if session.get_decoded().get("_auth_user_id") == str(user.pk):
            session.delete()


def change_password(user) -> None:
    user.set_password("a-new-password")
    user.save()


@pytest.mark.parametrize("ending", [end_sessions_by_logout, change_password])
async def test_a_session_that_has_ended_opens_no_socket(student, ending):
    cookie = await sync_to_async(session_cookie)(student)
    await sync_to_async(ending)(student)

    accepted, _ = await socket(cookie).connect()

    assert not accepted


async def test_socket_opened_from_another_origin_is_refused(student):
    cookie = await sync_to_async(session_cookie)(student)
    for origin in ("https://evil.example", settings.COMFY_PUBLIC_ORIGIN):
        communicator = socket(cookie, origin=origin)
        accepted, _ = await communicator.connect()
        assert not accepted, origin


async def test_student_is_sent_their_tasks_at_once_on_connect(cap_one, student, other_student, submit):
    running = await sync_to_async(submit)(student)
    await sync_to_async(start_running)(running)
    theirs = await sync_to_async(submit)(other_student)
    waiting = await sync_to_async(submit)(student)
    cookie = await sync_to_async(session_cookie)(student)

    communicator, frame = await connected(cookie)

    assert frame["type"] == "queue"
    assert frame["queue"]["max_concurrent"] == 1
    assert frame["queue"]["processing_count"] == 1
    assert frame["queue"]["queue_length"] == 2
    tasks = by_id(frame["tasks"])
    assert set(tasks) == {str(running.id), str(waiting.id)}, "a student sees only their own tasks"
    assert tasks[str(running.id)]["status"] == "processing"
    assert tasks[str(waiting.id)]["status"] == "queued"
    assert tasks[str(waiting.id)]["position"] == 2, "the other student's task is ahead"
    assert tasks[str(waiting.id)]["estimated_wait_seconds"] > 0
    assert str(theirs.id) not in json.dumps(frame)
    assert "board" not in frame
    await communicator.disconnect()


async def test_teacher_sees_the_whole_queue(cap_one, student, other_student, teacher, submit):
    first = await sync_to_async(submit)(student)
    await sync_to_async(start_running)(first)
    second = await sync_to_async(submit)(other_student)
    cookie = await sync_to_async(session_cookie)(teacher)

    communicator, frame = await connected(cookie)

    board = frame["board"]
    assert [task["task_id"] for task in board["running"]] == [str(first.id)]
    assert [(task["task_id"], task["username"], task["position"]) for task in board["waiting"]] == [
        (str(second.id), "bob", 1)
    ]
    assert frame["tasks"] == [], "the teacher has no tasks of their own"
    await communicator.disconnect()


async def test_a_queue_change_reaches_every_socket(cap_one, make_student, teacher, submit):
    students = [await sync_to_async(make_student)() for _ in range(4)]
    tasks = [await sync_to_async(submit)(student) for student in students]
    sockets = []
    for person in [*students, teacher]:
        communicator, _frame = await connected(await sync_to_async(session_cookie)(person))
        sockets.append(communicator)

    await sync_to_async(queue.cancel_task)(actor=students[0], task=tasks[0])
    await broadcast.broadcast_queue_snapshot()

    frames = [await communicator.receive_json_from(timeout=5) for communicator in sockets]
    (cancelled,) = frames[0]["tasks"]
    assert cancelled["status"] == "cancelled"
    for position, frame in enumerate(frames[1:4], start=1):
        (own,) = frame["tasks"]
        assert (own["status"], own["position"]) == ("queued", position)
    assert [task["position"] for task in frames[4]["board"]["waiting"]] == [1, 2, 3]
    assert [task["task_id"] for task in frames[4]["board"]["finished"]] == [str(tasks[0].id)]
    for communicator in sockets:
        assert await communicator.receive_nothing()
        await communicator.disconnect()


async def test_finished_task_carries_comfyui_error_and_node_errors(student, submit):
    task = await sync_to_async(submit)(student)
    comfy_error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}
    node_errors = {
        "1": {"class_type": "EmptyImage", "errors": [{"message": "Value too big", "details": "width"}]}
    }
    await sync_to_async(Task.objects.filter(pk=task.pk).update)(
        status=TaskStatus.FAILED,
        reason="validation",
        finished_at=timezone.now(),
        comfy_error=comfy_error,
        node_errors=node_errors,
    )
    communicator, frame = await connected(await sync_to_async(session_cookie)(student))

    (failed,) = frame["tasks"]
    assert (failed["status"], failed["reason"]) == ("failed", "validation")
    assert failed["error"] == comfy_error
    assert failed["node_errors"] == node_errors
    await communicator.disconnect()


async def test_an_older_snapshot_never_replaces_a_newer_one(student, submit):
    await sync_to_async(submit)(student)
    communicator, first = await connected(await sync_to_async(session_cookie)(student))

    stale = await sync_to_async(broadcast.read_queue_snapshot)()
    stale = broadcast.QueueSnapshot(first["as_of"] - 1, stale.queue, {}, stale.board)
    await get_channel_layer().group_send(
        broadcast.OWNERS_GROUP, broadcast.snapshot_events(stale)[broadcast.OWNERS_GROUP]
    )

    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()


async def test_what_a_client_sends_is_ignored(student, submit):
    task = await sync_to_async(submit)(student)
    communicator, _frame = await connected(await sync_to_async(session_cookie)(student))

    await communicator.send_to(text_data="{not json")
    await communicator.send_to(bytes_data=b"\x00\xff")
    await sync_to_async(queue.cancel_task)(actor=student, task=task)
    await broadcast.broadcast_queue_snapshot()

    frame = await communicator.receive_json_from(timeout=5)
    assert frame["tasks"][0]["status"] == "cancelled"
    await communicator.disconnect()


def stalling(app, stalled: asyncio.Event, released: asyncio.Event):
    """`app`, but a frame sent while `stalled` is set waits for `released`, as a send into a
    socket whose client stopped reading waits for its buffer to drain."""

    async def wrapped(scope, receive, send):
        async def send_when_the_client_reads(message):
            if message["type"] == "websocket.send" and stalled.is_set():
                await released.wait()
            await send(message)

        await app(scope, receive, send_when_the_client_reads)

    return wrapped


async def test_a_socket_whose_client_stops_reading_holds_up_no_other(cap_one, make_student, submit):
    students = [await sync_to_async(make_student)() for _ in range(4)]
    tasks = [await sync_to_async(submit)(student) for student in students]
    stalled, released = asyncio.Event(), asyncio.Event()
    slow_headers = [
        (b"origin", settings.SITE_ORIGIN.encode()),
        (b"host", b"127.0.0.1:8080"),
        (b"cookie", await sync_to_async(session_cookie)(students[3])),
    ]
    slow = WebsocketCommunicator(stalling(application, stalled, released), QUEUE_PATH, headers=slow_headers)
    assert (await slow.connect())[0]
    assert (await slow.receive_json_from())["tasks"][0]["position"] == 4
    fast, _frame = await connected(await sync_to_async(session_cookie)(students[2]))
    stalled.set()

    # Three changes while the slow client reads nothing: the other socket gets each at once.
    for head in range(3):
        await sync_to_async(queue.cancel_task)(actor=students[head], task=tasks[head])
        await broadcast.broadcast_queue_snapshot()
        (own,) = (await fast.receive_json_from(timeout=5))["tasks"]
        assert (own["status"], own["position"]) == (("queued", 2 - head) if head < 2 else ("cancelled", 0))
    assert await slow.receive_nothing(timeout=0.1)

    # Once it reads again: the frame it was being sent, then only the newest state.
    released.set()
    assert (await slow.receive_json_from(timeout=5))["tasks"][0]["position"] == 3
    (own,) = (await slow.receive_json_from(timeout=5))["tasks"]
    assert (own["status"], own["position"]) == ("queued", 1)
    assert await slow.receive_nothing()
    for communicator in (slow, fast):
        await communicator.disconnect()


async def test_started_eagerly_a_coroutine_that_never_waits_is_done_without_a_task():
    done = []

    async def send_now():
        done.append("sent")

    assert start_eagerly(send_now()) is None
    assert done == ["sent"]


async def test_started_eagerly_a_coroutine_that_waits_is_finished_by_a_task():
    room = asyncio.Event()
    steps = []

    async def send_when_there_is_room():
        steps.append("tried")
        await room.wait()
        steps.append("sent")
        return "frame"

    task = start_eagerly(send_when_there_is_room())
    assert steps == ["tried"]
    room.set()
    assert await task == "frame"
    assert steps == ["tried", "sent"]


async def test_cancelling_an_eagerly_started_send_reaches_the_coroutine():
    cleaned_up = asyncio.Event()

    async def send_forever():
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()

    task = start_eagerly(send_forever())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned_up.is_set()


def test_frames_are_valid_json_with_chinese_text_and_own_tasks_only(student, other_student, submit):
    mine, theirs = submit(student), submit(other_student)
    snapshot = broadcast.read_queue_snapshot()
    event = broadcast.snapshot_events(snapshot)[broadcast.OWNERS_GROUP]
    event["queue"] = json.dumps({"note": "前方还有 1 人排队"}, ensure_ascii=False).encode()

    frame = json.loads(broadcast.render_frame(event, broadcast.Viewer(student.pk)))

    assert frame["queue"] == {"note": "前方还有 1 人排队"}
    assert [task["task_id"] for task in frame["tasks"]] == [str(mine.id)]
    assert str(theirs.id) not in json.dumps(frame)


def test_layer_decodes_a_message_once_for_all_its_receivers():
    layer = SharedDecodePubSubChannelLayer()
    raw = layer.serialize({"type": "queue.snapshot", "as_of": 1.0})
    same_content_other_message = bytes(bytearray(raw))

    first, second = layer.deserialize(raw), layer.deserialize(raw)
    third = layer.deserialize(same_content_other_message)

    assert first is second
    assert third == first
    assert third is not first


def test_a_snapshot_reads_the_tasks_in_one_statement(make_student, submit, django_assert_max_num_queries):
    students = [make_student() for _ in range(5)]
    for student in students:
        start_running(submit(student))
        submit(student)

    # The queue settings, the recent run times (a cache miss), and the tasks: never one per task.
    with django_assert_max_num_queries(3):
        snapshot = broadcast.read_queue_snapshot()
    with django_assert_max_num_queries(3):
        own = broadcast.read_queue_snapshot(owner_id=students[-1].pk)

    assert (snapshot.queue["processing_count"], snapshot.queue["queue_length"]) == (5, 5)
    assert [task["position"] for task in snapshot.board["waiting"]] == [1, 2, 3, 4, 5]
    assert [task["status"] for task in own.tasks_by_owner[students[-1].pk]] == ["processing", "queued"]
    assert own.tasks_by_owner[students[-1].pk][1]["position"] == 5
    assert set(own.tasks_by_owner) == {students[-1].pk}
